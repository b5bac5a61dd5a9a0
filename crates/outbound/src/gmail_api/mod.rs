//! The Gmail API transport: `users.messages.send` with the raw message as
//! `message/rfc822`, needing only the `gmail.send` scope.
//!
//! - Up to 5 MB: one simple upload (`uploadType=media`). Above, up to
//!   Gmail's 35 MB: a resumable upload (`uploadType=resumable`); when the
//!   connection drops or the server fails mid-upload, a status query
//!   (`PUT` with `Content-Range: bytes */N`) says how much arrived and the
//!   upload resumes from there; when it says the upload completed (the
//!   final answer was lost), the message counts as sent: no second copy.
//! - The body streams from the spool (`Body`), never read whole.
//! - One `reqwest` client per account (a connection pool shared by its
//!   workers): HTTP/2 when ALPN offers it, HTTP/1.1 otherwise.
//! - Recipients are the envelope's exactly (`recipients.rs`).
//! - Errors are classified by reason and message (`errors.rs`); `401`
//!   refreshes the token once, then holds the account.
//! - Only `users.messages.send` is ever called: the `gmail.send` scope
//!   allows nothing else.

pub(crate) mod errors;
pub(crate) mod recipients;

use std::future::pending;
use std::sync::Arc;
use std::time::Duration;

use oauth::{AccessToken, TokenManager};
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE, RETRY_AFTER};
use secrecy::ExposeSecret;
use spool::SpoolError;

use self::errors::{ApiError, classify};
use self::recipients::Plan;
use crate::body::{self, Body, MAX_HEADER, rewrite_headers};
use crate::classify::{AccountSignal, RcptOutcome};
use crate::clock::Clock;
use crate::reply::{Answer, Reply, Status};
use crate::smtp::session::{AccountCtx, OpenError};
use crate::transport::{Attempt, Outgoing, ProbeReport, Transport};

/// `users.messages.send`'s upload path.
pub(crate) const SEND_PATH: &str = "/upload/gmail/v1/users/me/messages/send";
/// Simple uploads up to this size (Google: "5 MB or less").
pub(crate) const SIMPLE_MAX: u64 = 5 * 1024 * 1024;
/// Gmail's limit for a message through the API.
pub(crate) const MAX_MESSAGE: u64 = 35 * 1024 * 1024;
/// Status queries and resumptions per attempt before giving up for now.
const RESUME_TRIES: u32 = 5;

/// The HTTP client for an account: its CA roots, ALPN h2 + http/1.1, no
/// redirects (a `308` is the resumable protocol's, not a redirect).
pub(crate) fn client(
    tls: &Result<Arc<rustls::ClientConfig>, String>,
    connect_timeout: Duration,
) -> Result<reqwest::Client, String> {
    let tls = tls.as_ref().map_err(Clone::clone)?;
    let mut tls = (**tls).clone();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("oauthrelay/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("HTTP client setup: {e}"))
}

/// What one send came to.
enum Sent {
    /// Gmail's message id.
    Ok(String),
    /// An error answer.
    Api(ApiError),
    /// No answer: network, TLS, timeout, reset.
    Net(String),
    Spool(SpoolError),
}

/// The Gmail API for one account.
pub(crate) struct GmailApiTransport {
    ctx: Arc<AccountCtx>,
    tokens: TokenManager,
    /// The delivery side's clock: "now" for pauses until a given time.
    clock: Clock,
}

impl GmailApiTransport {
    pub(crate) fn new(
        ctx: Arc<AccountCtx>,
        tokens: TokenManager,
        clock: Clock,
    ) -> GmailApiTransport {
        GmailApiTransport { ctx, tokens, clock }
    }

    pub(crate) fn serves(&self, ctx: &Arc<AccountCtx>) -> bool {
        Arc::ptr_eq(&self.ctx, ctx)
    }
}

/// `host[:port]` of the API, for the log's `relay=`.
fn relay(ctx: &AccountCtx) -> String {
    let u = ctx.config.api_url.url();
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => u.to_string(),
    }
}

fn base(ctx: &AccountCtx) -> String {
    ctx.config
        .api_url
        .as_str()
        .trim_end_matches('/')
        .to_string()
}

impl Transport for GmailApiTransport {
    async fn deliver(&mut self, msg: &Outgoing<'_>) -> Attempt {
        let mut a = Attempt {
            relay: Some(relay(&self.ctx)),
            ..Attempt::default()
        };
        let ctx = self.ctx.clone();
        let acct = &ctx.config;
        let all = |o: RcptOutcome, a: &mut Attempt| {
            for &i in msg.recipients {
                a.outcomes.push((i, o.clone()));
            }
        };
        let local = |e: SpoolError, a: &mut Attempt| {
            if matches!(e, SpoolError::NotFound(_)) {
                a.gone = true;
                return;
            }
            let answer = Answer::error(format!("local error reading the queued message: {e}"));
            a.local.extend(msg.recipients);
            all(RcptOutcome::Deferred(answer), a);
        };
        let client = match &ctx.api {
            Some(Ok(c)) => c.clone(),
            Some(Err(e)) => {
                let answer = Answer::error(e);
                all(RcptOutcome::Deferred(answer.clone()), &mut a);
                a.signal = Some(AccountSignal::Unreachable(answer));
                return a;
            }
            None => {
                let answer = Answer::error("no HTTP client for the Gmail API");
                all(RcptOutcome::Deferred(answer.clone()), &mut a);
                a.signal = Some(AccountSignal::Unreachable(answer));
                return a;
            }
        };
        let rcpts: Vec<String> = msg
            .recipients
            .iter()
            .filter_map(|&i| msg.envelope.recipients.get(i).cloned())
            .collect();
        let header = match body::read_headers(msg.spool, msg.id, MAX_HEADER).await {
            Ok(h) => h,
            Err(e) => {
                local(e, &mut a);
                return a;
            }
        };
        let plan = recipients::plan(&header, &rcpts);
        if let Some(what) = plan.describe() {
            let id = msg.id;
            tracing::info!(queue_id = %id, account = %acct.name, "{id}: {what}");
            a.note = Some(what);
        }
        let opener = Opener {
            msg,
            plan: &plan,
            rcpts: &rcpts,
        };
        let size = match opener.open().await {
            Ok(b) => b.size,
            Err(e) => {
                local(e, &mut a);
                return a;
            }
        };
        if size > MAX_MESSAGE {
            all(
                RcptOutcome::Failed(Answer::Reply(Reply::new(
                    552,
                    Some(Status::new(5, 3, 4)),
                    &format!(
                        "message of {size} bytes exceeds the Gmail API's limit of {MAX_MESSAGE} bytes"
                    ),
                ))),
                &mut a,
            );
            return a;
        }
        let mut refreshed = false;
        loop {
            let token = match self.tokens.access_token(&acct.name).await {
                Ok(t) => t,
                Err(e) => {
                    let sig = OpenError::Token(e).signal(&acct.email);
                    all(RcptOutcome::Deferred(sig.answer().clone()), &mut a);
                    a.signal = Some(sig);
                    return a;
                }
            };
            let up = Upload {
                client: &client,
                base: base(&ctx),
                token: &token,
                size,
                timeout: msg.data_timeout,
                opener: &opener,
            };
            let r = if size <= SIMPLE_MAX {
                up.simple().await
            } else {
                up.resumable().await
            };
            match r {
                Sent::Ok(gmail_id) => {
                    a.connected = true;
                    a.transacted = true;
                    a.remote_id = Some(gmail_id.clone());
                    all(
                        RcptOutcome::Delivered(Answer::Reply(Reply::new(
                            250,
                            Some(Status::new(2, 0, 0)),
                            &format!("OK id={gmail_id} (Gmail API)"),
                        ))),
                        &mut a,
                    );
                }
                Sent::Api(e) if e.is_unauthenticated() => {
                    let reply = e.reply(535, Status::new(5, 7, 8));
                    // Like SMTP's 535: a fresh token once; then the token
                    // manager holds the account. Never a bounce.
                    self.tokens.invalidate(&acct.name, &token).await;
                    if !refreshed {
                        refreshed = true;
                        tracing::info!(account = %acct.name, "{reply}: trying once more with a fresh token");
                        continue;
                    }
                    self.tokens
                        .mark_rejected(&acct.name, &reply.to_string())
                        .await;
                    let answer = Answer::Reply(reply);
                    all(RcptOutcome::Deferred(answer.clone()), &mut a);
                    a.signal = Some(AccountSignal::AuthFailed(answer));
                }
                Sent::Api(e) => {
                    a.connected = true;
                    a.transacted = true;
                    let (o, s) = classify(&e, &acct.name, self.clock.now());
                    all(o, &mut a);
                    a.signal = s;
                }
                Sent::Net(why) => {
                    let answer = Answer::error(format!("Gmail API at {}: {why}", relay(&ctx)));
                    all(RcptOutcome::Deferred(answer.clone()), &mut a);
                    a.signal = Some(AccountSignal::Unreachable(answer));
                }
                Sent::Spool(e) => local(e, &mut a),
            }
            if let Some(note) = &a.note {
                // `queue show` and `queue list` show what was done to the
                // recipient headers with the last answer.
                for (_, o) in &mut a.outcomes {
                    if let RcptOutcome::Deferred(ans) | RcptOutcome::Failed(ans) = o {
                        *ans = with_note(ans, note);
                    }
                }
            }
            return a;
        }
    }

    async fn idle_closed(&mut self) {
        // The HTTP client's pool handles closed connections itself.
        pending().await
    }

    fn is_open(&self) -> bool {
        false
    }

    async fn close(&mut self) {}

    fn drop_channel(&mut self) {}

    /// The `gmail.send` scope allows no call but sending, so a probe can
    /// only show that the token endpoint gives a fresh token again; the
    /// first released message is then the real test (a refusal holds the
    /// account again, and probing starts over).
    async fn probe(&mut self) -> ProbeReport {
        let name = self.ctx.config.name.clone();
        match self.tokens.probe_token(&name).await {
            Ok(token) => {
                self.tokens.auth_accepted(&name).await;
                ProbeReport {
                    failed: None,
                    steps: vec![
                        format!(
                            "access token for {name}: refreshed (expires in {})",
                            humantime::format_duration(Duration::from_secs(
                                token.expires_in().as_secs()
                            ))
                        ),
                        "Gmail API: the gmail.send scope allows no call but sending, so the first released message is the test".to_string(),
                    ],
                }
            }
            Err(e) => {
                let step = format!("access token: {e}");
                ProbeReport {
                    failed: Some(OpenError::Token(e).signal(&self.ctx.config.email)),
                    steps: vec![step],
                }
            }
        }
    }
}

fn with_note(a: &Answer, note: &str) -> Answer {
    match a {
        Answer::Reply(r) => Answer::Reply(Reply::new(
            r.code,
            r.status,
            &format!("{} ({note})", r.text),
        )),
        Answer::Error(e) => Answer::error(format!("{e} ({note})")),
    }
}

/// Opens the message as it goes to the API: `rewrite_from` and the
/// recipient plan applied to the header section.
struct Opener<'a> {
    msg: &'a Outgoing<'a>,
    plan: &'a Plan,
    rcpts: &'a [String],
}

impl Opener<'_> {
    async fn open(&self) -> Result<Body, SpoolError> {
        let (msg, plan, rcpts) = (self.msg, self.plan, self.rcpts);
        if plan.unchanged() {
            return Body::open(msg.spool, msg.id, msg.rewrite_from).await;
        }
        let from = msg.rewrite_from;
        let t = move |h: &[u8]| {
            let h = match from {
                Some(email) => rewrite_headers(h, email),
                None => h.to_vec(),
            };
            recipients::apply(&h, plan, rcpts)
        };
        Body::open_with(msg.spool, msg.id, Some(&t)).await
    }
}

/// The body as a request body, streamed.
fn stream(body: Body) -> reqwest::Body {
    let s = futures_util::stream::unfold(Some(body), |b| async move {
        let mut b = b?;
        match b.next().await {
            Ok(Some(c)) => Some((Ok(bytes::Bytes::from(c)), Some(b))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    });
    reqwest::Body::wrap_stream(s)
}

/// `a.b.c` error chain of a request failure (never a header: no token).
fn net(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

struct Upload<'a> {
    client: &'a reqwest::Client,
    base: String,
    token: &'a AccessToken,
    size: u64,
    timeout: Duration,
    opener: &'a Opener<'a>,
}

/// The message id in a `200` answer.
async fn sent_id(resp: reqwest::Response) -> Sent {
    match resp.bytes().await {
        Ok(b) => {
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
            Sent::Ok(
                v["id"]
                    .as_str()
                    .map(crate::reply::escape_controls)
                    .unwrap_or_else(|| "unknown".into()),
            )
        }
        Err(e) => Sent::Net(net(&e)),
    }
}

async fn api_error(resp: reqwest::Response) -> Sent {
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match resp.bytes().await {
        Ok(b) => Sent::Api(ApiError::parse(status, retry.as_deref(), &b)),
        Err(e) => Sent::Net(net(&e)),
    }
}

/// `Range: bytes=0-M` -> `M + 1`; none -> 0.
fn range_end(resp: &reqwest::Response) -> u64 {
    resp.headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.trim().strip_prefix("bytes=0-"))
        .and_then(|m| m.parse::<u64>().ok())
        .map(|m| m + 1)
        .unwrap_or(0)
}

impl Upload<'_> {
    fn bearer(&self) -> String {
        format!("Bearer {}", self.token.secret().expose_secret())
    }

    async fn simple(&self) -> Sent {
        let body = match self.opener.open().await {
            Ok(b) => b,
            Err(e) => return Sent::Spool(e),
        };
        let r = self
            .client
            .post(format!("{}{SEND_PATH}?uploadType=media", self.base))
            .header(reqwest::header::AUTHORIZATION, self.bearer())
            .header(CONTENT_TYPE, "message/rfc822")
            .header(CONTENT_LENGTH, body.size)
            .body(stream(body))
            .timeout(self.timeout)
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => sent_id(resp).await,
            Ok(resp) => api_error(resp).await,
            // A lost answer to a simple upload cannot be asked about: the
            // message is tried again (at-least-once).
            Err(e) => Sent::Net(net(&e)),
        }
    }

    async fn resumable(&self) -> Sent {
        let size = self.size;
        let r = self
            .client
            .post(format!("{}{SEND_PATH}?uploadType=resumable", self.base))
            .header(reqwest::header::AUTHORIZATION, self.bearer())
            .header("X-Upload-Content-Type", "message/rfc822")
            .header("X-Upload-Content-Length", size)
            .header(CONTENT_LENGTH, 0)
            .timeout(self.timeout)
            .send()
            .await;
        let session = match r {
            Ok(resp) if resp.status().is_success() => {
                match resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()) {
                    Some(l) => l.to_string(),
                    None => {
                        return Sent::Net(
                            "no session URI (Location) in the answer to a resumable upload".into(),
                        );
                    }
                }
            }
            Ok(resp) => return api_error(resp).await,
            Err(e) => return Sent::Net(net(&e)),
        };
        // The token goes only where the API is.
        let same_origin = url::Url::parse(&session)
            .ok()
            .zip(url::Url::parse(&self.base).ok())
            .is_some_and(|(s, b)| s.origin() == b.origin());
        let auth = |rb: reqwest::RequestBuilder| {
            if same_origin {
                rb.header(reqwest::header::AUTHORIZATION, self.bearer())
            } else {
                rb
            }
        };
        let mut offset = 0u64;
        let mut tries = 0u32;
        loop {
            let mut body = match self.opener.open().await {
                Ok(b) => b,
                Err(e) => return Sent::Spool(e),
            };
            if let Err(e) = body.skip(offset).await {
                return Sent::Spool(e);
            }
            let r = auth(self.client.put(&session))
                .header(CONTENT_LENGTH, size - offset)
                .header(
                    CONTENT_RANGE,
                    format!("bytes {offset}-{}/{size}", size.saturating_sub(1)),
                )
                .body(stream(body))
                .timeout(self.timeout)
                .send()
                .await;
            let why = match r {
                Ok(resp) if resp.status().is_success() => return sent_id(resp).await,
                Ok(resp) if resp.status().as_u16() == 308 => {
                    let got = range_end(&resp);
                    if got <= offset {
                        format!("the upload stopped at byte {got} of {size}")
                    } else {
                        offset = got;
                        continue;
                    }
                }
                Ok(resp) if resp.status().is_server_error() => {
                    format!("HTTP {}", resp.status().as_u16())
                }
                Ok(resp) => return api_error(resp).await,
                Err(e) => net(&e),
            };
            // Interrupted: ask how much arrived, then resume (or find it
            // complete: the answer was lost, the message is sent).
            tries += 1;
            if tries > RESUME_TRIES {
                return Sent::Net(format!(
                    "resumable upload interrupted {RESUME_TRIES} times, last: {why}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(250) * 2u32.pow(tries - 1)).await;
            let q = auth(self.client.put(&session))
                .header(CONTENT_RANGE, format!("bytes */{size}"))
                .header(CONTENT_LENGTH, 0)
                .timeout(self.timeout)
                .send()
                .await;
            match q {
                Ok(resp) if resp.status().is_success() => {
                    tracing::info!(
                        "resumable upload: the status query found the upload complete (its answer was lost): not sending again"
                    );
                    return sent_id(resp).await;
                }
                Ok(resp) if resp.status().as_u16() == 308 => {
                    offset = range_end(&resp);
                    tracing::info!(
                        "resumable upload interrupted ({why}); resuming at byte {offset} of {size}"
                    );
                }
                Ok(resp) if resp.status().is_server_error() => continue,
                Ok(resp) => return api_error(resp).await,
                Err(e) => return Sent::Net(format!("{why}; status query: {}", net(&e))),
            }
        }
    }
}
