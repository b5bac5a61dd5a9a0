//! Delivery to the fake Gmail over real sockets: byte-exact copies, both TLS
//! modes, connection reuse, recipient limits, rewrite_from, bounces.

mod common;

use std::time::{Duration, Instant};

use common::*;
use outbound::AttemptResult;
use spool::Envelope;
use testkit::gmail::replies;

const T: Duration = Duration::from_secs(15);

#[tokio::test]
async fn delivers_byte_exact_over_implicit_tls_with_bdat() {
    let h = Harness::new().await;
    // Leading dots, a bare LF, 8-bit bytes, no final line end: BDAT sends
    // all of it untouched.
    let mut body = message("exact", ".leading dot\r\n..two dots\r\nbare\nlf\r\n");
    body.extend_from_slice("caf\u{e9} \u{2603}\r\nlast line without end".as_bytes());
    let mut env = Envelope::new("app@example.com", ["rcpt@example.org".to_string()]);
    env.eight_bit = true;
    let id = h.submit_env(env, &body).await;

    let msgs = h.wait_messages(1, T).await;
    let m = &msgs[0];
    assert_eq!(m.data, body, "the spool copy arrives byte for byte");
    assert_eq!(m.mail_from, "app@example.com");
    assert_eq!(m.rcpt_to, ["rcpt@example.org"]);
    assert!(m.chunked, "Gmail offers CHUNKING: BDAT is used");
    assert_eq!(m.auth_user, EMAIL);
    assert!(
        m.mail_params
            .iter()
            .any(|p| p == &format!("SIZE={}", body.len()))
    );
    assert!(m.mail_params.iter().any(|p| p == "BODY=8BITMIME"));
    assert!(
        h.wait_gone(id, T).await,
        "delivered message leaves the spool"
    );
    // Counted once the removal is durable, just after the wait above.
    assert!(common::wait_until(T, || h.metrics.delivered_count() == 1).await);
    assert_eq!(h.metrics.attempts_count(AttemptResult::Sent), 1);
}

#[tokio::test]
async fn delivers_over_starttls_including_a_large_streamed_message() {
    let h = Harness::with(Setup {
        starttls: true,
        ..Setup::default()
    })
    .await;
    let small = message("small", "hello\r\n");
    // Bigger than one spool chunk and than what is sent inline.
    let mut big = message("big", "");
    for i in 0..40_000 {
        big.extend_from_slice(
            format!("line {i:06} of a multi-megabyte attachment..\r\n").as_bytes(),
        );
    }
    let a = h.submit("a@example.com", &["x@example.org"], &small).await;
    let b = h.submit("b@example.com", &["y@example.org"], &big).await;
    let msgs = h.wait_messages(2, T).await;
    let got_small = msgs
        .iter()
        .find(|m| m.mail_from == "a@example.com")
        .unwrap();
    let got_big = msgs
        .iter()
        .find(|m| m.mail_from == "b@example.com")
        .unwrap();
    assert_eq!(got_small.data, small);
    assert_eq!(got_big.data.len(), big.len());
    assert!(got_big.data == big, "large message byte-exact");
    assert!(h.wait_gone(a, T).await && h.wait_gone(b, T).await);
}

#[tokio::test]
async fn data_with_dot_stuffing_when_chunking_is_not_offered() {
    let h = Harness::with(Setup {
        gmail: |b| b.without_chunking(),
        ..Setup::default()
    })
    .await;
    let body = message("dots", ".\r\n..\r\n.x\r\nend\r\n");
    let id = h.submit("app@example.com", &["r@example.org"], &body).await;
    let msgs = h.wait_messages(1, T).await;
    assert!(!msgs[0].chunked, "DATA was used");
    assert_eq!(
        msgs[0].data, body,
        "dot-stuffing is undone exactly at the server"
    );
    assert!(h.wait_gone(id, T).await);
}

#[tokio::test]
async fn lockstep_without_pipelining() {
    let h = Harness::with(Setup {
        gmail: |b| b.without_pipelining().without_chunking(),
        ..Setup::default()
    })
    .await;
    let body = message("lockstep", "one command at a time\r\n");
    let id = h
        .submit(
            "app@example.com",
            &["r1@example.org", "r2@example.org"],
            &body,
        )
        .await;
    let msgs = h.wait_messages(1, T).await;
    assert_eq!(msgs[0].rcpt_to, ["r1@example.org", "r2@example.org"]);
    assert_eq!(msgs[0].data, body);
    assert!(h.wait_gone(id, T).await);
}

#[tokio::test]
async fn twenty_messages_share_one_connection_and_one_auth() {
    let mut config = fast_config();
    config.concurrency = 1;
    let h = Harness::with(Setup {
        config,
        ..Setup::default()
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let body = message(&format!("m{i}"), "reuse me\r\n");
        ids.push(h.submit("app@example.com", &["r@example.org"], &body).await);
    }
    h.wait_messages(20, T).await;
    for id in ids {
        assert!(h.wait_gone(id, T).await);
    }
    let s = h.gmail.stats();
    assert_eq!(s.connections, 1, "one upstream connection: {s:?}");
    assert_eq!(s.auth_ok, 1, "one AUTH: {s:?}");
    assert_eq!(s.messages, 20);
    assert_eq!(s.rsets, 19, "RSET between transactions");
    assert_eq!(s.quits, 0, "the connection stays open while in use");
}

#[tokio::test]
async fn sequential_messages_reuse_the_warm_connection_with_default_concurrency() {
    let h = Harness::new().await;
    for i in 0..5 {
        let id = h
            .submit(
                "app@example.com",
                &["r@example.org"],
                &message(&format!("s{i}"), "x\r\n"),
            )
            .await;
        assert!(h.wait_gone(id, T).await);
    }
    let s = h.gmail.stats();
    assert_eq!((s.connections, s.auth_ok, s.messages), (1, 1, 5), "{s:?}");
}

#[tokio::test]
async fn more_than_100_recipients_are_split_into_transactions() {
    let h = Harness::new().await;
    // A server that would take them all at once: the batches of 100 are
    // ours, not a reaction to `452 4.5.3`.
    h.gmail.set_max_recipients(1000);
    let rcpts: Vec<String> = (0..250)
        .map(|i| format!("user{i:03}@example.org"))
        .collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let body = message("many", "to many\r\n");
    let id = h.submit("app@example.com", &refs, &body).await;
    let msgs = h.wait_messages(3, T).await;
    assert!(h.wait_gone(id, T).await);
    let sizes: Vec<usize> = msgs.iter().map(|m| m.rcpt_to.len()).collect();
    assert_eq!(sizes, [100, 100, 50]);
    let all: Vec<String> = msgs.iter().flat_map(|m| m.rcpt_to.clone()).collect();
    assert_eq!(all, rcpts, "every recipient once, in order");
    assert!(msgs.iter().all(|m| m.data == body));
    let s = h.gmail.stats();
    assert_eq!(s.connections, 1);
    assert_eq!(s.rcpt_commands, 250, "each RCPT once, none refused: {s:?}");
    assert_eq!(
        h.metrics.attempts_count(AttemptResult::Sent),
        1,
        "one attempt"
    );
}

#[tokio::test]
async fn too_many_recipients_452_sends_the_rest_in_a_new_transaction() {
    let h = Harness::new().await;
    // A server that takes 30 per transaction answers the 31st with 452 4.5.3.
    h.gmail.set_max_recipients(30);
    let rcpts: Vec<String> = (0..70).map(|i| format!("u{i:02}@example.org")).collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let id = h
        .submit("app@example.com", &refs, &message("452", "rest later\r\n"))
        .await;
    let msgs = h.wait_messages(3, T).await;
    assert!(h.wait_gone(id, T).await);
    let sizes: Vec<usize> = msgs.iter().map(|m| m.rcpt_to.len()).collect();
    assert_eq!(sizes, [30, 30, 10]);
    assert_eq!(
        h.metrics.attempts_count(AttemptResult::Deferred),
        0,
        "not deferred"
    );
    assert_eq!(h.metrics.attempts_count(AttemptResult::Sent), 1);
}

#[tokio::test]
async fn rewrite_from_sets_sender_and_from_and_keeps_the_original_in_reply_to() {
    let h = Harness::with(Setup {
        rewrite_from: true,
        ..Setup::default()
    })
    .await;
    let body = b"Subject: scan\r\nFrom: \"HP Scanner\" <scanner@office.lan>\r\nTo: boss@example.org\r\n\r\nscan attached\r\n".to_vec();
    let id = h
        .submit("scanner@office.lan", &["boss@example.org"], &body)
        .await;
    let msgs = h.wait_messages(1, T).await;
    assert!(h.wait_gone(id, T).await);
    let m = &msgs[0];
    assert_eq!(m.mail_from, EMAIL, "envelope sender rewritten");
    assert_eq!(
        m.text(),
        "Subject: scan\r\nFrom: \"HP Scanner\" <me@gmail.com>\r\nReply-To: \"HP Scanner\" <scanner@office.lan>\r\nTo: boss@example.org\r\n\r\nscan attached\r\n"
    );
    assert!(
        m.mail_params
            .iter()
            .any(|p| p == &format!("SIZE={}", m.data.len()))
    );
}

#[tokio::test]
async fn rewrite_from_streams_a_large_message_and_keeps_an_existing_reply_to() {
    let h = Harness::with(Setup {
        rewrite_from: true,
        ..Setup::default()
    })
    .await;
    let mut body =
        b"From: cron@host.lan\r\nReply-To: admin@example.org\r\nSubject: report\r\n\r\n".to_vec();
    for i in 0..20_000 {
        body.extend_from_slice(format!("row {i}\r\n").as_bytes());
    }
    let id = h
        .submit("cron@host.lan", &["admin@example.org"], &body)
        .await;
    let msgs = h.wait_messages(1, T).await;
    assert!(h.wait_gone(id, T).await);
    let expected = [
        b"From: me@gmail.com\r\nReply-To: admin@example.org\r\nSubject: report\r\n\r\n".as_slice(),
        &body[b"From: cron@host.lan\r\nReply-To: admin@example.org\r\nSubject: report\r\n\r\n"
            .len()..],
    ]
    .concat();
    assert!(msgs[0].data == expected, "only From: changed");
}

// ---- bounces ---------------------------------------------------------------

/// The parts of a multipart message: (headers, body) each.
fn parts(msg: &str) -> Vec<(String, String)> {
    let (head, _) = msg.split_once("\r\n\r\n").expect("header section");
    let unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ");
    let ct = unfolded
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("content-type:"))
        .expect("content-type");
    assert!(ct.contains("multipart/report"), "{ct}");
    assert!(ct.contains("report-type=delivery-status"), "{ct}");
    let boundary = ct
        .split("boundary=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("boundary");
    let delim = format!("--{boundary}");
    let mut out = Vec::new();
    for chunk in msg.split(&delim).skip(1) {
        if chunk.starts_with("--") {
            break;
        }
        let chunk = chunk.trim_start_matches("\r\n");
        let (h, b) = chunk.split_once("\r\n\r\n").unwrap_or((chunk, ""));
        out.push((h.to_string(), b.to_string()));
    }
    out
}

/// `name: value` fields of a delivery-status group (unfolded).
fn field(group: &str, name: &str) -> Option<String> {
    let unfolded = group.replace("\r\n ", " ");
    unfolded.split("\r\n").find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

#[tokio::test]
async fn permanent_failure_gives_exactly_one_dsn_and_removes_the_message() {
    let h = Harness::new().await;
    h.gmail
        .reject_recipient("nobody@example.org", replies::NO_SUCH_USER);
    let body = message("bounceme", "hello\r\n");
    let id = h
        .submit(
            "app@example.com",
            &["ok@example.org", "nobody@example.org"],
            &body,
        )
        .await;
    // The original (to the good recipient) and the bounce.
    let msgs = h.wait_messages(2, T).await;
    assert!(h.wait_gone(id, T).await, "the message leaves the spool");
    // A bounce is queued before the message is removed: once the spool is
    // empty, every bounce there was has gone out.
    assert!(wait_until(T, || h.spool.list().is_empty()).await);
    let msgs_now = h.gmail.messages();
    assert_eq!(msgs_now.len(), 2, "exactly one bounce");
    let orig = msgs
        .iter()
        .find(|m| m.mail_from == "app@example.com")
        .unwrap();
    assert_eq!(orig.rcpt_to, ["ok@example.org"]);
    let dsn = msgs
        .iter()
        .find(|m| m.mail_from.is_empty())
        .expect("bounce with the null sender");
    assert_eq!(dsn.rcpt_to, ["app@example.com"], "to the original sender");
    assert_eq!(dsn.auth_user, EMAIL, "through the same account");

    let text = dsn.text();
    assert!(text.contains("\r\nTo: <app@example.com>\r\n"));
    assert!(text.starts_with("From: Mail Delivery System <me@gmail.com>\r\n"));
    let p = parts(&text);
    assert_eq!(p.len(), 3, "human-readable, delivery-status, headers");
    assert!(p[0].0.contains("text/plain"));
    assert!(p[0].1.contains("nobody@example.org"));
    assert!(p[1].0.contains("Content-Type: message/delivery-status"));
    let groups: Vec<&str> = p[1]
        .1
        .split("\r\n\r\n")
        .filter(|g| !g.trim().is_empty())
        .collect();
    assert_eq!(
        field(groups[0], "Reporting-MTA").as_deref(),
        Some("dns; relay.test")
    );
    assert!(field(groups[0], "Arrival-Date").is_some());
    assert_eq!(
        groups.len(),
        2,
        "one per-message group, one failed recipient"
    );
    let g = groups[1];
    assert_eq!(
        field(g, "Final-Recipient").as_deref(),
        Some("rfc822; nobody@example.org")
    );
    assert_eq!(field(g, "Action").as_deref(), Some("failed"));
    assert_eq!(field(g, "Status").as_deref(), Some("5.1.1"));
    let diag = field(g, "Diagnostic-Code").expect("diagnostic code");
    assert!(
        diag.starts_with(
            "smtp; 550 5.1.1 The email account that you tried to reach does not exist."
        ),
        "{diag}"
    );
    assert!(
        diag.contains("https://support.google.com/mail/?p=NoSuchUser"),
        "Gmail's full reply: {diag}"
    );
    assert!(p[2].0.contains("text/rfc822-headers"));
    assert!(p[2].1.contains("Subject: bounceme\r\n"));
    assert!(p[2].1.contains("Message-ID: <bounceme@example.com>\r\n"));
    assert!(!p[2].1.contains("hello"), "headers only");
    assert_eq!(h.metrics.bounced_count(), 1);
}

#[tokio::test]
async fn the_null_sender_gets_no_bounce_the_postmaster_gets_a_copy_once() {
    let h = Harness::new().await;
    h.gmail
        .reject_recipient("nobody@example.org", replies::NO_SUCH_USER);
    let id = h
        .submit("", &["nobody@example.org"], &message("nb", "x\r\n"))
        .await;
    assert!(h.wait_gone(id, T).await, "failed message removed");
    h.wait_messages(1, T).await;
    assert!(
        wait_until(T, || h.spool.list().is_empty()).await,
        "nothing left queued"
    );
    // Anything else (a second copy) would have been queued before the
    // removal: in the spool, or sent by now.
    let msgs = h.gmail.messages();
    assert_eq!(msgs.len(), 1, "one copy, no loops: {msgs:#?}");
    let copy = &msgs[0];
    assert_eq!(copy.mail_from, "");
    assert_eq!(copy.rcpt_to, [EMAIL], "the default postmaster: the account");
    let text = copy.text();
    assert!(text.contains("Subject: Postmaster Copy: Undelivered Mail\r\n"));
    assert!(text.contains("Content-Type: message/rfc822\r\n"));
    assert!(text.contains("Final-Recipient: rfc822; nobody@example.org\r\n"));
    assert!(text.contains("\r\n\r\nx\r\n"), "the message whole: {text}");
    assert_eq!(h.metrics.bounced_count(), 1, "one report generated");
    // Counted once the removal is durable, just after the queue looks
    // empty.
    assert!(
        wait_until(T, || h.metrics.failed_count() == 1).await,
        "one failed message"
    );
    assert_eq!(h.metrics.dropped_count(), 0);
}

#[tokio::test]
async fn a_refused_postmaster_copy_is_dropped_and_counted_once() {
    let mut config = fast_config();
    config.postmaster = Some("postmaster@gone.example".into());
    let h = Harness::with(Setup {
        config,
        ..Setup::default()
    })
    .await;
    h.gmail
        .reject_recipient("nobody@example.org", replies::NO_SUCH_USER);
    h.gmail
        .reject_recipient("postmaster@gone.example", replies::NO_SUCH_USER);
    let id = h
        .submit("", &["nobody@example.org"], &message("nb", "x\r\n"))
        .await;
    assert!(h.wait_gone(id, T).await);
    assert!(
        wait_until(T, || h.metrics.dropped_count() == 1).await,
        "the copy's failure is counted"
    );
    // The copy is dropped before it is removed, and anything it caused (a
    // report about the report) would be queued before that removal: once
    // the spool is empty, all of it has been sent or counted.
    assert!(wait_until(T, || h.spool.list().is_empty()).await);
    // Counted once each removal is durable: the message, then its copy.
    assert!(
        wait_until(T, || h.metrics.failed_count() == 2).await,
        "failed messages: {}",
        h.metrics.failed_count()
    );
    assert!(h.gmail.messages().is_empty());
    assert!(h.spool.list().is_empty(), "nothing more queued");
    assert_eq!(h.metrics.dropped_count(), 1);
    assert_eq!(
        h.metrics.bounced_count(),
        1,
        "the copy, and nothing after it"
    );
}

#[tokio::test]
async fn size_refusal_at_mail_bounces_every_recipient() {
    let h = Harness::new().await;
    h.gmail
        .fail_next(testkit::gmail::Stage::Mail, 1, replies::TOO_BIG);
    let id = h
        .submit(
            "app@example.com",
            &["a@example.org", "b@example.org"],
            &message("big", "x\r\n"),
        )
        .await;
    let msgs = h.wait_messages(1, T).await;
    assert!(h.wait_gone(id, T).await);
    let dsn = &msgs[0];
    assert_eq!(dsn.mail_from, "");
    let text = dsn.text();
    assert_eq!(text.matches("Action: failed").count(), 2);
    assert!(text.contains("Status: 5.3.4"));
}

/// The one bounce at the fake: its text, its human-readable part and its
/// per-recipient delivery-status groups.
fn the_bounce(msgs: &[testkit::gmail::ReceivedMessage]) -> (String, String, Vec<String>) {
    let bounces: Vec<_> = msgs.iter().filter(|m| m.mail_from.is_empty()).collect();
    assert_eq!(bounces.len(), 1, "one bounce");
    let text = bounces[0].text();
    let p = parts(&text);
    assert_eq!(p.len(), 3, "{text}");
    let words = p[0].1.replace("\r\n    ", " ");
    let groups: Vec<String> = p[1]
        .1
        .split("\r\n\r\n")
        .filter(|g| !g.trim().is_empty())
        .skip(1)
        .map(str::to_string)
        .collect();
    (text, words, groups)
}

#[tokio::test]
async fn max_age_fails_permanently_with_the_last_reply() {
    let mut config = fast_config();
    config.max_age = Duration::from_millis(800);
    let h = Harness::with(Setup {
        config,
        ..Setup::default()
    })
    .await;
    h.gmail
        .reject_recipient("slow@example.org", replies::SENDING_TOO_FAST_450);
    let id = h
        .submit(
            "app@example.com",
            &["slow@example.org"],
            &message("old", "x\r\n"),
        )
        .await;
    let msgs = h.wait_messages(1, T).await;
    assert!(h.wait_gone(id, T).await);
    let dsn = &msgs[0];
    assert_eq!(dsn.mail_from, "");
    assert_eq!(dsn.rcpt_to, ["app@example.com"]);
    let (_, words, groups) = the_bounce(&msgs);
    assert!(
        words.contains(
            "<slow@example.org>: the message expired after 800ms in the queue without being delivered; the last attempt got: host 127.0.0.1 said: 450 4.2.1 The user you are trying to contact"
        ),
        "{words}"
    );
    assert_eq!(groups.len(), 1);
    let g = &groups[0];
    assert_eq!(
        field(g, "Final-Recipient").as_deref(),
        Some("rfc822; slow@example.org")
    );
    assert_eq!(field(g, "Action").as_deref(), Some("failed"));
    assert_eq!(
        field(g, "Status").as_deref(),
        Some("5.4.7"),
        "delivery time expired"
    );
    let diag = field(g, "Diagnostic-Code").expect("diagnostic code");
    assert!(diag.starts_with("smtp; 450 4.2.1 The user"), "{diag}");
    // Expired on the attempt that got the 450 once more, not before it.
    assert!(h.metrics.attempts_count(AttemptResult::Deferred) >= 1);
    assert_eq!(h.metrics.attempts_count(AttemptResult::Failed), 1);
    let rcpts = h.gmail.stats().rcpt_commands;
    assert_eq!(
        rcpts,
        h.metrics.attempts_count(AttemptResult::Deferred) + 2,
        "one RCPT per attempt of the message, one for the bounce"
    );
}

/// Issue 10: `535 5.7.8` to MAIL after a successful AUTH bounced 2 of 3
/// messages. An authentication reply at any stage after AUTH is treated
/// like a refused token: a fresh token on a fresh connection once, then
/// the account is held (the token manager says it needs authorization);
/// nothing bounces, and the held time does not age the mail.
#[tokio::test]
async fn an_authentication_reply_after_auth_holds_the_account_and_bounces_nothing() {
    for (stage, reply) in [
        (
            testkit::gmail::Stage::Mail,
            "535-5.7.8 Username and Password not accepted. For more information, go to\r\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials fake - gsmtp",
        ),
        (
            testkit::gmail::Stage::Rcpt,
            "530-5.7.0 Authentication Required. For more information, go to\r\n530 5.7.0  https://support.google.com/mail/?p=WantAuthError fake - gsmtp",
        ),
        (
            testkit::gmail::Stage::DataEnd,
            "535 5.7.8 Username and Password not accepted. fake - gsmtp",
        ),
    ] {
        let h = Harness::new().await;
        h.gmail.fail_next(stage, 100, reply);
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(
                h.submit(
                    "app@example.com",
                    &["a@example.org", "b@example.org"],
                    &message(&format!("auth{i}"), "x\r\n"),
                )
                .await,
            );
        }
        assert!(
            wait_until(T, || ids
                .iter()
                .all(|id| h.view(*id).is_some_and(|v| v.held.is_some())))
            .await,
            "{stage:?}: every message held"
        );
        let held = h.view(ids[0]).unwrap().held.unwrap();
        assert!(held.contains("needs authorization"), "{held}");
        assert!(
            held.contains("oauthrelay authorize --account default"),
            "{held}"
        );
        let status = h.tokens.account_status("default").unwrap();
        assert!(!status.auth.is_authorized(), "the token manager holds it");
        assert!(h.outbound().account_states()[0].held.is_some());
        for id in &ids {
            let v = h.view(*id).unwrap();
            assert!(
                v.recipients
                    .iter()
                    .all(|r| r.state == outbound::RcptState::Pending),
                "{stage:?}: nothing failed: {v:?}"
            );
        }
        assert!(
            h.gmail.messages().is_empty(),
            "{stage:?}: no bounce, nothing sent"
        );
        assert_eq!(h.metrics.bounced_count(), 0);
        assert_eq!(h.metrics.attempts_count(AttemptResult::Failed), 0);
    }
}

#[tokio::test]
async fn a_message_paused_by_the_daily_limit_past_max_age_is_not_bounced() {
    let mut config = fast_config();
    config.max_age = Duration::from_millis(100);
    config.daily_limit_pause = Duration::from_millis(200);
    let h = Harness::with(Setup {
        config,
        ..Setup::default()
    })
    .await;
    // Three daily-limit answers (pauses 0.2, 0.4, 0.8 s), all long after
    // max_age; then Gmail takes it.
    h.gmail
        .fail_next(testkit::gmail::Stage::DataEnd, 3, replies::DAILY_LIMIT);
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("dl-old", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(id, T).await);
    let msgs = h.gmail.messages();
    assert_eq!(msgs.len(), 1, "delivered, no bounce");
    assert_eq!(msgs[0].mail_from, "app@example.com");
    assert_eq!(h.gmail.stats().mail_commands, 4);
    assert_eq!(h.metrics.bounced_count(), 0);
    assert_eq!(h.metrics.attempts_count(AttemptResult::Failed), 0);
}

#[tokio::test]
async fn a_held_accounts_message_past_max_age_is_not_bounced() {
    let mut config = fast_config();
    config.max_age = Duration::from_millis(200);
    let mut h = Harness::with(Setup {
        config,
        start: false,
        ..Setup::default()
    })
    .await;
    h.google.revoke_refresh_token(&h.refresh_token);
    h.start();
    let id = h
        .submit(
            "scanner@office.lan",
            &["boss@example.org"],
            &message("scan", "a scanned page\r\n"),
        )
        .await;
    assert!(wait_until(T, || h.view(id).is_some_and(|e| e.held.is_some())).await);
    // Held until it is older than max_age (200 ms).
    let received = h.view(id).expect("queued").envelope.received;
    assert!(
        wait_until(T, || received
            .elapsed()
            .is_ok_and(|age| age > Duration::from_millis(300)))
        .await
    );
    // `queue retry` well past max_age: the account still waits for
    // `authorize` (a dead refresh token: nothing to probe), and the
    // message neither expires nor is attempted.
    for _ in 0..2 {
        let before = h.view(id).expect("queued").attempts;
        assert!(h.outbound().retry(id).await);
        assert!(h.outbound().ping().await);
        let e = h.view(id).expect("still queued (not expired on the retry)");
        assert!(e.held.is_some() && e.attempts == before, "{e:?}");
    }
    let env = h.view(id).expect("still queued");
    assert!(env.recipients.iter().all(|r| !r.expired), "{env:?}");
    assert!(h.gmail.messages().is_empty(), "no bounce");
    assert_eq!(h.metrics.bounced_count(), 0);
    // Authorized again: the scan goes out, whatever its age. The time it
    // was held does not age it, so a first temporary refusal after the
    // release defers it instead of expiring it.
    h.gmail
        .fail_next(testkit::gmail::Stage::DataEnd, 1, replies::TRY_AGAIN_451);
    let fresh = h.google.issue_refresh_token(CLIENT_ID, EMAIL);
    oauth::import_refresh_token(&h.resolved, &fresh).expect("import");
    assert!(h.wait_gone(id, T).await);
    let msgs = h.gmail.messages();
    assert_eq!(msgs.len(), 1, "the scan, and no bounce");
    assert_eq!(msgs[0].mail_from, "scanner@office.lan");
    assert_eq!(h.metrics.bounced_count(), 0);
}

#[tokio::test]
async fn unroutable_mail_is_held_then_released_by_reload() {
    let h = Harness::with(Setup {
        senders: vec!["*@example.com".into()],
        ..Setup::default()
    })
    .await;
    let id = h
        .submit(
            "someone@other.org",
            &["r@example.org"],
            &message("nr", "x\r\n"),
        )
        .await;
    assert!(
        wait_until(T, || h.view(id).is_some_and(|e| e.held.is_some())).await,
        "held durably"
    );
    let held = h.view(id).unwrap().held.unwrap();
    assert!(held.contains("senders"), "{held}");
    assert_eq!(h.gmail.stats().mail_commands, 0);
    let mut account = h.account.clone();
    account.senders = vec!["*".into()];
    h.outbound().reload(vec![account], h.config.clone());
    assert!(h.wait_gone(id, T).await, "delivered after the reload");
    assert_eq!(h.gmail.messages().len(), 1);
}

#[tokio::test]
async fn a_message_deleted_while_deferred_is_skipped() {
    let h = Harness::new().await;
    let env = Envelope::new("app@example.com", ["r@example.org".to_string()]);
    let state = deferred_state(
        1,
        1,
        std::time::SystemTime::now() + Duration::from_millis(300),
    );
    let gone = h
        .submit_state(env, Some(state), &message("deleted", "x\r\n"))
        .await;
    h.spool.remove(gone).await.unwrap();
    let kept = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("kept", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(kept, T).await);
    // The deleted one due now too: its attempt finds it gone.
    h.outbound().retry_all().await;
    assert!(h.outbound().ping().await);
    assert!(
        wait_until(T, || h
            .outbound()
            .account_states()
            .first()
            .is_some_and(|a| a.in_flight == 0))
        .await
    );
    let msgs = h.gmail.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].message_id.as_deref(), Some("<kept@example.com>"));
}

#[tokio::test]
async fn queued_messages_are_scheduled_at_start_and_retry_makes_them_due() {
    let mut h = Harness::with(Setup {
        start: false,
        ..Setup::default()
    })
    .await;
    let a = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("before", "x\r\n"),
        )
        .await;
    let env = Envelope::new("app@example.com", ["r@example.org".to_string()]);
    let state = deferred_state(
        1,
        3,
        std::time::SystemTime::now() + Duration::from_secs(3600),
    );
    let b = h
        .submit_state(env, Some(state), &message("later", "x\r\n"))
        .await;
    h.start();
    assert!(h.wait_gone(a, T).await, "queued before start: delivered");
    assert!(h.outbound().ping().await);
    assert!(h.view(b).is_some(), "deferred an hour: waits");
    assert_eq!(h.gmail.messages().len(), 1);
    assert!(h.outbound().retry(b).await);
    assert!(h.wait_gone(b, T).await, "retry makes it due now");
}

/// Not a pass/fail test: prints the time from the spool commit (when the
/// inbound side answers 250) to the upstream MAIL and to the upstream 250,
/// on an idle relay with a warm pooled connection.
/// `cargo test -p outbound --release --test delivery -- --ignored --nocapture commit_to_mail_latency`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn commit_to_mail_latency() {
    let h = Harness::new().await;
    let warm = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("warm", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(warm, T).await);
    let n = 300;
    let mut to_mail = Vec::with_capacity(n);
    let mut to_250 = Vec::with_capacity(n);
    for i in 0..n {
        let body = message(&format!("lat{i}"), "latency probe\r\n");
        let id = put(
            &h.spool,
            Envelope::new("app@example.com", ["r@example.org".to_string()]),
            &body,
        )
        .await;
        let committed = Instant::now();
        let msgs = h.gmail.wait_for_messages(i + 2, T).await;
        let m = msgs.last().unwrap();
        to_mail.push(m.mail_at.saturating_duration_since(committed));
        to_250.push(m.accepted_at.saturating_duration_since(committed));
        assert!(h.wait_gone(id, T).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s = h.gmail.stats();
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() as f64 - 1.0) * p) as usize]
    };
    println!(
        "commit -> upstream MAIL: p50 {:?} p99 {:?} max {:?}",
        pct(&mut to_mail, 0.5),
        pct(&mut to_mail, 0.99),
        pct(&mut to_mail, 1.0)
    );
    println!(
        "commit -> upstream 250:  p50 {:?} p99 {:?} max {:?}",
        pct(&mut to_250, 0.5),
        pct(&mut to_250, 0.99),
        pct(&mut to_250, 1.0)
    );
    println!(
        "upstream connections: {}, AUTHs: {}",
        s.connections, s.auth_ok
    );
}

/// Not a pass/fail test: end-to-end rate of 1 KB messages through one
/// account (4 workers) to the fake Gmail, everything in one process.
/// `cargo test -p outbound --release --test delivery -- --ignored --nocapture delivery_throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn delivery_throughput() {
    let mut config = fast_config();
    config.concurrency = 4;
    let h = Harness::with(Setup {
        config,
        gmail: |b| b.keep_data(false),
        ..Setup::default()
    })
    .await;
    let warm = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("warm", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(warm, T).await);
    let n = 5000;
    let body = {
        let mut b = message("tp", "");
        b.resize(1024, b'x');
        b.extend_from_slice(b"\r\n");
        b
    };
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..20 {
        let spool = h.spool.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / 20 {
                put(
                    &spool,
                    Envelope::new(format!("c{c}@example.com"), ["r@example.org".to_string()]),
                    &body,
                )
                .await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let accepted = t0.elapsed();
    let msgs = h
        .gmail
        .wait_for_messages(n + 1, Duration::from_secs(120))
        .await;
    let delivered = t0.elapsed();
    assert_eq!(msgs.len(), n + 1);
    println!(
        "{n} messages: committed in {accepted:?} ({:.0}/s), delivered in {delivered:?} ({:.0}/s); upstream connections {}",
        n as f64 / accepted.as_secs_f64(),
        n as f64 / delivered.as_secs_f64(),
        h.gmail.stats().connections
    );
}

// ---- send-test, metrics, logs -----------------------------------------------

#[tokio::test]
async fn send_test_reports_every_step_and_delivers() {
    let h = Harness::with(Setup {
        start: false,
        starttls: true,
        ..Setup::default()
    })
    .await;
    let mut lines: Vec<String> = Vec::new();
    let report = outbound::send_test(
        &h.tokens,
        &h.account,
        &h.config,
        HOSTNAME,
        "friend@example.org",
        &mut |l: &str| lines.push(l.to_string()),
    )
    .await
    .expect("send-test works");
    let all = lines.join("\n");
    for needle in [
        "access token for default: ok",
        "connected to 127.0.0.1[127.0.0.1]:",
        "STARTTLS: 220 2.0.0 Ready to start TLS",
        "TLS established (TLSv1_3",
        "EHLO: smtp.gmail.com at your service",
        "AUTH XOAUTH2 as me@gmail.com: 235 accepted",
        "MAIL FROM:<me@gmail.com>: 250 2.1.0 OK",
        "RCPT TO:<friend@example.org>: 250 2.1.5 OK",
        "BDAT ",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    for token in h.google.issued_access_tokens() {
        assert!(!all.contains(&token), "an access token was printed");
    }
    assert!(report.reply.starts_with("250 2.0.0 OK"));
    let msgs = h.wait_messages(1, T).await;
    assert_eq!(msgs[0].rcpt_to, ["friend@example.org"]);
    assert_eq!(
        msgs[0].header("Subject").as_deref(),
        Some("oauthrelay test message")
    );
    assert_eq!(
        msgs[0].message_id.as_deref(),
        Some(report.message_id.as_str())
    );
}

#[tokio::test]
async fn send_test_explains_an_authentication_failure() {
    let h = Harness::with(Setup {
        start: false,
        ..Setup::default()
    })
    .await;
    h.gmail.set_token_validator(|_, _| false);
    let mut lines: Vec<String> = Vec::new();
    let err = outbound::send_test(
        &h.tokens,
        &h.account,
        &h.config,
        HOSTNAME,
        "friend@example.org",
        &mut |l: &str| lines.push(l.to_string()),
    )
    .await
    .expect_err("refused");
    let text = err.to_string();
    assert!(text.contains("535 5.7.8"), "{text}");
    assert!(
        text.contains("oauthrelay authorize --account default"),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("refreshing the access token")),
        "{lines:?}"
    );
    assert!(h.gmail.messages().is_empty());
}

#[tokio::test]
async fn delivery_duration_runs_from_arrival_to_gmails_250() {
    let mut h = Harness::with(Setup {
        start: false,
        ..Setup::default()
    })
    .await;
    let mut registry = prometheus_client::registry::Registry::default();
    h.metrics = outbound::Metrics::new(&mut registry);
    h.start();
    // Each batch of replies (greeting, EHLO, AUTH, the transaction) takes
    // 150 ms: the attempt lasts 0.6 s or more after it starts.
    h.gmail.set_reply_delay(Duration::from_millis(150));
    let t0 = Instant::now();
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("dur", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(id, T).await);
    let elapsed = t0.elapsed().as_secs_f64();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(value("oauthrelay_delivery_duration_seconds_count"), 1.0);
    let secs = value("oauthrelay_delivery_duration_seconds_sum");
    assert!(
        secs >= 0.55 && secs <= elapsed,
        "arrival to Gmail's 250: {secs} s (the whole thing took {elapsed} s)"
    );
}

#[tokio::test]
async fn metrics_are_registered_under_the_interface_names() {
    let mut registry = prometheus_client::registry::Registry::default();
    let m = outbound::Metrics::new(&mut registry);
    m.accounts(["default"]);
    let _ = m.attempts_count(AttemptResult::Sent);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for name in [
        "oauthrelay_messages_delivered_total{account=\"default\"} 0",
        "oauthrelay_messages_bounced_total{account=\"default\"} 0",
        "oauthrelay_messages_failed_total{account=\"default\"} 0",
        "oauthrelay_delivery_attempts_total{account=\"default\",result=\"sent\"} 0",
        "oauthrelay_delivery_duration_seconds_count 0",
    ] {
        assert!(text.contains(name), "missing {name:?} in:\n{text}");
    }
}

#[test]
fn queue_states_for_queue_list() {
    let now = std::time::SystemTime::now();
    let mut s = outbound::DeliveryState::new(1);
    assert_eq!(s.queue_state(now).as_str(), "queued");
    s.attempts = 1;
    s.next_attempt = Some(now + Duration::from_secs(60));
    assert_eq!(s.queue_state(now).as_str(), "deferred");
    s.hold(
        outbound::HoldReason::NoRoute {
            sender: "a@b.c".into(),
        },
        now,
    );
    assert_eq!(s.queue_state(now).as_str(), "held");
    s.hold = None;
    s.recipients[0].state = outbound::RcptState::Failed;
    assert_eq!(s.queue_state(now).as_str(), "failed");
}

#[tokio::test]
async fn one_postfix_style_line_per_attempt_and_no_token_in_logs() {
    let (captured, _guard) = Logs::capture("debug");

    let h = Harness::new().await;
    h.gmail
        .reject_recipient("nobody@example.org", replies::NO_SUCH_USER);
    h.gmail
        .fail_next(testkit::gmail::Stage::DataEnd, 1, replies::TRY_AGAIN_451);
    let a = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("l1", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(a, T).await);
    let b = h
        .submit(
            "app@example.com",
            &["nobody@example.org"],
            &message("l2", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(b, T).await);
    h.wait_messages(2, T).await; // l1 and the bounce of l2
    // The bounce's attempt is logged (and in the history) before it is
    // removed.
    assert!(wait_until(T, || h.spool.list().is_empty()).await);

    let logs = captured.text();
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains(": to=<")).collect();
    let port = h.gmail.port();
    let relay = format!("relay=127.0.0.1[127.0.0.1]:{port}");
    let deferred: Vec<&&str> = lines
        .iter()
        .filter(|l| {
            l.contains(&format!(
                "{a}: to=<r@example.org>, account=default, {relay}, delay="
            ))
        })
        .collect();
    assert_eq!(deferred.len(), 2, "two attempts for l1: {lines:#?}");
    assert!(deferred[0].contains(", attempt=1, dsn=4.3.0, status=deferred (451 4.3.0 Mail server temporarily rejected message. fake - gsmtp)"), "{}", deferred[0]);
    assert!(
        deferred[1].contains(", attempt=2, dsn=2.0.0, status=sent (250 2.0.0 OK  "),
        "{}",
        deferred[1]
    );
    let bounced: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains(&format!("{b}: to=<nobody@example.org>")))
        .collect();
    assert_eq!(bounced.len(), 1);
    assert!(
        bounced[0].contains("dsn=5.1.1, status=bounced (550 5.1.1 The email account"),
        "{}",
        bounced[0]
    );
    assert!(logs.contains(&format!("{b}: sender non-delivery notification: ")));

    // The status page's history: the same outcomes, newest first (the
    // bounce, sent from the null sender, is an attempt too).
    let recent = h.outbound().recent_attempts();
    let of = |id| {
        recent
            .iter()
            .filter(|r| r.queue_id == id)
            .map(|r| {
                (
                    r.status.as_str(),
                    r.dsn.to_string(),
                    r.recipients.join(","),
                    r.attempt,
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        of(a),
        [
            ("sent", "2.0.0".to_string(), "r@example.org".to_string(), 2),
            (
                "deferred",
                "4.3.0".to_string(),
                "r@example.org".to_string(),
                1
            ),
        ]
    );
    assert_eq!(
        of(b),
        [(
            "bounced",
            "5.1.1".to_string(),
            "nobody@example.org".to_string(),
            1
        )]
    );
    assert_eq!(recent.len(), 4, "{recent:#?}");
    let bounced = recent.iter().find(|r| r.queue_id == b).unwrap();
    assert!(bounced.reply.starts_with("550 5.1.1 The email account"));
    assert_eq!(bounced.account, "default");
    assert_eq!(bounced.relay.as_deref(), Some(&relay["relay=".len()..]));
    let tokens = h.google.issued_access_tokens();
    assert!(!tokens.is_empty());
    for t in tokens.iter().chain([&h.refresh_token]) {
        assert!(!logs.contains(t.as_str()), "a token appears in the logs");
    }
}

/// A recipient that fails for good is bounced at the end of the attempt
/// that failed it, like Postfix, while another recipient of the same
/// message stays deferred; when that one is delivered later, no second
/// bounce (one DSN per attempt, each recipient reported once).
#[tokio::test]
async fn a_failed_recipient_is_bounced_at_once_while_another_stays_deferred() {
    let h = Harness::new().await;
    h.gmail
        .reject_recipient("bad@example.org", replies::NO_SUCH_USER);
    h.gmail
        .reject_recipient("later@example.org", replies::TRY_AGAIN_451);
    let id = h
        .submit(
            "app@example.com",
            &["bad@example.org", "later@example.org"],
            &message("partial", "x\r\n"),
        )
        .await;
    let msgs = h.wait_messages(1, T).await;
    let (text, _, groups) = the_bounce(&msgs);
    assert_eq!(groups.len(), 1, "only the failed recipient: {text}");
    assert!(text.contains("Final-Recipient: rfc822; bad@example.org"));
    assert!(!text.contains("later@example.org"));
    let v = h.view(id).expect("still queued for the deferred recipient");
    assert_eq!(v.recipients[0].state, outbound::RcptState::Failed);
    assert_eq!(v.recipients[1].state, outbound::RcptState::Pending);
    assert_eq!(h.metrics.bounced_count(), 1);
    // The deferred recipient goes through later: no second bounce.
    h.gmail.clear_faults();
    assert!(h.outbound().retry(id).await);
    assert!(h.wait_gone(id, T).await);
    let msgs = h.gmail.messages();
    assert_eq!(msgs.len(), 2, "the bounce and the delivery");
    assert_eq!(msgs.iter().filter(|m| m.mail_from.is_empty()).count(), 1);
    assert_eq!(h.metrics.bounced_count(), 1);
    // Counted just after the spool removal the wait above saw.
    assert!(
        common::wait_until(T, || h.metrics.failed_count() == 1).await,
        "one failed message"
    );
}

/// A bounce failed for good and the relay stopped before its postmaster
/// copy was queued: the next start finds the unreported failure and sends
/// the copy (nothing is lost between the two writes).
#[tokio::test]
async fn an_unreported_bounce_failure_reaches_the_postmaster_after_a_restart() {
    let h = Harness::new().await;
    let mut state = outbound::DeliveryState::new(1);
    state.recipients[0].state = outbound::RcptState::Failed;
    state.recipients[0].answer = Some(outbound::Answer::Reply(
        outbound::Reply::parse("553 5.1.2 We weren't able to find the recipient domain.").unwrap(),
    ));
    state.attempts = 1;
    state.bounce_of = Some(spool::MessageId::from_u64(0x1234));
    state.reports = vec![0];
    let bounce = b"From: Mail Delivery System <a@b>\r\nSubject: Undelivered Mail Returned to Sender\r\n\r\nreport\r\n";
    let id = h
        .submit_state(
            Envelope::new("", ["root@nowhere.invalid".to_string()]),
            Some(state),
            bounce,
        )
        .await;
    assert!(h.wait_gone(id, T).await);
    let msgs = h.wait_messages(1, T).await;
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert_eq!(
        (msgs[0].mail_from.as_str(), msgs[0].rcpt_to.as_slice()),
        ("", [EMAIL.to_string()].as_slice())
    );
    let text = msgs[0].text();
    assert!(
        text.contains("Subject: Postmaster Copy: Undelivered Mail\r\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "Final-Recipient: rfc822; root@nowhere.invalid\r\nAction: failed\r\nStatus: 5.1.2\r\n"
        ),
        "{text}"
    );
    assert!(text.contains("Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n\r\nFrom: Mail Delivery System <a@b>\r\n"), "{text}");
    assert!(wait_until(T, || h.spool.list().is_empty()).await);
    assert_eq!(h.metrics.dropped_count(), 0);
}
