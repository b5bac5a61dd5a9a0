//! Delivery through the real daemon (issue 4): mail handed to `oauthrelay
//! serve` over SMTP reaches the fake `smtp.gmail.com` over TLS with
//! XOAUTH2, and survives upstream trouble, token trouble and crashes.
//!
//! Every test runs on a multi-threaded runtime: the fakes live on its
//! workers while the test thread blocks on the daemon's commands.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use testkit::gmail::{Stage, TlsMode, replies};
use testkit::google::GrantType;

use crate::fakes::{
    BOUNCED, DEFERRED, DELIVERED, EMAIL, FAILED, RECEIVED, SENT, T, Upstream, field_names, message,
    metric, metrics, prepended_fields, queue, squash, submit, until, wait_metric, wait_queue_empty,
    wait_state, with_id,
};
use crate::harness::{Smtp, have_tool, queued_id};

/// The time of day (seconds) a daemon log line starts with
/// (`2026-11-24T10:00:00.123456Z  INFO ...`).
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let (_, time) = stamp.split_once('T')?;
    let mut hms = time.trim_end_matches('Z').split(':');
    let h: f64 = hms.next()?.parse().ok()?;
    let m: f64 = hms.next()?.parse().ok()?;
    let s: f64 = hms.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The first header field of `data` (our `Received:`) and the rest.
fn split_first_field(data: &[u8]) -> (&[u8], &[u8]) {
    let mut i = 0;
    while let Some(p) = data[i..].windows(2).position(|w| w == b"\r\n") {
        let end = i + p + 2;
        match data.get(end) {
            Some(b' ') | Some(b'\t') => i = end,
            _ => return data.split_at(end),
        }
    }
    panic!("no complete header field");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_message_reaches_gmail_over_implicit_tls_byte_exact() {
    if !have_tool("python3") {
        return;
    }
    let up = Upstream::start(TlsMode::Implicit).await;
    let d = up.relay("");
    // `token import` (in relay()) tried the token once before storing it.
    let imported = 1;

    // 8-bit text, a lone dot, a dot-led line, trailing blanks, a 900-byte
    // line: all must reach Gmail exactly as the client sent them.
    let mut original = b"From: Scanner <scanner@example.com>\r\nTo: Boss <boss@example.org>\r\nSubject: =?utf-8?q?Scan_=C3=BC?=\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <smtplib-1@e2e.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        .to_vec();
    original.extend_from_slice(
        "Ünïcödé body €\r\n.\r\n..two dots\r\ntrailing blanks \t \r\n".as_bytes(),
    );
    original.extend(std::iter::repeat_n(b'x', 900));
    original.extend_from_slice(b"\r\nlast line\r\n");
    let hex: String = original.iter().map(|b| format!("{b:02x}")).collect();
    let script = format!(
        r#"
import smtplib
msg = bytes.fromhex("{hex}")
with smtplib.SMTP("{host}", {port}, timeout=30) as s:
    s.ehlo("python-client")
    refused = s.sendmail("scanner@example.com", ["boss@example.org"], msg, mail_options=["BODY=8BITMIME"])
    assert refused == {{}}, refused
print("sent")
"#,
        host = d.smtp.ip(),
        port = d.smtp.port()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "smtplib: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let msgs = up.gmail.wait_for_messages(1, T).await;
    assert_eq!(msgs.len(), 1, "{}", d.logs());
    let m = &msgs[0];
    assert_eq!(m.mail_from, "scanner@example.com");
    assert_eq!(m.rcpt_to, ["boss@example.org"]);
    assert_eq!(
        prepended_fields(&m.data, &original),
        ["Received"],
        "only our trace header is added when Date and Message-ID are there"
    );
    assert!(
        m.text().starts_with("Received: from python-client ("),
        "{}",
        m.text()
    );
    // XOAUTH2 as the account, with a token the fake Google issued to it.
    assert_eq!(m.auth_user, EMAIL);
    let offered = up.offered.lock().unwrap().clone();
    let issued = up.google.issued_access_tokens();
    assert_eq!(offered.len(), 1, "one AUTH");
    for (user, token) in &offered {
        assert_eq!(user, EMAIL);
        assert!(issued.contains(token), "a token from the token endpoint");
    }
    assert_eq!(
        up.google.token_requests(GrantType::RefreshToken) - imported,
        1
    );
    let s = up.gmail.stats();
    assert_eq!(
        (s.connections, s.auth_ok, s.auth_rejected, s.messages),
        (1, 1, 0, 1),
        "{s:?}"
    );

    wait_queue_empty(&d, T).await;
    let m = wait_metric(&d, DELIVERED, 1.0, T).await;
    assert_eq!(metric(&m, DELIVERED), 1.0);
    assert_eq!(metric(&m, SENT), 1.0);
    assert_eq!(metric(&m, DEFERRED), 0.0);
    assert_eq!(metric(&m, FAILED), 0.0);
    assert_eq!(metric(&m, BOUNCED), 0.0);
    assert_eq!(metric(&m, RECEIVED), 1.0);
    assert_eq!(metric(&m, "oauthrelay_queue_messages"), 0.0);
    let line = d.wait_log("status=sent", T);
    assert!(
        line.contains("to=<boss@example.org>") && line.contains("account=default"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_upstream_gets_date_and_message_id_added_when_missing() {
    let up = Upstream::start(TlsMode::Starttls).await;
    let d = up.relay("");
    let head = b"From: cron@example.com\r\nTo: ops@example.org\r\nSubject: no date, no id\r\n";
    let body = b"\r\nnightly job ok\r\n.dot-led line\r\n";
    let original = [&head[..], &body[..]].concat();
    submit(&d, "cron@example.com", &["ops@example.org"], &original).await;

    let msgs = up.gmail.wait_for_messages(1, T).await;
    assert_eq!(msgs.len(), 1, "{}", d.logs());
    let m = &msgs[0];
    assert_eq!(m.auth_user, EMAIL);
    let (received, rest) = split_first_field(&m.data);
    assert!(received.starts_with(b"Received: from e2e.test ("));
    assert!(
        rest.starts_with(head) && rest.ends_with(body),
        "the client's header lines and body unchanged: {}",
        m.text()
    );
    let added = &rest[head.len()..rest.len() - body.len()];
    let mut names = field_names(added);
    names.sort();
    assert_eq!(
        names,
        ["Date", "Message-ID"],
        "added at the end of the header section"
    );
    let mid = m.header("Message-ID").unwrap();
    assert!(mid.starts_with('<') && mid.ends_with('>') && mid.contains('@'));

    // A client no one here wrote, on the same relay and upstream.
    if have_tool("swaks") {
        let out = Command::new("swaks")
            .arg("--server")
            .arg(d.smtp.to_string())
            .args(["--from", "swaks@example.com", "--to", "ops@example.org"])
            .args(["--header", "Subject: swaks over starttls upstream"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let msgs = up.gmail.wait_for_messages(2, T).await;
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1].mail_from, "swaks@example.com");
        assert!(
            msgs[1]
                .text()
                .contains("Subject: swaks over starttls upstream")
        );
    }
    wait_queue_empty(&d, T).await;
    assert_eq!(up.gmail.stats().auth_ok, 1, "{:?}", up.gmail.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_messages_in_a_row_use_one_connection_and_one_auth() {
    let up = Upstream::start(TlsMode::Implicit).await;
    // Default concurrency (4): the warm connection must still be the one used.
    let d = up.relay("");
    // `token import` (in relay()) tried the token once before storing it.
    let imported = 1;
    for i in 0..20 {
        let body = message(&format!("row{i}"), "in a row", "x\r\n");
        submit(&d, "printer@example.com", &["r@example.org"], &body).await;
        let got = up.gmail.wait_for_messages(i + 1, T).await;
        assert_eq!(got.len(), i + 1, "message {i} delivered");
    }
    let s = up.gmail.stats();
    assert_eq!(s.messages, 20, "{s:?}");
    assert_eq!(s.connections, 1, "one upstream connection: {s:?}");
    assert_eq!(s.auth_ok, 1, "one AUTH: {s:?}");
    assert_eq!(
        up.google.token_requests(GrantType::RefreshToken) - imported,
        1,
        "one token for all"
    );
    let msgs = up.gmail.messages();
    for i in 0..20 {
        assert_eq!(with_id(&msgs, &format!("row{i}")).len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_closed_by_the_server_is_replaced_without_deferring() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let d = up.relay("concurrency = 1\n");
    submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("pool1", "1", "x\r\n"),
    )
    .await;
    assert_eq!(up.gmail.wait_for_messages(1, T).await.len(), 1);

    // Gmail closes the idle pooled connection.
    up.gmail.close_connections();
    submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("pool2", "2", "x\r\n"),
    )
    .await;
    assert_eq!(up.gmail.wait_for_messages(2, T).await.len(), 2);

    // The pooled connection dies just as it is used again.
    up.gmail.drop_on_command_after_messages(Some(1));
    for i in 3..=4 {
        submit(
            &d,
            "a@example.com",
            &["r@example.org"],
            &message(&format!("pool{i}"), "n", "x\r\n"),
        )
        .await;
        assert_eq!(up.gmail.wait_for_messages(i, T).await.len(), i);
    }
    wait_queue_empty(&d, T).await;
    let s = up.gmail.stats();
    assert_eq!(s.messages, 4, "{s:?}");
    assert!(s.connections >= 3, "connections were replaced: {s:?}");
    let m = metrics(&d).await;
    assert_eq!(
        metric(&m, DEFERRED),
        0.0,
        "a dead pooled connection never defers the message:\n{}",
        d.logs()
    );
    assert_eq!(metric(&m, SENT), 4.0);
    let msgs = up.gmail.messages();
    for i in 1..=4 {
        assert_eq!(with_id(&msgs, &format!("pool{i}")).len(), 1, "pool{i} once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_421_and_451_are_retried_until_delivered() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let d = up.relay("");
    up.gmail
        .fail_next(Stage::Mail, 1, replies::TRY_AGAIN_LATER_421);
    up.gmail
        .fail_next(Stage::DataEnd, 1, replies::TRY_AGAIN_451);
    let id = submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("tmp", "retry me", "x\r\n"),
    )
    .await;
    wait_queue_empty(&d, T).await;
    let msgs = up.gmail.messages();
    assert_eq!(msgs.len(), 1, "delivered once");
    assert_eq!(with_id(&msgs, "tmp").len(), 1);
    let m = wait_metric(&d, DELIVERED, 1.0, T).await;
    assert_eq!(metric(&m, DEFERRED), 2.0, "two deferred attempts");
    assert_eq!(metric(&m, SENT), 1.0);
    assert_eq!(metric(&m, BOUNCED), 0.0);
    let logs = d.logs();
    let story: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(&format!("{id}: to=")))
        .collect();
    assert_eq!(story.len(), 3, "one line per attempt:\n{logs}");
    assert!(story[0].contains("attempt=1") && story[0].contains("status=deferred (421"));
    assert!(story[1].contains("attempt=2") && story[1].contains("status=deferred (451"));
    assert!(story[2].contains("attempt=3") && story[2].contains("status=sent (250"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_recipient_gets_exactly_one_dsn_and_leaves_the_queue() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let d = up.relay("");
    up.gmail
        .reject_recipient("nobody@example.org", replies::NO_SUCH_USER);
    submit(
        &d,
        "app@example.com",
        &["good@example.org", "nobody@example.org"],
        &message("bounce", "e2e bounce", "for two\r\n"),
    )
    .await;
    // The original for the good recipient, then the bounce; then nothing.
    wait_queue_empty(&d, T).await;
    let msgs = up.gmail.messages();
    assert_eq!(msgs.len(), 2, "{msgs:#?}");
    let original = with_id(&msgs, "bounce");
    assert_eq!(original.len(), 1);
    assert_eq!(original[0].rcpt_to, ["good@example.org"]);
    let dsns: Vec<_> = msgs.iter().filter(|m| m.mail_from.is_empty()).collect();
    assert_eq!(dsns.len(), 1, "exactly one DSN");
    let dsn = dsns[0];
    assert_eq!(dsn.rcpt_to, ["app@example.com"], "to the original sender");
    assert_eq!(dsn.auth_user, EMAIL, "through the same account");
    let ct = dsn.header("Content-Type").unwrap();
    assert!(
        ct.contains("multipart/report") && ct.contains("report-type=delivery-status"),
        "{ct}"
    );
    let text = squash(&dsn.text());
    for needle in [
        "Content-Type: message/delivery-status",
        "Final-Recipient: rfc822; nobody@example.org",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550",
        "The email account that you tried to reach does not exist",
        "Subject: e2e bounce",
        "Message-ID: <bounce@e2e.test>",
    ] {
        assert!(
            text.contains(needle),
            "DSN lacks {needle:?}:\n{}",
            dsn.text()
        );
    }
    assert!(
        !text.contains("Final-Recipient: rfc822; good@example.org"),
        "only the failed recipient is reported"
    );
    let m = metrics(&d).await;
    assert_eq!(metric(&m, BOUNCED), 1.0);
    assert_eq!(metric(&m, FAILED), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_limit_keeps_mail_queued_pauses_the_account_and_bounces_nothing() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let d = up.relay("daily_limit_pause = \"1h\"\n");
    up.gmail.fail_next(Stage::DataEnd, 1, replies::DAILY_LIMIT);
    let a = submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("limit1", "a", "x\r\n"),
    )
    .await;
    let entry = until("the first attempt recorded", T, async || {
        let q = queue(&d);
        match q.iter().find(|e| e["id"] == a.as_str()) {
            Some(e) if e["attempts"] == 1 => Ok(e.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(entry["state"], "deferred", "{entry}");
    let err = entry["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("5.4.5") && err.contains("Daily user sending limit exceeded"),
        "{entry}"
    );
    let next = humantime::parse_rfc3339(entry["next_attempt"].as_str().unwrap()).unwrap();
    let wait = next
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        wait > Duration::from_secs(50 * 60),
        "waits for the account's pause (1h here), not retry_initial: {entry}"
    );

    // The account is paused: a new message is not even tried.
    let mails = up.gmail.stats().mail_commands;
    let b = submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("limit2", "b", "x\r\n"),
    )
    .await;
    // The scheduler has taken it in (and decided whether to send it) when
    // the status page counts it for the account: nothing in flight.
    let account = until("the account's status counting both", T, async || {
        let (code, body) = d.http_get("/status.json").await;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{code} {e}"))?;
        let a = v["accounts"][0].clone();
        match a["queued"].as_u64() {
            Some(2) => Ok(a),
            _ => Err(a.to_string()),
        }
    })
    .await;
    assert_eq!(account["in_flight"], 0, "{account}");
    assert_eq!(
        up.gmail.stats().mail_commands,
        mails,
        "nothing is sent while the account is paused"
    );
    let q = queue(&d);
    assert_eq!(q.len(), 2, "{q:?}");
    assert!(q.iter().any(|e| e["id"] == b.as_str()));
    let m = metrics(&d).await;
    assert_eq!(metric(&m, BOUNCED), 0.0);
    assert_eq!(metric(&m, FAILED), 0.0);
    // The pause is visible to monitoring, and not a readiness failure.
    assert_eq!(
        metric(
            &m,
            "oauthrelay_account_paused{account=\"default\",reason=\"daily_limit\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "oauthrelay_account_held{account=\"default\"}"),
        0.0
    );
    let (code, body) = d.http_get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"paused\"") && body.contains("5.4.5"),
        "{body}"
    );
    assert!(up.gmail.messages().is_empty());
    let line = d.wait_log(&format!("{a}: to="), T);
    assert!(line.contains("status=deferred (550"), "{line}");

    // The operator lifts the pause: both go, neither bounced.
    let out = d.cli(&["queue", "retry", "--all"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_queue_empty(&d, T).await;
    let msgs = up.gmail.messages();
    assert_eq!(msgs.len(), 2);
    assert!(msgs.iter().all(|m| !m.mail_from.is_empty()), "no bounce");
    assert_eq!(metric(&metrics(&d).await, BOUNCED), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_access_token_is_refreshed_and_no_secret_is_ever_logged() {
    let up = Upstream::start(TlsMode::Implicit).await;
    // Debug level: the log a user turns on when something is wrong must
    // not leak either.
    let d = up.relay_logging("", Some("debug"));
    // `token import` (in relay()) tried the token once before storing it.
    let imported = 1;
    submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("exp1", "1", "x\r\n"),
    )
    .await;
    assert_eq!(up.gmail.wait_for_messages(1, T).await.len(), 1);

    // Google expires the token the relay still caches; the pooled
    // connection goes away, so the next message needs a new AUTH, which
    // Gmail answers with the 334 challenge.
    up.google.expire_all_access_tokens();
    up.gmail.close_connections();
    submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("exp2", "2", "x\r\n"),
    )
    .await;
    assert_eq!(up.gmail.wait_for_messages(2, T).await.len(), 2);

    // And once more, with Gmail refusing a token that is still valid.
    up.gmail.reject_tokens(1);
    up.gmail.close_connections();
    submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("exp3", "3", "x\r\n"),
    )
    .await;
    assert_eq!(up.gmail.wait_for_messages(3, T).await.len(), 3);
    wait_queue_empty(&d, T).await;

    let s = up.gmail.stats();
    assert_eq!((s.auth_rejected, s.auth_ok), (2, 3), "{s:?}");
    assert_eq!(
        up.google.token_requests(GrantType::RefreshToken) - imported,
        3
    );
    let m = metrics(&d).await;
    assert_eq!(metric(&m, DEFERRED), 0.0, "refreshed, not deferred");
    assert_eq!(metric(&m, SENT), 3.0);
    assert_eq!(
        metric(
            &m,
            "oauthrelay_token_refreshes_total{account=\"default\",result=\"ok\"}"
        ),
        3.0
    );

    let logs = d.logs();
    assert!(
        logs.contains("status=sent") && logs.lines().count() > 20,
        "a real log to search"
    );
    assert_eq!(up.google.issued_access_tokens().len() - imported, 3);
    up.assert_no_secrets("the daemon's debug log", &logs);
    let show = d.cli(&["token", "status"], None);
    up.assert_no_secrets(
        "token status",
        &format!(
            "{}{}",
            String::from_utf8_lossy(&show.stdout),
            String::from_utf8_lossy(&show.stderr)
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_holds_mail_until_token_import_then_it_flows_without_restart() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let d = up.relay("");
    submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("ig1", "works", "x\r\n"),
    )
    .await;
    assert_eq!(up.gmail.wait_for_messages(1, T).await.len(), 1);
    let (status, _) = d.http_get("/readyz").await;
    assert_eq!(status, 200);

    // The user revokes access: the cached token dies with it.
    up.google.revoke_all_refresh_tokens(EMAIL);
    up.google.expire_all_access_tokens();
    up.gmail.close_connections();
    let b = submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("ig2", "held", "x\r\n"),
    )
    .await;
    let held = wait_state(&d, &b, "held").await;
    let why = held["held"].as_str().unwrap_or_default();
    assert!(
        why.contains("oauthrelay authorize --account default"),
        "{held}"
    );

    let (status, body) = d.http_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    let problem = ready["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["account"] == "default")
        .unwrap_or_else(|| panic!("no problem named for the account: {body}"))
        .clone();
    assert!(
        problem["fix"]
            .as_str()
            .is_some_and(|f| f.contains("oauthrelay authorize --account default")),
        "{body}"
    );
    let m = metrics(&d).await;
    assert_eq!(
        metric(&m, "oauthrelay_account_authorized{account=\"default\"}"),
        0.0
    );
    let st = d.cli(&["token", "status", "--json"], None);
    assert_eq!(
        st.status.code(),
        Some(1),
        "token status fails while unusable"
    );
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st[0]["account"], "default");
    assert_eq!(st[0]["authorized"], false, "{st}");
    assert_eq!(st[0]["needs_authorization"], true, "{st}");
    assert!(
        st[0]["fix"]
            .as_str()
            .is_some_and(|f| f.contains("authorize --account default")),
        "{st}"
    );

    // More mail while held: held too, nothing bounced, nothing sent.
    let c = submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("ig3", "held too", "x\r\n"),
    )
    .await;
    wait_state(&d, &c, "held").await;
    assert_eq!(up.gmail.messages().len(), 1);
    assert_eq!(metric(&metrics(&d).await, BOUNCED), 0.0);
    let fix_logged = d.wait_log("oauthrelay authorize --account default", T);
    assert!(!fix_logged.is_empty());

    // The fix, on a running daemon.
    let fresh = up
        .google
        .issue_refresh_token(crate::fakes::CLIENT_ID, EMAIL);
    let out = d.cli(
        &["token", "import", "--account", "default"],
        Some(format!("{fresh}\n").as_bytes()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_queue_empty(&d, T).await;
    let msgs = up.gmail.messages();
    assert_eq!(msgs.len(), 3);
    assert_eq!(with_id(&msgs, "ig2").len(), 1);
    assert_eq!(with_id(&msgs, "ig3").len(), 1);
    assert!(msgs.iter().all(|m| !m.mail_from.is_empty()), "no bounce");
    let (status, body) = until("readyz 200", T, async || {
        match d.http_get("/readyz").await {
            (200, b) => Ok((200, b)),
            (s, b) => Err(format!("{s} {b}")),
        }
    })
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        metric(
            &metrics(&d).await,
            "oauthrelay_account_authorized{account=\"default\"}"
        ),
        1.0
    );
    let st = d.cli(&["token", "status", "--json"], None);
    assert!(st.status.success());
    up.assert_no_secrets("the daemon's log", &d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_then_up_delivers_everything_with_bounded_attempts() {
    let up = Upstream::start(TlsMode::Implicit).await;
    // Debug lines from the delivery side: one per connection attempt that
    // failed, which a listener that is closed cannot count.
    let d = up.relay_logging("", Some("info,outbound=debug"));
    up.gmail.stop_listening();
    for i in 0..5 {
        submit(
            &d,
            "a@example.com",
            &["r@example.org"],
            &message(&format!("down{i}"), "down", "x\r\n"),
        )
        .await;
    }
    wait_metric(&d, DEFERRED, 1.0, T).await;
    // The connection attempts, as the daemon logged them, and how far
    // apart they came.
    let connects = |logs: &str| -> Vec<f64> {
        logs.lines()
            .filter(|l| l.contains("cannot open a session") && l.contains("Connection refused"))
            .map(|l| log_time(l).unwrap_or_else(|| panic!("no timestamp: {l}")))
            .collect()
    };
    let gaps = |c: &[f64]| -> Vec<f64> {
        c.windows(2)
            .map(|w| (w[1] - w[0]).rem_euclid(86_400.0))
            .collect()
    };
    // The schedule (retry_initial 0.5 s doubling to retry_max 2 s, one
    // probe at a time once paused): after the first failure(s) (up to
    // `concurrency` = 4 workers at once) the account waits 0.5, then 1 s.
    // Retrying each message on its own schedule would make five attempts
    // at a time. Wait for two probes after the first burst.
    let burst_of = |g: &[f64]| g.iter().take_while(|&&g| g < 0.1).count();
    until("two probes after the first attempts", T, async || {
        let g = gaps(&connects(&d.logs()));
        match g.len().saturating_sub(burst_of(&g)) {
            n if n >= 2 => Ok(()),
            n => Err(format!("{n} probes: {g:?}")),
        }
    })
    .await;
    let during = metric(&metrics(&d).await, DEFERRED);
    let logs = d.logs();
    let connects = connects(&logs);
    let n = connects.len() as f64;
    eprintln!("attempts while upstream was down: {during}");
    // One connection per attempt, no reconnect loop inside one (the log
    // is read after the metric: at most one more attempt may have begun
    // since).
    assert!(
        n >= during && n <= during + 1.0,
        "one connection per attempt: {n} connections, {during} attempts\n{logs}"
    );
    let gaps = gaps(&connects);
    eprintln!("connection attempts while down: {n}, gaps between them: {gaps:.3?}");
    let burst = burst_of(&gaps);
    assert!(
        burst <= 3,
        "only the first attempts run side by side: {gaps:?}"
    );
    for (k, &g) in gaps[burst..].iter().enumerate() {
        let pause = (0.5 * 2f64.powi(k as i32)).min(2.0);
        assert!(
            g >= pause * 0.95,
            "probe {} came {g:.3} s after the one before, the pause was {pause} s: {gaps:?}",
            k + 1
        );
    }
    // Messages tried are deferred with the reason; those the paused
    // account has not tried yet are simply queued.
    let q = queue(&d);
    assert_eq!(q.len(), 5);
    assert!(
        q.iter()
            .all(|e| e["state"] == "deferred" || (e["state"] == "queued" && e["attempts"] == 0)),
        "{q:?}"
    );
    let tried: Vec<_> = q.iter().filter(|e| e["state"] == "deferred").collect();
    assert!(!tried.is_empty(), "{q:?}");
    assert!(
        tried.iter().all(|e| e["last_error"]
            .as_str()
            .is_some_and(|t| t.contains("Connection refused"))),
        "{q:?}"
    );

    up.gmail.resume_listening().expect("listen again");
    wait_queue_empty(&d, T).await;
    let msgs = up.gmail.messages();
    assert_eq!(msgs.len(), 5);
    for i in 0..5 {
        assert_eq!(with_id(&msgs, &format!("down{i}")).len(), 1);
    }
    let m = metrics(&d).await;
    assert_eq!(metric(&m, BOUNCED), 0.0);
    assert_eq!(metric(&m, SENT), 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_delivery_then_restart_delivers_every_accepted_message() {
    const N: usize = 40;
    let up = Upstream::start(TlsMode::Implicit).await;
    // Slow replies: delivery lags behind acceptance, and both workers
    // have a transaction in flight at almost any moment.
    up.gmail.set_reply_delay(Duration::from_millis(300));
    let mut d = up.relay("concurrency = 2\n");
    let mut s = Smtp::open(d.smtp).await;
    s.cmd("EHLO e2e.test").await;
    let mut acked = Vec::new();
    for i in 0..N {
        let r = s
            .mail(
                "a@example.com",
                &["r@example.org"],
                &message(&format!("k9-{i}"), "crash", "x\r\n"),
            )
            .await;
        assert!(r.starts_with("250 2.0.0"), "{r}");
        acked.push((format!("k9-{i}"), queued_id(&r)));
    }
    s.cmd("QUIT").await;
    assert!(
        up.gmail.wait_for_stats(T, |s| s.messages >= 3).await,
        "delivery started: {:?}",
        up.gmail.stats()
    );
    let at_kill = up.gmail.stats();
    d.kill9();
    assert!(
        (at_kill.messages as usize) < N,
        "the kill came before the end of delivery: {at_kill:?}"
    );
    up.gmail.set_reply_delay(Duration::ZERO);
    let d = d.restart();

    until("every acknowledged message at Gmail", T, async || {
        let msgs = up.gmail.messages();
        let missing: Vec<&str> = acked
            .iter()
            .filter(|(mid, _)| with_id(&msgs, mid).is_empty())
            .map(|(mid, _)| mid.as_str())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("{} missing: {missing:?}", missing.len()))
        }
    })
    .await;
    wait_queue_empty(&d, T).await;
    let msgs = up.gmail.messages();
    let mut count: HashMap<String, usize> = HashMap::new();
    for m in &msgs {
        *count
            .entry(m.message_id.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let duplicates = msgs.len() - N;
    eprintln!(
        "kill -9: {N} acknowledged; {} delivered and {} in flight at the kill; {} delivered in all, {duplicates} duplicate(s) (at-least-once)",
        at_kill.messages,
        at_kill.mail_commands - at_kill.messages,
        msgs.len()
    );
    assert_eq!(count.len(), N, "nothing but the acknowledged messages");
    assert!(
        duplicates <= 2,
        "at most one transaction per worker (concurrency 2) is sent twice: {count:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_delivery_in_flight_finish_and_loses_nothing() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let mut d = up.relay("concurrency = 1\n");
    up.gmail.set_reply_delay(Duration::from_millis(700));
    for i in 0..3 {
        submit(
            &d,
            "a@example.com",
            &["r@example.org"],
            &message(&format!("term{i}"), "term", "x\r\n"),
        )
        .await;
    }
    assert!(
        up.gmail.wait_for_stats(T, |s| s.mail_commands >= 1).await,
        "a transaction is in flight"
    );
    let status = d.terminate(Duration::from_secs(40));
    assert!(
        status.success(),
        "exit 0 on SIGTERM: {status}\n{}",
        d.logs()
    );
    let logs = d.logs();
    assert!(
        logs.contains("SIGTERM") && logs.contains("stopped"),
        "{logs}"
    );
    // Each message takes at least two delayed replies (1.4 s): the three
    // cannot all have gone before the signal.
    let at_exit = up.gmail.stats();
    assert_eq!(
        at_exit.messages, at_exit.mail_commands,
        "every transaction started was finished: {at_exit:?}\n{logs}"
    );
    assert!(
        (1..3).contains(&at_exit.messages),
        "the one in flight finished, the rest stayed queued: {at_exit:?}"
    );

    up.gmail.set_reply_delay(Duration::ZERO);
    let d = d.restart();
    wait_queue_empty(&d, T).await;
    let msgs = up.gmail.messages();
    for i in 0..3 {
        assert_eq!(
            with_id(&msgs, &format!("term{i}")).len(),
            1,
            "term{i} delivered exactly once"
        );
    }
    assert_eq!(msgs.len(), 3);
}
