//! BDAT (CHUNKING): chunks stored exactly as sent, LAST, BDAT 0 LAST,
//! chunks of refused commands read and thrown away, no mixing with DATA.

mod common;

use common::*;

const HEAD: &[u8] = b"Date: x\r\nMessage-ID: <m@x>\r\n\r\n";

#[tokio::test]
async fn chunks_are_stored_exactly() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        // Binary: dots at line starts, bare LF and CR, NUL, 8-bit, and what
        // looks like an end of data: all stored as sent.
        let chunk1: Vec<u8> = [HEAD, b"..x\r\n.\r\nQUIT\r\n\n.\n\x00\xff\r"].concat();
        let chunk2: &[u8] = b"tail without newline";
        c.send([format!("BDAT {}\r\n", chunk1.len()).as_bytes(), &chunk1].concat())
            .await;
        let r = c.expect_start("250 2.0.0").await;
        assert!(
            r.text().contains(&format!("{} bytes", chunk1.len())),
            "{r:?}"
        );
        c.send([format!("BDAT {} LAST\r\n", chunk2.len()).as_bytes(), chunk2].concat())
            .await;
        let id = c.expect_start("250 2.0.0 Ok: queued as").await.queue_id();
        let (received, rest) = split_received(&srv.body(id).await);
        assert_eq!(rest, [&chunk1[..], chunk2].concat());
        assert!(received.contains(" with ESMTP id "), "{received}");
        c.cmd("QUIT", 221).await;
    })
    .await;
}

#[tokio::test]
async fn pipelined_bdat_with_zero_last() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.greeting().await;
        let mut wire =
            b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n".to_vec();
        wire.extend_from_slice(format!("BDAT {}\r\n", HEAD.len()).as_bytes());
        wire.extend_from_slice(HEAD);
        wire.extend_from_slice(b"BDAT 4\r\nabcdBDAT 0 LAST\r\n");
        // A second message made of nothing but BDAT 0 LAST.
        wire.extend_from_slice(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nBDAT 0 LAST\r\nQUIT\r\n",
        );
        c.send(&wire).await;
        c.expect(250).await;
        c.expect_start("250 2.1.0").await;
        c.expect_start("250 2.1.5").await;
        c.expect_start("250 2.0.0 Ok: 30 bytes").await;
        c.expect_start("250 2.0.0 Ok: 4 bytes").await;
        let first = c.expect_start("250 2.0.0 Ok: queued as").await.queue_id();
        c.expect_start("250 2.1.0").await;
        c.expect_start("250 2.1.5").await;
        let second = c.expect_start("250 2.0.0 Ok: queued as").await.queue_id();
        c.expect_start("221").await;
        c.expect_closed().await;
        assert_eq!(
            split_received(&srv.body(first).await).1,
            [HEAD, b"abcd"].concat()
        );
        let (_, empty) = split_received(&srv.body(second).await);
        let text = String::from_utf8(empty).unwrap();
        assert!(
            text.starts_with("Date: ") && text.contains("\r\nMessage-ID: <"),
            "{text}"
        );
    })
    .await;
}

#[tokio::test]
async fn refused_bdat_chunks_are_read_not_executed() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.hello().await;
        // No transaction: refused, and its chunk (which looks like commands)
        // is thrown away.
        c.send("BDAT 6\r\nHELP\r\n").await;
        c.expect_start("503 5.5.1").await;
        c.cmd_start("NOOP", "250 2.0.0").await;
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.send("BDAT 6 LAST\r\nHELP\r\n").await;
        c.expect_start("503 5.5.1").await;
        c.cmd_start("NOOP", "250 2.0.0").await;
        assert!(srv.messages().await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn bdat_and_data_do_not_mix() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        c.send("BDAT 3\r\nabc").await;
        c.expect_start("250 2.0.0").await;
        c.cmd_start("DATA", "503 5.5.1").await;
        c.cmd_start("RCPT TO:<c@example.net>", "503 5.5.1").await;
        c.send("BDAT 3 LAST\r\ndef").await;
        let id = c.expect_start("250 2.0.0 Ok: queued").await.queue_id();
        let env = srv.spool.message(id).unwrap().envelope;
        assert_eq!(env.recipients.len(), 1);
        // RSET in the middle of a BDAT transaction drops it.
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        c.send("BDAT 3\r\nabc").await;
        c.expect_start("250 2.0.0").await;
        c.cmd("RSET", 250).await;
        c.send("BDAT 3 LAST\r\nabc").await;
        c.expect_start("503 5.5.1").await;
        assert_eq!(srv.messages().await.len(), 1);
    })
    .await;
}
