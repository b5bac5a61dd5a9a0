//! `/metrics`, `/healthz`, `/readyz`, and the status page (`/`,
//! `/status.json`) on `[metrics] listen`.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use spool::Spool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Something that keeps the relay from doing its job.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// `spool`, `account`, ...
    pub component: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    pub problem: String,
    /// What fixes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

pub type Readiness = Arc<dyn Fn() -> Vec<Problem> + Send + Sync>;

/// Gauges computed when scraped: from the spool, and from the delivery
/// side's account states.
#[derive(Clone, Default)]
pub struct QueueGauges {
    messages: Gauge,
    oldest_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    paused: Family<PauseLabels, Gauge>,
    held: Family<AccountLabel, Gauge>,
    accepting: Gauge,
    free: Gauge,
    reserve: Gauge,
    syncs: Counter,
    synced_ops: Counter,
    /// Two scrapes at once must not both add the same increase.
    counting: Arc<std::sync::Mutex<()>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabel {
    account: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PauseLabels {
    account: String,
    reason: &'static str,
}

/// The `reason` of `oauthrelay_account_paused`.
fn pause_reason(kind: outbound::PauseKind) -> &'static str {
    kind.as_str()
}

const PAUSE_KINDS: [outbound::PauseKind; 4] = [
    outbound::PauseKind::DailyLimit,
    outbound::PauseKind::LoginThrottled,
    outbound::PauseKind::Unreachable,
    outbound::PauseKind::RateLimited,
];

impl QueueGauges {
    pub fn register(registry: &mut Registry) -> QueueGauges {
        let g = QueueGauges::default();
        registry.register(
            "oauthrelay_queue_messages",
            "Messages in the queue",
            g.messages.clone(),
        );
        registry.register(
            "oauthrelay_queue_oldest_age_seconds",
            "Age of the oldest queued message",
            g.oldest_age.clone(),
        );
        registry.register(
            "oauthrelay_account_paused",
            "1 while delivery for the account is paused, by reason (daily_limit, login_throttled, unreachable, rate_limited); it resumes by itself",
            g.paused.clone(),
        );
        registry.register(
            "oauthrelay_spool_syncs",
            "Group commits: fdatasyncs of the spool that acknowledged waiting writes",
            g.syncs.clone(),
        );
        registry.register(
            "oauthrelay_spool_synced_operations",
            "Spool writes (commits, updates, removals) acknowledged by those syncs",
            g.synced_ops.clone(),
        );
        registry.register(
            "oauthrelay_account_held",
            "1 while the account's mail is held until a human acts (authorization)",
            g.held.clone(),
        );
        registry.register(
            "oauthrelay_spool_accepting",
            "1 while the spool takes new mail, 0 while it refuses it (free space at [spool] min_free_space, or writes failing)",
            g.accepting.clone(),
        );
        registry.register(
            "oauthrelay_spool_free_bytes",
            "Free space on the spool's file system above [spool] min_free_space: what new mail may still use",
            g.free.clone(),
        );
        registry.register(
            "oauthrelay_spool_reserve_bytes",
            "[spool] min_free_space: free space kept for deliveries, removals and compaction",
            g.reserve.clone(),
        );
        g
    }

    fn refresh(&self, spool: &Spool, accounts: &[outbound::AccountState]) {
        self.paused.clear();
        self.held.clear();
        for a in accounts {
            let label = AccountLabel {
                account: a.name.clone(),
            };
            let paused = a.paused_until.map(|_| a.pause_kind);
            for kind in PAUSE_KINDS {
                self.paused
                    .get_or_create(&PauseLabels {
                        account: a.name.clone(),
                        reason: pause_reason(kind),
                    })
                    .set(i64::from(paused == Some(Some(kind))));
            }
            self.held
                .get_or_create(&label)
                .set(i64::from(a.held.is_some()));
        }
        // The spool counts; the counters follow.
        let _one = self.counting.lock().unwrap_or_else(|p| p.into_inner());
        let c = spool.sync_counts();
        self.syncs.inc_by(c.syncs.saturating_sub(self.syncs.get()));
        self.synced_ops
            .inc_by(c.operations.saturating_sub(self.synced_ops.get()));
        self.accepting.set(i64::from(spool.health().is_ok()));
        if let Some(room) = spool.room_for_mail() {
            self.free.set(i64::try_from(room).unwrap_or(i64::MAX));
        }
        self.reserve
            .set(i64::try_from(spool.min_free_space()).unwrap_or(i64::MAX));
        let (n, oldest) = spool.stats();
        self.messages.set(n as i64);
        let age = oldest
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.oldest_age.set(age);
    }
}

struct AppState {
    registry: Registry,
    spool: Spool,
    outbound: outbound::Outbound,
    gauges: QueueGauges,
    readiness: Readiness,
}

/// Serve until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    spool: Spool,
    outbound: outbound::Outbound,
    gauges: QueueGauges,
    readiness: Readiness,
    status: crate::status::Sources,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = Arc::new(AppState {
        registry,
        spool,
        outbound,
        gauges,
        readiness,
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
        .merge(status_routes(status));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// OpenMetrics when the scraper prefers it (Prometheus does, by default),
/// else the Prometheus text format 0.0.4 (`promtool check metrics`, curl,
/// older scrapers), as the Go client negotiates.
async fn metrics(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    s.gauges.refresh(&s.spool, &s.outbound.account_states());
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut body = String::new();
    let (encoded, content_type) = if wants_openmetrics(accept) {
        (
            prometheus_client::encoding::text::encode(&mut body, &s.registry),
            OPENMETRICS,
        )
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut body, &s.registry),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    };
    match encoded {
        Ok(()) => (
            [
                (header::CONTENT_TYPE, content_type),
                (header::VARY, "Accept"),
            ],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Does `accept` rank `application/openmetrics-text` above the text
/// format? A tie, or no preference at all, gets the text format.
fn wants_openmetrics(accept: &str) -> bool {
    let mut openmetrics = 0.0f32;
    let mut text = 0.0f32;
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .and_then(|(_, v)| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics > text
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    let mut problems = (s.readiness)();
    let mut spool_full = None;
    if let Err(e) = s.spool.health() {
        let full = e.is_disk_full();
        let free = s.spool.free_space();
        let reserved = s.spool.min_free_space();
        problems.push(Problem {
            component: "spool".into(),
            account: None,
            problem: if full {
                format!(
                    "the spool is full: new mail gets 452 4.3.1 ({} bytes free, {reserved} kept back by [spool] min_free_space); queued mail still goes out",
                    free.map(|f| f.to_string()).unwrap_or_else(|| "unknown".into())
                )
            } else {
                format!("the spool cannot be written: {e}")
            },
            fix: Some(format!(
                "free space on the file system of {}",
                s.spool.dir().display()
            )),
        });
        if full {
            spool_full = Some(serde_json::json!({
                "free_bytes": free,
                "reserved_bytes": reserved,
            }));
        }
    }
    // A pause (daily limit, throttling, an upstream outage) is routine and
    // ends by itself: the relay is ready, but says so.
    let paused: Vec<serde_json::Value> = s
        .outbound
        .account_states()
        .into_iter()
        .filter_map(|a| {
            let until = a.paused_until?;
            Some(serde_json::json!({
                "account": a.name,
                "paused_until": humantime::format_rfc3339_seconds(until).to_string(),
                "reason": a.pause_reason,
            }))
        })
        .collect();
    if problems.is_empty() {
        let mut body = serde_json::json!({ "status": "ready" });
        if !paused.is_empty() {
            body["paused"] = serde_json::Value::Array(paused);
        }
        (StatusCode::OK, axum::Json(body)).into_response()
    } else {
        let mut body = serde_json::json!({ "status": "not ready", "problems": problems });
        if let Some(full) = spool_full {
            // Machine-readable: a load balancer or a check script keys on it.
            body["reason"] = "spool_full".into();
            body["spool"] = full;
        }
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
    }
}

/// `/` (HTML) and `/status.json`: the same snapshot.
fn status_routes(sources: crate::status::Sources) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/status.json", get(status_json))
        .with_state(Arc::new(sources))
}

/// The snapshot reads the whole queue index: off the async threads.
async fn snapshot(s: Arc<crate::status::Sources>) -> Option<crate::status::Snapshot> {
    tokio::task::spawn_blocking(move || s.snapshot()).await.ok()
}

/// No script may run and nothing may load from elsewhere, whatever the
/// page contains; it is never cached or framed.
const STATUS_HEADERS: [(header::HeaderName, &str); 4] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::CACHE_CONTROL, "no-store"),
    (header::REFERRER_POLICY, "no-referrer"),
];

async fn status_page(State(s): State<Arc<crate::status::Sources>>) -> Response {
    match snapshot(s).await {
        Some(snap) => (
            STATUS_HEADERS,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            crate::status::render(&snap),
        )
            .into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn status_json(State(s): State<Arc<crate::status::Sources>>) -> Response {
    match snapshot(s).await {
        Some(snap) => (STATUS_HEADERS, axum::Json(snap)).into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::wants_openmetrics;

    #[test]
    fn the_format_follows_the_accept_header() {
        // What Prometheus 2.x and 3.x send by default.
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
        ));
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;version=1.0.0;q=0.3,*/*;q=0.1"
        ));
        assert!(wants_openmetrics("application/openmetrics-text"));
        // Prometheus told to scrape the text format, curl, promtool users.
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics(
            "text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5"
        ));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0"));
        assert!(!wants_openmetrics("application/json"));
    }
}
