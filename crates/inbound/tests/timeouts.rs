//! Timeouts, with paused time: the command deadline counts from our last
//! reply, the body deadline grows with the bytes received, a slowloris is
//! cut off and an honest slow client is not.

mod common;

use std::time::Duration;

use common::*;
use tokio::time::{Instant, sleep};

fn timeout_reply() -> String {
    format!("421 4.4.2 {HOST} Error: timeout exceeded")
}

#[tokio::test(start_paused = true)]
async fn idle_client_is_cut_off_after_the_command_timeout() {
    bounded(3600, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.greeting().await;
        let t0 = Instant::now();
        let r = c.reply().await;
        assert_eq!(r.first(), timeout_reply());
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(300) && waited < Duration::from_secs(302),
            "{waited:?}"
        );
        c.expect_closed().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_dribbled_command_does_not_extend_the_deadline() {
    bounded(3600, async {
        let mut cfg = config();
        cfg.command_timeout = Duration::from_secs(60);
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        let t0 = Instant::now();
        // Activity within the deadline keeps the session: a whole command
        // every 50 s.
        for _ in 0..3 {
            sleep(Duration::from_secs(50)).await;
            c.cmd("NOOP", 250).await;
        }
        // A command sent one byte every 15 s never completes in time: the
        // deadline counts from the last reply, not the last byte.
        let cut = dribble(&mut c, Duration::from_secs(15)).await;
        let r = c.reply().await;
        assert_eq!(r.first(), timeout_reply());
        assert!(
            cut >= Duration::from_secs(60) && cut < Duration::from_secs(61),
            "{cut:?}"
        );
        assert!(t0.elapsed() > Duration::from_secs(150));
        c.expect_closed().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn silent_data_times_out() {
    bounded(3600, async {
        let mut cfg = config();
        cfg.data_timeout = Duration::from_secs(180);
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        c.cmd("DATA", 354).await;
        c.send("Subject: x\r\n").await;
        let t0 = Instant::now();
        let r = c.reply().await;
        assert_eq!(r.first(), timeout_reply());
        assert!(
            t0.elapsed() >= Duration::from_secs(179) && t0.elapsed() < Duration::from_secs(182)
        );
        c.expect_closed().await;
        assert!(srv.messages().await.is_empty());
    })
    .await;
}

/// Send one byte every `every` until the server says something; returns
/// how long that took.
async fn dribble(c: &mut Client, every: Duration) -> Duration {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let t0 = Instant::now();
    loop {
        tokio::select! {
            r = c.io.fill_buf() => {
                assert!(!r.unwrap().is_empty(), "closed without a reply");
                return t0.elapsed();
            }
            _ = sleep(every) => {
                let _ = c.io.get_mut().write_all(b"x").await;
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn slowloris_in_data_is_cut_off() {
    bounded(3600, async {
        let mut cfg = config();
        cfg.data_timeout = Duration::from_secs(180);
        cfg.min_data_rate = 500;
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        c.cmd("DATA", 354).await;
        let cut = dribble(&mut c, Duration::from_secs(5)).await;
        assert_eq!(c.reply().await.first(), timeout_reply());
        // 180 s, plus well under a second for ~36 bytes at 500 B/s.
        assert!(
            cut >= Duration::from_secs(180) && cut <= Duration::from_secs(182),
            "{cut:?}"
        );
        c.expect_closed().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn slowloris_in_bdat_is_cut_off() {
    bounded(3600, async {
        let mut cfg = config();
        cfg.data_timeout = Duration::from_secs(100);
        cfg.min_data_rate = 10;
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        c.line("BDAT 100000 LAST").await;
        let cut = dribble(&mut c, Duration::from_secs(2)).await;
        assert_eq!(c.reply().await.first(), timeout_reply());
        // 100 s + 1 s per 10 bytes: about 105 s at half a byte a second.
        assert!(
            cut >= Duration::from_secs(104) && cut <= Duration::from_secs(108),
            "{cut:?}"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_honest_slow_client_is_not_cut_off() {
    bounded(3600, async {
        let mut cfg = config();
        cfg.data_timeout = Duration::from_secs(30);
        cfg.min_data_rate = 100;
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        c.cmd("DATA", 354).await;
        c.send("Date: x\r\nMessage-ID: <y@z>\r\n\r\n").await;
        let line = format!("{}\r\n", "z".repeat(198));
        let t0 = Instant::now();
        // 200 bytes a second (twice the minimum rate) for two minutes: four
        // times the data timeout.
        for _ in 0..120 {
            sleep(Duration::from_secs(1)).await;
            c.send(&line).await;
        }
        assert!(t0.elapsed() >= Duration::from_secs(120));
        // Committing waits for the spool thread, in real time.
        tokio::time::resume();
        c.send(".\r\n").await;
        let id = c.expect(250).await.queue_id();
        assert_eq!(
            srv.body(id).await.len() as u64,
            srv.spool.message(id).unwrap().size
        );
        c.cmd("QUIT", 221).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_refused_client_may_not_linger() {
    bounded(3600, async {
        let mut cfg = config();
        cfg.allow_networks = vec!["127.0.0.1/32".parse().unwrap()];
        let srv = start(cfg).await;
        let mut c = srv.client_from("127.0.0.2").await;
        let t0 = Instant::now();
        c.expect_start("554 5.7.1").await;
        c.expect_closed().await;
        assert_eq!(t0.elapsed(), Duration::ZERO, "closed at once");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_stalled_tls_handshake_times_out() {
    bounded(3600, async {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(dir.path());
        let mut cfg = config();
        cfg.command_timeout = Duration::from_secs(60);
        cfg.tls = Some(inbound::TlsConfig {
            cert_file: certs.cert_file.clone(),
            key_file: certs.key_file.clone(),
        });
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd_start("STARTTLS", "220 2.0.0").await;
        let t0 = Instant::now();
        // No ClientHello: the server gives up and closes.
        c.expect_closed().await;
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(60) && waited < Duration::from_secs(62),
            "{waited:?}"
        );
    })
    .await;
}
