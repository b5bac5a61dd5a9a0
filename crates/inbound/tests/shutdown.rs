//! Shutdown: stop accepting; sessions waiting for a command get
//! `421 4.3.2` at once; a session inside DATA may finish within
//! `shutdown_grace` (its message is committed and answered), then gets 421.

mod common;

use std::time::Duration;

use common::*;

async fn listener_closed(addr: std::net::SocketAddr) -> bool {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn idle_sessions_are_closed_and_serve_returns() {
    bounded(30, async {
        let srv = start(config()).await;
        let mut a = srv.client().await;
        a.hello().await;
        let mut b = srv.client().await;
        b.greeting().await;
        srv.shutdown.cancel();
        for c in [&mut a, &mut b] {
            assert_eq!(c.reply().await.first(), "421 4.3.2 Service shutting down");
            c.expect_closed().await;
        }
        srv.task.await.unwrap();
        assert_eq!(srv.inbound.active_sessions(), 0);
        assert!(
            tokio::net::TcpStream::connect(srv.addr).await.is_err(),
            "no longer accepting"
        );
    })
    .await;
}

#[tokio::test]
async fn a_message_in_progress_is_finished_then_421() {
    bounded(30, async {
        let srv = start(config()).await;
        let mut idle = srv.client().await;
        idle.hello().await;
        let mut busy = srv.client().await;
        busy.hello().await;
        busy.cmd("MAIL FROM:<a@example.com>", 250).await;
        busy.cmd("RCPT TO:<b@example.net>", 250).await;
        busy.cmd("DATA", 354).await;
        busy.send("Subject: in flight\r\n\r\nfirst half\r\n").await;

        srv.shutdown.cancel();
        assert_eq!(
            idle.reply().await.first(),
            "421 4.3.2 Service shutting down"
        );
        assert!(
            listener_closed(srv.addr).await,
            "still accepting after shutdown"
        );

        busy.send("second half\r\n.\r\nNOOP\r\n").await;
        let id = busy
            .expect_start("250 2.0.0 Ok: queued as")
            .await
            .queue_id();
        // Pipelined commands already sent are still answered; then 421.
        busy.expect_start("250 2.0.0 Ok").await;
        assert_eq!(
            busy.reply().await.first(),
            "421 4.3.2 Service shutting down"
        );
        busy.expect_closed().await;
        srv.task.await.unwrap();
        let (_, body) = split_received(
            &srv.spool
                .read_body(id)
                .unwrap()
                .read_to_end()
                .await
                .unwrap(),
        );
        assert!(body.starts_with(b"Subject: in flight\r\n"));
        assert!(body.ends_with(b"\r\n\r\nfirst half\r\nsecond half\r\n"));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_stalled_message_is_cut_off_after_the_grace_period() {
    bounded(3600, async {
        let mut cfg = config();
        cfg.shutdown_grace = Duration::from_secs(30);
        cfg.data_timeout = Duration::from_secs(600);
        let srv = start(cfg).await;
        let mut busy = srv.client().await;
        busy.hello().await;
        busy.cmd("MAIL FROM:<a@example.com>", 250).await;
        busy.cmd("RCPT TO:<b@example.net>", 250).await;
        busy.cmd("DATA", 354).await;
        busy.send("Subject: never finished\r\n").await;
        let t0 = tokio::time::Instant::now();
        srv.shutdown.cancel();
        assert_eq!(
            busy.reply().await.first(),
            "421 4.3.2 Service shutting down"
        );
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
            "{waited:?}"
        );
        busy.expect_closed().await;
        srv.task.await.unwrap();
        assert!(srv.spool.list().is_empty());
    })
    .await;
}

#[tokio::test]
async fn reload_applies_to_new_sessions_only() {
    bounded(30, async {
        let srv = start(config()).await;
        let mut old = srv.client().await;
        old.hello().await;
        let mut cfg = config();
        cfg.max_message_size = inbound::ByteSize(5000);
        srv.inbound
            .reload(inbound::Settings::new(cfg, "new.test", accept_all()).unwrap());
        let mut new = srv.client().await;
        assert_eq!(
            new.greeting().await.first(),
            "220 new.test ESMTP oauthrelay"
        );
        let e = new.ehlo().await;
        assert!(e.lines.contains(&"SIZE 5000".to_string()), "{e:?}");
        let e = old.ehlo().await;
        assert!(e.lines.contains(&"SIZE 36700160".to_string()), "{e:?}");
        assert_eq!(srv.inbound.settings().hostname(), "new.test");
    })
    .await;
}
