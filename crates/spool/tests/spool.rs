//! The spool's guarantees, checked from the outside: what is committed is
//! found again byte-exact after a reopen, whatever else happened.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use spool::{DeliveryRecord, Envelope, MessageId, Options, Reserve, Spool, SpoolError};

/// A delivery record as its owner would write it (the spool never reads it).
fn record(attempts: u32) -> DeliveryRecord {
    DeliveryRecord::new(7, format!("{{\"attempts\":{attempts}}}").into_bytes())
}

fn env(sender: &str, rcpts: &[&str]) -> Envelope {
    let mut e = Envelope::new(sender, rcpts.iter().map(|s| s.to_string()));
    e.client = Some("127.0.0.1:40000".into());
    e.helo = "printer.local".into();
    e
}

async fn put(spool: &Spool, body: &[u8]) -> MessageId {
    let mut w = spool.begin(Reserve::Respect);
    // Write in odd-sized pieces, as a network would deliver them.
    for piece in body.chunks(7919) {
        w.write(piece).await.unwrap();
    }
    w.commit(
        env("a@example.com", &["b@example.com"]),
        DeliveryRecord::default(),
    )
    .await
    .unwrap()
}

async fn body(spool: &Spool, id: MessageId) -> Vec<u8> {
    spool.read_body(id).unwrap().read_to_end().await.unwrap()
}

async fn reopen(spool: Spool, dir: &Path) -> Spool {
    spool.close().await.unwrap();
    drop(spool);
    Spool::open(dir).unwrap().0
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn committed_messages_survive_a_reopen_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, rec) = Spool::open(dir.path()).unwrap();
    assert_eq!(rec.messages, 0);
    let mut new_ids = spool.subscribe();

    let small = b"Subject: hi\r\n\r\n\xc3\xa9t\xc3\xa9 8-bit \xff body\r\n".to_vec();
    let large = pattern(3 * spool::CHUNK_SIZE + 12345, 7);
    let empty: Vec<u8> = Vec::new();
    let a = put(&spool, &small).await;
    let b = put(&spool, &large).await;
    let c = put(&spool, &empty).await;
    assert!(a < b && b < c, "ids sort by time");
    assert_eq!(new_ids.recv().await, Some(a));
    assert_eq!(new_ids.recv().await, Some(b));
    assert_eq!(new_ids.recv().await, Some(c));
    assert_eq!(spool.message(b).unwrap().size, large.len() as u64);

    let spool = reopen(spool, dir.path()).await;
    let listed: Vec<MessageId> = spool.list().into_iter().map(|(id, _)| id).collect();
    assert_eq!(listed, vec![a, b, c]);
    assert_eq!(body(&spool, a).await, small);
    assert_eq!(body(&spool, b).await, large);
    assert_eq!(body(&spool, c).await, empty);
    let q = spool.message(a).unwrap();
    assert!(q.delivery.is_none(), "no delivery record yet");
    let e = &q.envelope;
    assert_eq!(e.sender, "a@example.com");
    assert_eq!(e.helo, "printer.local");
    assert_eq!(e.client.as_deref(), Some("127.0.0.1:40000"));
    // New ids keep sorting after recovered ones.
    let d = put(&spool, b"x").await;
    assert!(d > c);
}

#[tokio::test]
async fn an_abandoned_message_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path()).unwrap();
    let mut w = spool.begin(Reserve::Respect);
    w.write(&pattern(5 * spool::CHUNK_SIZE, 1)).await.unwrap();
    drop(w);
    let kept = put(&spool, b"kept").await;
    let spool = reopen(spool, dir.path()).await;
    let ids: Vec<_> = spool.list().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, vec![kept]);
}

#[tokio::test]
async fn updates_and_removals_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path()).unwrap();
    let a = put(&spool, b"one").await;
    let b = put(&spool, b"two").await;
    spool.update(a, record(3)).await.unwrap();
    spool.remove(b).await.unwrap();
    assert!(matches!(
        spool.remove(b).await,
        Err(SpoolError::NotFound(_))
    ));

    let spool = reopen(spool, dir.path()).await;
    let got = spool.message(a).unwrap();
    assert_eq!(got.delivery, record(3));
    assert_eq!(got.envelope.recipients, ["b@example.com"]);
    assert_eq!(got.size, 3, "size survives record updates");
    assert!(spool.message(b).is_none());
}

#[tokio::test]
async fn a_second_process_cannot_open_a_locked_spool() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path()).unwrap();
    match Spool::open(dir.path()) {
        Err(SpoolError::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("two owners of one spool"),
    }
    spool.close().await.unwrap();
    assert!(Spool::open(dir.path()).is_ok(), "lock released by close");
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_torn_tail_is_dropped_and_everything_acknowledged_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path()).unwrap();
    let a = put(&spool, b"first").await;
    let b = put(&spool, &pattern(100_000, 3)).await;
    spool.close().await.unwrap();
    drop(spool);
    // A crash in the middle of a batch leaves a partial record behind.
    let last = segments(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    let tail: Vec<u8> = bytes[..40].to_vec();
    bytes.extend_from_slice(&tail);
    std::fs::write(&last, bytes).unwrap();

    let (spool, rec) = Spool::open(dir.path()).unwrap();
    assert_eq!(rec.torn_bytes, 40);
    assert_eq!(rec.moved_aside, 0);
    assert_eq!(body(&spool, a).await, b"first");
    assert_eq!(body(&spool, b).await, pattern(100_000, 3));
}

#[tokio::test]
async fn a_corrupt_record_is_moved_aside_and_the_rest_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path()).unwrap();
    let a = put(&spool, b"AAAA-first-message").await;
    let b = put(&spool, b"BBBB-second-message").await;
    let c = put(&spool, b"CCCC-third-message").await;
    spool.close().await.unwrap();
    drop(spool);
    let seg = segments(dir.path())
        .into_iter()
        .find(|p| std::fs::metadata(p).unwrap().len() > 0)
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == b"BBBB")
        .expect("body of b in the segment");
    bytes[at] ^= 0xff;
    std::fs::write(&seg, bytes).unwrap();

    let (spool, rec) = Spool::open(dir.path()).unwrap();
    // The damaged record, and the segment (sealed with three commits, one
    // of them now unreadable) kept whole.
    assert_eq!(rec.moved_aside, 2, "{rec:?}");
    assert_eq!(rec.lost, 1, "an acknowledged message is lost: {rec:?}");
    assert!(spool.message(b).is_none());
    assert_eq!(body(&spool, a).await, b"AAAA-first-message");
    assert_eq!(body(&spool, c).await, b"CCCC-third-message");
    let aside: Vec<_> = std::fs::read_dir(dir.path().join("corrupt"))
        .unwrap()
        .collect();
    assert_eq!(
        aside.len(),
        2,
        "the damaged record and its segment are kept for a human"
    );
    // It is mail: the owner's alone, like the rest of the spool.
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        aside[0]
            .as_ref()
            .unwrap()
            .metadata()
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode, 0o600, "{mode:o}");
}

#[tokio::test]
async fn many_concurrent_commits_share_syncs_and_all_survive() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path()).unwrap();
    let mut tasks = Vec::new();
    for t in 0..20u8 {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..25u8 {
                let b = pattern(1000 + usize::from(i) * 3, t ^ i);
                mine.push((put(&spool, &b).await, b));
            }
            mine
        }));
    }
    let mut all = BTreeMap::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 500, "ids are unique");
    // Group commit: every commit was acknowledged by a sync, and commits
    // that arrived together shared one.
    let c = spool.sync_counts();
    assert_eq!(c.operations, 500, "{c:?}");
    assert!(c.syncs >= 1 && c.syncs < c.operations, "{c:?}");
    let spool = reopen(spool, dir.path()).await;
    assert_eq!(spool.list().len(), 500);
    for (id, b) in &all {
        assert_eq!(&body(&spool, *id).await, b);
    }
}

#[tokio::test]
async fn each_acknowledgement_waits_for_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path()).unwrap();
    // One writer, one operation at a time: nothing to share a sync with,
    // so every commit, update and removal is acknowledged by its own.
    for i in 0..10u8 {
        let id = put(&spool, &pattern(500, i)).await;
        spool.update(id, record(1)).await.unwrap();
        spool.remove(id).await.unwrap();
    }
    let c = spool.sync_counts();
    assert_eq!(c.operations, 30, "{c:?}");
    assert_eq!(c.syncs, 30, "{c:?}");
}

/// Segment switches do not wait for the sync of the finished segment: the
/// sync thread seals it later. Many writers whose messages span switches,
/// then a reopen: every acknowledged message is there byte-exact, and every
/// seal agrees with what its segment holds (a seal claiming more commits or
/// bytes than found would be reported as a loss).
#[tokio::test]
async fn messages_spanning_many_segment_switches_survive_with_true_seals() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        segment_size: 96 << 10,
        ..Options::default()
    };
    let (spool, _) = Spool::open_with(dir.path(), opts.clone()).unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u8 {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..6u8 {
                let b = pattern(
                    20_000 + usize::from(t) * 17_000 + usize::from(i) * 9_000,
                    t ^ i,
                );
                mine.push((put(&spool, &b).await, b));
            }
            mine
        }));
    }
    let mut all = BTreeMap::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert!(
        segments(dir.path()).len() > 10,
        "{:?}",
        segments(dir.path())
    );
    spool.close().await.unwrap();
    drop(spool);
    let (spool, rec) = Spool::open_with(dir.path(), opts).unwrap();
    assert_eq!(rec.lost, 0, "{rec:?}");
    assert_eq!(rec.damaged_segments, 0, "{rec:?}");
    assert_eq!(rec.torn_bytes, 0, "{rec:?}");
    assert_eq!(rec.messages, 48, "{rec:?}");
    for (id, b) in &all {
        assert_eq!(&body(&spool, *id).await, b);
    }
}

#[tokio::test]
async fn old_segments_are_reclaimed_and_long_lived_messages_copied_forward() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        segment_size: 16 << 10,
        ..Options::default()
    };
    let (spool, _) = Spool::open_with(dir.path(), opts.clone()).unwrap();
    // One message stays queued (deferred for days) while traffic flows.
    let keeper_body = pattern(150_000, 9);
    let keeper = put(&spool, &keeper_body).await;
    spool.update(keeper, record(5)).await.unwrap();
    for i in 0..200u32 {
        let id = put(&spool, &pattern(3000, i as u8)).await;
        spool.remove(id).await.unwrap();
    }
    spool.sync().await.unwrap();
    // 600 KB went through; what stays on disk is bounded by the live data
    // (the 150 KB keeper), not by the traffic.
    let segs = segments(dir.path());
    let on_disk: u64 = segs
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        on_disk <= 3 * 150_000 + 4 * (16 << 10),
        "segments are reclaimed while traffic flows ({} files, {on_disk} bytes left)",
        segs.len()
    );
    assert!(
        !segs[0].ends_with("seg-0000000000000001.log"),
        "the keeper was copied out of the first segment"
    );
    let spool = reopen(spool, dir.path()).await;
    assert_eq!(spool.list().len(), 1);
    assert_eq!(body(&spool, keeper).await, keeper_body);
    assert_eq!(spool.message(keeper).unwrap().delivery, record(5));
}

/// Mount a tiny tmpfs for the disk-full test, or explain why not.
fn tiny_fs(size: &str) -> Option<(tempfile::TempDir, Unmount)> {
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
    let path = dir.path().to_path_buf();
    Some((dir, Unmount(path)))
}

struct Unmount(std::path::PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Without a reserve (`Spool::open`), the file system really fills up.
#[tokio::test]
async fn a_full_disk_fails_cleanly_and_recovers_when_space_returns() {
    let Some((fs, _unmount)) = tiny_fs("1m") else {
        return;
    };
    let spool_dir = fs.path().join("spool");
    let (spool, _) = Spool::open(&spool_dir).unwrap();
    let mut kept = Vec::new();
    let err = loop {
        let body = pattern(40_000, kept.len() as u8);
        let mut w = spool.begin(Reserve::Respect);
        let r = async {
            w.write(&body).await?;
            w.commit(
                env("a@example.com", &["b@example.com"]),
                DeliveryRecord::default(),
            )
            .await
        }
        .await;
        match r {
            Ok(id) => kept.push((id, body)),
            Err(e) => break e,
        }
        if kept.len() > 100 {
            panic!("a 1 MiB file system never filled up");
        }
    };
    assert!(err.is_disk_full(), "got {err}");
    assert!(spool.health().is_err(), "readiness reports the full disk");

    // Space returns: messages are delivered and removed.
    for (id, _) in kept.drain(..kept.len() / 2) {
        spool.remove(id).await.unwrap();
    }
    let mut after = None;
    for _ in 0..50 {
        if let Ok(id) = {
            let mut w = spool.begin(Reserve::Respect);
            match w.write(b"after the disk was full").await {
                Ok(()) => {
                    w.commit(
                        env("a@example.com", &["b@example.com"]),
                        DeliveryRecord::default(),
                    )
                    .await
                }
                Err(e) => Err(e),
            }
        } {
            after = Some(id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = after.expect("writes work again once space is back");
    assert!(spool.health().is_ok());

    let spool = reopen(spool, &spool_dir).await;
    for (id, b) in &kept {
        assert_eq!(&body(&spool, *id).await, b, "acknowledged messages intact");
    }
    assert_eq!(body(&spool, after).await, b"after the disk was full");
    assert_eq!(spool.list().len(), kept.len() + 1, "no partial message");
}

/// Bytes an unprivileged process may still write where `path` lives.
fn free_space(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a zeroed statvfs is valid to fill; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    #[allow(clippy::unnecessary_cast)]
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    free
}

#[tokio::test]
async fn new_mail_stops_at_the_reserve_so_delivered_mail_can_still_be_removed() {
    // Inbound mail fills the file system while nothing is delivered. It must
    // stop at min_free_space: what is left lets the spool record deliveries
    // and removals, free whole segments, and take mail again.
    let Some((fs, _unmount)) = tiny_fs("4m") else {
        return;
    };
    const RESERVE: u64 = 1 << 20;
    let spool_dir = fs.path().join("spool");
    let opts = Options {
        segment_size: 256 << 10,
        min_free_space: RESERVE,
    };
    let (spool, _) = Spool::open_with(&spool_dir, opts.clone()).unwrap();
    assert_eq!(spool.min_free_space(), RESERVE);
    let mut kept = Vec::new();
    let err = loop {
        let body = pattern(100_000, kept.len() as u8);
        let mut w = spool.begin(Reserve::Respect);
        let r = async {
            for piece in body.chunks(7919) {
                w.write(piece).await?;
            }
            w.commit(
                env("a@example.com", &["b@example.com"]),
                DeliveryRecord::default(),
            )
            .await
        }
        .await;
        match r {
            Ok(id) => kept.push((id, body)),
            Err(e) => break e,
        }
        assert!(kept.len() < 100, "a 4 MiB file system never filled up");
    };
    assert!(err.is_disk_full(), "got {err}");
    assert!(kept.len() >= 10, "mail was taken until the reserve");
    let free = free_space(fs.path());
    assert!(
        free + (64 << 10) >= RESERVE,
        "new mail stopped at the reserve: {free} bytes left, reserve {RESERVE}"
    );
    assert!(spool.room_for_mail().unwrap() < 100_000);
    assert!(spool.health().is_err(), "readiness reports the full spool");
    // A small message does not fit either: the reserve is not for mail.
    let mut w = spool.begin(Reserve::Respect);
    w.write(&pattern(70_000, 1)).await.unwrap();
    let e = w
        .commit(
            env("a@example.com", &["b@example.com"]),
            DeliveryRecord::default(),
        )
        .await
        .unwrap_err();
    assert!(e.is_disk_full(), "{e}");
    assert_eq!(spool.list().len(), kept.len(), "no partial message");
    // A message that lets the spool free space once stored (a bounce) may
    // use the reserve, its streamed chunks too.
    let bounce_body = pattern(100_000, 2);
    let mut w = spool.begin(Reserve::MayUse);
    for piece in bounce_body.chunks(7919) {
        w.write(piece).await.unwrap();
    }
    let bounce = w
        .commit(env("", &["a@example.com"]), DeliveryRecord::default())
        .await
        .expect("a bounce may use the reserve");
    kept.push((bounce, bounce_body));

    // Delivery goes on inside the reserve: attempts are recorded, and the
    // delivered messages are removed (all but the first two, still queued).
    for (id, _) in &kept {
        spool.update(*id, record(1)).await.unwrap();
    }
    let segments_full = segments(&spool_dir).len();
    for (id, _) in kept.drain(2..) {
        spool.remove(id).await.unwrap();
    }
    spool.sync().await.unwrap();
    // Whole segments are gone and their space is back.
    assert!(
        segments(&spool_dir).len() < segments_full / 2,
        "segments reclaimed: {} of {segments_full} left",
        segments(&spool_dir).len()
    );
    let free_after = free_space(fs.path());
    assert!(
        free_after > free + (1 << 20),
        "space came back: {free} -> {free_after} bytes"
    );

    // And mail is taken again.
    let after = put(&spool, &pattern(100_000, 77)).await;
    assert!(spool.health().is_ok());
    assert!(spool.room_for_mail().unwrap() > 1 << 20);

    spool.close().await.unwrap();
    drop(spool);
    let (spool, rec) = Spool::open_with(&spool_dir, opts).unwrap();
    assert_eq!(rec.moved_aside, 0);
    assert_eq!(spool.list().len(), 3);
    for (id, b) in &kept {
        assert_eq!(&body(&spool, *id).await, b, "queued messages intact");
        assert_eq!(spool.message(*id).unwrap().delivery, record(1));
    }
    assert_eq!(body(&spool, after).await, pattern(100_000, 77));
}

#[tokio::test]
async fn on_a_small_disk_the_emptied_active_segment_is_given_back() {
    // With the default segment size the whole queue fits in the active
    // segment, which would only be sealed (and deleted) once it reached
    // 64 MiB: never, on a full 4 MiB file system.
    let Some((fs, _unmount)) = tiny_fs("4m") else {
        return;
    };
    let spool_dir = fs.path().join("spool");
    let opts = Options {
        min_free_space: 1 << 20,
        ..Options::default()
    };
    let (spool, _) = Spool::open_with(&spool_dir, opts.clone()).unwrap();
    let mut ids = Vec::new();
    loop {
        let mut w = spool.begin(Reserve::Respect);
        let r = async {
            w.write(&pattern(200_000, ids.len() as u8)).await?;
            w.commit(
                env("a@example.com", &["b@example.com"]),
                DeliveryRecord::default(),
            )
            .await
        }
        .await;
        match r {
            Ok(id) => ids.push(id),
            Err(e) => {
                assert!(e.is_disk_full(), "{e}");
                break;
            }
        }
        assert!(ids.len() < 40, "a 4 MiB file system never filled up");
    }
    // The active segment holds the queue; beside it at most the next one,
    // made ahead and still empty (its 32-byte header).
    let sizes: Vec<u64> = segments(&spool_dir)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    assert_eq!(
        sizes.iter().filter(|&&n| n > 32).count(),
        1,
        "one active segment: {sizes:?}"
    );
    assert!(sizes.len() <= 2, "{sizes:?}");
    let free = free_space(fs.path());
    for id in ids {
        spool.remove(id).await.unwrap();
    }
    // The removals are answered once durable; the writer gives the
    // segment back after that, woken by the sync thread: wait for it.
    let start = std::time::Instant::now();
    loop {
        let free_after = free_space(fs.path());
        if free_after > free + (2 << 20) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the emptied segment was not given back within 10 s: {free} -> {free_after} bytes free"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let id = put(&spool, &pattern(200_000, 99)).await;
    assert!(spool.health().is_ok());
    let spool = {
        spool.close().await.unwrap();
        drop(spool);
        Spool::open_with(&spool_dir, opts).unwrap().0
    };
    assert_eq!(spool.list().len(), 1);
    assert_eq!(body(&spool, id).await, pattern(200_000, 99));
}

#[tokio::test]
async fn a_removed_message_whose_chunks_were_reclaimed_is_not_reported_damaged() {
    // A large message's chunks fill old segments and its Commit lands in a
    // newer one, next to a message that stays queued. Once it is removed
    // the old segments are deleted, but its Commit (and the Remove after
    // it) stay in the segment the other message keeps alive: recovery must
    // see the message as removed, not as damaged.
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        segment_size: 64 << 10,
        ..Options::default()
    };
    let (spool, _) = Spool::open_with(dir.path(), opts).unwrap();
    let mut w = spool.begin(Reserve::Respect);
    w.write(&pattern(300_000, 1)).await.unwrap();
    spool.sync().await.unwrap();
    let a = w
        .commit(
            env("a@example.com", &["b@example.com"]),
            DeliveryRecord::default(),
        )
        .await
        .unwrap();
    let b = put(&spool, b"stays queued").await;
    spool.remove(a).await.unwrap();
    spool.sync().await.unwrap();
    let (spool, rec) = {
        spool.close().await.unwrap();
        drop(spool);
        Spool::open(dir.path()).unwrap()
    };
    assert_eq!(rec.moved_aside, 0, "nothing damaged: {rec:?}");
    assert!(
        !dir.path().join("corrupt").exists(),
        "nothing moved to corrupt/"
    );
    assert!(
        spool.message(a).is_none(),
        "the removed message stays removed"
    );
    assert_eq!(body(&spool, b).await, b"stays queued");
    assert_eq!(spool.list().len(), 1);
}

#[tokio::test]
async fn a_queued_message_whose_chunks_are_gone_is_still_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        segment_size: 64 << 10,
        ..Options::default()
    };
    let (spool, _) = Spool::open_with(dir.path(), opts).unwrap();
    let mut w = spool.begin(Reserve::Respect);
    w.write(&pattern(300_000, 2)).await.unwrap();
    spool.sync().await.unwrap();
    let a = w
        .commit(
            env("a@example.com", &["b@example.com"]),
            DeliveryRecord::default(),
        )
        .await
        .unwrap();
    let b = put(&spool, b"intact").await;
    spool.close().await.unwrap();
    drop(spool);
    // Damage: the oldest segment, holding the first pieces of a, is lost.
    std::fs::remove_file(&segments(dir.path())[0]).unwrap();
    let (spool, rec) = Spool::open(dir.path()).unwrap();
    assert_eq!(rec.moved_aside, 1, "{rec:?}");
    assert_eq!(rec.lost_ids, vec![a], "{rec:?}");
    assert!(spool.message(a).is_none());
    assert_eq!(body(&spool, b).await, b"intact");
    let mut aside: Vec<String> = std::fs::read_dir(dir.path().join("corrupt"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    aside.sort();
    // Its envelope, and every piece still found (at least the tail, stored
    // with the commit; the chunks that were in the deleted segment are
    // gone), for a person to rebuild what is left.
    assert_eq!(aside[0], format!("{a}.envelope.json"));
    assert_eq!(aside.last().unwrap(), &format!("{a}.part-0005-of-0005.bin"));
    assert!(aside.len() < 6, "the first piece is gone: {aside:?}");
    let whole = pattern(300_000, 2);
    for name in &aside[1..] {
        let k: usize = name[name.find(".part-").unwrap() + 6..][..4]
            .parse()
            .unwrap();
        let piece = std::fs::read(dir.path().join("corrupt").join(name)).unwrap();
        let from = (k - 1) << 16;
        assert_eq!(
            piece,
            whole[from..whole.len().min(from + (64 << 10))],
            "{name} holds the message's bytes"
        );
    }
    let envelope = std::fs::read_to_string(dir.path().join("corrupt").join(&aside[0])).unwrap();
    assert!(envelope.contains("b@example.com"), "{envelope}");
}

/// A record framed like ours, with a checksum anyone can compute: what a
/// client could try to smuggle inside a message body.
fn forged_record(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut r = b"ORS1".to_vec();
    r.push(kind);
    r.extend_from_slice(&[0, 0, 0]);
    r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&r[4..12]), payload);
    r.extend_from_slice(&crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&r[..16]);
    r.extend_from_slice(&hcrc.to_le_bytes());
    r.extend_from_slice(payload);
    r
}

#[tokio::test]
async fn records_forged_inside_a_torn_message_body_are_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path()).unwrap();
    let victim = put(&spool, b"Subject: victim\r\n\r\nhello\r\n").await;
    // The attacker's body carries a Remove of the victim and a Commit of
    // a message of their own making.
    let forged_id: u64 = 0x0123_4567_89AB;
    let env = br#"{"sender":"attacker@evil","recipients":[{"address":"anyone@example.org"}],"received":0,"auth_user":"admin"}"#;
    let mut commit = forged_id.to_le_bytes().to_vec();
    commit.extend_from_slice(&(env.len() as u32).to_le_bytes());
    commit.extend_from_slice(env);
    commit.extend_from_slice(&0u32.to_le_bytes());
    commit.extend_from_slice(b"Subject: forged\r\n\r\nspam\r\n");
    let mut body = b"Subject: innocent\r\n\r\n".to_vec();
    body.extend(forged_record(4, &victim.as_u64().to_le_bytes()));
    body.extend(forged_record(2, &commit));
    body.extend_from_slice(b"MARKER-END");
    body.extend(std::iter::repeat_n(b'x', 2000));
    put(&spool, &body).await;
    spool.close().await.unwrap();
    drop(spool);
    // A crash tears the attacker's record right after the forged ones.
    let seg = segments(dir.path())
        .into_iter()
        .find(|p| std::fs::metadata(p).unwrap().len() > 32)
        .unwrap();
    let data = std::fs::read(&seg).unwrap();
    let cut = data.windows(10).position(|w| w == b"MARKER-END").unwrap() + 10;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(cut as u64)
        .unwrap();

    let (spool, rec) = Spool::open(dir.path()).unwrap();
    assert!(
        spool.message(victim).is_some(),
        "an acknowledged message was deleted by bytes from a body"
    );
    assert!(
        spool.list().iter().all(|(id, _)| id.as_u64() != forged_id),
        "a forged message was queued"
    );
    // The cut took an acknowledged message (the attacker's own): that is
    // reported as a loss, with the segment kept, never as a torn write.
    assert_eq!(rec.lost, 1, "{rec:?}");
    assert!(rec.torn_bytes > 0);
}

#[tokio::test]
async fn a_big_live_queue_does_not_make_every_commit_copy_segments() {
    // A long outage: everything stays queued, spanning many segments. The
    // old segments are all live; copying them would gain nothing, and must
    // not happen on every batch.
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open_with(
        dir.path(),
        Options {
            segment_size: 64 << 10,
            ..Options::default()
        },
    )
    .unwrap();
    let body = pattern(1024, 5);
    for _ in 0..800 {
        put(&spool, &body).await;
    }
    // Segments are numbered in the order they are made and a copied one
    // is deleted: with nothing ever copied, the numbers on disk have no
    // gap. (Copying every live segment on each batch would leave only the
    // newest few, far apart.)
    let numbers: Vec<u64> = segments(dir.path())
        .iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_str().unwrap();
            u64::from_str_radix(name.trim_start_matches("seg-"), 16).unwrap()
        })
        .collect();
    assert!(
        numbers.len() >= 8,
        "the queue spans several segments: {numbers:?}"
    );
    let span = numbers[numbers.len() - 1] - numbers[0] + 1;
    assert_eq!(
        span,
        numbers.len() as u64,
        "live segments were copied (gaps in the numbers): {numbers:?}"
    );
    let spool = reopen(spool, dir.path()).await;
    assert_eq!(spool.list().len(), 800);
}

#[tokio::test]
async fn ping_answers_without_touching_the_disk_and_fails_once_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path()).unwrap();
    let before = spool.sync_counts();
    spool.ping().await.unwrap();
    assert_eq!(spool.sync_counts(), before, "a ping is not a sync");
    spool.close().await.unwrap();
    assert!(matches!(spool.ping().await, Err(spool::SpoolError::Closed)));
}

/// A spool written by the release before the envelope/delivery split
/// (segment format 1, `ORSEG001`): message A new, B attempted twice and
/// held, C a 70 000-byte bounce of B with an expired recipient, D removed.
#[tokio::test]
async fn a_spool_written_in_the_previous_format_opens_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spool-v1");
    for f in std::fs::read_dir(&fixture).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
    }
    let (spool, recovery) = Spool::open(dir.path()).unwrap();
    assert_eq!(recovery.messages, 3);
    assert_eq!(recovery.moved_aside, 0);
    let ids: Vec<MessageId> = spool.list().into_iter().map(|(id, _)| id).collect();
    let [a, b, c] = ids[..] else {
        panic!("{ids:?}")
    };
    assert_eq!(a.to_string(), "0661A777641504");
    assert_eq!(b.to_string(), "0661A777641EA2");
    assert_eq!(c.to_string(), "0661A777643387");

    let qa = spool.message(a).unwrap();
    assert_eq!(qa.envelope.sender, "app@example.com");
    assert_eq!(qa.envelope.recipients, ["x@example.org", "y@example.org"]);
    assert_eq!(qa.envelope.client.as_deref(), Some("127.0.0.1:40000"));
    assert_eq!(qa.envelope.helo, "printer.lan");
    assert_eq!(qa.envelope.auth_user.as_deref(), Some("printer"));
    assert!(qa.envelope.smtputf8 && qa.envelope.eight_bit);
    assert_eq!(
        qa.envelope.received,
        std::time::UNIX_EPOCH + Duration::from_secs(1_764_000_000)
    );
    assert_eq!(qa.size, 46);
    assert_eq!(
        body(&spool, a).await,
        b"Subject: a\r\nFrom: app@example.com\r\n\r\nhello a\r\n"
    );

    // The delivery state of that release is handed over whole, as the
    // latest update wrote it, for the delivery side to read.
    let qb = spool.message(b).unwrap();
    assert_eq!(qb.delivery.format, DeliveryRecord::LEGACY);
    let json: serde_json::Value = serde_json::from_slice(&qb.delivery.data).unwrap();
    assert_eq!(json["attempts"], 2);
    assert_eq!(json["recipients"][0]["state"], "delivered");
    assert_eq!(json["account"], "default");
    assert_eq!(qb.envelope.recipients.len(), 3);

    let qc = spool.message(c).unwrap();
    assert_eq!(qc.size, 70_000);
    assert_eq!(qc.envelope.sender, "");
    let json: serde_json::Value = serde_json::from_slice(&qc.delivery.data).unwrap();
    assert_eq!(json["bounce_of"], "0661A777641EA2");
    assert_eq!(json["recipients"][0]["expired"], true);
    let bc = body(&spool, c).await;
    assert_eq!(bc.len(), 70_000);
    assert!(bc.starts_with(b"abcdefghij\r\nabcdefghij\r\n"));

    // New records go to a new-format segment; both are read together.
    spool.update(b, record(3)).await.unwrap();
    let d = put(&spool, b"new").await;
    let spool = reopen(spool, dir.path()).await;
    assert_eq!(spool.list().len(), 4);
    assert_eq!(spool.message(b).unwrap().delivery, record(3));
    assert_eq!(
        spool.message(c).unwrap().delivery.format,
        DeliveryRecord::LEGACY
    );
    assert_eq!(body(&spool, d).await, b"new");
    assert_eq!(body(&spool, c).await, bc);
}

#[tokio::test]
async fn the_next_segment_is_made_ahead_used_at_the_switch_and_not_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        segment_size: 256 << 10,
        ..Options::default()
    };
    let (spool, _) = Spool::open_with(dir.path(), opts.clone()).unwrap();
    let first = put(&spool, b"Subject: one\r\n\r\nx\r\n").await;
    spool.sync().await.unwrap();
    // Beside the active segment, the next one is ready: header only.
    let made: Vec<u64> = segments(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    assert_eq!(made.len(), 2, "{made:?}");
    assert_eq!(made[1], 32, "the next segment, empty: {made:?}");
    // Switches take it (and make the next); everything survives them.
    let mut ids = vec![first];
    for i in 0..6u8 {
        ids.push(put(&spool, &pattern(100_000, i)).await);
    }
    spool.close().await.unwrap();
    drop(spool);
    // A clean stop seals the active segment and deletes the one made
    // ahead: every segment left is sealed (its length in the header's
    // bytes 24-27).
    let left = segments(dir.path());
    assert!(left.len() >= 3, "the messages span segments: {left:?}");
    for p in &left {
        let head = std::fs::read(p).unwrap();
        assert!(
            head.get(24..28).is_some_and(|len| len != [0u8; 4]),
            "{} is not sealed: an unused segment was left behind",
            p.display()
        );
    }
    let (spool, rec) = Spool::open_with(dir.path(), opts).unwrap();
    assert_eq!(rec.messages, ids.len());
    for (i, id) in ids.iter().enumerate().skip(1) {
        assert_eq!(body(&spool, *id).await, pattern(100_000, (i - 1) as u8));
    }
}
