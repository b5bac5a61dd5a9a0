//! Test harness: a spool in a tempdir, the fake Google token endpoint, the
//! fake Gmail (TLS with a generated CA, XOAUTH2 checked against the fake
//! endpoint's tokens), a real TokenManager and a running Outbound.
//!
//! These tests run on the real clock. Tokio's paused clock jumps to the
//! next timer whenever the runtime waits on something outside it, and here
//! that is most of the time (the spool's writer thread, loopback sockets):
//! a pause would end while the attempt before it is still being written.
//! The decisions about time are unit-tested with paused time (`decide.rs`,
//! `account.rs`, `pace.rs`); these tests wait for events
//! ([`wait_until`], the fakes' counters, the scheduler's `ping`, log lines)
//! and measure pauses on the scheduler's own clock ([`after_attempt`]).

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Once;
use std::time::{Duration, SystemTime};

use oauth::config::{AccountConfig, SmtpTls};
use oauth::{Account, AccountContext, ManagerOptions, TokenManager};
use outbound::{DeliveryConfig, DeliveryState, Metrics, Outbound, RcptState};
use secrecy::SecretString;
use spool::{DeliveryRecord, Envelope, MessageId, Reserve, Spool};
use tempfile::TempDir;
use testkit::ca::TestCa;
use testkit::gmail::{FakeGmail, FakeGmailBuilder, ReceivedMessage};
use testkit::google::FakeGoogle;
use tokio_util::sync::CancellationToken;

pub const CLIENT_ID: &str = "client-1.apps.googleusercontent.com";
pub const CLIENT_SECRET: &str = "s3cret";
pub const EMAIL: &str = "me@gmail.com";
pub const HOSTNAME: &str = "relay.test";

/// Short timings so retries happen within a test.
pub fn fast_config() -> DeliveryConfig {
    DeliveryConfig {
        concurrency: 2,
        retry_initial: Duration::from_millis(200),
        retry_max: Duration::from_secs(1),
        max_age: Duration::from_secs(3600),
        connect_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        data_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(5),
        login_throttle_pause: Duration::from_millis(500),
        daily_limit_pause: Duration::from_millis(800),
        ..DeliveryConfig::default()
    }
}

pub fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn,oauthrelay::delivery=info".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

pub struct Harness {
    pub dir: TempDir,
    pub ca: TestCa,
    pub ca_file: PathBuf,
    pub google: FakeGoogle,
    pub gmail: FakeGmail,
    pub spool: Spool,
    pub tokens: TokenManager,
    pub account: AccountConfig,
    pub resolved: Account,
    pub refresh_token: String,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
    pub outbound: Option<Outbound>,
    pub config: DeliveryConfig,
}

pub struct Setup {
    pub config: DeliveryConfig,
    pub starttls: bool,
    pub rewrite_from: bool,
    pub senders: Vec<String>,
    pub gmail: fn(FakeGmailBuilder) -> FakeGmailBuilder,
    /// Start the relay at once (false: call `start()` later).
    pub start: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            config: fast_config(),
            starttls: false,
            rewrite_from: false,
            senders: vec!["*".into()],
            gmail: |b| b,
            start: true,
        }
    }
}

impl Harness {
    pub async fn new() -> Harness {
        Harness::with(Setup::default()).await
    }

    pub async fn with(setup: Setup) -> Harness {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new();
        let ca_file = ca.write_to(dir.path());
        let google = FakeGoogle::start().await.expect("fake google");
        google.add_client(CLIENT_ID, CLIENT_SECRET);
        let refresh_token = google.issue_refresh_token(CLIENT_ID, EMAIL);

        let mut builder = FakeGmail::builder(&ca).token_validator(google.token_validator());
        if setup.starttls {
            builder = builder.starttls();
        }
        let gmail = (setup.gmail)(builder).start().await.expect("fake gmail");

        let account = AccountConfig {
            client_id: Some(CLIENT_ID.into()),
            client_secret: Some(SecretString::from(CLIENT_SECRET)),
            senders: setup.senders.clone(),
            rewrite_from: setup.rewrite_from,
            smtp_host: "127.0.0.1".into(),
            smtp_port: gmail.port(),
            smtp_tls: if setup.starttls {
                SmtpTls::Starttls
            } else {
                SmtpTls::Implicit
            },
            ca_file: Some(ca_file.clone()),
            auth_url: google.auth_url().parse().expect("auth url"),
            token_url: google.token_url().parse().expect("token url"),
            scopes: vec!["https://mail.google.com/".into()],
            ..AccountConfig::new("default", EMAIL)
        };
        let ctx = AccountContext::new(dir.path().join("state")).with_credentials_dir(None);
        let resolved = Account::resolve(&account, &ctx).expect("resolve account");
        oauth::import_refresh_token(&resolved, &refresh_token).expect("import token");
        let tokens = TokenManager::new(
            vec![resolved.clone()],
            ManagerOptions {
                request_timeout: Duration::from_secs(5),
                attempts: 1,
                backoff_initial: Duration::from_millis(50),
                backoff_max: Duration::from_millis(100),
                failure_cooldown: Duration::from_millis(50),
                watch_interval: Some(Duration::from_millis(100)),
                ..Default::default()
            },
        )
        .expect("token manager");
        let (spool, _) = Spool::open(&dir.path().join("spool")).expect("spool");
        let mut h = Harness {
            dir,
            ca,
            ca_file,
            google,
            gmail,
            spool,
            tokens,
            account,
            resolved,
            refresh_token,
            metrics: Metrics::unregistered(),
            shutdown: CancellationToken::new(),
            outbound: None,
            config: setup.config,
        };
        if setup.start {
            h.start();
        }
        h
    }

    pub fn start(&mut self) {
        self.shutdown = CancellationToken::new();
        self.outbound = Some(Outbound::start(
            self.spool.clone(),
            self.tokens.clone(),
            vec![self.account.clone()],
            self.config.clone(),
            HOSTNAME.into(),
            self.metrics.clone(),
            self.shutdown.clone(),
        ));
    }

    pub fn outbound(&self) -> &Outbound {
        self.outbound.as_ref().expect("outbound started")
    }

    /// Stop the relay and wait for it (bounded).
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(o) = self.outbound.take() {
            tokio::time::timeout(Duration::from_secs(15), o.join())
                .await
                .expect("outbound stops within 15 s");
        }
    }

    /// Queue a message like the inbound side does.
    pub async fn submit(&self, from: &str, to: &[&str], body: &[u8]) -> MessageId {
        self.submit_env(Envelope::new(from, to.iter().map(|s| s.to_string())), body)
            .await
    }

    pub async fn submit_env(&self, env: Envelope, body: &[u8]) -> MessageId {
        self.submit_state(env, None, body).await
    }

    /// Queue a message with a delivery state (an earlier attempt's).
    pub async fn submit_state(
        &self,
        env: Envelope,
        state: Option<DeliveryState>,
        body: &[u8],
    ) -> MessageId {
        let mut w = self.spool.begin(Reserve::Respect);
        w.write(body).await.expect("spool write");
        let record = state.map(|s| s.to_record()).unwrap_or_default();
        w.commit(env, record).await.expect("spool commit")
    }

    /// What the spool holds about `id`, as the delivery side reads it.
    pub fn view(&self, id: MessageId) -> Option<View> {
        view(&self.spool, id)
    }

    /// Wait until `id` has left the spool.
    pub async fn wait_gone(&self, id: MessageId, limit: Duration) -> bool {
        wait_until(limit, || self.spool.message(id).is_none()).await
    }

    pub async fn wait_messages(&self, n: usize, limit: Duration) -> Vec<ReceivedMessage> {
        let msgs = self.gmail.wait_for_messages(n, limit).await;
        assert!(
            msgs.len() >= n,
            "expected {n} messages at the fake Gmail, got {}",
            msgs.len()
        );
        msgs
    }
}

/// Poll `cond` every 10 ms until it holds or `limit` passes.
///
/// `limit` is real time even when the test runs with paused time: Tokio's
/// paused clock jumps ahead whenever the runtime waits for something
/// outside it (the spool's writer thread, the kernel), so a deadline on
/// that clock could pass while the daemon is still busy. The polls
/// themselves sleep on Tokio's clock and let paused time move.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The delivery side's log, captured: every line logged on this thread
/// (all tasks of a current-thread test runtime) from [`Logs::capture`]
/// until its guard is dropped.
#[derive(Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    /// Capture at `filter` (an `EnvFilter` directive, e.g. `"debug"`).
    pub fn capture(filter: &str) -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.text().lines().filter(|l| l.contains(needle)).count()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A small message with the usual headers.
pub fn message(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: App <app@example.com>\r\nTo: <rcpt@example.org>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@example.com>\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n\r\n{body}"
    )
    .into_bytes()
}

/// How long after the end of the attempt that set it `t` (a pause's end,
/// a message's next attempt) is, on the scheduler's own clock: the newest
/// attempt (of `id`, or of any message) that ended before `t`. Exact
/// however late the test looks (time left until `t` is not). Also returns
/// which attempt of its message that was.
pub fn after_attempt(h: &Harness, id: Option<MessageId>, t: SystemTime) -> (u32, Duration) {
    let attempts = h.outbound().recent_attempts();
    let a = attempts
        .iter()
        .find(|a| a.at < t && id.is_none_or(|id| a.queue_id == id))
        .unwrap_or_else(|| panic!("no attempt ended before {t:?}: {attempts:#?}"));
    (a.attempt, t.duration_since(a.at).unwrap_or_default())
}

/// `d` is `base` plus the scheduler's jitter (up to 20 %). Give or take a
/// millisecond: the spool's record keeps times in milliseconds.
#[track_caller]
pub fn assert_jittered(d: Duration, base: Duration, what: &str) {
    let ms = Duration::from_millis(1);
    assert!(
        d + ms >= base && d <= base.mul_f64(1.2) + ms,
        "{what}: {d:?}, not {base:?} plus up to 20 %"
    );
}

/// One recipient of a [`View`].
#[derive(Debug, Clone)]
pub struct RcptView {
    pub address: String,
    pub state: RcptState,
    pub reply: Option<String>,
    pub expired: bool,
}

/// A queued message's envelope and delivery state, flattened for asserts.
#[derive(Debug, Clone)]
pub struct View {
    pub envelope: Envelope,
    pub state: DeliveryState,
    pub attempts: u32,
    pub next_attempt: Option<SystemTime>,
    pub last_error: Option<String>,
    pub held: Option<String>,
    pub recipients: Vec<RcptView>,
}

pub fn view(spool: &Spool, id: MessageId) -> Option<View> {
    let q = spool.message(id)?;
    let state = DeliveryState::of(id, &q);
    Some(View {
        envelope: (*q.envelope).clone(),
        attempts: state.attempts,
        next_attempt: state.next_attempt,
        last_error: state.last_error.as_ref().map(ToString::to_string),
        held: state.hold.as_ref().map(|h| h.reason.to_string()),
        recipients: q
            .envelope
            .recipients
            .iter()
            .zip(&state.recipients)
            .map(|(a, r)| RcptView {
                address: a.clone(),
                state: r.state,
                reply: r.answer.as_ref().map(ToString::to_string),
                expired: r.expired,
            })
            .collect(),
        state,
    })
}

/// A delivery state as an earlier attempt left it: `attempts` made, the
/// next one at `next`.
pub fn deferred_state(recipients: usize, attempts: u32, next: SystemTime) -> DeliveryState {
    let mut s = DeliveryState::new(recipients);
    s.attempts = attempts;
    s.next_attempt = Some(next);
    s
}

/// Commit a plain message into `spool`, as the inbound side does.
pub async fn put(spool: &Spool, env: Envelope, body: &[u8]) -> MessageId {
    let mut w = spool.begin(Reserve::Respect);
    w.write(body).await.expect("spool write");
    w.commit(env, DeliveryRecord::default())
        .await
        .expect("spool commit")
}
