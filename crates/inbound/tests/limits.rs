//! Every limit: SIZE at MAIL, bodies over the limit (read, discarded, 552,
//! session still usable), recipients, connections, line length, errors,
//! and a full disk.

mod common;

use std::time::Duration;

use common::*;
use inbound::ByteSize;

#[tokio::test]
async fn size_parameter_over_the_limit() {
    bounded(20, async {
        let mut cfg = config();
        cfg.max_message_size = ByteSize(1000);
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd_start("MAIL FROM:<a@example.com> SIZE=1001", "552 5.3.4")
            .await;
        c.cmd_start("MAIL FROM:<a@example.com> SIZE=1000", "250 2.1.0")
            .await;
        let text = srv.metrics_text();
        assert!(
            text.contains("oauthrelay_messages_rejected_total{reason=\"size\"} 1"),
            "{text}"
        );
    })
    .await;
}

#[tokio::test]
async fn data_over_the_limit_is_discarded_and_the_session_goes_on() {
    bounded(30, async {
        let mut cfg = config();
        cfg.max_message_size = ByteSize(1000);
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        let mut big = b"Subject: big\r\n\r\n".to_vec();
        for i in 0..2000 {
            big.extend_from_slice(
                format!("line {i} of a message that is far too big\r\n").as_bytes(),
            );
        }
        // Looks like commands inside the oversized body: must stay content.
        big.extend_from_slice(b"HELP\r\n");
        let r = c.send_mail("a@example.com", &["b@example.net"], &big).await;
        assert_eq!(
            r.first(),
            "552 5.3.4 Message size exceeds fixed maximum message size"
        );
        assert!(srv.messages().await.is_empty(), "nothing stored");
        // The session is still usable, and a message at the limit passes.
        let mut ok = b"Date: x\r\nMessage-ID: <y@z>\r\n\r\n".to_vec();
        ok.resize(998, b'x');
        ok.extend_from_slice(b"\r\n");
        assert_eq!(ok.len(), 1000);
        let id = c
            .send_mail("a@example.com", &["b@example.net"], &ok)
            .await
            .queue_id();
        assert_eq!(split_received(&srv.body(id).await).1, ok);
        assert_eq!(srv.messages().await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn bdat_over_the_limit_is_discarded() {
    bounded(20, async {
        let mut cfg = config();
        cfg.max_message_size = ByteSize(1000);
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        let chunk = vec![b'x'; 600];
        // Pipelined: the second chunk goes over; the third belongs to the
        // failed transaction; then a NOOP.
        let mut wire = Vec::new();
        for (n, last) in [(600, ""), (600, ""), (600, " LAST")] {
            wire.extend_from_slice(format!("BDAT {n}{last}\r\n").as_bytes());
            wire.extend_from_slice(&chunk);
        }
        wire.extend_from_slice(b"NOOP\r\n");
        c.send(&wire).await;
        c.expect_start("250 2.0.0 Ok: 600 bytes").await;
        c.expect_start("552 5.3.4").await;
        c.expect_start("552 5.3.4").await;
        c.expect_start("250 2.0.0 Ok").await;
        assert!(srv.messages().await.is_empty());
        // A fresh transaction works.
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        c.send("BDAT 5 LAST\r\nhello").await;
        c.expect_start("250 2.0.0 Ok: queued").await;
        // One chunk bigger than the limit, refused at the command.
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        c.send([b"BDAT 1001 LAST\r\n".as_slice(), &[b'y'; 1001]].concat())
            .await;
        c.expect_start("552 5.3.4").await;
        c.cmd_start("NOOP", "250 2.0.0").await;
        assert_eq!(srv.messages().await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn too_many_recipients() {
    bounded(20, async {
        let mut cfg = config();
        cfg.max_recipients = 3;
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        for i in 0..3 {
            c.cmd_start(&format!("RCPT TO:<r{i}@example.net>"), "250 2.1.5")
                .await;
        }
        let r = c.cmd_start("RCPT TO:<r3@example.net>", "452 4.5.3").await;
        assert_eq!(r.first(), "452 4.5.3 Too many recipients");
        c.cmd("DATA", 354).await;
        c.send("Subject: x\r\n\r\nhi\r\n.\r\n").await;
        let id = c.expect(250).await.queue_id();
        assert_eq!(srv.spool.message(id).unwrap().envelope.recipients.len(), 3);
    })
    .await;
}

#[tokio::test]
async fn connections_over_the_limit_get_421() {
    bounded(20, async {
        let mut cfg = config();
        cfg.max_connections = 2;
        let srv = start(cfg).await;
        let mut a = srv.client().await;
        a.greeting().await;
        let mut b = srv.client().await;
        b.greeting().await;
        let mut c = srv.client().await;
        let r = c.reply().await;
        assert_eq!(
            r.first(),
            format!("421 4.7.0 {HOST} Error: too many connections")
        );
        c.expect_closed().await;
        let text = srv.metrics_text();
        assert!(
            text.contains("oauthrelay_smtp_connections_refused_total{reason=\"limit\"} 1"),
            "{text}"
        );
        assert!(text.contains("oauthrelay_smtp_sessions 2"), "{text}");
        // When one leaves, a new client gets in.
        a.cmd("QUIT", 221).await;
        a.expect_closed().await;
        while srv.inbound.active_sessions() > 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut d = srv.client().await;
        d.greeting().await;
        b.cmd("NOOP", 250).await;
    })
    .await;
}

#[tokio::test]
async fn overlong_lines_get_500_and_the_session_survives() {
    bounded(20, async {
        let mut cfg = config();
        cfg.max_line_length = 512;
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        // Exactly at the limit (CRLF included): fine.
        let ok = format!("NOOP {}", "x".repeat(512 - 7));
        c.cmd_start(&ok, "250 2.0.0").await;
        // One over.
        let long = format!("NOOP {}", "x".repeat(512 - 6));
        let r = c.cmd_start(&long, "500 5.5.2").await;
        assert_eq!(r.first(), "500 5.5.2 Line too long");
        c.cmd_start("NOOP", "250 2.0.0").await;
        // A huge line in pieces gets one 500, and what follows still works.
        c.send(vec![b'A'; 3000]).await;
        c.send(vec![b'B'; 3000]).await;
        c.send("\r\nNOOP\r\n").await;
        c.expect_start("500 5.5.2").await;
        c.expect_start("250 2.0.0").await;
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
    })
    .await;
}

#[tokio::test]
async fn too_many_errors_close_the_session() {
    bounded(20, async {
        let mut cfg = config();
        cfg.max_errors = 3;
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd_start("FROB", "500 5.5.1").await;
        c.cmd_start("RCPT TO:<x@y.z>", "503 5.5.1").await;
        // Successful commands do not reset the count.
        c.cmd("NOOP", 250).await;
        c.line("FROB").await;
        c.expect_start("500 5.5.1").await;
        let r = c.expect(421).await;
        assert_eq!(r.first(), "421 4.7.0 Too many errors");
        c.expect_closed().await;
    })
    .await;
}

/// A tiny tmpfs for the spool. `None` when mounting is impossible here
/// (not root, no tmpfs): said loudly, and a failure under CI.
struct Tmpfs {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { path, _dir: dir }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                eprintln!(
                    "\n*** SKIPPING the disk-full test: cannot mount a tmpfs here ({why}) ***\n"
                );
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "the disk-full test needs `mount -t tmpfs` (root) under CI: {why}"
                );
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_gives_452_and_stores_nothing() {
    let Some(fs) = Tmpfs::mount("256k") else {
        return;
    };
    bounded(30, async {
        let srv = start_full(
            config(),
            accept_all(),
            "127.0.0.1:0",
            Some(&fs.path.join("spool")),
        )
        .await;
        let mut c = srv.client().await;
        c.hello().await;
        let mut big = b"Subject: big\r\n\r\n".to_vec();
        while big.len() < 1 << 20 {
            big.extend_from_slice(
                b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n",
            );
        }
        let r = c.send_mail("a@example.com", &["b@example.net"], &big).await;
        assert_eq!(r.code, 452, "{r:?}");
        assert!(r.first().starts_with("452 4.3.1"), "{r:?}");
        assert!(srv.spool.list().is_empty(), "no partial message");
        // The session is usable, and once space is back (the failed write
        // was cut off) a small message is taken.
        c.cmd("NOOP", 250).await;
        let r = c
            .send_mail(
                "a@example.com",
                &["b@example.net"],
                b"Subject: small\r\n\r\nhi\r\n",
            )
            .await;
        assert_eq!(r.code, 250, "{r:?}");
        assert_eq!(srv.spool.list().len(), 1);
        let text = srv.metrics_text();
        assert!(
            text.contains("oauthrelay_messages_rejected_total{reason=\"storage\"} 1"),
            "{text}"
        );
        c.cmd("QUIT", 221).await;
        srv.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_is_refused_at_the_spool_reserve_while_removals_go_on() {
    bounded(30, async {
        let mut cfg = config();
        // No size limit gets in the way of the free-space check.
        cfg.max_message_size = inbound::ByteSize(u64::MAX);
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        let r = c
            .send_mail(
                "a@example.com",
                &["b@example.net"],
                b"Subject: before\r\n\r\nqueued before the disk filled\r\n",
            )
            .await;
        let delivered = r.queue_id();
        assert!(srv.spool.room_for_mail().expect("statvfs works here") > 1000);

        // A SIZE= larger than the free space above the reserve is refused
        // at MAIL, before the client sends anything.
        c.cmd_start(
            "MAIL FROM:<a@example.com> SIZE=1152921504606846976",
            "452 4.3.1",
        )
        .await;
        c.cmd_start("MAIL FROM:<a@example.com> SIZE=1000", "250 2.1.0")
            .await;
        c.cmd("RSET", 250).await;

        // The file system is now "down to its reserve": the reserve is more
        // than all the free space.
        srv.spool.set_min_free_space(u64::MAX / 2);
        c.cmd_start("MAIL FROM:<a@example.com> SIZE=1000", "452 4.3.1")
            .await;
        // Without SIZE=, the body is read and refused by the spool writer.
        let r = c
            .send_mail(
                "a@example.com",
                &["b@example.net"],
                b"Subject: refused\r\n\r\nno room\r\n",
            )
            .await;
        assert!(r.first().starts_with("452 4.3.1"), "{r:?}");
        assert_eq!(srv.spool.list().len(), 1, "nothing stored");
        assert!(
            srv.spool.health().is_err(),
            "readiness says the spool is full"
        );
        let text = srv.metrics_text();
        assert!(
            text.contains("oauthrelay_messages_rejected_total{reason=\"storage\"} 3"),
            "{text}"
        );

        // Delivery may use the reserve: the delivered message is removed.
        let record = spool::DeliveryRecord::new(2, b"{\"attempts\":1}".to_vec());
        srv.spool.update(delivered, record).await.unwrap();
        srv.spool.remove(delivered).await.unwrap();
        assert!(srv.spool.list().is_empty());

        // Room again: mail is taken.
        srv.spool.set_min_free_space(0);
        let r = c
            .send_mail(
                "a@example.com",
                &["b@example.net"],
                b"Subject: after\r\n\r\nroom again\r\n",
            )
            .await;
        assert_eq!(r.code, 250, "{r:?}");
        assert!(srv.spool.health().is_ok());
        c.cmd("QUIT", 221).await;
        srv.stop().await;
    })
    .await;
}
