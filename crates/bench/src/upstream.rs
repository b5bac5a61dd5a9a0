//! The fake Google token endpoint and the fake Gmail upstreams (SMTP and
//! the Gmail API), on their own runtime (threads named `upstream-N`) so
//! their CPU time can be told apart from the load generator's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use testkit::ca::TestCa;
use testkit::gmail::FakeGmail;
use testkit::gmail_api::FakeGmailApi;
use testkit::google::FakeGoogle;
use tokio::runtime::Handle;

pub const CLIENT_ID: &str = "1234-bench.apps.googleusercontent.com";
pub const CLIENT_SECRET: &str = "GOCSPX-bench-secret";
pub const EMAIL: &str = "bench@gmail.com";
/// The scope a `transport = "gmail-api"` account is authorized with.
pub const SEND_SCOPE: &str = "https://www.googleapis.com/auth/gmail.send";

/// Everything upstream of the relays.
pub struct Upstreams {
    pub google: FakeGoogle,
    /// oauthrelay's upstream: implicit TLS, XOAUTH2 checked against `google`.
    pub gmail: FakeGmail,
    /// Postfix's upstream: the same, except that it accepts mail without
    /// AUTH (Postfix cannot do XOAUTH2).
    pub gmail_postfix: FakeGmail,
    /// oauthrelay's upstream with `transport = "gmail-api"`: HTTPS with a
    /// certificate from the same CA, bearer tokens checked against
    /// `google` (scope included), no per-user rate limit unless a run
    /// sets one.
    pub gmail_api: FakeGmailApi,
    /// `ca.pem` for `ca_file` / `smtp_tls_CAfile`.
    pub ca_file: PathBuf,
    _ca: TestCa,
}

impl Upstreams {
    /// Start the fakes on `handle`'s runtime; `dir` receives `ca.pem`.
    pub async fn start(handle: Handle, dir: &std::path::Path) -> anyhow::Result<Upstreams> {
        let ca = TestCa::new();
        let ca_file = ca.write_to(dir);
        let google = handle
            .spawn(FakeGoogle::start())
            .await?
            .context("starting the fake token endpoint")?;
        google.add_client(CLIENT_ID, CLIENT_SECRET);
        let builder = FakeGmail::builder(&ca)
            .implicit_tls()
            .keep_data(false)
            .token_validator(google.token_validator());
        let gmail = handle
            .spawn(builder.start())
            .await?
            .context("starting the fake Gmail")?;
        let builder = FakeGmail::builder(&ca)
            .implicit_tls()
            .keep_data(false)
            .allow_unauthenticated();
        let gmail_postfix = handle
            .spawn(builder.start())
            .await?
            .context("starting the fake Gmail for Postfix")?;
        let gmail_api = handle
            .spawn(FakeGmailApi::start_with_tls(google.bearer_validator(), &ca))
            .await?
            .context("starting the fake Gmail API")?;
        gmail_api.keep_data(false);
        gmail_api.set_rate_limit(None);
        Ok(Upstreams {
            google,
            gmail,
            gmail_postfix,
            gmail_api,
            ca_file,
            _ca: ca,
        })
    }

    /// A fresh refresh token for the bench account, as `token import` reads it
    /// (scope `https://mail.google.com/`, what SMTP needs).
    pub fn refresh_token(&self) -> String {
        self.google.issue_refresh_token(CLIENT_ID, EMAIL)
    }

    /// A fresh refresh token with only the `gmail.send` scope, for
    /// `transport = "gmail-api"`.
    pub fn send_refresh_token(&self) -> String {
        self.google
            .issue_refresh_token_with_scope(CLIENT_ID, EMAIL, SEND_SCOPE)
    }
}

/// Where a run's messages arrive: a fake Gmail SMTP server or the fake
/// Gmail API.
#[derive(Clone, Copy)]
pub enum Sink<'a> {
    Smtp(&'a FakeGmail),
    Api(&'a FakeGmailApi),
}

/// One message as the upstream saw it.
struct Seen {
    message_id: Option<String>,
    /// Which upstream connection carried it.
    connection: u64,
    /// SMTP: `MAIL`; the API: the request's head.
    started: Instant,
    /// SMTP: the final `250`; the API: the `200` with Gmail's id.
    accepted: Instant,
}

impl Sink<'_> {
    /// Forget the messages recorded so far (the counters go on).
    pub fn clear(&self) {
        match self {
            Sink::Smtp(g) => g.clear_messages(),
            Sink::Api(a) => a.clear_messages(),
        }
    }

    /// Messages accepted since the fake started.
    pub fn count(&self) -> u64 {
        match self {
            Sink::Smtp(g) => g.stats().messages,
            Sink::Api(a) => a.stats().messages,
        }
    }

    /// Connections accepted since the fake started.
    pub fn connections(&self) -> u64 {
        match self {
            Sink::Smtp(g) => g.stats().connections,
            Sink::Api(a) => a.stats().connections,
        }
    }

    /// Wait (at most `timeout`) until [`count`](Self::count) reaches `n`.
    pub async fn wait_count(&self, timeout: Duration, n: u64) {
        match self {
            Sink::Smtp(g) => {
                g.wait_for_stats(timeout, |s| s.messages >= n).await;
            }
            Sink::Api(a) => {
                a.wait_for_stats(timeout, |s| s.messages >= n).await;
            }
        }
    }

    fn seen(&self) -> Vec<Seen> {
        match self {
            Sink::Smtp(g) => g
                .messages()
                .into_iter()
                .map(|m| Seen {
                    message_id: m.message_id,
                    connection: m.connection,
                    started: m.mail_at,
                    accepted: m.accepted_at,
                })
                .collect(),
            Sink::Api(a) => a
                .messages()
                .into_iter()
                .map(|m| Seen {
                    message_id: m.header("Message-ID"),
                    connection: m.connection,
                    started: m.request_at,
                    accepted: m.at,
                })
                .collect(),
        }
    }
}

/// Upstream acceptance times of the messages a run is waiting for, by
/// Message-ID.
pub struct Arrivals {
    /// Message-ID -> (upstream start: `MAIL` or the request, upstream
    /// `250` or `200`).
    pub accepted: HashMap<String, (Instant, Instant)>,
    /// Per upstream connection, the time from one message's acceptance to
    /// the next message's start (how long the relay's worker left it
    /// idle while it had work: only gaps during the run are meaningful).
    pub gaps: Vec<Duration>,
}

impl Arrivals {
    /// Collect what `sink` accepted among `wanted` (Message-IDs), waiting
    /// until all arrived or `timeout` passes. `base` is `sink`'s message
    /// counter when its record was last cleared (before the run): the wait
    /// watches the counter (cheap) and copies the record only when enough
    /// messages have arrived.
    pub async fn wait(
        sink: Sink<'_>,
        base: u64,
        wanted: &HashMap<String, Instant>,
        timeout: Duration,
    ) -> Arrivals {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut target = wanted.len() as u64;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            sink.wait_count(left, base + target).await;
            let mut accepted = HashMap::with_capacity(wanted.len());
            let msgs = sink.seen();
            for m in &msgs {
                record(&mut accepted, wanted, m);
            }
            let missing = wanted.len() - accepted.len();
            if missing == 0 || tokio::time::Instant::now() >= deadline {
                return Arrivals {
                    accepted,
                    gaps: gaps(&msgs),
                };
            }
            // Duplicates or strangers counted: wait for as many more.
            target = msgs.len() as u64 + missing as u64;
        }
    }
}

fn gaps(msgs: &[Seen]) -> Vec<Duration> {
    let mut last: HashMap<u64, Instant> = HashMap::new();
    let mut out = Vec::new();
    for m in msgs {
        if let Some(prev) = last.insert(m.connection, m.accepted) {
            out.push(m.started.saturating_duration_since(prev));
        }
    }
    out
}

fn record(
    accepted: &mut HashMap<String, (Instant, Instant)>,
    wanted: &HashMap<String, Instant>,
    m: &Seen,
) {
    if let Some(id) = &m.message_id
        && wanted.contains_key(id)
    {
        // First arrival counts (delivery is at-least-once).
        accepted
            .entry(id.clone())
            .or_insert((m.started, m.accepted));
    }
}
