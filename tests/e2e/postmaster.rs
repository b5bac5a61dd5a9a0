//! Nothing vanishes silently (issue 8, items 3 and 4), through the real
//! daemon against the fake Gmail:
//!
//! - a bounce Gmail refuses goes to the postmaster, with the bounce (and
//!   so the original report) attached; a failing message from the null
//!   sender too; only a postmaster copy that fails for good is dropped,
//!   with an ERROR line and `oauthrelay_messages_dropped_total{reason}`;
//! - senders Gmail would refuse (in the local domain) go upstream as the
//!   account's address, while the queue and the log keep the original;
//!   `envelope_from` forces one address; routing uses the original.

use testkit::gmail::{ReceivedMessage, Stage, TlsMode, replies};

use crate::fakes::{
    BOUNCED, EMAIL, FAST_DELIVERY, T, Upstream, message, metric, metrics, squash, submit, until,
    wait_queue_empty, with_id,
};
use crate::harness::{BASE, Daemon};

const REFUSED: &str = "oauthrelay_messages_dropped_total{reason=\"postmaster_refused\"}";
const EXPIRED: &str = "oauthrelay_messages_dropped_total{reason=\"postmaster_expired\"}";
const DROPPED: &str = "oauthrelay_messages_dropped_total";

/// The messages the fake received from the null sender for `rcpt`.
fn notices_to<'a>(msgs: &'a [ReceivedMessage], rcpt: &str) -> Vec<&'a ReceivedMessage> {
    msgs.iter()
        .filter(|m| m.mail_from.is_empty() && m.rcpt_to == [rcpt])
        .collect()
}

/// The relay with `[local] domain` set, `delivery` after
/// [`FAST_DELIVERY`] (or instead of it with `own_schedule`), and these
/// accounts, whose tokens are imported.
fn relay_with(
    up: &Upstream,
    local_domain: &str,
    delivery: &str,
    accounts: &[(&str, &str, String)],
) -> Daemon {
    let tables: Vec<String> = accounts.iter().map(|(_, _, t)| t.clone()).collect();
    let config = format!(
        "{BASE}\n[local]\ndomain = \"{local_domain}\"\n\n[delivery]\n{delivery}\n{}",
        tables.join("\n")
    );
    for (name, email, _) in accounts {
        up.import(&config, name, email);
    }
    Daemon::start(&config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_gmail_refuses_reaches_the_postmaster_and_nothing_is_dropped() {
    let up = Upstream::start(TlsMode::Implicit).await;
    // The default postmaster: the first account's email.
    let d = up.relay("");
    let m = metrics(&d).await;
    assert_eq!(metric(&m, REFUSED), 0.0, "every reason at 0 from the start");
    assert_eq!(metric(&m, EXPIRED), 0.0);

    // A recipient that fails for good, and a sender Gmail refuses both as
    // a sender and as the bounce's recipient.
    let sender = "app@unknown-host.example";
    up.gmail
        .reject_recipient("nobody@example.org", replies::NO_SUCH_USER);
    up.gmail.reject_recipient(sender, replies::NO_SUCH_DOMAIN);
    let id = submit(
        &d,
        sender,
        &["nobody@example.org"],
        &message("refused-rcpt", "cron output", "disk almost full\r\n"),
    )
    .await;
    wait_queue_empty(&d, T).await;
    // Then one whose sender Gmail refuses at MAIL FROM (553 5.1.7).
    up.gmail.reject_sender(sender, replies::INVALID_SENDER);
    let id2 = submit(
        &d,
        sender,
        &["ops@example.org"],
        &message("refused-sender", "backup report", "all fine\r\n"),
    )
    .await;
    wait_queue_empty(&d, T).await;

    let msgs = up.gmail.messages();
    assert!(with_id(&msgs, "refused-rcpt").is_empty());
    assert!(with_id(&msgs, "refused-sender").is_empty());
    let copies = notices_to(&msgs, EMAIL);
    assert_eq!(copies.len(), 2, "one postmaster copy each: {msgs:#?}");
    assert_eq!(msgs.len(), 2, "and nothing else arrived: {msgs:#?}");
    for (copy, original_subject, final_rcpt, status) in [
        (
            copies[0],
            "cron output",
            "nobody@example.org",
            "Status: 5.1.1",
        ),
        (
            copies[1],
            "backup report",
            "ops@example.org",
            "Status: 5.1.7",
        ),
    ] {
        assert_eq!(copy.auth_user, EMAIL);
        assert_eq!(
            copy.header("Subject").as_deref(),
            Some("Postmaster Copy: Undelivered Mail")
        );
        let ct = copy.header("Content-Type").unwrap();
        assert!(ct.contains("report-type=delivery-status"), "{ct}");
        let text = squash(&copy.text());
        for needle in [
            "Content-Type: message/delivery-status",
            // The double bounce's own report: the sender refused.
            &format!("Final-Recipient: rfc822; {sender}"),
            "Status: 5.1.2",
            "Content-Type: message/rfc822",
            // The undeliverable bounce, whole, with the original report.
            "Subject: Undelivered Mail Returned to Sender",
            &format!("Final-Recipient: rfc822; {final_rcpt}"),
            status,
            &format!("Subject: {original_subject}"),
        ] {
            assert!(
                text.contains(needle),
                "postmaster copy lacks {needle:?}:\n{}",
                copy.text()
            );
        }
    }
    let m = metrics(&d).await;
    assert_eq!(metric(&m, DROPPED), 0.0, "nothing dropped");
    let (_, json) = d.http_get("/status.json").await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["queue"]["dropped"], 0, "{json}");
    assert_eq!(
        metric(&m, BOUNCED),
        4.0,
        "two bounces, two postmaster copies"
    );
    let logs = d.logs();
    for id in [&id, &id2] {
        assert!(
            logs.contains(&format!("{id}: sender non-delivery notification:")),
            "{logs}"
        );
    }
    assert_eq!(
        logs.matches(": postmaster non-delivery notification:")
            .count(),
        2,
        "{logs}"
    );
    assert!(!logs.contains(" ERROR "), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postmaster_copy_that_fails_for_good_is_dropped_loudly() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let postmaster = "postmaster@gone.example";
    let d = up.relay(&format!("postmaster = \"{postmaster}\"\n"));
    up.gmail
        .reject_recipient("nobody@example.org", replies::NO_SUCH_USER);
    up.gmail
        .reject_recipient(postmaster, replies::NO_SUCH_DOMAIN);
    // Mail from the null sender gets no bounce: its failure goes to the
    // postmaster, whose copy is refused too.
    let id = submit(
        &d,
        "",
        &["nobody@example.org"],
        &message("null-sender", "a bounce from elsewhere", "report\r\n"),
    )
    .await;
    wait_queue_empty(&d, T).await;
    let m = until("the drop to be counted", T, async || {
        let m = metrics(&d).await;
        if metric(&m, DROPPED) >= 1.0 {
            Ok(m)
        } else {
            Err(m)
        }
    })
    .await;
    assert_eq!(metric(&m, REFUSED), 1.0);
    assert_eq!(metric(&m, EXPIRED), 0.0);
    assert!(up.gmail.messages().is_empty(), "nothing was delivered");
    let (status, json) = d.http_get("/status.json").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["queue"]["dropped"], 1, "{json}");
    let (_, page) = d.http_get("/").await;
    assert!(page.contains("dropped since start"), "{page}");
    let logs = d.logs();
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(" ERROR ") && l.contains("postmaster notification"))
        .collect();
    assert_eq!(errors.len(), 1, "{logs}");
    assert!(
        errors[0].contains(&format!("to=<{postmaster}>"))
            && errors[0].contains("postmaster_refused")
            && errors[0].contains(&format!("about message {id}")),
        "{}",
        errors[0]
    );
    assert!(
        logs.contains(&format!("{id}: postmaster non-delivery notification:")),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_sender_goes_upstream_as_the_account_and_the_queue_keeps_the_original() {
    let up = Upstream::start(TlsMode::Implicit).await;
    // A slow schedule: the first attempt is refused for now, and the
    // message waits in the queue until `queue retry`.
    let slow = "retry_initial = \"1h\"\nretry_max = \"1h\"\n";
    let d = relay_with(
        &up,
        "host.e2e.test",
        slow,
        &[("default", EMAIL, up.account("default", EMAIL, &["*"], true))],
    );
    up.gmail.fail_next(Stage::Mail, 1, replies::TRY_AGAIN_451);
    let id = submit(
        &d,
        "root@host.e2e.test",
        &["boss@example.org"],
        &message("local-sender", "Cron <root@host> backup", "done\r\n"),
    )
    .await;
    d.wait_log(&format!("{id}: to=<boss@example.org>"), T);
    let show = d.cli(&["queue", "show", &id], None);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success(), "{show:?}");
    assert!(text.contains("<root@host.e2e.test>"), "{text}");
    assert!(!text.contains(EMAIL), "{text}");
    let out = d.cli(&["queue", "retry", &id], None);
    assert!(out.status.success(), "{out:?}");
    wait_queue_empty(&d, T).await;

    let msgs = up.gmail.messages();
    let got = with_id(&msgs, "local-sender");
    assert_eq!(got.len(), 1, "{msgs:#?}");
    assert_eq!(got[0].mail_from, EMAIL, "sent as the account");
    assert_eq!(got[0].rcpt_to, ["boss@example.org"]);
    let logs = d.logs();
    assert!(
        logs.contains(&format!(
            "{id}: from=<root@host.e2e.test> goes upstream as <{EMAIL}> (a sender in the local domain)"
        )),
        "{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains(&format!("{id}: client="))
                && l.contains("from=<root@host.e2e.test>")),
        "the receiving line keeps the original:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_from_forces_the_sender_and_routing_uses_the_original() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let alerts = "alerts.relay@gmail.com";
    let mut alerts_table = up.account("alerts", alerts, &["*@host.e2e.test"], true);
    alerts_table.push_str("envelope_from = \"alerts@example.com\"\n");
    let d = relay_with(
        &up,
        "host.e2e.test",
        FAST_DELIVERY,
        &[
            ("alerts", alerts, alerts_table),
            ("default", EMAIL, up.account("default", EMAIL, &["*"], true)),
        ],
    );
    // Routed by the original sender (local domain -> "alerts"), sent as
    // the forced address.
    submit(
        &d,
        "root@host.e2e.test",
        &["boss@example.org"],
        &message("forced", "smartd", "disk\r\n"),
    )
    .await;
    // Another domain: the default account, its sender unchanged.
    submit(
        &d,
        "app@example.com",
        &["boss@example.org"],
        &message("as-is", "app", "hello\r\n"),
    )
    .await;
    wait_queue_empty(&d, T).await;
    let msgs = up.gmail.messages();
    let forced = with_id(&msgs, "forced");
    assert_eq!(forced.len(), 1, "{msgs:#?}");
    assert_eq!(forced[0].auth_user, alerts, "routed by the original sender");
    assert_eq!(forced[0].mail_from, "alerts@example.com");
    let as_is = with_id(&msgs, "as-is");
    assert_eq!(as_is.len(), 1, "{msgs:#?}");
    assert_eq!(as_is[0].auth_user, EMAIL);
    assert_eq!(as_is[0].mail_from, "app@example.com");
}
