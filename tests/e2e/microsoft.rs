//! Microsoft 365 and Outlook.com through the binary (issue 14): delegated
//! accounts (authorization code + PKCE, device code), app-only (secret and
//! certificate), rotating refresh tokens across kill -9, Exchange's reply
//! classes, a Gmail and a Microsoft account in one relay, send-test, and
//! pacing inside Exchange's limits. Against the fake identity platform and
//! the fake Exchange Online in crates/testkit.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testkit::ca::TestCa;
use testkit::gmail::{FakeGmail, Stage, TlsMode, exchange_replies};
use testkit::google::browse;
use testkit::microsoft::{APP_SCOPE, FakeMicrosoft, Grant};

use crate::fakes::{FAST_DELIVERY, T, Upstream, message, queue, submit, until, wait_queue_empty};
use crate::harness::{BASE, Daemon, Interactive, config_in, run_cli};

const TENANT: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";
const PUBLIC_CLIENT: &str = "0e6d1a52-7d3b-4a4b-9d51-1c2f00aa1001";
const APP_SECRET_CLIENT: &str = "0e6d1a52-7d3b-4a4b-9d51-1c2f00aa2002";
const APP_CERT_CLIENT: &str = "0e6d1a52-7d3b-4a4b-9d51-1c2f00aa3003";
const APP_SECRET: &str = "Xq8Q~e2e-app-secret-value-9ZyW";
const MAILBOX: &str = "relay@contoso.com";

/// The fake identity platform, the fake Exchange Online, and a private
/// directory for token, certificate and key files.
struct Ms {
    aux: tempfile::TempDir,
    _ca: TestCa,
    ca_file: PathBuf,
    ms: FakeMicrosoft,
    exchange: FakeGmail,
}

impl Ms {
    async fn start() -> Ms {
        let aux = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let ca_file = ca.write_to(aux.path());
        let ms = FakeMicrosoft::start(TENANT).await.expect("fake Microsoft");
        ms.add_public_client(PUBLIC_CLIENT);
        let exchange = FakeGmail::builder(&ca)
            .exchange()
            .token_validator(ms.token_validator())
            .start()
            .await
            .expect("fake Exchange");
        Ms {
            aux,
            _ca: ca,
            ca_file,
            ms,
            exchange,
        }
    }

    fn token_file(&self, name: &str) -> PathBuf {
        self.aux.path().join("tokens").join(format!("{name}.json"))
    }

    /// A delegated account (public client) pointed at the fakes; `extra`
    /// lines are appended.
    fn delegated(&self, name: &str, senders: &str, extra: &str) -> String {
        format!(
            "[[accounts]]\nname = \"{name}\"\nprovider = \"microsoft\"\nemail = \"{MAILBOX}\"\nclient_id = \"{PUBLIC_CLIENT}\"\nsenders = [{senders}]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\nca_file = \"{}\"\nauth_url = \"{}\"\ntoken_url = \"{}\"\ndevice_auth_url = \"{}\"\ntoken_file = \"{}\"\nmax_rate = 50\n{extra}",
            self.exchange.port(),
            self.ca_file.display(),
            self.ms.authorize_url("common"),
            self.ms.token_url("common"),
            self.ms.devicecode_url("common"),
            self.token_file(name).display(),
        )
    }

    /// An app-only account: `auth` gives the secret or certificate keys.
    fn app_only(
        &self,
        name: &str,
        client: &str,
        mailbox: &str,
        senders: &str,
        auth: &str,
    ) -> String {
        format!(
            "[[accounts]]\nname = \"{name}\"\nprovider = \"microsoft\"\ntenant = \"{TENANT}\"\nemail = \"{mailbox}\"\nclient_id = \"{client}\"\nscopes = [\"{APP_SCOPE}\"]\nsenders = [{senders}]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\nca_file = \"{}\"\ntoken_url = \"{}\"\ntoken_file = \"{}\"\nmax_rate = 50\n{auth}",
            self.exchange.port(),
            self.ca_file.display(),
            self.ms.token_url(TENANT),
            self.token_file(name).display(),
        )
    }

    fn config(&self, accounts: &[String]) -> String {
        format!(
            "{BASE}\n[delivery]\n{FAST_DELIVERY}\n{}",
            accounts.join("\n")
        )
    }

    /// `token import` of a refresh token the fake issued.
    fn import(&self, config: &str, name: &str) -> String {
        let rt = self.ms.issue_refresh_token(PUBLIC_CLIENT, MAILBOX);
        let cfg = config_in(self.aux.path(), config);
        let out = run_cli(
            &cfg,
            &["token", "import", "--account", name],
            Some(format!("{rt}\n").as_bytes()),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        rt
    }

    fn write_private(&self, name: &str, text: &str) -> PathBuf {
        let p = self.aux.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }
}

fn stored_refresh_token(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["refresh_token"].as_str().map(str::to_string)
}

fn user_code(line: &str) -> Option<String> {
    let t = line.trim();
    (t.len() == 9 && t.chars().all(|c| c.is_ascii_alphanumeric())).then(|| t.to_string())
}

#[test]
fn check_config_fills_in_microsoft_defaults_and_explains_default_with_common() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_in(
        dir.path(),
        "[[accounts]]\nname = \"m365\"\nprovider = \"microsoft\"\nemail = \"relay@contoso.com\"\nclient_id = \"abc\"\n\n[[accounts]]\nname = \"outlook\"\nprovider = \"microsoft\"\ntenant = \"consumers\"\nemail = \"someone@outlook.com\"\nclient_id = \"abc\"\nsenders = [\"*@outlook.com\"]\n",
    );
    let out = run_cli(&cfg, &["check-config"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "smtp_host = \"smtp.office365.com\"",
        "smtp_port = 587",
        "smtp_tls = \"starttls\"",
        "https://login.microsoftonline.com/common/oauth2/v2.0/authorize",
        "https://login.microsoftonline.com/common/oauth2/v2.0/token",
        "https://login.microsoftonline.com/common/oauth2/v2.0/devicecode",
        "\"https://outlook.office.com/SMTP.Send\"",
        "\"offline_access\"",
        "rewrite_from = true",
        "max_rate = 0.5",
        "smtp_host = \"smtp-mail.outlook.com\"",
        "https://login.microsoftonline.com/consumers/oauth2/v2.0/token",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    let cfg = config_in(
        dir.path(),
        "[[accounts]]\nname = \"app\"\nprovider = \"microsoft\"\nemail = \"relay@contoso.com\"\nclient_id = \"abc\"\nclient_secret_file = \"/nonexistent\"\nscopes = [\"https://outlook.office365.com/.default\"]\n",
    );
    let out = run_cli(&cfg, &["check-config"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("AADSTS9001023"), "{err}");
    let line = std::fs::read_to_string(&cfg)
        .unwrap()
        .lines()
        .position(|l| l.starts_with("scopes"))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("oauthrelay.toml:{line}:")),
        "file:line of scopes ({line}): {err}"
    );
    assert!(err.contains("directory (tenant) ID"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegated_authorization_code_with_pkce_then_delivery_as_the_mailbox() {
    let up = Ms::start().await;
    up.ms.approve_as(MAILBOX);
    let config = up.config(&[up.delegated("m365", "\"*\"", "")]);
    let cfg = config_in(up.aux.path(), &config);

    let mut auth = Interactive::start(
        &cfg,
        &["authorize", "--account", "m365", "--no-browser"],
        false,
    );
    let url = auth.wait_for("authorization URL", T, |l| {
        let t = l.trim();
        t.contains("/common/oauth2/v2.0/authorize?")
            .then(|| t.to_string())
    });
    assert!(url.contains("code_challenge_method=S256"), "{url}");
    assert!(url.contains("offline_access"), "{url}");
    assert!(!url.contains("access_type"), "Google's parameter: {url}");
    let visit = browse(&url, T).await.expect("browser");
    assert_eq!(visit.final_status, Some(200), "{}", visit.final_body);
    let (ok, out, err) = auth.finish(T);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("Authorized"), "{out}");
    assert_eq!(up.ms.requests(Grant::AuthorizationCode), 1);
    let stored = stored_refresh_token(&up.token_file("m365")).expect("refresh token stored");
    assert!(up.ms.refresh_token_valid(&stored));

    let d = Daemon::start(&config);
    let id = submit(
        &d,
        "app@example.com",
        &["someone@example.org"],
        &message("pkce-1", "hello", "from the app"),
    )
    .await;
    wait_queue_empty(&d, T).await;
    let msgs = up.exchange.messages();
    assert_eq!(msgs.len(), 1, "{id}");
    let m = &msgs[0];
    assert_eq!(m.auth_user, MAILBOX);
    // rewrite_from is on for Microsoft: envelope and From: are the mailbox,
    // the original sender is kept in Reply-To:.
    assert_eq!(m.mail_from, MAILBOX);
    assert!(m.header("From").unwrap().contains(MAILBOX), "{}", m.text());
    assert!(
        m.header("Reply-To").unwrap().contains("app@example.com"),
        "{}",
        m.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_code_sign_in_pending_slow_down_approved_declined_unknown_and_expired() {
    let up = Ms::start().await;
    up.ms.set_device_interval(1);
    let config = up.config(&[up.delegated("m365", "\"*\"", "")]);
    let cfg = config_in(up.aux.path(), &config);

    // Approved, after a pending poll and a slow_down.
    let mut run = Interactive::start(&cfg, &["authorize", "--account", "m365", "--device"], false);
    let code = run.wait_for("user code", T, user_code);
    run.wait_for("the address", T, |l| {
        l.contains("https://microsoft.com/devicelogin")
            .then(String::new)
    });
    run.wait_for("the pending line", T, |l| {
        l.contains("Waiting for you to enter the code")
            .then(String::new)
    });
    up.ms.slow_down_next(1);
    run.wait_for("the slow_down line", T, |l| {
        l.contains("asks to poll less often: now every 6s")
            .then(String::new)
    });
    assert!(up.ms.approve_device(&code, MAILBOX));
    let (ok, out, err) = run.finish(T);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("Authorized"), "{out}");
    assert!(stored_refresh_token(&up.token_file("m365")).is_some());

    // Declined.
    let mut run = Interactive::start(&cfg, &["authorize", "--account", "m365", "--device"], false);
    let code = run.wait_for("user code", T, user_code);
    assert!(up.ms.decline_device(&code));
    let (ok, out, err) = run.finish(T);
    assert!(!ok, "{out}");
    assert!(err.contains("declined"), "{err}");

    // bad_verification_code: the service no longer knows the code.
    let mut run = Interactive::start(&cfg, &["authorize", "--account", "m365", "--device"], false);
    let code = run.wait_for("user code", T, user_code);
    assert!(up.ms.forget_device(&code));
    let (ok, out, err) = run.finish(T);
    assert!(!ok, "{out}");
    assert!(
        err.contains("does not recognise the device code") && err.contains("--device again"),
        "{err}"
    );

    // Expired: nobody enters the code.
    up.ms.set_device_lifetime(Duration::from_secs(2));
    let run = Interactive::start(&cfg, &["authorize", "--account", "m365", "--device"], false);
    let (ok, out, err) = run.finish(T);
    assert!(!ok, "{out}");
    assert!(
        err.contains("expired") && err.contains("--device again"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_only_with_a_secret_and_with_a_certificate() {
    let up = Ms::start().await;
    up.ms.add_client(APP_SECRET_CLIENT, APP_SECRET);
    up.ms
        .grant_mailbox(APP_SECRET_CLIENT, "scanner@contoso.com");
    let cert = up.ms.add_certificate(APP_CERT_CLIENT);
    up.ms.grant_mailbox(APP_CERT_CLIENT, "printer@contoso.com");
    let secret_file = up.write_private("app.secret", APP_SECRET);
    let cert_file = up.write_private("app.crt", &cert.cert_pem);
    let key_file = up.write_private("app.key", &cert.key_pem);
    let config = up.config(&[
        up.app_only(
            "app-secret",
            APP_SECRET_CLIENT,
            "scanner@contoso.com",
            "\"*@scanner.example\"",
            &format!("client_secret_file = \"{}\"\n", secret_file.display()),
        ),
        up.app_only(
            "app-cert",
            APP_CERT_CLIENT,
            "printer@contoso.com",
            "\"*\"",
            &format!(
                "client_certificate_file = \"{}\"\nclient_certificate_key_file = \"{}\"\n",
                cert_file.display(),
                key_file.display()
            ),
        ),
    ]);
    let d = Daemon::start(&config);
    submit(
        &d,
        "a@scanner.example",
        &["x@example.org"],
        &message("app-1", "s", "b"),
    )
    .await;
    submit(
        &d,
        "b@printer.example",
        &["y@example.org"],
        &message("app-2", "c", "b"),
    )
    .await;
    wait_queue_empty(&d, T).await;
    let mut users: Vec<String> = up
        .exchange
        .messages()
        .iter()
        .map(|m| m.auth_user.clone())
        .collect();
    users.sort();
    assert_eq!(users, ["printer@contoso.com", "scanner@contoso.com"]);
    assert_eq!(up.ms.requests(Grant::ClientCredentials), 2);
    let header = up.ms.last_assertion_header().expect("a client assertion");
    assert_eq!(header["alg"], "PS256");
    assert!(
        header["x5t#S256"].as_str().is_some_and(|t| t.len() == 43),
        "{header}"
    );
    let out = d.cli(&["token", "status", "--json"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("app_only"), "{text}");
    assert!(!d.logs().contains(APP_SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_refresh_token_survives_kill_9_between_storing_and_using_it() {
    let up = Ms::start().await;
    up.ms.set_strict(true);
    let config = up.config(&[up.delegated("m365", "\"*\"", "")]);
    let first = up.import(&config, "m365");
    // Short-lived access tokens: the restarted daemon must refresh with
    // the refresh token it stored.
    up.ms.set_access_token_lifetime(Duration::from_secs(2));
    up.exchange.hold_greeting(true);
    let mut d = Daemon::start(&config);
    submit(
        &d,
        "app@example.com",
        &["r@example.org"],
        &message("rot-1", "s", "b"),
    )
    .await;
    // The daemon refreshed (Microsoft rotated the token, and this strict
    // fake killed the old one) and stored the new token; it now waits for
    // Exchange's greeting: stored, not yet used.
    let file = up.token_file("m365");
    let second = until(
        "the rotated refresh token on disk",
        T,
        async || match stored_refresh_token(&file) {
            Some(t) if t != first => Ok(t),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    assert!(
        !up.ms.refresh_token_valid(&first),
        "strict: the used one is dead"
    );
    assert!(up.ms.refresh_token_valid(&second));
    assert_eq!(up.exchange.stats().auth_ok, 0, "not used yet");
    d.kill9();
    up.exchange.hold_greeting(false);
    let d = d.restart();
    wait_queue_empty(&d, T).await;
    assert_eq!(up.exchange.messages().len(), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    submit(
        &d,
        "app@example.com",
        &["r@example.org"],
        &message("rot-2", "s", "b"),
    )
    .await;
    wait_queue_empty(&d, T).await;
    assert!(up.ms.requests(Grant::RefreshToken) >= 2);
    let newest = stored_refresh_token(&file).unwrap();
    assert!(
        up.ms.refresh_token_valid(&newest),
        "only the newest is used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_microsofts_answer_and_the_write_is_named_in_the_hold() {
    let up = Ms::start().await;
    up.ms.set_strict(true);
    let config = up.config(&[up.delegated("m365", "\"*\"", "")]);
    let first = up.import(&config, "m365");
    let d = Daemon::start(&config);
    let pid = d.pid() as i32;
    up.ms
        .before_refresh_answer(Some(std::sync::Arc::new(move || {
            // SAFETY: kill(2) on the daemon we started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        })));
    submit(
        &d,
        "app@example.com",
        &["r@example.org"],
        &message("lost-1", "s", "b"),
    )
    .await;
    until("the daemon killed at Microsoft's answer", T, async || {
        // Dead (a zombie until the harness reaps it) or gone.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        match stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next()) {
            None | Some(Some('Z')) | Some(Some('X')) => Ok(()),
            _ => Err(stat),
        }
    })
    .await;
    up.ms.before_refresh_answer(None);
    assert_eq!(
        stored_refresh_token(&up.token_file("m365")).as_deref(),
        Some(first.as_str())
    );
    let d = d.restart();
    let q = until("the message held", T, async || {
        let q = queue(&d);
        if q.first().is_some_and(|m| m["state"] == "held") {
            Ok(q)
        } else {
            Err(format!("{q:?}"))
        }
    })
    .await;
    let why = q[0]["last_error"].as_str().unwrap_or_default().to_string();
    let (_, ready) = d.http_get("/readyz").await;
    let all = format!("{why}\n{ready}");
    assert!(
        all.contains("interrupted before its answer was stored"),
        "{all}"
    );
    assert!(all.contains("oauthrelay authorize --account m365"), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_exchange_reply_class_through_the_daemon() {
    let up = Ms::start().await;
    let config = up.config(&[up.delegated("m365", "\"*\"", "rewrite_from = false\n")]);
    up.import(&config, "m365");
    let d = Daemon::start(&config);
    let ex = &up.exchange;

    // 550 5.7.60 send-as denied: the message fails, the sender gets a
    // bounce (null sender, through the mailbox) naming the sender and
    // rewrite_from.
    ex.fail_next(Stage::Mail, 1, exchange_replies::SEND_AS_DENIED);
    submit(
        &d,
        "boss@example.com",
        &["x@example.org"],
        &message("sendas", "s", "b"),
    )
    .await;
    wait_queue_empty(&d, T).await;
    let msgs = ex.wait_for_messages(1, T).await;
    let bounce = msgs
        .iter()
        .find(|m| m.mail_from.is_empty())
        .expect("a bounce");
    assert_eq!(bounce.rcpt_to, ["boss@example.com"]);
    let text = crate::fakes::squash(&bounce.text());
    assert!(text.contains("5.7.60"), "{text}");
    assert!(
        text.contains("may not send as <boss@example.com>"),
        "{text}"
    );
    assert!(text.contains("rewrite_from = true"), "{text}");
    ex.clear_messages();

    // 535 5.7.3 once: refresh once, then delivered.
    ex.close_connections();
    let refreshes = up.ms.requests(Grant::RefreshToken);
    ex.reject_tokens(1);
    submit(
        &d,
        "app@example.com",
        &["x@example.org"],
        &message("573", "s", "b"),
    )
    .await;
    wait_queue_empty(&d, T).await;
    assert_eq!(up.ms.requests(Grant::RefreshToken), refreshes + 1);

    // 432 4.3.2 thread limit: a pause, then delivered.
    ex.fail_next(Stage::DataEnd, 1, exchange_replies::THREAD_LIMIT);
    submit(
        &d,
        "app@example.com",
        &["x@example.org"],
        &message("432", "s", "b"),
    )
    .await;
    wait_queue_empty(&d, T).await;
    d.wait_log("4.3.2", T);

    // 421 4.4.2 submission rate: a pause, then delivered.
    ex.fail_next(Stage::Mail, 1, exchange_replies::SUBMISSION_RATE);
    submit(
        &d,
        "app@example.com",
        &["x@example.org"],
        &message("442", "s", "b"),
    )
    .await;
    wait_queue_empty(&d, T).await;

    // 535 5.7.139 for the mailbox: held with the PowerShell fix; released
    // by queue retry --all once fixed.
    ex.close_connections();
    ex.fail_next(Stage::Auth, 1, exchange_replies::AUTH_DISABLED_MAILBOX);
    submit(
        &d,
        "app@example.com",
        &["x@example.org"],
        &message("5739", "s", "b"),
    )
    .await;
    let held = wait_held(&d).await;
    assert!(
        held.contains(
            "Set-CASMailbox -Identity relay@contoso.com -SmtpClientAuthenticationDisabled $false"
        ),
        "{held}"
    );
    let (status, ready) = d.http_get("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert!(ready.contains("Set-CASMailbox"), "{ready}");
    assert!(d.cli(&["queue", "retry", "--all"], None).status.success());
    wait_queue_empty(&d, T).await;

    // 554 5.2.0 OutboundSpamException: held with the reason.
    ex.fail_next(Stage::DataEnd, 1, exchange_replies::OUTBOUND_SPAM);
    submit(
        &d,
        "app@example.com",
        &["x@example.org"],
        &message("spam", "s", "b"),
    )
    .await;
    let held = wait_held(&d).await;
    assert!(held.contains("Restricted entities"), "{held}");
    assert!(d.cli(&["queue", "retry", "--all"], None).status.success());
    wait_queue_empty(&d, T).await;

    // 535 5.7.3 even with a fresh token: held, needs authorization.
    ex.close_connections();
    ex.reject_tokens(2);
    submit(
        &d,
        "app@example.com",
        &["x@example.org"],
        &message("573b", "s", "b"),
    )
    .await;
    let held = wait_held(&d).await;
    assert!(
        held.contains("Exchange Online refused a freshly refreshed access token"),
        "{held}"
    );
    assert!(
        held.contains("the hold lifts when Exchange Online takes it"),
        "{held}"
    );
    // Nothing bounced but the send-as message.
    assert!(ex.messages().iter().all(|m| !m.mail_from.is_empty()));
}

async fn wait_held(d: &Daemon) -> String {
    until("a held message", T, async || {
        let q = queue(d);
        match q.iter().find(|m| m["state"] == "held") {
            Some(m) => Ok(m["last_error"].as_str().unwrap_or_default().to_string()
                + " "
                + m["hold"].as_str().unwrap_or_default()
                + &m.to_string()),
            None => Err(format!("{q:?}")),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_serves_a_gmail_and_a_microsoft_account_routed_by_senders() {
    let google = Upstream::start(TlsMode::Implicit).await;
    let up = Ms::start().await;
    let gmail_account = google.account(
        "gmail",
        "scanner.relay@gmail.com",
        &["*@gmail-side.example"],
        true,
    );
    let config = up.config(&[gmail_account, up.delegated("m365", "\"*\"", "")]);
    google.import(&config, "gmail", "scanner.relay@gmail.com");
    up.import(&config, "m365");
    let d = Daemon::start(&config);
    submit(
        &d,
        "a@gmail-side.example",
        &["x@example.org"],
        &message("g-1", "s", "b"),
    )
    .await;
    submit(
        &d,
        "b@elsewhere.example",
        &["y@example.org"],
        &message("m-1", "s", "b"),
    )
    .await;
    wait_queue_empty(&d, T).await;
    let g = google.gmail.messages();
    let m = up.exchange.messages();
    assert_eq!(g.len(), 1);
    assert_eq!(m.len(), 1);
    assert_eq!(g[0].auth_user, "scanner.relay@gmail.com");
    assert_eq!(
        g[0].mail_from, "a@gmail-side.example",
        "Gmail keeps rewrite_from off"
    );
    assert_eq!(m[0].auth_user, MAILBOX);
    assert_eq!(m[0].mail_from, MAILBOX);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_against_the_fake_prints_every_step() {
    let up = Ms::start().await;
    let config = up.config(&[up.delegated("m365", "\"*\"", "")]);
    up.import(&config, "m365");
    let cfg = config_in(up.aux.path(), &config);
    let out = run_cli(
        &cfg,
        &["send-test", "--account", "m365", "--to", "x@example.org"],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "access token",
        "STARTTLS",
        "AUTH XOAUTH2 as relay@contoso.com: 235",
        "250",
    ] {
        assert!(text.contains(step), "missing {step:?}:\n{text}");
    }
    assert_eq!(up.exchange.messages().len(), 1);
}

/// The fake Exchange's submission limit for the pacing tests: Exchange's
/// 30 messages a minute scaled down to 6 in any 2 s, so a run takes
/// seconds. `max_rate = 2` (a burst of 2, then one every 0.5 s) takes at
/// most 5 tokens in any 2 s: one message of slack for the time between a
/// token and its `MAIL FROM` (a connection opened first).
const SCALED_LIMIT: (usize, Duration) = (6, Duration::from_secs(2));

/// 12 messages at once through one Microsoft account; the send times.
async fn burst_of_12(up: &Ms, max_rate: &str) -> Vec<Instant> {
    up.exchange.set_submission_limit(Some(SCALED_LIMIT));
    // [delivery] concurrency 8: a Microsoft account still opens at most 3
    // connections.
    let account = up
        .delegated("m365", "\"*\"", "")
        .replace("max_rate = 50", &format!("max_rate = {max_rate}"));
    let config = format!("{BASE}\n[delivery]\n{FAST_DELIVERY}concurrency = 8\n{account}");
    up.import(&config, "m365");
    let d = Daemon::start(&config);
    for i in 0..12 {
        submit(
            &d,
            "app@example.com",
            &["x@example.org"],
            &message(&format!("p{i}"), "s", "b"),
        )
        .await;
    }
    wait_queue_empty(&d, T).await;
    let mut at: Vec<_> = up.exchange.messages().iter().map(|m| m.mail_at).collect();
    at.sort();
    assert_eq!(at.len(), 12, "every message delivered once, none bounced");
    assert!(
        up.exchange.stats().peak_concurrent <= 3,
        "{:?}",
        up.exchange.stats()
    );
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_and_concurrency_stay_inside_exchanges_limits() {
    let up = Ms::start().await;
    let at = burst_of_12(&up, "2").await;
    let stats = up.exchange.stats();
    assert_eq!(
        stats.rate_refused, 0,
        "paced mail never meets Exchange's submission limit: {stats:?}"
    );
    // Spaced, not sent at once: a burst of 2, then one every 0.5 s (the
    // first may wait for its connection, so the span is measured from the
    // second).
    let span = at[11] - at[1];
    assert!(span >= Duration::from_millis(4800), "{span:?}");
}

/// The other side of the test above: the same burst unpaced runs into the
/// fake's limit (`421 4.4.2`), which pauses the account; the mail waits
/// and goes, none bounces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaced_mail_meets_the_submission_limit_and_waits_for_it() {
    let up = Ms::start().await;
    burst_of_12(&up, "1000").await;
    let stats = up.exchange.stats();
    assert!(stats.rate_refused >= 1, "{stats:?}");
}
