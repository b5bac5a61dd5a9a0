//! The scheduler's bookkeeping: worker pool resizing on reload, spool
//! writes for held mail, and what it remembers when the spool cannot be
//! written.

mod common;

use std::time::Duration;

use common::*;
use spool::MessageId;

const T: Duration = Duration::from_secs(15);

/// Wait until the scheduler has handled every command sent before (a retry
/// of a message that does not exist changes nothing).
async fn barrier(h: &Harness) {
    assert!(!h.outbound().retry(MessageId::from_u64(1)).await);
}

// ---- worker pool --------------------------------------------------------------------

#[tokio::test]
async fn shrinking_concurrency_retires_idle_workers_and_lets_busy_ones_finish() {
    let mut config = fast_config();
    config.concurrency = 3;
    let h = Harness::with(Setup {
        config: config.clone(),
        ..Setup::default()
    })
    .await;
    // Slow replies keep the first message in flight during the reload.
    h.gmail.set_reply_delay(Duration::from_millis(100));
    let first = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("busy", "x\r\n"),
        )
        .await;
    assert!(
        wait_until(T, || h.outbound().account_states()[0].in_flight == 1).await,
        "one worker busy, two idle"
    );

    // SIGHUP with concurrency 1 while one worker is busy and two are idle.
    config.concurrency = 1;
    h.outbound().reload(vec![h.account.clone()], config.clone());
    barrier(&h).await;
    assert!(
        h.spool.envelope(first).is_some(),
        "still in flight at the reload"
    );
    let mut later = Vec::new();
    for i in 0..3 {
        let subject = format!("after-{i}");
        later.push(
            h.submit(
                "app@example.com",
                &["r@example.org"],
                &message(&subject, "x\r\n"),
            )
            .await,
        );
    }
    for id in [first].iter().chain(&later) {
        assert!(h.wait_gone(*id, T).await, "{id} delivered");
    }

    // The busy worker was kept (and finished); the idle ones retired. So
    // the later messages waited for it and went over its warm connection,
    // one at a time.
    let mut msgs = h.gmail.messages();
    assert_eq!(msgs.len(), 4);
    assert_eq!(
        h.gmail.stats().connections,
        1,
        "every message over the busy worker's connection"
    );
    msgs.sort_by_key(|m| m.mail_at);
    assert_eq!(msgs[0].message_id.as_deref(), Some("<busy@example.com>"));
    for pair in msgs.windows(2) {
        assert!(
            pair[1].mail_at >= pair[0].accepted_at,
            "{:?} started while {:?} was in flight: more than 1 at once",
            pair[1].message_id,
            pair[0].message_id
        );
    }
}

#[tokio::test]
async fn shrinking_below_the_busy_workers_waits_for_them_before_dispatching() {
    let mut config = fast_config();
    config.concurrency = 3;
    let h = Harness::with(Setup {
        config: config.clone(),
        ..Setup::default()
    })
    .await;
    h.gmail.set_reply_delay(Duration::from_millis(100));
    let mut first = Vec::new();
    for i in 0..3 {
        let subject = format!("busy-{i}");
        first.push(
            h.submit(
                "app@example.com",
                &["r@example.org"],
                &message(&subject, "x\r\n"),
            )
            .await,
        );
    }
    assert!(
        wait_until(T, || h.outbound().account_states()[0].in_flight == 3).await,
        "three workers busy"
    );
    config.concurrency = 1;
    h.outbound().reload(vec![h.account.clone()], config.clone());
    barrier(&h).await;
    let mut later = Vec::new();
    for i in 0..2 {
        let subject = format!("after-{i}");
        later.push(
            h.submit(
                "app@example.com",
                &["r@example.org"],
                &message(&subject, "x\r\n"),
            )
            .await,
        );
    }
    for id in first.iter().chain(&later) {
        assert!(h.wait_gone(*id, T).await, "{id} delivered");
    }
    let msgs = h.gmail.messages();
    let busy_done = msgs
        .iter()
        .filter(|m| m.message_id.as_deref().is_some_and(|s| s.contains("busy")))
        .map(|m| m.accepted_at)
        .max()
        .expect("busy messages delivered");
    let mut after: Vec<_> = msgs
        .iter()
        .filter(|m| m.message_id.as_deref().is_some_and(|s| s.contains("after")))
        .collect();
    assert_eq!(after.len(), 2);
    after.sort_by_key(|m| m.mail_at);
    assert!(
        after[0].mail_at >= busy_done,
        "a new message started while more than the new concurrency were busy"
    );
    assert!(after[1].mail_at >= after[0].accepted_at, "one at a time");
    // Two of the three workers retired after their job (QUIT), one stays.
    assert!(
        h.gmail.wait_for_stats(T, |s| s.quits >= 2).await,
        "retired workers close their connections"
    );
    assert!(wait_until(T, || h.outbound().account_states()[0].in_flight == 0).await);
}

// ---- held mail ----------------------------------------------------------------------

/// Bytes in the spool's segments: every envelope update appends a record.
fn spool_bytes(h: &Harness) -> u64 {
    std::fs::read_dir(h.spool.dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn total_attempts(h: &Harness) -> u32 {
    h.spool.list().iter().map(|(_, e)| e.attempts).sum()
}

/// More than one update record of the largest envelope takes: frame, id
/// and the JSON envelope, whose size is mostly its texts.
fn one_update(h: &Harness) -> u64 {
    let texts = |e: &spool::Envelope| {
        e.sender.len()
            + e.helo.len()
            + e.held.as_deref().map_or(0, str::len)
            + e.last_error.as_deref().map_or(0, str::len)
            + e.recipients
                .iter()
                .map(|r| r.address.len() + r.reply.as_deref().map_or(0, str::len))
                .sum::<usize>()
    };
    let largest = h.spool.list().iter().map(|(_, e)| texts(e)).max();
    largest.unwrap_or(0) as u64 + 512
}

#[tokio::test]
async fn probing_a_held_account_does_not_rewrite_every_held_message() {
    let mut h = Harness::with(Setup {
        start: false,
        ..Setup::default()
    })
    .await;
    h.google.revoke_refresh_token(&h.refresh_token);
    h.start();
    const N: usize = 30;
    let mut ids = Vec::new();
    for i in 0..N {
        ids.push(
            h.submit(
                "app@example.com",
                &["r@example.org"],
                &message(&format!("held-{i}"), "x\r\n"),
            )
            .await,
        );
    }
    let all_held = |h: &Harness| {
        ids.iter()
            .all(|id| h.spool.envelope(*id).is_some_and(|e| e.held.is_some()))
    };
    assert!(wait_until(T, || all_held(&h)).await, "held durably");
    // Let the first round of marking settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bytes = spool_bytes(&h);
    let attempts = total_attempts(&h);

    // Hold probes (every retry_max = 1 s), an operator's `queue retry
    // --all`, and a `token import` of a refresh token Google refuses too:
    // each tries one message, which fails again.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert!(h.outbound().retry_all().await >= N);
    let dead = h.google.issue_refresh_token(CLIENT_ID, EMAIL);
    h.google.revoke_refresh_token(&dead);
    oauth::import_refresh_token(&h.resolved, &dead).expect("import");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        wait_until(T, || h.outbound().account_states()[0].held.is_some()).await,
        "held again"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    let probes = total_attempts(&h) - attempts;
    assert!(
        probes >= 3,
        "the held account was tried ({probes} attempts)"
    );
    let growth = spool_bytes(&h) - bytes;
    eprintln!(
        "{probes} attempts of held mail wrote {growth} bytes to the spool (one update < {})",
        one_update(&h)
    );
    assert!(
        growth <= u64::from(probes) * one_update(&h),
        "{probes} probes wrote {growth} bytes to the spool: held messages that were not tried were rewritten"
    );
    // `queue list` still shows every message held.
    assert!(all_held(&h));
    assert_eq!(h.gmail.stats().connections, 0, "nothing tried upstream");
}
