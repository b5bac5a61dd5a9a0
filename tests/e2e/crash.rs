//! kill -9 right after a `250`: the message must be there after a restart,
//! byte-exact.

use std::time::Duration;

use crate::harness::{BASE, Daemon, Smtp, queued_id};

/// Read every queued message straight from the spool (the daemon must be
/// stopped): id -> bytes.
async fn spool_contents(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let (spool, _) = spool::Spool::open(&dir.join("spool")).unwrap();
    let mut out = Vec::new();
    for (id, _) in spool.list() {
        let body = spool.read_body(id).unwrap().read_to_end().await.unwrap();
        out.push((id.to_string(), body));
    }
    spool.close().await.unwrap();
    out
}

#[tokio::test]
async fn sigkill_right_after_250_loses_nothing() {
    let mut d = Daemon::start(BASE);
    let mut sent = Vec::new();
    for round in 0..5u8 {
        let mut s = Smtp::open(d.smtp).await;
        s.cmd("EHLO crash").await;
        // 8-bit, long lines, a leading dot: all must come back exactly.
        let mut body = format!(
            "Date: Tue, 24 Nov 2026 10:00:0{round} +0000\r\nMessage-ID: <crash{round}@example.com>\r\nSubject: round {round}\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(b".leading dot\r\n\xe2\x82\xac \xff\xfe binary-ish\r\n");
        body.extend(std::iter::repeat_n(b'z', 5000 * (round as usize + 1)));
        body.extend_from_slice(b"\r\n");
        let r = s.mail("a@example.com", &["b@example.com"], &body).await;
        assert!(r.starts_with("250 2.0.0"), "{r}");
        // The crash, the instant the client has its 250.
        d.kill9();
        sent.push((queued_id(&r), body));
        d = d.restart();
    }
    let listed = d.cli(&["queue", "list", "--json"], None);
    let list: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 5, "{list}");
    let dir = d.dir.clone();
    assert!(d.terminate(Duration::from_secs(20)).success());

    let stored = spool_contents(&dir).await;
    assert_eq!(stored.len(), 5);
    for (id, body) in &sent {
        let (_, got) = stored
            .iter()
            .find(|(sid, _)| sid == id)
            .expect("acknowledged message present");
        // We prepend Received:; everything after it is the client's bytes.
        assert!(got.starts_with(b"Received: "), "our trace header first");
        assert!(
            got.ends_with(body),
            "stored bytes equal the sent bytes for {id}"
        );
        let header_end = got.windows(2).position(|w| w == b"\r\n").unwrap();
        let after_received = &got[header_end + 2..];
        let received_folded = after_received.starts_with(b" ") || after_received.starts_with(b"\t");
        assert!(
            got.len() - body.len() < 400,
            "only a trace header was added (folded: {received_folded})"
        );
    }
}
