//! The fake Google token endpoint and the fake Gmail upstreams, on their own
//! runtime (threads named `upstream-N`) so their CPU time can be told apart
//! from the load generator's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use testkit::ca::TestCa;
use testkit::gmail::{FakeGmail, ReceivedMessage};
use testkit::google::FakeGoogle;
use tokio::runtime::Handle;

pub const CLIENT_ID: &str = "1234-bench.apps.googleusercontent.com";
pub const CLIENT_SECRET: &str = "GOCSPX-bench-secret";
pub const EMAIL: &str = "bench@gmail.com";

/// Everything upstream of the relays.
pub struct Upstreams {
    pub google: FakeGoogle,
    /// oauthrelay's upstream: implicit TLS, XOAUTH2 checked against `google`.
    pub gmail: FakeGmail,
    /// Postfix's upstream: the same, except that it accepts mail without
    /// AUTH (Postfix cannot do XOAUTH2).
    pub gmail_postfix: FakeGmail,
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
        Ok(Upstreams {
            google,
            gmail,
            gmail_postfix,
            ca_file,
            _ca: ca,
        })
    }

    /// A fresh refresh token for the bench account, as `token import` reads it.
    pub fn refresh_token(&self) -> String {
        self.google.issue_refresh_token(CLIENT_ID, EMAIL)
    }
}

/// Upstream `250` times of the messages a run is waiting for, by Message-ID.
pub struct Arrivals {
    /// Message-ID -> (upstream `MAIL`, upstream `250`).
    pub accepted: HashMap<String, (Instant, Instant)>,
    /// Per upstream connection, the time from one message's `250` to the
    /// next message's `MAIL` (how long the relay's worker left it idle
    /// while it had work: only gaps during the run are meaningful).
    pub gaps: Vec<Duration>,
}

impl Arrivals {
    /// Collect what `gmail` accepted among `wanted` (Message-IDs), waiting
    /// until all arrived or `timeout` passes. `base` is `gmail`'s message
    /// counter when its record was last cleared (before the run): the wait
    /// watches the counter (cheap) and copies the record only when enough
    /// messages have arrived.
    pub async fn wait(
        gmail: &FakeGmail,
        base: u64,
        wanted: &HashMap<String, Instant>,
        timeout: Duration,
    ) -> Arrivals {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut target = wanted.len() as u64;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            gmail
                .wait_for_stats(left, |s| s.messages >= base + target)
                .await;
            let mut accepted = HashMap::with_capacity(wanted.len());
            let msgs = gmail.messages();
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

fn gaps(msgs: &[ReceivedMessage]) -> Vec<Duration> {
    let mut last: HashMap<u64, Instant> = HashMap::new();
    let mut out = Vec::new();
    for m in msgs {
        if let Some(prev) = last.insert(m.connection, m.accepted_at) {
            out.push(m.mail_at.saturating_duration_since(prev));
        }
    }
    out
}

fn record(
    accepted: &mut HashMap<String, (Instant, Instant)>,
    wanted: &HashMap<String, Instant>,
    m: &ReceivedMessage,
) {
    if let Some(id) = &m.message_id
        && wanted.contains_key(id)
    {
        // First arrival counts (delivery is at-least-once).
        accepted
            .entry(id.clone())
            .or_insert((m.mail_at, m.accepted_at));
    }
}
