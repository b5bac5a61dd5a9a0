//! No starvation: clients outside `allow_networks` cannot take the slots a
//! trusted client (a printer, cron on this host) needs. Outside addresses
//! are loopback aliases (127.0.0.2, 127.0.1.x) while only 127.0.0.1/32 is
//! trusted.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

fn only_localhost() -> inbound::ServerConfig {
    let mut cfg = config();
    cfg.allow_networks = vec!["127.0.0.1/32".parse().unwrap()];
    cfg
}

async fn raw_from(ip: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(ip.parse().unwrap(), 0))?;
    sock.connect(addr).await
}

/// An outside session that got in: greeted and past EHLO. `None` if it
/// was refused at connect.
async fn idle_session(ip: String, addr: SocketAddr) -> Option<Client> {
    let mut c = Client::connect_from(ip.parse().unwrap(), addr).await;
    let r = c.reply().await;
    if r.code != 220 {
        assert_eq!(r.code, 421, "{r:?}");
        return None;
    }
    c.cmd("EHLO idle.test", 250).await;
    Some(c)
}

/// Connect from `ip` over and over, read what the server says, hang up,
/// until `stop`. Counts connections.
fn reconnect_storm(ip: &'static str, addr: SocketAddr, stop: Arc<AtomicBool>) -> Arc<AtomicU64> {
    let n = Arc::new(AtomicU64::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(mut s) = raw_from(ip, addr).await {
                let mut buf = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    n
}

/// A loopback client sends one message, start to end.
async fn trusted_send(srv: &Server, i: usize) {
    let mut c = srv.client().await;
    let r = c.reply().await;
    assert_eq!(r.code, 220, "loopback client {i} refused: {r:?}");
    c.ehlo().await;
    let r = c
        .send_mail(
            "printer@example.com",
            &["office@example.net"],
            format!("Subject: scan {i}\r\n\r\nscan\r\n").as_bytes(),
        )
        .await;
    assert_eq!(r.code, 250, "loopback client {i}: {r:?}");
    c.cmd("QUIT", 221).await;
}

/// The attack of issue 10, with `[[server.users]]` configured (outside
/// clients may connect to authenticate): 200 sockets held open from one
/// outside address, another address reconnecting as fast as it can, and
/// 100 idle unauthenticated sessions from 100 other outside addresses.
/// Every send from the loopback client succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_lock_out_a_trusted_client() {
    bounded(120, async {
        let mut cfg = only_localhost();
        cfg.users = users();
        let srv = start(cfg).await;
        let addr = srv.addr;

        let mut hostile = Vec::new();
        for _ in 0..200 {
            hostile.push(raw_from("127.0.0.2", addr).await.unwrap());
        }
        // Only max_connections_per_client of them got a session.
        let mut greeted = 0;
        for s in &mut hostile {
            let mut buf = [0u8; 3];
            s.read_exact(&mut buf).await.unwrap();
            match &buf {
                b"220" => greeted += 1,
                b"421" => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(greeted, 10);
        let stop = Arc::new(AtomicBool::new(false));
        let storm = reconnect_storm("127.0.0.3", addr, stop.clone());
        let idle: Vec<_> = (1..=100)
            .map(|i| tokio::spawn(idle_session(format!("127.0.1.{i}"), addr)))
            .collect();
        let mut sessions = Vec::new();
        for t in idle {
            if let Some(c) = t.await.unwrap() {
                sessions.push(c);
            }
        }
        for i in 0..50 {
            trusted_send(&srv, i).await;
        }
        stop.store(true, Ordering::Relaxed);
        assert!(storm.load(Ordering::Relaxed) > 0);
        eprintln!(
            "{greeted} of 200 hostile sockets greeted, {} of 100 idle outside sessions admitted, {} storm connections; 50 of 50 loopback sends queued",
            sessions.len(),
            storm.load(Ordering::Relaxed)
        );
        assert_eq!(srv.messages().await.len(), 50);
        drop(hostile);
    })
    .await;
}

/// Without `[[server.users]]` an outside client is refused at connect and
/// the connection closed at once: a reconnecting flood holds no slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_clients_hold_no_slot() {
    bounded(120, async {
        let srv = start(only_localhost()).await;
        let addr = srv.addr;
        let stop = Arc::new(AtomicBool::new(false));
        let storms: Vec<_> = ["127.0.0.2", "127.0.0.3"]
            .into_iter()
            .map(|ip| reconnect_storm(ip, addr, stop.clone()))
            .collect();
        let mut hostile = Vec::new();
        for _ in 0..200 {
            hostile.push(raw_from("127.0.0.2", addr).await.unwrap());
        }
        for i in 0..20 {
            trusted_send(&srv, i).await;
        }
        stop.store(true, Ordering::Relaxed);
        for s in &storms {
            assert!(s.load(Ordering::Relaxed) > 0);
        }
        // Each of the held sockets was told why and closed.
        for mut s in hostile {
            let mut all = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
                .await
                .expect("a refused client is closed at once")
                .unwrap();
            let text = String::from_utf8_lossy(&all);
            assert!(text.starts_with("554 5.7.1 127.0.0.2 "), "{text}");
        }
        assert_eq!(srv.messages().await.len(), 20);
    })
    .await;
}

/// One outside client gets `max_connections_per_client` sessions; the next
/// is told why and closed. Trusted clients have no such limit, and the
/// reserved slots are theirs alone.
#[tokio::test]
async fn per_client_limit_and_reserved_slots() {
    bounded(30, async {
        let mut cfg = only_localhost();
        cfg.users = users();
        cfg.max_connections = 10;
        cfg.max_connections_per_client = 3;
        cfg.reserved_connections = Some(4);
        let srv = start(cfg).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut c = srv.client_from("127.0.0.2").await;
            c.greeting().await;
            held.push(c);
        }
        let mut c = srv.client_from("127.0.0.2").await;
        let r = c.reply().await;
        assert_eq!(
            r.first(),
            format!("421 4.7.0 {HOST} Error: too many connections from 127.0.0.2")
        );
        c.expect_closed().await;
        // Three more outside clients fill the outside share (10 - 4).
        for ip in ["127.0.0.3", "127.0.0.4", "127.0.0.5"] {
            let mut c = srv.client_from(ip).await;
            c.greeting().await;
            held.push(c);
        }
        let mut c = srv.client_from("127.0.0.6").await;
        let r = c.reply().await;
        assert_eq!(
            r.first(),
            format!("421 4.7.0 {HOST} Error: too many connections")
        );
        c.expect_closed().await;
        // The four reserved slots: loopback, several at once.
        for _ in 0..4 {
            let mut c = srv.client().await;
            c.greeting().await;
            held.push(c);
        }
        let mut c = srv.client().await;
        c.expect_start("421 4.7.0").await;
        let text = srv.metrics_text();
        assert!(
            text.contains("oauthrelay_smtp_connections_refused_total{reason=\"client_limit\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("oauthrelay_smtp_connections_refused_total{reason=\"limit\"} 2"),
            "{text}"
        );
        // A session that ends gives its slot back.
        let mut first = held.remove(0);
        first.cmd("QUIT", 221).await;
        first.expect_closed().await;
        while srv.inbound.active_sessions() > 9 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut again = srv.client_from("127.0.0.2").await;
        again.greeting().await;
    })
    .await;
}

fn timeout_reply() -> String {
    format!("421 4.4.2 {HOST} Error: timeout exceeded")
}

/// A stranger that does not authenticate gets the short idle timeout;
/// after AUTH, and for trusted clients, `command_timeout` applies.
#[tokio::test(start_paused = true)]
async fn strangers_get_a_short_idle_timeout_until_they_authenticate() {
    bounded(3600, async {
        let mut cfg = only_localhost();
        cfg.users = users();
        let srv = start(cfg).await;

        let mut stranger = srv.client_from("127.0.0.2").await;
        let t0 = tokio::time::Instant::now();
        stranger.greeting().await;
        assert_eq!(stranger.reply().await.first(), timeout_reply());
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "{waited:?}"
        );
        stranger.expect_closed().await;

        // Authenticated: the RFC's five minutes.
        let mut user = srv.client_from("127.0.0.2").await;
        user.hello().await;
        user.auth_plain(USER, PASSWORD).await;
        let t0 = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(200)).await;
        user.cmd("NOOP", 250).await;
        assert_eq!(user.reply().await.first(), timeout_reply());
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(500) && waited < Duration::from_secs(501),
            "{waited:?}"
        );

        // Trusted: the same.
        let mut local = srv.client().await;
        local.hello().await;
        tokio::time::sleep(Duration::from_secs(200)).await;
        local.cmd("NOOP", 250).await;
    })
    .await;
}

/// Commands that do nothing, from a stranger that does not authenticate:
/// `untrusted_junk_command_limit` of them, then `421` and the connection
/// closed, however fast they come (pipelined). Trusted and authenticated
/// clients may NOOP as they like.
#[tokio::test]
async fn strangers_may_not_idle_on_junk_commands() {
    bounded(60, async {
        let mut cfg = only_localhost();
        cfg.users = users();
        cfg.untrusted_junk_command_limit = 5;
        let srv = start(cfg).await;

        let mut stranger = srv.client_from("127.0.0.2").await;
        stranger.hello().await;
        for cmd in ["NOOP", "RSET", "EHLO again.test", "HELP", "VRFY root"] {
            let r = stranger.cmd_start(cmd, "2").await;
            assert!(r.code < 300, "{r:?}");
        }
        let r = stranger.cmd_start("NOOP", "421 4.7.0").await;
        assert_eq!(
            r.first(),
            format!("421 4.7.0 {HOST} Error: too many commands without authentication")
        );
        stranger.expect_closed().await;

        // Pipelined: a flood ends at the limit too.
        let mut flood = srv.client_from("127.0.0.2").await;
        flood.greeting().await;
        flood
            .send("EHLO x\r\n".to_string() + &"NOOP\r\nRSET\r\nEHLO x\r\n".repeat(10_000))
            .await;
        let mut replies = 0;
        loop {
            let r = flood.reply().await;
            if r.code == 421 {
                break;
            }
            replies += 1;
        }
        assert_eq!(replies, 1 + 5, "EHLO, then the limit");

        // Once authenticated, no limit.
        let mut user = srv.client_from("127.0.0.3").await;
        user.hello().await;
        for _ in 0..4 {
            user.cmd("NOOP", 250).await;
        }
        user.auth_plain(USER, PASSWORD).await;
        for _ in 0..50 {
            user.cmd("NOOP", 250).await;
        }
        let r = user
            .send_mail(
                "a@example.com",
                &["b@example.net"],
                b"Subject: x\r\n\r\nx\r\n",
            )
            .await;
        assert_eq!(r.code, 250, "{r:?}");

        let mut local = srv.client().await;
        local.hello().await;
        for _ in 0..50 {
            local.cmd("NOOP", 250).await;
            local.cmd("RSET", 250).await;
        }
    })
    .await;
}
