//! STARTTLS: the upgrade, AUTH after it, input pipelined behind STARTTLS
//! thrown away, TLS 1.2 and 1.3, settings errors that name the file.

mod common;

use common::*;
use inbound::{Settings, SettingsError, TlsConfig};

fn tls_config(certs: &Certs) -> inbound::ServerConfig {
    let mut cfg = config();
    cfg.users = users();
    cfg.tls = Some(TlsConfig {
        cert_file: certs.cert_file.clone(),
        key_file: certs.key_file.clone(),
    });
    cfg
}

#[tokio::test]
async fn starttls_then_auth_then_mail() {
    bounded(30, async {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(dir.path());
        let mut cfg = tls_config(&certs);
        cfg.allow_networks = vec!["127.0.0.1/32".parse().unwrap()];
        let srv = start(cfg).await;
        let mut c = srv.client_from("127.0.0.2").await;
        let e = c.hello().await;
        assert!(e.lines.contains(&"STARTTLS".to_string()), "{e:?}");
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd_start("STARTTLS", "503 5.5.1").await;
        c.cmd("RSET", 250).await;
        let (mut c, version) = c.starttls(certs.client.clone()).await;
        assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
        // Everything from before TLS is forgotten: EHLO again.
        c.cmd_start("MAIL FROM:<a@example.com>", "503 5.5.1").await;
        let e = c.ehlo().await;
        assert!(!e.lines.contains(&"STARTTLS".to_string()), "{e:?}");
        assert!(e.lines.contains(&"AUTH PLAIN LOGIN".to_string()), "{e:?}");
        c.cmd_start("STARTTLS", "503 5.5.1").await;
        assert_eq!(c.auth_plain(USER, PASSWORD).await.code, 235);
        let id = c
            .send_mail(
                "a@example.com",
                &["b@example.net"],
                b"Subject: x\r\n\r\nover TLS\r\n",
            )
            .await
            .queue_id();
        c.cmd("QUIT", 221).await;
        let (received, _) = split_received(&srv.body(id).await);
        assert!(received.contains(" with ESMTPSA id "), "{received}");
    })
    .await;
}

#[tokio::test]
async fn tls12_clients_work() {
    bounded(30, async {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(dir.path());
        let srv = start(tls_config(&certs)).await;
        let mut c = srv.client().await;
        c.hello().await;
        let (mut c, version) = c
            .starttls(certs.client_with(&[&rustls::version::TLS12]))
            .await;
        assert_eq!(version, rustls::ProtocolVersion::TLSv1_2);
        c.ehlo().await;
        c.send_mail(
            "a@example.com",
            &["b@example.net"],
            b"Subject: x\r\n\r\nhi\r\n",
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn input_pipelined_after_starttls_is_discarded() {
    bounded(30, async {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(dir.path());
        let srv = start(tls_config(&certs)).await;
        let mut c = srv.client().await;
        c.hello().await;
        // HELP would answer 214 if it were taken as sent over TLS.
        c.send("STARTTLS\r\nHELP\r\n").await;
        c.expect_start("220 2.0.0").await;
        let stream = c.io.into_inner();
        let connector = tokio_rustls::TlsConnector::from(certs.client.clone());
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, stream).await.unwrap();
        let mut c = Client::over(Box::new(tls));
        c.cmd_start("NOOP", "250 2.0.0").await;
        c.cmd("QUIT", 221).await;
    })
    .await;
}

#[tokio::test]
async fn starttls_is_refused_when_not_configured() {
    bounded(30, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd_start("STARTTLS", "502 5.5.1").await;
        c.cmd("NOOP", 250).await;
    })
    .await;
}

#[tokio::test]
async fn a_failed_handshake_ends_only_that_session() {
    bounded(30, async {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(dir.path());
        let srv = start(tls_config(&certs)).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("STARTTLS", 220).await;
        c.send("this is not a TLS ClientHello\r\n").await;
        // The server may answer with a TLS alert, then closes.
        let mut rest = Vec::new();
        use tokio::io::AsyncReadExt;
        let _ = c.io.read_to_end(&mut rest).await;
        assert!(rest.len() < 16 && !rest.ends_with(b"\r\n"), "{rest:?}");
        let mut d = srv.client().await;
        d.hello().await;
    })
    .await;
}

#[test]
fn settings_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let build = |cert: &std::path::Path, key: &std::path::Path| {
        let mut cfg = config();
        cfg.tls = Some(TlsConfig {
            cert_file: cert.to_path_buf(),
            key_file: key.to_path_buf(),
        });
        Settings::new(cfg, HOST, accept_all())
    };
    assert!(
        build(&certs.cert_file, &certs.key_file)
            .unwrap()
            .tls_enabled()
    );

    let missing = dir.path().join("missing.pem");
    let e = build(&missing, &certs.key_file).unwrap_err();
    assert!(matches!(e, SettingsError::Certificate { .. }), "{e}");
    assert!(e.to_string().contains("missing.pem"), "{e}");

    let e = build(&certs.cert_file, &missing).unwrap_err();
    assert!(matches!(e, SettingsError::Key { .. }), "{e}");
    assert!(e.to_string().contains("missing.pem"), "{e}");

    // A key file holding a certificate: no key in it.
    let e = build(&certs.cert_file, &certs.cert_file).unwrap_err();
    assert!(matches!(e, SettingsError::Key { .. }), "{e}");
    assert!(e.to_string().contains("server.pem"), "{e}");

    // A certificate file holding a key: no certificate in it.
    let e = build(&certs.key_file, &certs.key_file).unwrap_err();
    assert!(matches!(e, SettingsError::Certificate { .. }), "{e}");

    // A key that does not match the certificate.
    let other = tempfile::tempdir().unwrap();
    let other_certs = common::certs(other.path());
    let e = build(&certs.cert_file, &other_certs.key_file).unwrap_err();
    assert!(matches!(e, SettingsError::CertificateKey { .. }), "{e}");

    assert!(matches!(
        Settings::new(config(), "bad host", accept_all()).unwrap_err(),
        SettingsError::Hostname(_)
    ));
    let mut cfg = config();
    cfg.max_line_length = 100;
    assert!(matches!(
        Settings::new(cfg, HOST, accept_all()).unwrap_err(),
        SettingsError::Limit { .. }
    ));
}

#[tokio::test]
async fn remote_clients_authenticate_after_starttls() {
    bounded(30, async {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(dir.path());
        let srv = start(tls_config(&certs)).await;
        // A non-loopback client over an in-memory pipe.
        let (ours, theirs) = tokio::io::duplex(64 << 10);
        let inbound = srv.inbound.clone();
        let token = srv.shutdown.clone();
        tokio::spawn(async move {
            inbound
                .handle(theirs, "203.0.113.5:2525".parse().unwrap(), token)
                .await
        });
        let mut c = Client::over(Box::new(ours));
        let e = c.hello().await;
        assert!(e.lines.contains(&"STARTTLS".to_string()), "{e:?}");
        assert!(!e.text().contains("AUTH"), "{e:?}");
        let r = c.auth_plain(USER, PASSWORD).await;
        assert_eq!(r.first(), "530 5.7.0 Must issue a STARTTLS command first");
        c.cmd_start("MAIL FROM:<a@example.com>", "250").await;
        c.cmd_start("RCPT TO:<b@example.net>", "554 5.7.1").await;
        c.cmd("RSET", 250).await;
        let (mut c, _) = c.starttls(certs.client.clone()).await;
        let e = c.ehlo().await;
        assert!(e.lines.contains(&"AUTH PLAIN LOGIN".to_string()), "{e:?}");
        c.cmd("AUTH LOGIN", 334).await;
        c.cmd(&b64(USER.as_bytes()), 334).await;
        c.cmd_start(&b64(PASSWORD.as_bytes()), "235 2.7.0").await;
        let id = c
            .send_mail(
                "a@example.com",
                &["b@example.net"],
                b"Subject: x\r\n\r\nhi\r\n",
            )
            .await
            .queue_id();
        let env = srv.spool.message(id).unwrap().envelope;
        assert_eq!(env.client.as_deref(), Some("203.0.113.5:2525"));
        assert_eq!(env.auth_user.as_deref(), Some(USER));
    })
    .await;
}
