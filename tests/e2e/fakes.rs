//! The daemon against fake Google services: a generated CA, the fake token
//! and consent endpoints, the fake `smtp.gmail.com`, and the config that
//! points an account at them. Plus the small things every delivery test
//! needs: polling with a deadline, the queue as JSON, metrics by series.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use testkit::ca::TestCa;
use testkit::gmail::{FakeGmail, FakeGmailBuilder, ReceivedMessage, TlsMode};
use testkit::google::FakeGoogle;

use crate::harness::{BASE, Daemon, Smtp, config_in, queued_id, run_cli};

pub const CLIENT_ID: &str = "e2e-client-7.apps.googleusercontent.com";
/// Distinctive, so a leak is found by a plain substring search.
pub const CLIENT_SECRET: &str = "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et";
pub const EMAIL: &str = "scanner.relay@gmail.com";

/// How long any single expectation may take on a loaded 2-core machine.
pub const T: Duration = Duration::from_secs(30);

/// Delivery settings that keep retries within a test's lifetime.
pub const FAST_DELIVERY: &str = "retry_initial = \"500ms\"\nretry_max = \"2s\"\nconnect_timeout = \"5s\"\ncommand_timeout = \"10s\"\ndata_timeout = \"20s\"\n";

/// The fakes one daemon talks to, and a private directory for the files
/// the config names (CA, token files made before the daemon starts).
pub struct Upstream {
    pub aux: tempfile::TempDir,
    pub ca: TestCa,
    pub ca_file: PathBuf,
    pub google: FakeGoogle,
    pub gmail: FakeGmail,
    /// Every `(user, token)` the fake Gmail was offered in XOAUTH2.
    pub offered: Arc<Mutex<Vec<(String, String)>>>,
}

impl Upstream {
    pub async fn start(mode: TlsMode) -> Upstream {
        Upstream::start_with(mode, |b| b).await
    }

    /// `tweak` adjusts the fake Gmail before it starts.
    pub async fn start_with(
        mode: TlsMode,
        tweak: impl FnOnce(FakeGmailBuilder) -> FakeGmailBuilder,
    ) -> Upstream {
        let aux = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let ca_file = ca.write_to(aux.path());
        let google = FakeGoogle::start().await.expect("fake Google");
        google.add_client(CLIENT_ID, CLIENT_SECRET);
        let offered = Arc::new(Mutex::new(Vec::new()));
        let validator = {
            let valid = google.token_validator();
            let offered = offered.clone();
            move |user: &str, token: &str| {
                offered
                    .lock()
                    .unwrap()
                    .push((user.to_string(), token.to_string()));
                valid(user, token)
            }
        };
        let builder = FakeGmail::builder(&ca)
            .tls_mode(mode)
            .token_validator(validator);
        let gmail = tweak(builder).start().await.expect("fake Gmail");
        Upstream {
            aux,
            ca,
            ca_file,
            google,
            gmail,
            offered,
        }
    }

    /// An `[[accounts]]` table for `name` sending as `email`, pointed at the
    /// fakes. `token_file` in the aux directory when `own_token_file`, so a
    /// token can be imported before the daemon exists; else the default
    /// (`<state dir>/tokens/NAME.json`).
    pub fn account(
        &self,
        name: &str,
        email: &str,
        senders: &[&str],
        own_token_file: bool,
    ) -> String {
        let senders: Vec<String> = senders.iter().map(|s| format!("{s:?}")).collect();
        let tls = match self.gmail.tls_mode() {
            TlsMode::Implicit => "implicit",
            TlsMode::Starttls => "starttls",
        };
        let mut t = format!(
            "[[accounts]]\nname = \"{name}\"\nemail = \"{email}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\nsenders = [{}]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\nsmtp_tls = \"{tls}\"\nca_file = \"{}\"\ntoken_url = \"{}\"\nauth_url = \"{}\"\n",
            senders.join(", "),
            self.gmail.port(),
            self.ca_file.display(),
            self.google.token_url(),
            self.google.auth_url(),
        );
        if own_token_file {
            t.push_str(&format!(
                "token_file = \"{}\"\n",
                self.token_file(name).display()
            ));
        }
        t
    }

    pub fn token_file(&self, name: &str) -> PathBuf {
        self.aux.path().join("tokens").join(format!("{name}.json"))
    }

    /// A full daemon config: [`BASE`], `[delivery]` with `delivery`, then
    /// the accounts.
    pub fn config(&self, delivery: &str, accounts: &[String]) -> String {
        format!("{BASE}\n[delivery]\n{delivery}\n{}", accounts.join("\n"))
    }

    /// `oauthrelay token import --account NAME` with a refresh token the
    /// fake issues for `email`, using `config` (run before the daemon
    /// starts; the account must have its own token file). Returns the token.
    pub fn import(&self, config: &str, name: &str, email: &str) -> String {
        self.import_scoped(config, name, email, testkit::google::GMAIL_SCOPE)
    }

    /// [`Upstream::import`] with a refresh token that grants `scope`.
    pub fn import_scoped(&self, config: &str, name: &str, email: &str, scope: &str) -> String {
        let refresh = self
            .google
            .issue_refresh_token_with_scope(CLIENT_ID, email, scope);
        let cfg = config_in(self.aux.path(), config);
        let out = run_cli(
            &cfg,
            &["token", "import", "--account", name],
            Some(format!("{refresh}\n").as_bytes()),
        );
        assert!(
            out.status.success(),
            "token import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        refresh
    }

    /// The usual relay: one account `default` (all senders) with a stored
    /// refresh token, `[delivery]` = [`FAST_DELIVERY`] + `delivery`.
    pub fn relay(&self, delivery: &str) -> Daemon {
        self.relay_logging(delivery, None)
    }

    pub fn relay_logging(&self, delivery: &str, log: Option<&str>) -> Daemon {
        let config = self.config(
            &format!("{FAST_DELIVERY}{delivery}"),
            &[self.account("default", EMAIL, &["*"], true)],
        );
        self.import(&config, "default", EMAIL);
        Daemon::start_logging(&config, log)
    }

    /// Every secret the fakes handed out, the client secret, and each
    /// XOAUTH2 initial response (base64) the fake Gmail was offered.
    pub fn secrets(&self) -> Vec<String> {
        use base64::Engine;
        let mut s = self.google.issued_access_tokens();
        s.extend(self.google.issued_refresh_tokens());
        s.extend(self.google.issued_authorization_codes());
        s.push(CLIENT_SECRET.to_string());
        for (user, token) in self.offered.lock().unwrap().iter() {
            let head = format!("user={user}\x01auth=Bearer ");
            let b64 =
                base64::engine::general_purpose::STANDARD.encode(format!("{head}{token}\x01\x01"));
            // From the first base64 group that carries token bytes on.
            s.push(b64[head.len() / 3 * 4..].to_string());
        }
        s
    }

    /// Panic if `text` (logs, command output) contains any secret, whole
    /// or any 18-byte piece of it (a truncated token is still a leak).
    pub fn assert_no_secrets(&self, what: &str, text: &str) {
        const PIECE: usize = 16;
        let secrets = self.secrets();
        assert!(secrets.len() > 1, "nothing issued: a vacuous check");
        for s in &secrets {
            assert!(s.is_ascii() && s.len() >= PIECE, "{s:?}");
            let leaked = (0..=s.len() - PIECE)
                .step_by(3)
                .map(|i| &s[i..i + PIECE])
                .find(|piece| text.contains(piece));
            assert!(
                leaked.is_none(),
                "{what} contains a piece of a secret ({}...): {leaked:?}",
                &s[..12]
            );
        }
    }
}

/// Poll `f` until it gives `Ok`, for at most `limit`; panic with `what`
/// and the last observation (the `Err`) otherwise.
pub async fn until<T>(
    what: &str,
    limit: Duration,
    mut f: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) => {
                if tokio::time::Instant::now() > deadline {
                    panic!("{what}: not within {limit:?}; last seen: {last}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `queue list --json` (through the daemon when it runs).
pub fn queue(d: &Daemon) -> Vec<serde_json::Value> {
    queue_at(&d.config)
}

/// Wait (up to `T`) until message `id` is in `state` in `queue list
/// --json`; its entry.
pub async fn wait_state(d: &Daemon, id: &str, state: &str) -> serde_json::Value {
    until(&format!("{id} {state}"), T, async || {
        match queue(d).into_iter().find(|m| m["id"] == id) {
            Some(m) if m["state"] == state => Ok(m),
            other => Err(format!("{other:?}\n{}", d.logs())),
        }
    })
    .await
}

pub fn queue_at(config: &Path) -> Vec<serde_json::Value> {
    let out = run_cli(config, &["queue", "list", "--json"], None);
    assert!(
        out.status.success(),
        "queue list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("queue list JSON");
    v.as_array().expect("a JSON array").clone()
}

/// Wait until `queue list --json` prints `[]`.
pub async fn wait_queue_empty(d: &Daemon, limit: Duration) {
    until("the queue to empty", limit, async || {
        let out = d.cli(&["queue", "list", "--json"], None);
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && text == "[]" {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await
}

/// The `/metrics` text.
pub async fn metrics(d: &Daemon) -> String {
    let (status, body) = d.http_get("/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of a series, e.g. `oauthrelay_queue_messages` or
/// `oauthrelay_delivery_attempts_total{result="sent"}`, summed over the
/// labels not named (so `oauthrelay_messages_delivered_total` is every
/// account's); `None` if no series matches.
pub fn series(text: &str, query: &str) -> Option<f64> {
    let (name, want) = split_series(query);
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((s, value)) = l.rsplit_once(' ') else {
            continue;
        };
        let (n, labels) = split_series(s);
        if n == name
            && want.iter().all(|w| labels.contains(w))
            && let Ok(v) = value.parse::<f64>()
        {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// `name{a="1",b="2"}` as its name and label pairs.
fn split_series(s: &str) -> (&str, Vec<(String, String)>) {
    let Some((name, rest)) = s.split_once('{') else {
        return (s, Vec::new());
    };
    let mut labels = Vec::new();
    let mut rest = rest.trim_end_matches('}');
    while let Some((k, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        value.push(e);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((k.trim_start_matches(',').to_string(), value));
        rest = &after[end..];
    }
    (name, labels)
}

/// Like [`series`], panicking when the series is missing.
pub fn metric(text: &str, name: &str) -> f64 {
    series(text, name).unwrap_or_else(|| panic!("no series {name} in /metrics:\n{text}"))
}

pub const SENT: &str = "oauthrelay_delivery_attempts_total{result=\"sent\"}";
pub const DEFERRED: &str = "oauthrelay_delivery_attempts_total{result=\"deferred\"}";
pub const FAILED: &str = "oauthrelay_delivery_attempts_total{result=\"failed\"}";
pub const DELIVERED: &str = "oauthrelay_messages_delivered_total";
pub const BOUNCED: &str = "oauthrelay_messages_bounced_total";
pub const RECEIVED: &str = "oauthrelay_messages_received_total";

/// Wait until `series` reaches at least `at_least`; return the metrics text.
pub async fn wait_metric(d: &Daemon, name: &str, at_least: f64, limit: Duration) -> String {
    until(&format!("{name} >= {at_least}"), limit, async || {
        let m = metrics(d).await;
        match series(&m, name) {
            Some(v) if v >= at_least => Ok(m),
            v => Err(format!("{v:?}")),
        }
    })
    .await
}

/// A CRLF message with `Date:` and `Message-ID: <{id}@e2e.test>`.
pub fn message(id: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: App <app@example.com>\r\nTo: <r@example.org>\r\nSubject: {subject}\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{id}@e2e.test>\r\n\r\n{body}"
    )
    .into_bytes()
}

/// One message through a new SMTP session; returns the queue id.
pub async fn submit(d: &Daemon, from: &str, to: &[&str], body: &[u8]) -> String {
    let mut s = Smtp::open(d.smtp).await;
    let r = s.cmd("EHLO e2e.test").await;
    assert!(r.starts_with("250"), "{r}");
    let r = s.mail(from, to, body).await;
    assert!(r.starts_with("250 2.0.0"), "end of data: {r}");
    s.cmd("QUIT").await;
    queued_id(&r)
}

/// The messages the fake holds whose Message-ID is `<{id}@e2e.test>`.
pub fn with_id<'a>(msgs: &'a [ReceivedMessage], id: &str) -> Vec<&'a ReceivedMessage> {
    let want = format!("<{id}@e2e.test>");
    msgs.iter()
        .filter(|m| m.message_id.as_deref() == Some(want.as_str()))
        .collect()
}

/// Split what the fake received into the header fields we put in front of
/// the client's bytes and check the rest is `original`, byte for byte:
/// returns the names of the prepended fields.
pub fn prepended_fields(received: &[u8], original: &[u8]) -> Vec<String> {
    assert!(
        received.ends_with(original),
        "the client's bytes arrive unchanged after our headers;\nreceived:\n{}\noriginal:\n{}",
        String::from_utf8_lossy(received),
        String::from_utf8_lossy(original)
    );
    let prefix = &received[..received.len() - original.len()];
    field_names(prefix)
}

/// Names of the header fields in `block` (whole CRLF lines; continuation
/// lines start with white space).
pub fn field_names(block: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(block);
    assert!(
        text.is_empty() || text.ends_with("\r\n"),
        "whole lines: {text:?}"
    );
    text.split_terminator("\r\n")
        .filter(|l| !l.starts_with([' ', '\t']))
        .map(|l| {
            l.split_once(':')
                .unwrap_or_else(|| panic!("not a header field: {l:?}"))
                .0
                .to_string()
        })
        .collect()
}

/// White space runs collapsed to one space (unfolds headers for `contains`).
pub fn squash(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
