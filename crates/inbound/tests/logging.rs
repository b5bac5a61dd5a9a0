//! Logging: one Postfix-style line per accepted message, connect and
//! disconnect (with the commands counted), AUTH outcomes in a form
//! fail2ban can anchor on, a client lost mid-DATA, a failed TLS handshake,
//! and never a password. (Its own test binary: tracing's per-thread
//! subscriber must not share call sites with tests on other threads.)

mod common;

use std::sync::{Arc, Mutex};

use common::*;

fn with_users() -> inbound::ServerConfig {
    let mut cfg = config();
    cfg.users = users();
    cfg
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn passwords_never_reach_the_logs() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let id = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        let srv = start(with_users()).await;
        let mut c = srv.client().await;
        c.hello().await;
        assert_eq!(c.auth_plain(USER, "Hunter2-wrong").await.code, 535);
        c.cmd("AUTH LOGIN", 334).await;
        c.cmd(&b64(USER.as_bytes()), 334).await;
        c.cmd(&b64(b"Hunter3-wrong"), 535).await;
        assert_eq!(c.auth_plain(USER, PASSWORD).await.code, 235);
        let id = c
            .send_mail(
                "alice@example.com",
                &["bob@example.net"],
                b"Subject: x\r\n\r\nhi\r\n",
            )
            .await
            .queue_id();
        c.cmd("QUIT", 221).await;
        c.expect_closed().await;
        srv.stop().await;
        id
    })
    .await
    .expect("test took too long");
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains(&format!("{id}: client=127.0.0.1:")))
        .unwrap_or_else(|| panic!("no queue line for {id}:\n{text}"));
    assert!(
        line.contains("helo=<client.test>, sasl_username=printer, from=<alice@example.com>, size=")
            && line.contains(", nrcpt=1 (queued)"),
        "{line}"
    );
    assert!(text.contains("authentication failed"), "{text}");
    assert!(text.contains("authenticated"), "{text}");
    for secret in ["Hunter2", "Hunter3", PASSWORD] {
        assert!(
            !text.contains(secret),
            "password {secret} in the logs:\n{text}"
        );
    }
    for encoded in [
        b64(b"Hunter3-wrong"),
        b64(format!("\0{USER}\0{PASSWORD}").as_bytes()),
    ] {
        assert!(
            !text.contains(&encoded),
            "encoded password in the logs:\n{text}"
        );
    }
}

/// Run `f` with every log line of this thread captured; the text.
async fn logged<F: std::future::Future<Output = ()>>(f: F) -> String {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    tokio::time::timeout(std::time::Duration::from_secs(30), f)
        .await
        .expect("test took too long");
    String::from_utf8(logs.0.lock().unwrap().clone()).unwrap()
}

fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no log line with {needle:?}:\n{text}"))
}

#[tokio::test]
async fn every_session_logs_connect_and_a_postfix_style_disconnect_summary() {
    let text = logged(async {
        let srv = start(with_users()).await;
        let mut c = srv.client().await;
        c.hello().await;
        assert_eq!(c.auth_plain(USER, PASSWORD).await.code, 235);
        c.send_mail(
            "a@example.com",
            &["b@example.net"],
            b"Subject: x\r\n\r\nhi\r\n",
        )
        .await;
        c.cmd("QUIT", 221).await;
        c.expect_closed().await;

        // A failing session: counts show ok/total.
        let mut c = srv.client().await;
        c.hello().await;
        assert_eq!(c.auth_plain(USER, "wrong").await.code, 535);
        c.cmd("BOGUS", 500).await;
        c.cmd("QUIT", 221).await;
        c.expect_closed().await;
        srv.stop().await;
    })
    .await;
    let connect = line_with(&text, "connect from unknown[127.0.0.1]");
    assert!(
        connect.contains(" INFO ") && connect.contains("client=127.0.0.1:"),
        "{connect}"
    );
    let first = line_with(&text, "disconnect from unknown[127.0.0.1]");
    assert!(
        first.contains(
            "disconnect from unknown[127.0.0.1] ehlo=1 auth=1 mail=1 rcpt=1 data=1 quit=1 commands=6"
        ) && first.contains(" INFO "),
        "{first}"
    );
    assert!(
        text.contains(
            "disconnect from unknown[127.0.0.1] ehlo=1 auth=0/1 quit=1 unknown=0/1 commands=2/4"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn failed_and_refused_auth_are_warnings_fail2ban_can_anchor_on() {
    let text = logged(async {
        let srv = start(with_users()).await;
        let mut c = srv.client().await;
        c.hello().await;
        assert_eq!(c.auth_plain(USER, "wrong").await.code, 535);
        c.cmd("AUTH LOGIN", 334).await;
        c.cmd(&b64(USER.as_bytes()), 334).await;
        c.cmd(&b64(b"wrong-too"), 535).await;
        drop(c);

        // From a remote address without TLS: refused before any password.
        let (ours, theirs) = tokio::io::duplex(64 << 10);
        let inbound = srv.inbound.clone();
        let token = srv.shutdown.clone();
        let peer = "198.51.100.7:3333".parse().unwrap();
        tokio::spawn(async move { inbound.handle(theirs, peer, token).await });
        let mut c = Client::over(Box::new(ours));
        c.greeting().await;
        c.ehlo().await;
        assert_eq!(c.auth_plain(USER, PASSWORD).await.code, 530);
        c.cmd("QUIT", 221).await;
        srv.stop().await;
    })
    .await;
    let plain = line_with(
        &text,
        "SASL PLAIN authentication failed from unknown[127.0.0.1]",
    );
    assert!(
        plain.contains(" WARN ") && plain.contains("user=printer"),
        "{plain}"
    );
    let login = line_with(
        &text,
        "SASL LOGIN authentication failed from unknown[127.0.0.1]",
    );
    assert!(login.contains(" WARN "), "{login}");
    let refused = line_with(
        &text,
        "AUTH refused from unknown[198.51.100.7]: STARTTLS first",
    );
    assert!(refused.contains(" WARN "), "{refused}");
    assert!(
        text.contains("disconnect from unknown[198.51.100.7] ehlo=1 auth=0/1 quit=1 commands=2/3"),
        "{text}"
    );
}

#[tokio::test]
async fn a_client_dropping_mid_data_is_a_warning_with_the_queue_id() {
    let text = logged(async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        c.cmd("DATA", 354).await;
        c.send(b"Subject: cut off\r\n\r\n0123456789\r\n").await;
        drop(c);
        srv.stop().await;
    })
    .await;
    let lost = line_with(&text, "lost connection after DATA (");
    assert!(
        lost.contains(" WARN ")
            && lost.contains("bytes) from unknown[127.0.0.1]; the message was not queued")
            && lost.contains("queue_id="),
        "{lost}"
    );
    assert!(
        text.contains(
            "disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_tls_1_0_client_is_told_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let mut cfg = config();
    cfg.tls = Some(inbound::TlsConfig {
        cert_file: certs.cert_file.clone(),
        key_file: certs.key_file.clone(),
    });
    let text = logged(async {
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd_start("STARTTLS", "220 2.0.0").await;
        c.send(tls10_client_hello()).await;
        // The server answers with an alert and closes.
        let mut rest = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut c.io, &mut rest).await;
        srv.stop().await;
    })
    .await;
    let failed = line_with(&text, "TLS handshake failed from unknown[127.0.0.1]");
    assert!(
        failed.contains(" WARN ") && failed.contains("TLS 1.2 or later"),
        "{failed}"
    );
}

/// A ClientHello as an old printer sends it: TLS 1.0, RSA-CBC suites, no
/// extensions.
fn tls10_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x01];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0x00, 0x2f, 0x00, 0x35]); // suites
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    let mut hs = vec![0x01, 0x00, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01, (hs.len() >> 8) as u8, hs.len() as u8];
    rec.extend_from_slice(&hs);
    rec
}
