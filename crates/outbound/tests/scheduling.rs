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
        wait_until(T, || h
            .outbound()
            .account_states()
            .first()
            .is_some_and(|a| a.in_flight == 1))
        .await,
        "one worker busy, two idle"
    );

    // SIGHUP with concurrency 1 while one worker is busy and two are idle.
    config.concurrency = 1;
    h.outbound().reload(vec![h.account.clone()], config.clone());
    barrier(&h).await;
    assert!(h.view(first).is_some(), "still in flight at the reload");
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
    h.spool
        .list()
        .iter()
        .map(|(id, q)| outbound::DeliveryState::of(*id, q).attempts)
        .sum()
}

/// More than one update record of the largest delivery record takes:
/// frame, id and the record.
fn one_update(h: &Harness) -> u64 {
    let largest = h
        .spool
        .list()
        .iter()
        .map(|(_, q)| q.delivery.data.len())
        .max();
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
            .all(|id| h.view(*id).is_some_and(|e| e.held.is_some()))
    };
    assert!(wait_until(T, || all_held(&h)).await, "held durably");
    assert!(h.outbound().ping().await);
    let bytes = spool_bytes(&h);
    let attempts = total_attempts(&h);

    // An operator's `queue retry --all` (a dead refresh token: nothing to
    // probe, nothing attempted) and a `token import` of a refresh token
    // Google refuses too: that releases the account, which tries one
    // message, which fails again.
    assert!(h.outbound().retry_all().await >= N);
    let dead = h.google.issue_refresh_token(CLIENT_ID, EMAIL);
    h.google.revoke_refresh_token(&dead);
    oauth::import_refresh_token(&h.resolved, &dead).expect("import");
    assert!(
        wait_until(T, || total_attempts(&h) > attempts).await,
        "the released account tried a message"
    );
    assert!(
        wait_until(T, || h.outbound().account_states()[0].held.is_some()).await,
        "held again"
    );
    assert!(h.outbound().ping().await);

    let probes = total_attempts(&h) - attempts;
    assert!(
        probes >= 1,
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

// ---- the spool cannot be written after Gmail's 250 ----------------------------------

/// A tiny tmpfs, unmounted on drop.
struct TinyFs {
    dir: tempfile::TempDir,
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// Mount a tiny tmpfs for a disk-full test, or say loudly why not (root is
/// needed; under CI=true that is a failure).
fn tiny_fs(size: &str) -> Option<TinyFs> {
    let dir = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir.path())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        let msg = "SKIPPED: cannot mount a tmpfs (needs root) for the disk-full test";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{msg}; CI must run it");
        }
        eprintln!("\n!!!! {msg} !!!!\n");
        return None;
    }
    Some(TinyFs { dir })
}

const PAGE: u64 = 4096;

/// The segment being written: the newest one with records in it (the
/// spool makes the next segment ahead, an empty file with only its
/// 32-byte header, beside it).
fn active_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seg-"))
        })
        .collect();
    segs.sort();
    segs.retain(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 32));
    segs.pop().expect("a spool segment with records")
}

/// Grow the active segment to a whole number of pages (a message committed
/// and removed again, sized to fit). On a full tmpfs, a record written into
/// the last page's free bytes would still succeed; at a page boundary the
/// next record needs a new page, and fails.
async fn pad_segment_to_page(spool: &spool::Spool) {
    let seg = active_segment(spool.dir());
    let len = || std::fs::metadata(&seg).unwrap().len();
    let mut overhead: Option<u64> = None;
    for _ in 0..20 {
        let before = len();
        let slack = (PAGE - before % PAGE) % PAGE;
        if slack == 0 {
            return;
        }
        // Commit + remove of a message of `b` bytes takes `overhead + b`
        // (the overhead grows with the digits of `b`: measure again).
        let b = match overhead {
            None => 1,
            Some(o) if slack > o => slack - o,
            Some(o) => slack + PAGE - o,
        };
        let id = put(
            spool,
            spool::Envelope::new("pad@example.com", ["pad@example.com".to_string()]),
            &vec![b'p'; b as usize],
        )
        .await;
        spool.remove(id).await.unwrap();
        overhead = Some(len() - before - b);
    }
    panic!("could not align the spool segment to a page");
}

/// Take every free page of the file system.
fn fill(fs: &TinyFs) -> std::path::PathBuf {
    use std::io::Write;
    let path = fs.dir.path().join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let page = vec![0u8; PAGE as usize];
    while f.write_all(&page).is_ok() {}
    let _ = f.sync_all();
    path
}

/// A harness whose spool lives on a tiny tmpfs, holding `body` from
/// `to`, its segment padded to a page: the next spool write fails once the
/// file system is filled.
async fn harness_on_tiny_fs(to: &[&str], subject: &str) -> Option<(Harness, TinyFs, MessageId)> {
    let fs = tiny_fs("2m")?;
    let mut h = Harness::with(Setup {
        start: false,
        ..Setup::default()
    })
    .await;
    let (spool, _) = spool::Spool::open(&fs.dir.path().join("spool")).expect("spool on tmpfs");
    h.spool = spool;
    let id = h
        .submit("app@example.com", to, &message(subject, "x\r\n"))
        .await;
    pad_segment_to_page(&h.spool).await;
    Some((h, fs, id))
}

/// What a worker logs when it takes up a message whose last spool write
/// failed: it retries the write, sending nothing again.
const RETRIED_WRITE: &str = "(their record failed) are not sent again";

#[tokio::test]
async fn removal_failing_after_gmails_250_does_not_send_the_message_again() {
    let (logs, _guard) = Logs::capture("info");
    let Some((mut h, fs, id)) = harness_on_tiny_fs(&["r@example.org"], "once").await else {
        return;
    };
    let filler = fill(&fs);
    h.start();
    let msgs = h.wait_messages(1, T).await;
    assert_eq!(msgs[0].message_id.as_deref(), Some("<once@example.com>"));

    // The removal fails (ENOSPC) and is retried every retry_initial
    // (200 ms): the message must not go upstream again meanwhile.
    assert!(
        wait_until(T, || logs.count(RETRIED_WRITE) >= 3).await,
        "the removal is retried:\n{}",
        logs.text()
    );
    assert!(
        h.view(id).is_some(),
        "the spool is full: the removal cannot have worked"
    );
    assert!(h.spool.health().is_err(), "the spool saw the write fail");
    assert_eq!(
        h.gmail.messages().len(),
        1,
        "sent again while the removal kept failing"
    );

    // Space returns: the removal goes through, still without a resend.
    std::fs::remove_file(&filler).unwrap();
    assert!(h.wait_gone(id, T).await, "removed once the disk has room");
    assert!(h.outbound().ping().await);
    assert!(h.spool.list().is_empty(), "nothing else to send");
    assert_eq!(h.gmail.messages().len(), 1);
    assert_eq!(h.metrics.delivered_count(), 1);
    h.stop().await;
}

#[tokio::test]
async fn delivered_recipients_are_not_sent_again_when_their_record_fails() {
    let Some((mut h, fs, id)) =
        harness_on_tiny_fs(&["ok@example.org", "later@example.org"], "partial").await
    else {
        return;
    };
    h.gmail
        .reject_recipient("later@example.org", "450 4.2.1 Try this recipient later");
    let filler = fill(&fs);
    h.start();
    let first = h.wait_messages(1, T).await;
    assert_eq!(first[0].rcpt_to, vec!["ok@example.org".to_string()]);

    // Recording "ok: delivered" fails; later attempts try only the
    // recipient still pending.
    assert!(
        h.gmail.wait_for_stats(T, |s| s.rcpt_commands >= 4).await,
        "the deferred recipient was tried again"
    );
    let sent_to_ok = |h: &Harness| {
        h.gmail
            .messages()
            .iter()
            .filter(|m| m.rcpt_to.iter().any(|r| r == "ok@example.org"))
            .count()
    };
    assert_eq!(sent_to_ok(&h), 1, "the delivered recipient got it again");

    // The other recipient is accepted, the disk has room again: done,
    // each recipient served once.
    h.gmail.clear_faults();
    assert!(
        h.gmail.wait_for_messages(2, T).await.len() >= 2,
        "the deferred recipient is delivered"
    );
    std::fs::remove_file(&filler).unwrap();
    assert!(h.wait_gone(id, T).await);
    let msgs = h.gmail.messages();
    assert_eq!(sent_to_ok(&h), 1);
    assert_eq!(
        msgs.iter()
            .filter(|m| m.rcpt_to.iter().any(|r| r == "later@example.org"))
            .count(),
        1
    );
    h.stop().await;
}

#[tokio::test]
async fn a_bounce_that_cannot_be_recorded_is_sent_once_and_the_message_not_again() {
    let (logs, _guard) = Logs::capture("info");
    let Some((mut h, fs, id)) =
        harness_on_tiny_fs(&["ok@example.org", "nobody@example.org"], "mixed").await
    else {
        return;
    };
    h.gmail.reject_recipient(
        "nobody@example.org",
        "550 5.1.1 The email account does not exist",
    );
    let filler = fill(&fs);
    h.start();
    let first = h.wait_messages(1, T).await;
    assert_eq!(first[0].rcpt_to, vec!["ok@example.org".to_string()]);

    // Recording the failure (before the bounce) fails again and again.
    assert!(
        wait_until(T, || logs.count(RETRIED_WRITE) >= 3).await,
        "the record is retried:\n{}",
        logs.text()
    );
    assert_eq!(h.gmail.messages().len(), 1, "sent again");
    assert!(h.view(id).is_some());

    std::fs::remove_file(&filler).unwrap();
    assert!(h.wait_gone(id, T).await);
    h.wait_messages(2, T).await;
    // Whatever else was queued (another bounce) would be in the spool.
    assert!(wait_until(T, || h.spool.list().is_empty()).await);
    let msgs = h.gmail.messages();
    assert_eq!(msgs.len(), 2, "the message once, one bounce: {msgs:#?}");
    let dsn = &msgs[1];
    assert_eq!(dsn.mail_from, "");
    assert_eq!(dsn.rcpt_to, vec!["app@example.com".to_string()]);
    assert!(dsn.text().contains("nobody@example.org"));
    assert_eq!(h.metrics.bounced_count(), 1);
    h.stop().await;
}
