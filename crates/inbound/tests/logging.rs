//! Logging: one Postfix-style line per accepted message, AUTH outcomes,
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
