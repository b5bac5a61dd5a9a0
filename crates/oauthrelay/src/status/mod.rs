//! The status page (`/` on the metrics listener) and `/status.json`: what
//! a person checking on the relay wants to see at a glance. Each account's
//! token and delivery state with what fixes it, the queue, the last
//! delivery attempts, version and uptime.
//!
//! One [`Snapshot`] feeds both: the JSON is its serialization, the HTML
//! (`page.rs`) renders it. Nothing here holds a secret: the token manager's
//! status carries expiry times and error texts, never a token, and the
//! rest comes from the queue and the delivery log.

mod page;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use oauth::{AccountStatus, AuthState, TokenManager};
use outbound::{AccountState, AttemptRecord, DeliveryState, HoldReason, Outbound, QueueState};
use serde::Serialize;
use spool::Spool;

pub use page::render;

/// How often the page reloads itself (`<meta http-equiv="refresh">`).
pub const REFRESH: Duration = Duration::from_secs(10);

/// Held messages are grouped by reason; at most this many groups are shown.
const HELD_GROUPS: usize = 10;

/// Where the status comes from.
#[derive(Clone)]
pub struct Sources {
    pub spool: Spool,
    pub outbound: Outbound,
    pub tokens: TokenManager,
    /// `[server] hostname` (the greeting's name).
    pub hostname: String,
}

/// Everything the page shows, at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub version: &'static str,
    pub hostname: String,
    #[serde(serialize_with = "rfc3339")]
    pub now: SystemTime,
    #[serde(serialize_with = "rfc3339")]
    pub started: SystemTime,
    pub uptime_seconds: u64,
    /// `ok`, or `attention` when an account is held or the spool refuses
    /// mail (a pause is routine and ends by itself).
    pub status: &'static str,
    pub accounts: Vec<AccountView>,
    pub queue: QueueView,
    pub spool: SpoolView,
    /// The last delivery attempts, newest first.
    pub attempts: Vec<AttemptView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AccountView {
    pub name: String,
    pub email: String,
    /// `ready`, `paused` (resumes by itself) or `held` (waits for a
    /// person).
    pub state: &'static str,
    pub token: TokenView,
    pub paused: Option<PauseView>,
    pub held: Option<HeldView>,
    /// What to run or change now, if anything.
    pub fix: Option<String>,
    /// Messages routed to the account and not yet done.
    pub queued: usize,
    pub in_flight: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenView {
    /// `valid` (an access token in hand), `none yet` (authorized; one is
    /// fetched when needed), `failing` (refreshes fail; retried),
    /// `needs authorization`.
    pub state: &'static str,
    pub authorized: bool,
    #[serde(serialize_with = "opt_rfc3339")]
    pub expires_at: Option<SystemTime>,
    pub last_refresh: Option<RefreshView>,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RefreshView {
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    /// `ok` or `error`.
    pub result: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PauseView {
    #[serde(serialize_with = "rfc3339")]
    pub until: SystemTime,
    /// `daily_limit`, `login_throttled`, `unreachable`, `rate_limited`
    /// (the `reason` of `oauthrelay_account_paused`).
    pub reason: &'static str,
    /// The reply or error that caused it.
    pub reply: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeldView {
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueView {
    pub messages: usize,
    pub queued: usize,
    pub deferred: usize,
    pub held: usize,
    pub failed: usize,
    /// Being attempted right now.
    pub in_flight: usize,
    /// Failure reports dropped since the relay started: even the
    /// postmaster's copy failed (`oauthrelay_messages_dropped_total`).
    pub dropped: u64,
    pub oldest: Option<OldestView>,
    pub next_retry: Option<NextRetryView>,
    /// Held messages by reason, the largest groups first.
    pub held_reasons: Vec<HeldGroup>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OldestView {
    pub id: String,
    pub from: String,
    /// The client's HELO/EHLO name.
    pub helo: String,
    pub client: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub received: SystemTime,
    pub age_seconds: u64,
    pub state: &'static str,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NextRetryView {
    pub id: String,
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeldGroup {
    pub reason: String,
    pub messages: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpoolView {
    pub accepting: bool,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptView {
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    pub queue_id: String,
    pub account: String,
    pub recipients: Vec<String>,
    /// `sent`, `deferred`, `bounced` or `held`, as in the log.
    pub result: &'static str,
    pub dsn: String,
    pub delay_seconds: f64,
    pub attempt: u32,
    pub relay: Option<String>,
    pub reply: String,
}

impl Sources {
    /// Gather the snapshot. Reads the whole queue index once: call it off
    /// the async threads (`spawn_blocking`) for big queues.
    pub fn snapshot(&self) -> Snapshot {
        let now = SystemTime::now();
        let started = crate::process::started();
        let states = self.outbound.account_states();
        let tokens = self.tokens.status();
        let accounts: Vec<AccountView> = states
            .iter()
            .map(|a| account_view(a, tokens.iter().find(|t| t.account == a.name), now))
            .collect();
        let mut queue = queue_view(&self.spool, now);
        queue.in_flight = states.iter().map(|a| a.in_flight).sum();
        queue.dropped = self.outbound.dropped();
        let spool = match self.spool.health() {
            Ok(()) => SpoolView {
                accepting: true,
                problem: None,
            },
            Err(e) => SpoolView {
                accepting: false,
                problem: Some(format!(
                    "new mail is refused: {e} ({} bytes free, {} kept back by [spool] min_free_space); free space on the file system of {}",
                    self.spool
                        .free_space()
                        .map(|f| f.to_string())
                        .unwrap_or_else(|| "unknown".into()),
                    self.spool.min_free_space(),
                    self.spool.dir().display()
                )),
            },
        };
        let attention =
            !spool.accepting || accounts.is_empty() || accounts.iter().any(|a| a.state == "held");
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            hostname: self.hostname.clone(),
            now,
            started,
            uptime_seconds: now.duration_since(started).unwrap_or_default().as_secs(),
            status: if attention { "attention" } else { "ok" },
            accounts,
            queue,
            spool,
            attempts: self
                .outbound
                .recent_attempts()
                .iter()
                .map(attempt_view)
                .collect(),
        }
    }
}

fn account_view(a: &AccountState, t: Option<&AccountStatus>, now: SystemTime) -> AccountView {
    let token = match t {
        Some(t) => token_view(t, now),
        None => TokenView {
            state: "unknown",
            authorized: false,
            expires_at: None,
            last_refresh: None,
            problem: Some("not known to the token manager".into()),
        },
    };
    let paused = a.paused_until.map(|until| PauseView {
        until,
        reason: a.pause_kind.map(|k| k.as_str()).unwrap_or("unreachable"),
        reply: a.pause_reason.clone(),
    });
    let (state, fix) = match (&a.held, &paused) {
        (Some(h), _) => ("held", Some(hold_fix(h))),
        (None, Some(p)) => (
            "paused",
            Some(format!(
                "nothing to do: delivery resumes by itself at {}; to try now: oauthrelay queue retry --all",
                humantime::format_rfc3339_seconds(p.until)
            )),
        ),
        (None, None) => ("ready", None),
    };
    AccountView {
        name: a.name.clone(),
        email: a.email.clone(),
        state,
        token,
        paused,
        held: a.held.as_ref().map(|h| HeldView {
            reason: hold_problem(h),
        }),
        fix,
        queued: a.queued,
        in_flight: a.in_flight,
    }
}

fn token_view(t: &AccountStatus, now: SystemTime) -> TokenView {
    let valid = t.access_token_expires_at.is_some_and(|e| e > now);
    let state = match &t.auth {
        AuthState::NeedsAuthorization(_) => "needs authorization",
        AuthState::Authorized { trouble: Some(_) } => "failing",
        AuthState::Authorized { trouble: None } if valid => "valid",
        AuthState::Authorized { trouble: None } => "none yet",
    };
    TokenView {
        state,
        authorized: t.auth.is_authorized(),
        expires_at: t.access_token_expires_at,
        last_refresh: t.last_refresh.as_ref().map(|r| RefreshView {
            at: r.at,
            // Its serialized name: `ok` or `error`.
            result: serde_json::to_value(r.result)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            error: r.error.clone(),
        }),
        problem: t.auth.problem().map(str::to_string),
    }
}

/// What is wrong, without the fix (shown apart).
fn hold_problem(h: &HoldReason) -> String {
    match h {
        HoldReason::NeedsAuthorization { problem, .. } => {
            format!("needs authorization: {problem}")
        }
        HoldReason::Refused { problem, .. } => format!("refused by its provider: {problem}"),
        other => other.to_string(),
    }
}

/// The command (or change) that lifts the hold.
fn hold_fix(h: &HoldReason) -> String {
    match h {
        HoldReason::NeedsAuthorization { fix, .. } | HoldReason::Refused { fix, .. } => fix.clone(),
        HoldReason::UnknownToTokenManager { .. } => "systemctl reload oauthrelay".into(),
        HoldReason::AccountNotConfigured { .. } | HoldReason::NoRoute { .. } => {
            "add or correct an [[accounts]] entry, then: systemctl reload oauthrelay".into()
        }
        HoldReason::Recorded { .. } => "oauthrelay queue retry --all".into(),
    }
}

fn queue_view(spool: &Spool, now: SystemTime) -> QueueView {
    let mut q = QueueView::default();
    let mut held: BTreeMap<String, usize> = BTreeMap::new();
    let mut oldest: Option<(spool::MessageId, spool::Queued, DeliveryState)> = None;
    for (id, m) in spool.list() {
        let d = DeliveryState::of(id, &m);
        q.messages += 1;
        match d.queue_state(now) {
            QueueState::Queued => q.queued += 1,
            QueueState::Deferred => q.deferred += 1,
            QueueState::Held => q.held += 1,
            QueueState::Failed => q.failed += 1,
        }
        if let Some(h) = &d.hold {
            *held.entry(h.reason.to_string()).or_default() += 1;
        } else if let Some(at) = d.next_attempt.filter(|t| *t > now)
            && q.next_retry.as_ref().is_none_or(|n| at < n.at)
        {
            q.next_retry = Some(NextRetryView {
                id: id.to_string(),
                at,
            });
        }
        if oldest
            .as_ref()
            .is_none_or(|(_, o, _)| m.envelope.received < o.envelope.received)
        {
            oldest = Some((id, m, d));
        }
    }
    q.oldest = oldest.map(|(id, m, d)| OldestView {
        id: id.to_string(),
        from: m.envelope.sender.clone(),
        helo: m.envelope.helo.clone(),
        client: m.envelope.client.clone(),
        received: m.envelope.received,
        age_seconds: now
            .duration_since(m.envelope.received)
            .unwrap_or_default()
            .as_secs(),
        state: d.queue_state(now).as_str(),
        last_error: d.last_error.as_ref().map(ToString::to_string),
    });
    let mut groups: Vec<HeldGroup> = held
        .into_iter()
        .map(|(reason, messages)| HeldGroup { reason, messages })
        .collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.messages));
    groups.truncate(HELD_GROUPS);
    q.held_reasons = groups;
    q
}

fn attempt_view(r: &AttemptRecord) -> AttemptView {
    AttemptView {
        at: r.at,
        queue_id: r.queue_id.to_string(),
        account: r.account.clone(),
        recipients: r.recipients.clone(),
        result: r.status.as_str(),
        dsn: r.dsn.to_string(),
        delay_seconds: (r.delay.as_secs_f64() * 100.0).round() / 100.0,
        attempt: r.attempt,
        relay: r.relay.clone(),
        reply: r.reply.clone(),
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_seconds(*t))
}

fn opt_rfc3339<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}
