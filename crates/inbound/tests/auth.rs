//! AUTH PLAIN and LOGIN: exact challenges, inline user name, cancel, bad
//! base64, unknown mechanism, wrong password, rate limit, TLS requirement,
//! and passwords never in the logs.

mod common;

use std::time::Duration;

use common::*;

fn with_users() -> inbound::ServerConfig {
    let mut cfg = config();
    cfg.users = users();
    cfg
}

#[tokio::test]
async fn plain_with_initial_response_and_then_no_second_auth() {
    bounded(30, async {
        let srv = start(with_users()).await;
        let mut c = srv.client().await;
        let e = c.hello().await;
        assert_eq!(e.lines.last().unwrap(), "CHUNKING");
        assert!(e.lines.contains(&"AUTH PLAIN LOGIN".to_string()));
        c.line(&format!(
            "AUTH PLAIN {}",
            b64(format!("{USER}\0{USER}\0{PASSWORD}").as_bytes())
        ))
        .await;
        assert_eq!(
            c.reply().await.first(),
            "235 2.7.0 Authentication successful"
        );
        c.cmd_start("AUTH PLAIN", "503 5.5.1").await;
    })
    .await;
}

#[tokio::test]
async fn plain_after_an_empty_challenge() {
    bounded(30, async {
        let srv = start(with_users()).await;
        let mut c = srv.client().await;
        c.hello().await;
        let r = c.cmd("AUTH PLAIN", 334).await;
        assert_eq!(r.lines, [""], "the challenge is exactly `334 `");
        c.line(&b64(format!("\0{USER}\0{PASSWORD}").as_bytes()))
            .await;
        c.expect_start("235 2.7.0").await;
    })
    .await;
}

#[tokio::test]
async fn login_uses_the_exact_challenges() {
    bounded(30, async {
        let srv = start(with_users()).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.line("AUTH LOGIN").await;
        let mut raw = String::new();
        use tokio::io::AsyncBufReadExt;
        c.io.read_line(&mut raw).await.unwrap();
        assert_eq!(raw, "334 VXNlcm5hbWU6\r\n");
        c.line(&b64(USER.as_bytes())).await;
        raw.clear();
        c.io.read_line(&mut raw).await.unwrap();
        assert_eq!(raw, "334 UGFzc3dvcmQ6\r\n");
        c.line(&b64(PASSWORD.as_bytes())).await;
        c.expect_start("235 2.7.0").await;
    })
    .await;
}

#[tokio::test]
async fn login_with_the_user_name_inline() {
    bounded(30, async {
        let srv = start(with_users()).await;
        let mut c = srv.client().await;
        c.hello().await;
        let r = c
            .cmd(&format!("AUTH LOGIN {}", b64(USER.as_bytes())), 334)
            .await;
        assert_eq!(r.first(), "334 UGFzc3dvcmQ6");
        c.line(&b64(PASSWORD.as_bytes())).await;
        c.expect_start("235 2.7.0").await;
        // Relaying is now allowed even from an untrusted address (checked in
        // relay.rs); the session records the user.
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
async fn cancel_bad_base64_and_unknown_mechanisms() {
    bounded(30, async {
        let srv = start(with_users()).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("AUTH LOGIN", 334).await;
        c.cmd_start("*", "501 5.0.0").await;
        c.cmd("AUTH LOGIN", 334).await;
        c.cmd(&b64(USER.as_bytes()), 334).await;
        c.cmd_start("*", "501 5.0.0").await;
        c.cmd("AUTH PLAIN", 334).await;
        c.cmd_start("*", "501 5.0.0").await;
        c.cmd_start("AUTH PLAIN !!!not-base64!!!", "501 5.5.2")
            .await;
        c.cmd("AUTH LOGIN", 334).await;
        c.cmd_start("@@@@", "501 5.5.2").await;
        c.cmd_start("AUTH CRAM-MD5", "504 5.5.4").await;
        c.cmd_start("AUTH XYZZY", "504 5.5.4").await;
        c.cmd_start("AUTH", "501 5.5.4").await;
        // After all that, it still works.
        let r = c.auth_plain(USER, PASSWORD).await;
        assert_eq!(r.code, 235, "{r:?}");
    })
    .await;
}

#[tokio::test]
async fn wrong_credentials_fail_and_are_rate_limited() {
    bounded(60, async {
        let mut cfg = with_users();
        cfg.auth_failure_limit = 3;
        cfg.auth_failure_window = Duration::from_secs(600);
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        let r = c.auth_plain(USER, "wrong").await;
        assert_eq!(r.first(), "535 5.7.8 Authentication credentials invalid");
        let r = c.auth_plain("nobody", PASSWORD).await;
        assert_eq!(r.code, 535);
        c.cmd("AUTH LOGIN", 334).await;
        c.cmd(&b64(USER.as_bytes()), 334).await;
        c.cmd_start(&b64(b"also wrong"), "535 5.7.8").await;
        // Limit reached: even the right password is refused for now.
        let r = c.auth_plain(USER, PASSWORD).await;
        assert_eq!(
            r.first(),
            "454 4.7.0 Too many failed authentication attempts, try again later"
        );
        // Also on a new connection from the same address.
        let mut d = srv.client().await;
        d.hello().await;
        assert_eq!(d.auth_plain(USER, PASSWORD).await.code, 454);
        // Another address is not affected.
        let mut e = srv.client_from("127.0.0.3").await;
        e.hello().await;
        assert_eq!(e.auth_plain(USER, PASSWORD).await.code, 235);
        let text = srv.metrics_text();
        assert!(
            text.contains("oauthrelay_smtp_auth_failures_total 3"),
            "{text}"
        );
    })
    .await;
}

#[tokio::test]
async fn auth_is_not_allowed_inside_a_transaction() {
    bounded(30, async {
        let srv = start(with_users()).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        let r = c.auth_plain(USER, PASSWORD).await;
        assert!(r.first().starts_with("503 5.5.1"), "{r:?}");
    })
    .await;
}

/// A session over an in-memory pipe from a non-loopback address.
fn remote_session(srv: &Server, peer: &str) -> Client {
    let (ours, theirs) = tokio::io::duplex(64 << 10);
    let inbound = srv.inbound.clone();
    let token = srv.shutdown.clone();
    let peer = peer.parse().unwrap();
    tokio::spawn(async move { inbound.handle(theirs, peer, token).await });
    Client::over(Box::new(ours))
}

#[tokio::test]
async fn remote_clients_need_tls_for_auth() {
    bounded(30, async {
        let srv = start(with_users()).await;
        let mut c = remote_session(&srv, "198.51.100.7:3333");
        c.greeting().await;
        let e = c.ehlo().await;
        assert!(
            !e.text().contains("AUTH"),
            "AUTH not offered without TLS: {e:?}"
        );
        let r = c.auth_plain(USER, PASSWORD).await;
        assert_eq!(r.first(), "530 5.7.0 Must issue a STARTTLS command first");
        c.cmd_start("MAIL FROM:<a@example.com>", "250").await;
        c.cmd_start("RCPT TO:<b@example.net>", "554 5.7.1").await;

        // With require_tls_for_auth = false they may authenticate in plain.
        let mut cfg = with_users();
        cfg.require_tls_for_auth = false;
        let srv = start(cfg).await;
        let mut c = remote_session(&srv, "198.51.100.7:3333");
        c.greeting().await;
        let e = c.ehlo().await;
        assert!(e.lines.contains(&"AUTH PLAIN LOGIN".to_string()), "{e:?}");
        assert_eq!(c.auth_plain(USER, PASSWORD).await.code, 235);
        c.send_mail(
            "a@example.com",
            &["b@example.net"],
            b"Subject: x\r\n\r\nhi\r\n",
        )
        .await;
    })
    .await;
}

/// Many connections guessing at once from one address get at most
/// `auth_failure_limit` password checks between them: an attempt is counted
/// before its password is checked, not after.
#[tokio::test]
async fn concurrent_guesses_get_at_most_the_failure_limit_of_checks() {
    bounded(60, async {
        let mut cfg = with_users();
        cfg.auth_failure_limit = 3;
        cfg.auth_failure_window = Duration::from_secs(600);
        let srv = start(cfg).await;
        let mut clients = Vec::new();
        for _ in 0..40 {
            let mut c = srv.client().await;
            c.hello().await;
            clients.push(c);
        }
        let guess = format!("AUTH PLAIN {}", b64(format!("\0{USER}\0wrong").as_bytes()));
        for c in &mut clients {
            c.line(&guess).await;
        }
        let (mut checked, mut refused) = (0, 0);
        for c in &mut clients {
            let r = c.reply().await;
            match r.code {
                535 => checked += 1,
                454 => refused += 1,
                _ => panic!("unexpected reply {r:?}"),
            }
        }
        assert!(
            (1..=3).contains(&checked),
            "{checked} passwords checked, {refused} refused"
        );
        // Every check of a wrong password is one counted failure.
        let text = srv.metrics_text();
        assert!(
            text.contains(&format!("oauthrelay_smtp_auth_failures_total {checked}\n")),
            "{text}"
        );
        // The address is limited now, even with the right password.
        assert_eq!(clients[0].auth_plain(USER, PASSWORD).await.code, 454);
    })
    .await;
}

/// IPv6 clients are limited per /64: a host cannot get a fresh limit by
/// moving to another address of its network.
#[tokio::test]
async fn ipv6_neighbours_in_a_slash_64_share_a_limit() {
    bounded(60, async {
        let mut cfg = with_users();
        cfg.auth_failure_limit = 2;
        cfg.auth_failure_window = Duration::from_secs(600);
        cfg.require_tls_for_auth = false;
        let srv = start(cfg).await;
        for peer in ["[2001:db8:0:7::1]:3333", "[2001:db8:0:7:1:2:3:4]:3333"] {
            let mut c = remote_session(&srv, peer);
            c.hello().await;
            assert_eq!(c.auth_plain(USER, "wrong").await.code, 535, "{peer}");
        }
        let mut c = remote_session(&srv, "[2001:db8:0:7:ffff:ffff:ffff:fffe]:4444");
        c.hello().await;
        let r = c.auth_plain(USER, PASSWORD).await;
        assert_eq!(
            r.first(),
            "454 4.7.0 Too many failed authentication attempts, try again later"
        );
        // The next /64 is another client.
        let mut c = remote_session(&srv, "[2001:db8:0:8::1]:3333");
        c.hello().await;
        assert_eq!(c.auth_plain(USER, PASSWORD).await.code, 235);
    })
    .await;
}

/// A successful login gives its attempt back but does not wipe the
/// failures before it (knowing one password must not reset the count for
/// guessing another).
#[tokio::test]
async fn a_success_does_not_reset_earlier_failures() {
    bounded(60, async {
        let mut cfg = with_users();
        cfg.auth_failure_limit = 2;
        cfg.auth_failure_window = Duration::from_secs(600);
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        assert_eq!(c.auth_plain(USER, "wrong").await.code, 535);
        for _ in 0..3 {
            let mut d = srv.client().await;
            d.hello().await;
            assert_eq!(d.auth_plain(USER, PASSWORD).await.code, 235);
        }
        assert_eq!(c.auth_plain(USER, "wrong").await.code, 535);
        let mut d = srv.client().await;
        d.hello().await;
        assert_eq!(d.auth_plain(USER, PASSWORD).await.code, 454);
    })
    .await;
}

/// Malformed credentials check no password and guess nothing: they are
/// refused, but do not use up the client's failures (else a flood of them
/// would fill the limiter for free).
#[tokio::test]
async fn malformed_credentials_do_not_use_up_the_limit() {
    bounded(60, async {
        let mut cfg = with_users();
        cfg.auth_failure_limit = 2;
        cfg.auth_failure_window = Duration::from_secs(600);
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        for creds in [
            "no NULs at all".to_string(),
            format!("someone-else\0{USER}\0{PASSWORD}"),
            format!("\0\0{PASSWORD}"),
        ] {
            c.cmd_start(
                &format!("AUTH PLAIN {}", b64(creds.as_bytes())),
                "535 5.7.8",
            )
            .await;
        }
        assert_eq!(c.auth_plain(USER, PASSWORD).await.code, 235);
    })
    .await;
}
