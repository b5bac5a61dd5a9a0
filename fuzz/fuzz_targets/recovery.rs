//! Spool recovery on arbitrary segment files, and on real segments torn or
//! damaged anywhere inside a message whose body a client chose.
//!
//! Input: byte 0 chooses the mode.
//!
//! - Even: the rest is written as the spool's segment files (byte 1 says
//!   where it is split into a first and a second segment; 0: one segment),
//!   and the spool is opened. What must hold: no panic; opening succeeds
//!   (damage is reported and set aside, never a refusal to start); every
//!   recovered message's body can be asked for without a panic; a second
//!   open finds the same messages (recovery does not change its mind).
//! - Odd: a real spool gets a "victim" message, then one whose body is the
//!   rest of the input (a client's bytes, which may hold anything,
//!   including records framed like ours), is closed, and its segment is cut
//!   at the offset bytes 1-2 choose and, with byte 3 odd, a byte in the
//!   client's body flipped. What must hold: the victim is recovered
//!   byte-exact; nothing else is recovered but the client's message itself,
//!   byte-exact; nothing from the client's body passes as a record (no
//!   other id, no removal of the victim).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spool::{DeliveryRecord, Envelope, MessageId, Reserve, Spool};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn segment(dir: &Path, no: u64) -> std::path::PathBuf {
    dir.join(format!("seg-{no:016x}.log"))
}

async fn put(spool: &Spool, body: &[u8]) -> MessageId {
    let mut w = spool.begin(Reserve::Respect);
    for piece in body.chunks(4093) {
        w.write(piece).await.expect("write");
    }
    w.commit(
        Envelope::new("a@example.com", ["b@example.com".to_string()]),
        DeliveryRecord::default(),
    )
    .await
    .expect("commit")
}

async fn bodies(spool: &Spool) -> Vec<(MessageId, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    for (id, _) in spool.list() {
        let body = match spool.read_body(id) {
            Ok(r) => r.read_to_end().await.ok(),
            Err(_) => None,
        };
        out.push((id, body));
    }
    out
}

fn raw(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let at = if split == 0 {
        rest.len()
    } else {
        (split as usize * 97) % (rest.len() + 1)
    };
    std::fs::write(segment(dir.path(), 1), &rest[..at]).expect("segment 1");
    if at < rest.len() {
        std::fs::write(segment(dir.path(), 2), &rest[at..]).expect("segment 2");
    }
    let rt = runtime();
    rt.block_on(async {
        let (spool, _) = Spool::open(dir.path()).expect("recovery never refuses to start");
        let first = bodies(&spool).await;
        spool.close().await.expect("close");
        drop(spool);
        let (spool, _) = Spool::open(dir.path()).expect("second open");
        let ids: Vec<MessageId> = first.iter().map(|(id, _)| *id).collect();
        let again: Vec<MessageId> = spool.list().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, again, "a second recovery finds the same messages");
        spool.close().await.expect("close");
    });
}

fn torn(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let (cut, flip, body) = (u16::from_le_bytes([data[0], data[1]]), data[2], &data[3..]);
    let dir = tempfile::tempdir().expect("tempdir");
    let victim_body = b"Subject: victim\r\n\r\nmust survive\r\n".to_vec();
    let rt = runtime();
    let (victim, client) = rt.block_on(async {
        let (spool, _) = Spool::open(dir.path()).expect("open");
        let victim = put(&spool, &victim_body).await;
        let client = put(&spool, body).await;
        spool.close().await.expect("close");
        (victim, client)
    });
    let path = segment(dir.path(), 1);
    let mut seg = std::fs::read(&path).expect("segment");
    // The victim's commit is acknowledged and complete before the client's
    // message starts: cut only after it.
    let start = seg
        .windows(victim_body.len())
        .position(|w| w == victim_body)
        .expect("victim in segment 1")
        + victim_body.len();
    let len = start + (cut as usize % (seg.len() - start + 1));
    seg.truncate(len);
    if flip & 1 == 1 && len > start {
        let at = start + (flip as usize * 131) % (len - start);
        seg[at] ^= 0x20;
    }
    std::fs::write(&path, &seg).expect("write back");
    rt.block_on(async {
        let (spool, _) = Spool::open(dir.path()).expect("recovery never refuses to start");
        for (id, got) in bodies(&spool).await {
            if id == victim {
                assert_eq!(got.as_deref(), Some(&victim_body[..]), "the victim intact");
            } else {
                assert_eq!(id, client, "only messages that were committed come back");
                assert_eq!(got.as_deref(), Some(body), "the client's message exact");
            }
        }
        assert!(
            spool.message(victim).is_some(),
            "bytes of a client's body removed another message"
        );
        spool.close().await.expect("close");
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 { raw(rest) } else { torn(rest) }
});
