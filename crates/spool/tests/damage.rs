//! Damage found at start-up is never quiet and its evidence is never
//! deleted: a truncated segment, an emptied older segment, a flipped byte
//! in a chunk, stray names in the spool directory. Each is reported
//! ([`spool::Recovery`] with the lost count and ids; the daemon logs it at
//! ERROR) and kept in `corrupt/`.

use std::path::{Path, PathBuf};

use spool::{DeliveryRecord, Envelope, MessageId, Options, Reserve, Spool};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn put(spool: &Spool, body: &[u8]) -> MessageId {
    let mut w = spool.begin(Reserve::Respect);
    for piece in body.chunks(7919) {
        w.write(piece).await.unwrap();
    }
    w.commit(
        Envelope::new("a@example.com", ["b@example.com".to_string()]),
        DeliveryRecord::default(),
    )
    .await
    .unwrap()
}

/// Bytes without repeats (so a window of them is found in one place).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    v.sort();
    v
}

fn corrupt(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("corrupt"))
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// 40 queued messages, the daemon stopped cleanly.
async fn queued(dir: &Path, opts: Options) -> Vec<MessageId> {
    let (spool, _) = Spool::open_with(dir, opts).unwrap();
    let mut ids = Vec::new();
    for n in 0..40 {
        ids.push(put(&spool, &pattern(3000, n)).await);
    }
    spool.close().await.unwrap();
    ids
}

#[tokio::test]
async fn a_segment_truncated_in_the_middle_is_a_loss_not_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let ids = queued(dir.path(), Options::default()).await;
    let seg = segments(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let (spool, rec) = Spool::open(dir.path()).unwrap();
    let kept = spool.list().len();
    assert!(kept > 10 && kept < 30, "{kept}");
    assert_eq!(rec.lost, 40 - kept, "every lost message counted: {rec:?}");
    assert_eq!(rec.messages, kept);
    let name = seg.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        corrupt(dir.path()),
        [format!("{}.truncated", name.trim_end_matches(".log"))],
        "the segment is kept whole"
    );
    let kept_path = dir
        .path()
        .join("corrupt")
        .join(format!("{}.truncated", name.trim_end_matches(".log")));
    assert_eq!(std::fs::metadata(&kept_path).unwrap().len(), len / 2);
    assert_eq!(mode(&kept_path), 0o600);
    assert_eq!(mode(&dir.path().join("corrupt")), 0o700);
    // The first half came back.
    for id in &ids[..kept] {
        assert!(spool.message(*id).is_some());
    }
    // The evidence outlives the segment's reclaiming.
    spool.close().await.unwrap();
    drop(spool);
    let (_spool, rec) = Spool::open(dir.path()).unwrap();
    assert_eq!(rec.lost, 0, "reported once: {rec:?}");
    assert!(kept_path.exists());
}

#[tokio::test]
async fn an_emptied_older_segment_is_reported_with_what_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        segment_size: 40 << 10,
        ..Options::default()
    };
    queued(dir.path(), opts.clone()).await;
    let segs = segments(dir.path());
    assert!(segs.len() >= 3, "{segs:?}");
    std::fs::write(&segs[0], b"").unwrap();

    let (spool, rec) = Spool::open_with(dir.path(), opts).unwrap();
    assert_eq!(
        rec.damaged_segments, 1,
        "the emptied segment's loss is reported: {rec:?}"
    );
    assert!(spool.list().len() < 40, "{rec:?}");
    let name = segs[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        corrupt(dir.path()).contains(&format!("{}.unreadable", name.trim_end_matches(".log"))),
        "{:?}",
        corrupt(dir.path())
    );
}

#[tokio::test]
async fn a_flipped_byte_in_a_chunk_keeps_the_rest_of_the_message_for_a_person() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path()).unwrap();
    let big = noise(300_000, 5);
    let id = put(&spool, &big).await;
    let other = put(&spool, b"small and intact").await;
    spool.close().await.unwrap();
    drop(spool);
    let seg = segments(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    // A byte in the second chunk.
    let at = bytes
        .windows(64)
        .position(|w| w == &big[70_000..70_064])
        .unwrap();
    bytes[at] ^= 1;
    std::fs::write(&seg, &bytes).unwrap();

    let (spool, rec) = Spool::open(dir.path()).unwrap();
    assert!(spool.message(id).is_none());
    assert!(spool.message(other).is_some());
    assert_eq!(rec.lost_ids.first(), Some(&id), "{rec:?}");
    let aside = corrupt(dir.path());
    for want in [
        format!("{id}.envelope.json"),
        format!("{id}.part-0001-of-0005.bin"),
        format!("{id}.part-0003-of-0005.bin"),
        format!("{id}.part-0004-of-0005.bin"),
        format!("{id}.part-0005-of-0005.bin"),
    ] {
        assert!(aside.contains(&want), "{want} kept: {aside:?}");
    }
    // The damaged chunk's record itself is kept too (as a region).
    assert!(
        aside
            .iter()
            .any(|n| n.ends_with(".bin") && n.contains("-at-")),
        "{aside:?}"
    );
    // A person can rebuild the message: the good parts are exact, and the
    // damaged one differs from the original in one byte.
    let c = dir.path().join("corrupt");
    let mut rebuilt = std::fs::read(c.join(format!("{id}.part-0001-of-0005.bin"))).unwrap();
    let region = aside.iter().find(|n| n.contains("-at-")).unwrap();
    let region = std::fs::read(c.join(region)).unwrap();
    // Record header (20) + id (8), then the chunk.
    rebuilt.extend_from_slice(&region[28..28 + (64 << 10)]);
    for k in 3..=5 {
        rebuilt.extend(std::fs::read(c.join(format!("{id}.part-{k:04}-of-0005.bin"))).unwrap());
    }
    assert_eq!(rebuilt.len(), big.len());
    let diff = rebuilt.iter().zip(&big).filter(|(a, b)| a != b).count();
    assert_eq!(diff, 1, "only the flipped byte differs");
    for f in std::fs::read_dir(&c).unwrap() {
        assert_eq!(mode(&f.unwrap().path()), 0o600);
    }
}

#[tokio::test]
async fn junk_and_wrapping_names_are_set_aside_and_never_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ids = queued(dir.path(), Options::default()).await;
    // Deliver them all, so a forgotten removal would send them again.
    {
        let (spool, _) = Spool::open(dir.path()).unwrap();
        for id in &ids {
            spool.remove(*id).await.unwrap();
        }
        spool.close().await.unwrap();
    }
    std::fs::write(dir.path().join("seg-ffffffffffffffff.log"), b"junk").unwrap();
    std::fs::create_dir(dir.path().join("seg-0000000000000abc.log")).unwrap();
    std::fs::write(dir.path().join("seg-12.log"), b"junk").unwrap();

    let (spool, rec) = Spool::open(dir.path()).unwrap();
    assert_eq!(rec.strays, 3, "{rec:?}");
    assert_eq!(rec.messages, 0, "no delivered message comes back");
    let aside = corrupt(dir.path());
    assert_eq!(
        aside,
        [
            "stray-seg-0000000000000abc.log",
            "stray-seg-12.log",
            "stray-seg-ffffffffffffffff.log"
        ]
    );
    // The counter did not wrap: new mail goes on, and a restart finds it.
    let id = put(&spool, b"after the junk").await;
    spool.close().await.unwrap();
    drop(spool);
    let (spool, rec) = Spool::open(dir.path()).unwrap();
    assert_eq!(rec.strays, 0);
    assert_eq!(
        spool.list().into_iter().map(|(i, _)| i).collect::<Vec<_>>(),
        [id]
    );
    for seg in segments(dir.path()) {
        let name = seg.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.as_str() < "seg-0001", "{name}");
    }
}

/// The sync thread syncs and seals a finished segment before it
/// acknowledges anything written after it, while the writer already goes
/// on in the next one. A power failure in between can leave the older
/// segment unsealed with its tail unwritten and the newer one holding the
/// commit of a message whose body was in that tail: the message was never
/// acknowledged, so it is no loss (and no ERROR), but what was found is
/// still kept.
#[tokio::test]
async fn a_commit_whose_body_was_in_an_unsynced_tail_was_never_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        segment_size: 100 << 10,
        ..Options::default()
    };
    let (spool, _) = Spool::open_with(dir.path(), opts.clone()).unwrap();
    let first = put(&spool, &pattern(30_000, 1)).await;
    // Four 64 KiB chunks, at least one of them in segment 1; once they
    // are written (the barrier) the writer has moved on to a new segment,
    // where the commit goes.
    let mut w = spool.begin(Reserve::Respect);
    w.write(&noise(4 * 65_536 + 100, 7)).await.unwrap();
    spool.sync().await.unwrap();
    let big = w
        .commit(
            Envelope::new("a@example.com", ["b@example.com".to_string()]),
            DeliveryRecord::default(),
        )
        .await
        .unwrap();
    spool.close().await.unwrap();
    drop(spool);
    let segs = segments(dir.path());
    assert!(segs.len() >= 2, "{segs:?}");

    // What a crash before the seal of segment 1 completed looks like: no
    // seal, and its last chunk never reached the disk.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&segs[0])
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0u8; 8], 24).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 1000).unwrap();
    drop(f);

    let (spool, rec) = Spool::open_with(dir.path(), opts).unwrap();
    assert_eq!(rec.lost, 0, "never acknowledged, so not lost: {rec:?}");
    assert!(rec.lost_ids.is_empty(), "{rec:?}");
    assert_eq!(rec.damaged_segments, 0, "{rec:?}");
    assert!(
        spool.message(first).is_some(),
        "the message before is intact"
    );
    assert!(
        spool.message(big).is_none(),
        "an incomplete body is never sent"
    );
    let kept = corrupt(dir.path());
    assert!(
        kept.contains(&format!("{big}.envelope.json")),
        "what there is stays for a person: {kept:?}"
    );
}
