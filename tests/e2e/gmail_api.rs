//! The `gmail-api` transport through the daemon, against the fake Gmail
//! API: byte-exact delivery with only the `gmail.send` scope, recipients
//! exactly the envelope's, a 30 MB resumable upload cut half way, every
//! error class, pacing.

use std::time::{Duration, SystemTime};

use testkit::ca::TestCa;
use testkit::gmail::TlsMode;
use testkit::gmail_api::{ApiFault, FakeGmailApi, SEND_PATH, UploadType};

use crate::fakes::{
    EMAIL, FAST_DELIVERY, T, Upstream, message, prepended_fields, queue, submit, until, wait_state,
};
use crate::harness::Daemon;

const SEND_SCOPE: &str = "https://www.googleapis.com/auth/gmail.send";

struct Api {
    up: Upstream,
    api: FakeGmailApi,
}

impl Api {
    async fn start() -> Api {
        let up = Upstream::start(TlsMode::Implicit).await;
        let api = FakeGmailApi::start(up.google.bearer_validator())
            .await
            .expect("fake Gmail API");
        Api { up, api }
    }

    /// The fake over HTTPS with a certificate from `ca` (the upstream's
    /// own CA, which the account trusts through `ca_file`, or another).
    async fn start_tls(ca: Option<&TestCa>) -> Api {
        let up = Upstream::start(TlsMode::Implicit).await;
        let api = FakeGmailApi::start_with_tls(up.google.bearer_validator(), ca.unwrap_or(&up.ca))
            .await
            .expect("fake Gmail API over TLS");
        Api { up, api }
    }

    fn account(&self, extra: &str) -> String {
        format!(
            "{}transport = \"gmail-api\"\napi_url = \"{}\"\n{extra}",
            self.up.account("default", EMAIL, &["*"], true),
            self.api.url()
        )
    }

    /// A relay whose account `default` sends over the API with a
    /// `gmail.send` token.
    fn relay(&self, delivery: &str, extra: &str) -> Daemon {
        let config = self.up.config(
            &format!("{FAST_DELIVERY}{delivery}"),
            &[self.account(extra)],
        );
        self.up.import_scoped(&config, "default", EMAIL, SEND_SCOPE);
        Daemon::start(&config)
    }

    async fn wait_messages(&self, n: usize) -> Vec<testkit::gmail_api::ApiMessage> {
        until(
            &format!("{n} messages at the fake Gmail API"),
            T,
            async || {
                let m = self.api.messages();
                if m.len() >= n {
                    Ok(m)
                } else {
                    Err(format!("{}", m.len()))
                }
            },
        )
        .await
    }
}

fn state_of(d: &Daemon, id: &str) -> Option<serde_json::Value> {
    queue(d).into_iter().find(|m| m["id"] == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_over_the_api_is_byte_exact_with_only_gmail_send() {
    let a = Api::start().await;
    let d = a.relay("", "");
    let mut original = message(
        "api1",
        "over the API",
        "Ünïcödé body €\r\n.\r\n..two dots\r\n",
    );
    original.extend(std::iter::repeat_n(b'x', 900));
    original.extend_from_slice(b"\r\nlast line\r\n");
    let id = submit(&d, "app@example.com", &["r@example.org"], &original).await;
    let msgs = a.wait_messages(1).await;
    let m = &msgs[0];
    assert_eq!(
        prepended_fields(&m.raw, &original),
        ["Received"],
        "{}",
        m.text()
    );
    assert_eq!(m.upload, UploadType::Media);
    assert_eq!(m.recipients, ["r@example.org"]);
    assert_eq!(m.user, EMAIL);
    // Gmail's id in the delivery line.
    let line = d.wait_log(&format!("remote_id={}", m.id), T);
    assert!(
        line.contains(&format!("{id}: to=<r@example.org>")),
        "{line}"
    );
    assert!(line.contains("status=sent"), "{line}");
    // Only users.messages.send was called; SMTP never.
    assert_eq!(a.api.stats().other_endpoints, 0);
    assert!(a.api.requests().iter().all(|r| r.contains(SEND_PATH)));
    assert!(a.up.offered.lock().unwrap().is_empty(), "no XOAUTH2 login");
    // token status shows the scope; check-config accepts it.
    let out = d.cli(&["token", "status"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("transport:         gmail-api"), "{text}");
    assert!(
        text.contains(&format!("token scope:       {SEND_SCOPE}")),
        "{text}"
    );
    let out = d.cli(&["check-config"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!(
            "# account default: transport gmail-api, token scope {SEND_SCOPE}"
        )),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_the_api_certificate_is_verified_against_ca_file() {
    // Trusted through the account's ca_file: delivered, connection reused.
    let a = Api::start_tls(None).await;
    assert!(a.api.url().starts_with("https://127.0.0.1:"));
    let d = a.relay("", "");
    for i in 0..3 {
        let original = message(&format!("tls{i}"), "over HTTPS", "b\r\n");
        submit(&d, "app@example.com", &["r@example.org"], &original).await;
    }
    let msgs = a.wait_messages(3).await;
    assert!(msgs.iter().all(|m| m.recipients == ["r@example.org"]));
    assert_eq!(a.api.stats().connections, 1, "one TLS connection, reused");

    // A certificate from a CA the account does not trust: nothing is
    // sent, the mail waits with the reason.
    let other = TestCa::new();
    let a = Api::start_tls(Some(&other)).await;
    let d = a.relay("", "");
    let id = submit(
        &d,
        "app@example.com",
        &["r@example.org"],
        &message("tls-bad", "s", "b\r\n"),
    )
    .await;
    d.wait_log("status=deferred", T);
    let m = state_of(&d, &id).expect("still queued");
    assert!(
        m["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase()
            .contains("certificate"),
        "{m}\n{}",
        d.logs()
    );
    assert_eq!(a.api.stats().requests, 0);
    assert!(a.api.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gmail_send_token_cannot_be_used_for_smtp_and_a_token_without_a_send_scope_holds() {
    // transport = "smtp" with a gmail.send token: never offered to SMTP,
    // the mail is held, and token status / check-config say what to do.
    let up = Upstream::start(TlsMode::Implicit).await;
    let config = up.config(FAST_DELIVERY, &[up.account("default", EMAIL, &["*"], true)]);
    up.import_scoped(&config, "default", EMAIL, SEND_SCOPE);
    let d = Daemon::start(&config);
    let id = submit(
        &d,
        "app@example.com",
        &["r@example.org"],
        &message("s1", "s", "b\r\n"),
    )
    .await;
    let held = wait_state(&d, &id, "held").await;
    let err = held["last_error"].as_str().unwrap_or_default().to_string();
    assert!(
        err.contains("cannot be used with transport = \"smtp\""),
        "{err}"
    );
    assert!(
        err.contains("transport = \"gmail-api\""),
        "the fix names the transport that works: {err}"
    );
    assert!(
        up.offered.lock().unwrap().is_empty(),
        "a gmail.send token is never offered to SMTP"
    );
    let out = d.cli(&["token", "status"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains(&format!("token scope:       {SEND_SCOPE}")),
        "{text}"
    );
    assert!(text.contains("authorize --account default"), "{text}");
    let out = d.cli(&["check-config"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with transport"));

    // transport = "gmail-api" with a token whose scope cannot send (read
    // only): refused by the relay itself, never offered to the API.
    let a = Api::start().await;
    let config = a.up.config(FAST_DELIVERY, &[a.account("")]);
    a.up.import_scoped(
        &config,
        "default",
        EMAIL,
        "https://www.googleapis.com/auth/gmail.readonly",
    );
    let d = Daemon::start(&config);
    let id = submit(
        &d,
        "app@example.com",
        &["r@example.org"],
        &message("s2", "s", "b\r\n"),
    )
    .await;
    let held = wait_state(&d, &id, "held").await;
    assert!(
        held["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot be used with transport = \"gmail-api\""),
        "{held}"
    );
    assert_eq!(a.api.stats().requests, 0);
}

/// The troubleshooting entry for a scope that does not fit the transport,
/// checked against what the daemon logs and holds, and its first fix:
/// switching to the transport the token serves releases the held mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_mismatch_is_logged_as_troubleshooting_md_says_and_switching_transport_releases_the_mail()
 {
    let a = Api::start().await;
    let smtp = a.up.config(
        FAST_DELIVERY,
        &[a.up.account("default", EMAIL, &["*"], true)],
    );
    a.up.import_scoped(&smtp, "default", EMAIL, SEND_SCOPE);
    let d = Daemon::start(&smtp);
    let id = submit(
        &d,
        "app@example.com",
        &["r@example.org"],
        &message("mismatch", "s", "b\r\n"),
    )
    .await;
    let held = wait_state(&d, &id, "held").await;
    let line = d.wait_log("account needs authorization: the token's scope", T);
    let expected = format!(
        "account needs authorization: the token's scope ({SEND_SCOPE}) cannot be used with \
         transport = \"smtp\", which needs https://mail.google.com/ (Gmail's SMTP server takes \
         no other); its mail is held until you set transport = \"gmail-api\" (the token serves \
         it), or set scopes = [\"https://mail.google.com/\"] (or remove `scopes`) and run: \
         oauthrelay authorize --account default"
    );
    assert!(line.contains(&expected), "{line}");
    crate::docs::assert_troubleshooting_quotes(
        &line,
        &[
            "account needs authorization: …; its mail is held until you …",
            "the token's scope (…) cannot be used with transport = \"…\", which needs …",
            "(Gmail's SMTP server takes no other)",
            "set transport = \"…\" (the token serves it), or …",
            "set scopes = [\"…\"] (or remove `scopes`) and run: oauthrelay authorize --account …",
        ],
    );
    let reason = held["last_error"].as_str().unwrap_or_default();
    crate::docs::assert_troubleshooting_quotes(
        reason,
        &["the token's scope (…) cannot be used with transport = \"…\", which needs …"],
    );

    // The fix the line names first: the transport the token serves, and
    // a reload. The held message goes out over the API.
    crate::harness::config_in(&d.dir, &a.up.config(FAST_DELIVERY, &[a.account("")]));
    d.signal("HUP");
    d.wait_log("configuration reloaded", T);
    let m = until("the held message over the API", T, async || {
        match a.api.messages().pop() {
            Some(m) => Ok(m),
            None => Err(format!("{:?}\n{}", state_of(&d, &id), d.logs())),
        }
    })
    .await;
    assert_eq!(m.recipients, ["r@example.org"]);
    assert!(m.text().contains("Subject: s"), "{}", m.text());
    d.wait_log("account is authorized again; held mail can go", T);
    assert!(
        a.up.offered.lock().unwrap().is_empty(),
        "never offered to SMTP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_recipients_missing_from_the_headers_go_as_bcc() {
    let a = Api::start().await;
    let d = a.relay("", "");
    let id = submit(
        &d,
        "app@example.com",
        &["r@example.org", "hidden@example.net"],
        &message("bcc1", "bcc", "body\r\n"),
    )
    .await;
    let m = a.wait_messages(1).await.remove(0);
    assert_eq!(m.recipients, ["r@example.org", "hidden@example.net"]);
    assert!(
        m.text().contains("Bcc: <hidden@example.net>\r\n"),
        "{}",
        m.text()
    );
    d.wait_log(
        &format!(
            "{id}: added envelope recipients missing from To/Cc/Bcc as Bcc: hidden@example.net"
        ),
        T,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_naming_recipients_outside_the_envelope_get_a_rewritten_copy() {
    let a = Api::start().await;
    let d = a.relay("", "");
    // A list expansion: the headers name the list and a colleague; the
    // envelope only one member.
    let msg = b"From: App <app@example.com>\r\nTo: staff@example.org, member@example.org\r\nCc: colleague@example.org\r\nBcc: secret@example.org\r\nSubject: outside\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <out1@e2e.test>\r\n\r\nbody\r\n";
    let id = submit(&d, "app@example.com", &["member@example.org"], msg).await;
    let m = a.wait_messages(1).await.remove(0);
    assert_eq!(m.recipients, ["member@example.org"], "exactly the envelope");
    let text = m.text();
    assert!(
        text.contains("X-Original-To: staff@example.org, member@example.org\r\n"),
        "{text}"
    );
    assert!(
        text.contains("X-Original-Cc: colleague@example.org\r\n"),
        "{text}"
    );
    assert!(
        !text.contains("secret@example.org"),
        "Bcc stays blind: {text}"
    );
    assert!(text.contains("Bcc: <member@example.org>\r\n"), "{text}");
    let line = d.wait_log(
        &format!("{id}: the headers name recipients outside the envelope"),
        T,
    );
    assert!(
        line.contains("staff@example.org, colleague@example.org, secret@example.org"),
        "{line}"
    );
    // The delivery line says it too.
    let line = d.wait_log("note=(the headers name recipients outside", T);
    assert!(line.contains("status=sent"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_mb_resumable_upload_cut_half_way_resumes_without_a_second_copy() {
    let a = Api::start().await;
    let d = a.relay("", "");
    let mut body = message("big1", "30 MB", "");
    let line = [
        b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789".as_slice(),
        b"\r\n",
    ]
    .concat();
    while body.len() < 30 * 1024 * 1024 {
        body.extend_from_slice(&line);
    }
    a.api
        .fail_next(1, ApiFault::DropAfterBytes(15 * 1024 * 1024));
    submit(&d, "app@example.com", &["r@example.org"], &body).await;
    d.reset_peak_rss();
    let (_, rss_before) = d.memory_kib();
    let m = a.wait_messages(1).await.remove(0);
    assert_eq!(m.upload, UploadType::Resumable);
    assert_eq!(m.puts, 2, "the first part, then the rest");
    assert_eq!(prepended_fields(&m.raw, &body), ["Received"]);
    let s = a.api.stats();
    assert_eq!(s.sessions, 1, "resumed, not restarted");
    assert!(s.status_queries >= 1);
    assert_eq!(s.dropped, 1);
    d.wait_log("resuming at byte", T);
    crate::fakes::wait_queue_empty(&d, T).await;
    assert_eq!(a.api.messages().len(), 1, "one message");
    let (peak, _) = d.memory_kib();
    assert!(
        peak < rss_before + 12 * 1024,
        "memory flat while uploading 30 MB: peak {peak} KiB, before {rss_before} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_to_a_resumable_upload_is_asked_about_not_sent_again() {
    let a = Api::start().await;
    let d = a.relay("", "");
    let mut body = message("lost1", "6 MB", "");
    while body.len() < 6 * 1024 * 1024 {
        body.extend_from_slice(b"some text for a six megabyte message, line after line\r\n");
    }
    a.api.fail_next(1, ApiFault::DropResponse);
    submit(&d, "app@example.com", &["r@example.org"], &body).await;
    crate::fakes::wait_queue_empty(&d, T).await;
    d.wait_log("found the upload complete", T);
    assert_eq!(a.api.messages().len(), 1);
    assert_eq!(a.api.stats().dropped, 1);
}

/// One message against one scripted answer.
async fn with_fault(fault: ApiFault, delivery: &str) -> (Api, Daemon, String) {
    let a = Api::start().await;
    let d = a.relay(delivery, "");
    a.api.fail_next(1, fault);
    let id = submit(
        &d,
        "app@example.com",
        &["r@example.org"],
        &message("f1", "fault", "body\r\n"),
    )
    .await;
    (a, d, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_refreshes_once_then_holds() {
    // Once: a fresh token and the message goes.
    let (a, d, _) = with_fault(ApiFault::Unauthenticated, "").await;
    a.wait_messages(1).await;
    d.wait_log("trying once more with a fresh token", T);
    // Twice: held, needs authorization, never bounced.
    let a = Api::start().await;
    let d = a.relay("", "");
    a.api.fail_next(2, ApiFault::Unauthenticated);
    let id = submit(
        &d,
        "app@example.com",
        &["r@example.org"],
        &message("f2", "fault", "b\r\n"),
    )
    .await;
    let held = wait_state(&d, &id, "held").await;
    assert!(
        held["held"]
            .as_str()
            .unwrap_or_default()
            .contains("authorize --account default"),
        "{held}"
    );
    assert!(
        held["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("HTTP 401 authError"),
        "{held}"
    );
    assert!(a.api.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_scope_or_a_disabled_api_holds_with_the_fix() {
    let (_a, d, id) = with_fault(ApiFault::ScopeInsufficient, "").await;
    let held = wait_state(&d, &id, "held").await;
    let err = held["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("insufficientPermissions"), "{err}");
    let why = held["held"].as_str().unwrap_or_default();
    assert!(
        why.contains("gmail.send") && why.contains("authorize --account default"),
        "{why}"
    );

    let (a, d, id) = with_fault(ApiFault::AccessNotConfigured, "").await;
    let held = wait_state(&d, &id, "held").await;
    let err = held["held"].as_str().unwrap_or_default();
    assert!(err.contains("Gmail API is not enabled"), "{err}");
    assert!(err.contains("https://console.developers.google.com/apis/api/gmail.googleapis.com/overview?project=123456789012"), "{err}");
    // Fixed (the API enabled): queue retry sends it.
    let out = d.cli(&["queue", "retry", "--all"], None);
    assert!(out.status.success());
    a.wait_messages(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_pause_for_retry_after_and_then_deliver() {
    for status_429 in [false, true] {
        let (a, d, _) = with_fault(
            ApiFault::RateLimit {
                status_429,
                retry_after: 2,
            },
            "",
        )
        .await;
        let line = d.wait_log("rate", T);
        assert!(
            line.contains("rateLimitExceeded") || line.contains("RateLimitExceeded"),
            "{line}"
        );
        let m = a.wait_messages(1).await;
        assert!(m[0].at.elapsed() < T);
        assert_eq!(m.len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sending_limit_pauses_until_googles_time_and_daily_limit_pauses() {
    let until = SystemTime::now() + Duration::from_secs(3);
    let (a, d, id) = with_fault(ApiFault::SendingLimit { until }, "").await;
    let line = d.wait_log("Mail sending", T);
    assert!(line.contains("Retry after"), "{line}");
    // Queued, not bounced, while paused.
    assert!(state_of(&d, &id).is_some());
    let m = a.wait_messages(1).await;
    assert!(SystemTime::now() >= until, "not before Google's time");
    assert_eq!(m.len(), 1);

    let (a, d, _) = with_fault(ApiFault::DailyLimit, "daily_limit_pause = \"1s\"\n").await;
    d.wait_log("dailyLimitExceeded", T);
    a.wait_messages(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_argument_bounces_quoting_google_and_server_errors_defer() {
    let (a, d, id) = with_fault(ApiFault::InvalidArgument("Invalid To header".into()), "").await;
    // The bounce goes to the sender, through the same account.
    let m = a.wait_messages(1).await.remove(0);
    assert_eq!(m.recipients, ["app@example.com"]);
    let text = m.text();
    assert!(text.contains("Invalid To header"), "{text}");
    assert!(text.contains("5.6.0"), "{text}");
    until("the original to leave the queue", T, async || {
        if state_of(&d, &id).is_none() {
            Ok(())
        } else {
            Err(d.logs())
        }
    })
    .await;

    let (a, d, _) = with_fault(ApiFault::Status(503), "").await;
    let line = d.wait_log("status=deferred", T);
    assert!(line.contains("HTTP 503"), "{line}");
    a.wait_messages(1).await;

    let (a, d, _) = with_fault(ApiFault::DropAfterBytes(10), "").await;
    d.wait_log("status=deferred", T);
    a.wait_messages(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_keeps_a_burst_of_100_under_the_rate_limit() {
    let a = Api::start().await;
    // The fake's bucket: 10 a second, 8 at once; the account: 8 a second
    // (a burst of 5), four workers.
    a.api.set_rate_limit(Some((10.0, 8.0)));
    let d = a.relay("concurrency = 4\n", "max_rate = 8\n");
    let mut s = crate::harness::Smtp::open(d.smtp).await;
    let r = s.cmd("EHLO e2e.test").await;
    assert!(r.starts_with("250"), "{r}");
    for i in 0..100 {
        let r = s
            .mail(
                "app@example.com",
                &["r@example.org"],
                &message(&format!("p{i}"), "paced", "b\r\n"),
            )
            .await;
        assert!(r.starts_with("250"), "{r}");
    }
    s.cmd("QUIT").await;
    until("100 messages", Duration::from_secs(90), async || {
        let n = a.api.messages().len();
        if n >= 100 {
            Ok(())
        } else {
            Err(format!("{n}; rate limited {}", a.api.stats().rate_limited))
        }
    })
    .await;
    assert_eq!(a.api.stats().rate_limited, 0, "no 429");
    let msgs = a.api.messages();
    let span = msgs[99].at.duration_since(msgs[0].at);
    assert!(
        span >= Duration::from_secs_f64(94.0 / 8.0),
        "paced at 8/s: {span:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_over_the_api_prints_each_step() {
    let a = Api::start().await;
    let d = a.relay("", "");
    let out = d.cli(
        &[
            "send-test",
            "--account",
            "default",
            "--to",
            "me@example.org",
        ],
        None,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let m = a.wait_messages(1).await.remove(0);
    assert_eq!(m.recipients, ["me@example.org"]);
    assert!(text.contains("via the Gmail API at http://"), "{text}");
    assert!(text.contains(&format!("scope: {SEND_SCOPE}")), "{text}");
    assert!(text.contains("HTTP 200"), "{text}");
    assert!(
        text.contains(&format!("Gmail message id: {}", m.id)),
        "{text}"
    );
    a.up.assert_no_secrets("send-test output", &text);

    // The API not enabled: the fix and the console link.
    a.api.fail_next(1, ApiFault::AccessNotConfigured);
    let out = d.cli(
        &[
            "send-test",
            "--account",
            "default",
            "--to",
            "me@example.org",
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("FAILED: Gmail API: HTTP 403 accessNotConfigured"),
        "{text}"
    );
    assert!(
        text.contains("enable the Gmail API at https://console.developers.google.com/"),
        "{text}"
    );
}
