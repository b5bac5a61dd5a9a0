//! What the delivery side says, through the daemon: one line when an
//! account pauses (with until when) and when the pause ends, the deferral
//! line with the enhanced status the upstream really gave, a line for a
//! pooled connection that the server closed with 421 and that was replaced,
//! the queue id as a field of every delivery line in the JSON log, and the
//! `account` label on the delivery counters.

use std::time::{Duration, SystemTime};

use testkit::gmail::{Stage, TlsMode, replies};

use crate::fakes::{
    EMAIL, FAST_DELIVERY, T, Upstream, message, metric, metrics, submit, wait_metric,
    wait_queue_empty,
};
use crate::harness::Daemon;

/// The relay of [`Upstream::relay`] with the JSON log.
fn json_relay(up: &Upstream, delivery: &str) -> Daemon {
    let config = format!(
        "{}\n[log]\nformat = \"json\"\n",
        up.config(
            &format!("{FAST_DELIVERY}{delivery}"),
            &[up.account("default", EMAIL, &["*"], true)],
        )
    );
    up.import(&config, "default", EMAIL);
    Daemon::start(&config)
}

/// The daemon's JSON log events so far.
fn events(d: &Daemon) -> Vec<serde_json::Value> {
    d.logs()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn message_of(e: &serde_json::Value) -> &str {
    e["message"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_limit_pause_is_one_warning_saying_until_when_and_the_deferral_says_5_4_5() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let d = json_relay(&up, "daily_limit_pause = \"1h\"\n");
    up.gmail.fail_next(Stage::DataEnd, 1, replies::DAILY_LIMIT);
    let id = submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("dl1", "a", "x\r\n"),
    )
    .await;
    d.wait_log("paused until", T);
    let pause_at = SystemTime::now();

    let ev = events(&d);
    // The deferral: Gmail's own status, not a made-up 4.0.0; the queue id,
    // account, status and dsn as fields for shippers.
    let deferred: Vec<&serde_json::Value> = ev
        .iter()
        .filter(|e| message_of(e).starts_with(&format!("{id}: to=<r@example.org>")))
        .collect();
    assert_eq!(deferred.len(), 1, "{ev:#?}");
    let e = deferred[0];
    assert!(
        message_of(e).contains(
            ", attempt=1, dsn=5.4.5, status=deferred (550 5.4.5 Daily user sending limit exceeded."
        ),
        "{e}"
    );
    assert_eq!(e["level"], "WARN");
    assert_eq!(e["queue_id"], id.as_str(), "{e}");
    assert_eq!(e["account"], "default");
    assert_eq!(e["status"], "deferred");
    assert_eq!(e["dsn"], "5.4.5");

    // One line for the pause, saying until when, and that nothing bounces.
    let pauses: Vec<&serde_json::Value> = ev
        .iter()
        .filter(|e| message_of(e).contains("paused until"))
        .collect();
    assert_eq!(pauses.len(), 1, "{pauses:#?}");
    let p = pauses[0];
    assert_eq!(p["level"], "WARN");
    assert_eq!(p["account"], "default");
    assert_eq!(p["reason"], "daily_limit");
    let until_text = p["paused_until"].as_str().expect("paused_until field");
    let until = humantime::parse_rfc3339(until_text).unwrap();
    let left = until.duration_since(pause_at).unwrap_or_default();
    assert!(
        left > Duration::from_secs(55 * 60) && left <= Duration::from_secs(3600),
        "an hour from now: {until_text}"
    );
    assert!(
        message_of(p).starts_with(&format!("account default paused until {until_text} (for "))
            && message_of(p).contains(
                "daily sending limit reached (550 5.4.5 Daily user sending limit exceeded."
            )
            && message_of(p).contains("nothing is bounced"),
        "{p}"
    );

    // The operator lifts it: delivered, logged with the queue id.
    let out = d.cli(&["queue", "retry", "--all"], None);
    assert!(out.status.success(), "{out:?}");
    wait_queue_empty(&d, T).await;
    let ev = events(&d);
    let sent = ev
        .iter()
        .find(|e| {
            message_of(e).starts_with(&format!("{id}: to=<r@example.org>"))
                && message_of(e).contains("status=sent")
        })
        .unwrap_or_else(|| panic!("no sent line in {ev:#?}"));
    assert_eq!(sent["level"], "INFO");
    assert_eq!(sent["queue_id"], id.as_str());
    assert_eq!(sent["dsn"], "2.0.0");

    // The counters say which account (a message counts as delivered once
    // its removal is durable: wait for it).
    let m = wait_metric(
        &d,
        "oauthrelay_messages_delivered_total{account=\"default\"}",
        1.0,
        T,
    )
    .await;
    for (series, value) in [
        (
            "oauthrelay_delivery_attempts_total{account=\"default\",result=\"deferred\"}",
            1.0,
        ),
        (
            "oauthrelay_delivery_attempts_total{account=\"default\",result=\"sent\"}",
            1.0,
        ),
        (
            "oauthrelay_delivery_attempts_total{account=\"default\",result=\"failed\"}",
            0.0,
        ),
        (
            "oauthrelay_messages_delivered_total{account=\"default\"}",
            1.0,
        ),
        (
            "oauthrelay_messages_bounced_total{account=\"default\"}",
            0.0,
        ),
        ("oauthrelay_messages_failed_total{account=\"default\"}", 0.0),
    ] {
        assert!(
            m.lines()
                .any(|l| l == format!("{series} {value}")
                    || l == format!("{series} {}", value as u64)),
            "{series} {value} in\n{m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_421_on_a_pooled_connection_is_retried_and_a_421_on_a_new_one_pauses_the_account() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let d = up.relay("concurrency = 1\n");
    submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("p1", "1", "x\r\n"),
    )
    .await;
    assert_eq!(up.gmail.wait_for_messages(1, T).await.len(), 1);

    // The connection kept from the first message gets 421 to MAIL: replaced
    // at once, said at info, nothing deferred.
    up.gmail
        .fail_next(Stage::Mail, 1, replies::TRY_AGAIN_LATER_421);
    let second = submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("p2", "2", "x\r\n"),
    )
    .await;
    assert_eq!(up.gmail.wait_for_messages(2, T).await.len(), 2);
    let relay = format!("127.0.0.1[127.0.0.1]:{}", up.gmail.port());
    let line = d.wait_log("closed by the server", T);
    assert!(
        line.contains(&format!(
            " INFO {second}: pooled connection to {relay} closed by the server (421 4.7.0 Try again later, closing connection."
        )) && line.ends_with("; retrying on a new connection account=default"),
        "{line}"
    );
    let logs = d.logs();
    assert!(
        !logs
            .lines()
            .any(|l| l.contains(&format!("{second}: to=")) && l.contains("status=deferred")),
        "not deferred:\n{logs}"
    );
    assert!(!logs.contains("paused until"), "no pause:\n{logs}");

    // 421 on the pooled connection and again on the new one: the account
    // pauses (one warning, with until when), the deferral says 4.7.0, and
    // after the pause the message goes.
    up.gmail
        .fail_next(Stage::Mail, 2, replies::TRY_AGAIN_LATER_421);
    let third = submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("p3", "3", "x\r\n"),
    )
    .await;
    assert_eq!(up.gmail.wait_for_messages(3, T).await.len(), 3);
    wait_queue_empty(&d, T).await;
    let logs = d.logs();
    let pause: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("paused until"))
        .collect();
    assert_eq!(pause.len(), 1, "{logs}");
    assert!(
        pause[0].contains(" WARN account default paused until ")
            && pause[0]
                .contains("failure 1 in a row): upstream unreachable (421 4.7.0 Try again later")
            && pause[0].contains("; its mail is retried then"),
        "{}",
        pause[0]
    );
    let deferred = logs
        .lines()
        .find(|l| {
            l.contains(&format!("{third}: to=<r@example.org>")) && l.contains("status=deferred")
        })
        .unwrap_or_else(|| panic!("no deferral of {third}:\n{logs}"));
    assert!(
        deferred.contains(", attempt=1, dsn=4.7.0, status=deferred (421 4.7.0 Try again later"),
        "{deferred}"
    );
    assert!(
        logs.contains("INFO account default: pause over (unreachable); trying one message"),
        "{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains(&format!("{third}: to=<r@example.org>"))
                && l.contains(", attempt=2, dsn=2.0.0, status=sent")),
        "{logs}"
    );
    let m = metrics(&d).await;
    assert_eq!(
        metric(
            &m,
            "oauthrelay_delivery_attempts_total{account=\"default\",result=\"deferred\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "oauthrelay_delivery_attempts_total{account=\"default\",result=\"sent\"}"
        ),
        3.0
    );
}
