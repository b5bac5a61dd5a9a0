//! A 30 MB message, streamed through DATA and through BDAT, stored byte
//! exact. (Memory is measured by the binary-level tests.)

mod common;

use common::*;
use inbound::ByteSize;

/// About `size` bytes of base64-looking lines, some starting with a dot.
fn big_body(size: usize) -> Vec<u8> {
    let mut body = b"Date: x\r\nMessage-ID: <big@x>\r\nSubject: big\r\n\r\n".to_vec();
    let mut state: u32 = 12345;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    while body.len() < size {
        for i in 0..76 {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let c = ALPHABET[(state >> 16) as usize % 64];
            body.push(if i == 0 && state.is_multiple_of(97) {
                b'.'
            } else {
                c
            });
        }
        body.extend_from_slice(b"\r\n");
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_megabytes_through_data() {
    bounded(300, async {
        let mut cfg = config();
        cfg.max_message_size = ByteSize(40 << 20);
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        let body = big_body(30 << 20);
        assert!(body.windows(3).any(|w| w == b"\n.A") || body.windows(2).any(|w| w == b"\n."));
        c.cmd("MAIL FROM:<a@example.com> SIZE=31457280", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        c.cmd("DATA", 354).await;
        let mut wire = Vec::with_capacity(body.len() + (1 << 20));
        inbound::dot::stuff(&body, &mut wire);
        for piece in wire.chunks(64 << 10) {
            c.send(piece).await;
        }
        let id = c.expect_start("250 2.0.0 Ok: queued as").await.queue_id();
        let stored = srv.body(id).await;
        let (_, rest) = split_received(&stored);
        assert!(rest == body, "30 MB body differs after storage");
        assert_eq!(srv.spool.message(id).unwrap().size, stored.len() as u64);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_megabytes_through_bdat() {
    bounded(300, async {
        let mut cfg = config();
        cfg.max_message_size = ByteSize(40 << 20);
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        let body = big_body(30 << 20);
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        let chunks: Vec<&[u8]> = body.chunks(3 << 20).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = if i + 1 == chunks.len() { " LAST" } else { "" };
            c.send(format!("BDAT {}{last}\r\n", chunk.len())).await;
            c.send(chunk).await;
        }
        for _ in 1..chunks.len() {
            c.expect_start("250 2.0.0 Ok: 3145728 bytes").await;
        }
        let id = c.expect_start("250 2.0.0 Ok: queued as").await.queue_id();
        let (_, rest) = split_received(&srv.body(id).await);
        assert!(rest == body, "30 MB body differs after storage");
    })
    .await;
}
