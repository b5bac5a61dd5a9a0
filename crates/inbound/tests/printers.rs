//! What old printers and scanners need: addresses without angle brackets
//! from trusted clients, `AUTH=LOGIN` in EHLO, bare-LF line endings, and
//! an implicit-TLS listener (port 465); and what stays refused for
//! strangers.

mod common;

use std::sync::Arc;

use common::*;
use inbound::{Inbound, Listener, Metrics, Settings, SettingsError, TlsConfig};
use spool::Spool;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// 127.0.0.1 trusted, users configured: 127.0.0.2 is a stranger that may
/// authenticate.
fn printer_config() -> inbound::ServerConfig {
    let mut cfg = config();
    cfg.allow_networks = vec!["127.0.0.1/32".parse().unwrap()];
    cfg.users = users();
    cfg
}

#[tokio::test]
async fn addresses_without_brackets_from_trusted_clients_only() {
    bounded(60, async {
        let srv = start(printer_config()).await;
        // From allow_networks: both forms read as the bracketed address.
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd_start("MAIL FROM:scanner@example.com", "250 2.1.0")
            .await;
        c.cmd_start("RCPT TO:office@example.net", "250 2.1.5").await;
        c.cmd_start("RCPT TO: boss@example.net", "250 2.1.5").await;
        c.cmd("DATA", 354).await;
        c.send("Subject: scan\r\n\r\npage 1\r\n.\r\n").await;
        let id = c.expect_start("250 2.0.0 Ok: queued").await.queue_id();
        let env = srv.spool.message(id).unwrap().envelope;
        assert_eq!(env.sender, "scanner@example.com");
        assert_eq!(env.recipients, ["office@example.net", "boss@example.net"]);
        // With parameters after the bare address.
        c.cmd_start("MAIL FROM:scanner@example.com SIZE=100", "250 2.1.0")
            .await;
        c.cmd("RSET", 250).await;
        c.cmd("QUIT", 221).await;

        // A stranger gets the strict parser until it authenticates.
        let mut c = srv.client_from("127.0.0.2").await;
        c.hello().await;
        let r = c.cmd("MAIL FROM:scanner@example.com", 501).await;
        assert!(r.first().starts_with("501 5.5.4"), "{r:?}");
        c.cmd_start("MAIL FROM:<scanner@example.com>", "250 2.1.0")
            .await;
        c.cmd_start("RCPT TO:office@example.net", "501").await;
        c.cmd("RSET", 250).await;
        // Authenticated clients count as trusted.
        assert_eq!(c.auth_plain(USER, PASSWORD).await.code, 235);
        c.cmd_start("MAIL FROM:scanner@example.com", "250 2.1.0")
            .await;
        c.cmd_start("RCPT TO:office@example.net", "250 2.1.5").await;
        c.cmd("QUIT", 221).await;
    })
    .await;
}

#[tokio::test]
async fn ehlo_advertises_auth_the_old_way_too() {
    bounded(30, async {
        let srv = start(printer_config()).await;
        let mut c = srv.client().await;
        let e = c.hello().await;
        assert!(e.lines.contains(&"AUTH PLAIN LOGIN".to_string()), "{e:?}");
        assert!(e.lines.contains(&"AUTH=LOGIN PLAIN".to_string()), "{e:?}");
        // AUTH LOGIN works as the old clients do it.
        c.cmd("AUTH LOGIN", 334).await;
        c.cmd(&b64(USER.as_bytes()), 334).await;
        c.cmd(&b64(PASSWORD.as_bytes()), 235).await;

        // No users: no AUTH in either form.
        let srv = start(config()).await;
        let mut c = srv.client().await;
        let e = c.hello().await;
        assert!(!e.text().contains("AUTH"), "{e:?}");
    })
    .await;
}

/// One DATA transaction whose body is sent raw (end of data included);
/// returns the stored body without our Received: line.
async fn raw_data(c: &mut Client, srv: &Server, wire: &[u8]) -> Vec<u8> {
    c.cmd("MAIL FROM:<printer@example.com>", 250).await;
    c.cmd("RCPT TO:<office@example.net>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(wire).await;
    let id = c.expect_start("250 2.0.0 Ok: queued").await.queue_id();
    split_received(&srv.body(id).await).1
}

#[tokio::test]
async fn bare_lf_end_networks_empty_requires_crlf_dot_crlf_from_everyone() {
    bounded(30, async {
        let mut cfg = config();
        cfg.bare_lf_end_networks = Some(Vec::new());
        let srv = start(cfg).await;
        let mut c = srv.client().await; // 127.0.0.1: in allow_networks
        c.hello().await;
        // LF.LF is an empty line, not the end; the pipelined NOOP is
        // content; only CRLF.CRLF ends the data.
        let body = raw_data(
            &mut c,
            &srv,
            b"Date: x\nMessage-ID: <a@b>\n\n..dot\nend\n.\nNOOP\r\n.\r\n",
        )
        .await;
        assert_eq!(
            body,
            b"Date: x\r\nMessage-ID: <a@b>\r\n\r\n.dot\r\nend\r\n\r\nNOOP\r\n"
        );
        // CR.CR never ends it either.
        let body = raw_data(
            &mut c,
            &srv,
            b"Date: x\r\nMessage-ID: <a@b>\r\n\r\na\r.\rb\r\n.\r\n",
        )
        .await;
        assert_eq!(body, b"Date: x\r\nMessage-ID: <a@b>\r\n\r\na\r.\rb\r\n");
        // The session is in step: one reply per command.
        c.cmd_start("NOOP", "250 2.0.0 Ok").await;
    })
    .await;
}

#[tokio::test]
async fn bare_lf_end_networks_may_differ_from_allow_networks() {
    bounded(30, async {
        let mut cfg = printer_config();
        cfg.bare_lf_end_networks = Some(vec!["127.0.0.2/32".parse().unwrap()]);
        let srv = start(cfg).await;
        // 127.0.0.2: outside allow_networks (authenticates), but LF.LF ends
        // its data.
        let mut c = srv.client_from("127.0.0.2").await;
        c.hello().await;
        assert_eq!(c.auth_plain(USER, PASSWORD).await.code, 235);
        let body = raw_data(&mut c, &srv, b"Date: x\nMessage-ID: <a@b>\n\nhi\n.\n").await;
        assert_eq!(body, b"Date: x\r\nMessage-ID: <a@b>\r\n\r\nhi\r\n");
        c.cmd_start("NOOP", "250 2.0.0 Ok").await;
        // 127.0.0.1: in allow_networks, not in bare_lf_end_networks.
        let mut c = srv.client().await;
        c.hello().await;
        let body = raw_data(
            &mut c,
            &srv,
            b"Date: x\nMessage-ID: <a@b>\n\nhi\n.\n\r\n.\r\n",
        )
        .await;
        assert_eq!(body, b"Date: x\r\nMessage-ID: <a@b>\r\n\r\nhi\r\n\r\n\r\n");
        c.cmd_start("NOOP", "250 2.0.0 Ok").await;
    })
    .await;
}

// ---- implicit TLS ---------------------------------------------------------

struct TlsServer {
    srv: Server,
    tls_addr: std::net::SocketAddr,
    certs: Certs,
}

/// A server with a plain listener (`srv.addr`) and an implicit-TLS one.
async fn start_tls(mut cfg: inbound::ServerConfig) -> TlsServer {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    cfg.tls = Some(TlsConfig {
        cert_file: certs.cert_file.clone(),
        key_file: certs.key_file.clone(),
    });
    let (spool, _) = Spool::open(&dir.path().join("spool")).unwrap();
    let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = plain.local_addr().unwrap();
    let tls_addr = tls.local_addr().unwrap();
    cfg.listen_tls = vec![tls_addr];
    let settings = Settings::new(cfg, HOST, accept_all()).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let inbound = Inbound::new(settings, spool.clone(), metrics);
    let shutdown = CancellationToken::new();
    let task = {
        let inbound = inbound.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            inbound
                .serve(vec![Listener::from(plain), Listener::tls(tls)], shutdown)
                .await
        })
    };
    TlsServer {
        srv: Server {
            addr,
            spool,
            inbound,
            shutdown,
            task,
            registry: Arc::new(std::sync::Mutex::new(registry)),
            dir,
        },
        tls_addr,
        certs,
    }
}

async fn tls_client(addr: std::net::SocketAddr, local: &str, certs: &Certs) -> Client {
    let plain = Client::connect_from(local.parse().unwrap(), addr).await;
    let stream = plain.io.into_inner();
    let connector = tokio_rustls::TlsConnector::from(certs.client.clone());
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, stream).await.unwrap();
    Client::over(Box::new(tls))
}

#[tokio::test]
async fn implicit_tls_listener_delivers() {
    bounded(60, async {
        let t = start_tls(printer_config()).await;
        // A stranger on the TLS port: TLS first, then SMTP; AUTH is
        // offered (the channel is encrypted), STARTTLS is not.
        let mut c = tls_client(t.tls_addr, "127.0.0.2", &t.certs).await;
        let g = c.greeting().await;
        assert!(g.first().starts_with("220 relay.test ESMTP"), "{g:?}");
        let e = c.ehlo().await;
        assert!(!e.lines.contains(&"STARTTLS".to_string()), "{e:?}");
        assert!(e.lines.contains(&"AUTH=LOGIN PLAIN".to_string()), "{e:?}");
        assert_eq!(c.auth_plain(USER, PASSWORD).await.code, 235);
        let id = c
            .send_mail(
                "scanner@example.com",
                &["office@example.net"],
                b"Date: x\r\nMessage-ID: <a@b>\r\n\r\n.over 465\r\n",
            )
            .await
            .queue_id();
        c.cmd("QUIT", 221).await;
        let (received, body) = split_received(&t.srv.body(id).await);
        assert!(received.contains(" with ESMTPSA id "), "{received}");
        assert_eq!(body, b"Date: x\r\nMessage-ID: <a@b>\r\n\r\n.over 465\r\n");

        // The plain listener still works, with STARTTLS.
        let mut c = t.srv.client().await;
        let e = c.hello().await;
        assert!(e.lines.contains(&"STARTTLS".to_string()), "{e:?}");

        // Plain SMTP on the TLS port: the handshake fails and it is counted.
        let mut c = Client::connect(t.tls_addr).await;
        c.send("EHLO plain.test\r\n").await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            c.io.read_to_end(&mut rest),
        )
        .await
        .expect("the server closes a failed handshake");
        assert!(!rest.starts_with(b"220"), "{rest:?}");
        let text = t.srv.metrics_text();
        assert!(
            text.contains(
                "oauthrelay_smtp_tls_handshakes_total{listener=\"smtps\",result=\"ok\"} 1"
            ),
            "{text}"
        );
        // The failure is counted once the session has ended.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let text = t.srv.metrics_text();
            if text.contains(
                "oauthrelay_smtp_tls_handshakes_total{listener=\"smtps\",result=\"failed\"} 1",
            ) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{text}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        t.srv.stop().await;
    })
    .await;
}

#[tokio::test]
async fn implicit_tls_refuses_strangers_without_a_handshake() {
    bounded(30, async {
        // No users: a client outside allow_networks is refused at connect.
        let mut cfg = config();
        cfg.allow_networks = vec!["127.0.0.1/32".parse().unwrap()];
        let t = start_tls(cfg).await;
        let mut c = Client::connect_from("127.0.0.2".parse().unwrap(), t.tls_addr).await;
        c.expect_closed().await;
        let text = t.srv.metrics_text();
        assert!(
            text.contains("oauthrelay_smtp_connections_refused_total{reason=\"network\"} 1"),
            "{text}"
        );
        // A trusted client on the TLS port needs no AUTH.
        let mut c = tls_client(t.tls_addr, "127.0.0.1", &t.certs).await;
        c.hello().await;
        let r = c
            .send_mail("scanner@example.com", &["office@example.net"], b"hi\r\n")
            .await;
        assert_eq!(r.code, 250, "{r:?}");
    })
    .await;
}

#[test]
fn listen_tls_needs_a_certificate() {
    let mut cfg = config();
    cfg.listen_tls = vec!["127.0.0.1:465".parse().unwrap()];
    let e = Settings::new(cfg, HOST, accept_all()).unwrap_err();
    assert!(matches!(e, SettingsError::ListenTlsWithoutTls), "{e}");
    assert!(e.to_string().contains("[server.tls]"), "{e}");
}
