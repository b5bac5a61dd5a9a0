//! Who may relay: allow_networks, refusal at connect without users,
//! refusal at RCPT with users until AUTH. Clients connect from the loopback
//! alias 127.0.0.2 while only 127.0.0.1/32 is trusted.

mod common;

use common::*;

fn only_localhost() -> inbound::ServerConfig {
    let mut cfg = config();
    cfg.allow_networks = vec!["127.0.0.1/32".parse().unwrap()];
    cfg
}

#[tokio::test]
async fn untrusted_client_is_refused_at_connect_without_users() {
    bounded(20, async {
        let srv = start(only_localhost()).await;
        let mut c = srv.client_from("127.0.0.2").await;
        let r = c.reply().await;
        assert_eq!(
            r.first(),
            "554 5.7.1 127.0.0.2 is not allowed to relay; add it to [server] allow_networks"
        );
        // Closed at once: nothing more is read from it.
        c.expect_closed().await;
        let text = srv.metrics_text();
        assert!(
            text.contains("oauthrelay_smtp_connections_refused_total{reason=\"network\"} 1"),
            "{text}"
        );
        // 127.0.0.1 itself is trusted.
        let mut ok = srv.client().await;
        ok.hello().await;
        ok.send_mail(
            "a@example.com",
            &["b@example.net"],
            b"Subject: x\r\n\r\nhi\r\n",
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn a_wildcard_listener_sees_the_real_client_address() {
    bounded(20, async {
        let srv = start_full(only_localhost(), accept_all(), "0.0.0.0:0", None).await;
        let mut c = srv.client_from("127.0.0.2").await;
        c.expect_start("554 5.7.1 127.0.0.2 ").await;
        c.expect_closed().await;
        let mut ok = srv.client_from("127.0.0.1").await;
        ok.greeting().await;
    })
    .await;
}

/// A refused client that talks anyway gets the `554` and nothing else:
/// none of its commands is read.
#[tokio::test]
async fn a_refused_client_is_closed_at_once() {
    bounded(20, async {
        use tokio::io::AsyncWriteExt;
        let srv = start(only_localhost()).await;
        let mut c = srv.client_from("127.0.0.2").await;
        c.expect_start("554 5.7.1").await;
        // The connection may already be gone (the write then fails).
        let _ =
            c.io.get_mut()
                .write_all(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n")
                .await;
        c.expect_closed().await;
        assert!(srv.messages().await.is_empty());
        while srv.inbound.active_sessions() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn with_users_untrusted_clients_must_authenticate_to_relay() {
    bounded(30, async {
        let mut cfg = only_localhost();
        cfg.users = users();
        let srv = start(cfg).await;
        let mut c = srv.client_from("127.0.0.2").await;
        c.greeting().await;
        let e = c.ehlo().await;
        assert!(
            e.lines.contains(&"AUTH PLAIN LOGIN".to_string()),
            "loopback may AUTH without TLS: {e:?}"
        );
        c.cmd_start("MAIL FROM:<a@example.com>", "250 2.1.0").await;
        let r = c.cmd_start("RCPT TO:<bob@example.net>", "554 5.7.1").await;
        assert_eq!(
            r.first(),
            "554 5.7.1 <bob@example.net>: Relay access denied"
        );
        c.cmd_start("DATA", "503 5.5.1").await;
        c.cmd("RSET", 250).await;
        let r = c.auth_plain(USER, PASSWORD).await;
        assert_eq!(r.first(), "235 2.7.0 Authentication successful");
        let id = c
            .send_mail(
                "a@example.com",
                &["bob@example.net"],
                b"Subject: x\r\n\r\nhi\r\n",
            )
            .await
            .queue_id();
        let env = srv.spool.message(id).unwrap().envelope;
        assert_eq!(env.auth_user.as_deref(), Some(USER));
        assert!(env.client.as_deref().unwrap().starts_with("127.0.0.2:"));
        let (received, _) = split_received(&srv.body(id).await);
        assert!(
            received.contains("([127.0.0.2]) by relay.test (oauthrelay) with ESMTPA id "),
            "{received}"
        );
        let text = srv.metrics_text();
        assert!(
            text.contains("oauthrelay_messages_rejected_total{reason=\"relay\"} 1"),
            "{text}"
        );
    })
    .await;
}
