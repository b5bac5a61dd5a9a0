//! SMTP smuggling (CVE-2023-51764 and kin): from a client outside
//! `bare_lf_end_networks` (default: `allow_networks`) only CRLF.CRLF ends
//! DATA, so none of the known payloads can end a message and start a second
//! one. From every client a bare LF ends a content line and is normalised to
//! CRLF (Postfix's `smtpd_forbid_bare_newline = normalize`).

mod common;

use common::*;

const SMUGGLED: &str = "MAIL FROM:<admin@victim.example>\r\nRCPT TO:<target@victim.example>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n";

/// An authenticated client on 127.0.0.2 while only 127.0.0.1 is trusted.
async fn untrusted(srv: &Server) -> Client {
    let mut c = srv.client_from("127.0.0.2").await;
    c.hello().await;
    assert_eq!(c.auth_plain(USER, PASSWORD).await.code, 235);
    c
}

fn server_config() -> inbound::ServerConfig {
    let mut cfg = config();
    cfg.allow_networks = vec!["127.0.0.1/32".parse().unwrap()];
    cfg.users = users();
    cfg
}

#[tokio::test]
async fn known_payloads_do_not_end_data_from_untrusted_clients() {
    bounded(60, async {
        let srv = start(server_config()).await;
        let mut c = untrusted(&srv).await;
        let payloads: [&[u8]; 6] = [
            b"\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\n.\r\n", b"\r\n.\n",
        ];
        for payload in payloads {
            c.cmd("MAIL FROM:<user@example.com>", 250).await;
            c.cmd("RCPT TO:<friend@example.net>", 250).await;
            c.cmd("DATA", 354).await;
            let mut wire =
                b"Date: x\r\nMessage-ID: <a@b>\r\nSubject: innocent\r\n\r\nhello".to_vec();
            wire.extend_from_slice(payload);
            wire.extend_from_slice(SMUGGLED.as_bytes());
            wire.extend_from_slice(b"\r\n.\r\n");
            c.send(&wire).await;
            // Exactly one reply: the message is queued, nothing else ran.
            let id = c.expect_start("250 2.0.0 Ok: queued as").await.queue_id();
            c.cmd_start("NOOP", "250 2.0.0 Ok").await;
            let env = srv.spool.message(id).unwrap().envelope;
            assert_eq!(env.sender, "user@example.com");
            assert_eq!(env.recipients.len(), 1);
            assert_eq!(env.recipients[0], "friend@example.net");
            let (_, body) = split_received(&srv.body(id).await);
            let body = String::from_utf8(body).unwrap();
            assert!(
                body.contains("MAIL FROM:<admin@victim.example>"),
                "{payload:?}: {body:?}"
            );
            assert!(
                body.ends_with("Subject: smuggled\r\n\r\nevil\r\n\r\n"),
                "{payload:?}: {body:?}"
            );
            // Every LF is part of a CRLF in what we store.
            assert!(
                !body.replace("\r\n", "").contains('\n'),
                "{payload:?}: {body:?}"
            );
        }
        assert_eq!(
            srv.spool.list().len(),
            payloads.len(),
            "one message per DATA, none smuggled"
        );
    })
    .await;
}

#[tokio::test]
async fn stored_bytes_for_each_payload_from_untrusted_clients() {
    bounded(60, async {
        let srv = start(server_config()).await;
        let mut c = untrusted(&srv).await;
        // (sent, stored): bare LF becomes CRLF and ends the line, so a
        // lone dot next to it is an empty line (the stuffed dot goes), never
        // the end; a bare CR is kept and ends nothing.
        let cases: [(&[u8], &[u8]); 7] = [
            (b"a\n.\nb", b"a\r\n\r\nb"),
            (b"a\r.\rb", b"a\r.\rb"),
            (b"a\r\n.\rb", b"a\r\n\rb"),
            (b"a\r.\r\nb", b"a\r.\r\nb"),
            (b"a\n.\r\nb", b"a\r\n\r\nb"),
            (b"a\r\n.\nb", b"a\r\n\r\nb"),
            (b"a\n..b\n.", b"a\r\n.b\r\n"),
        ];
        for (sent, stored) in cases {
            c.cmd("MAIL FROM:<user@example.com>", 250).await;
            c.cmd("RCPT TO:<friend@example.net>", 250).await;
            c.cmd("DATA", 354).await;
            let head = b"Date: x\r\nMessage-ID: <a@b>\r\n\r\n";
            c.send([&head[..], sent, b"\r\n.\r\n"].concat()).await;
            let id = c.expect_start("250 2.0.0 Ok: queued").await.queue_id();
            let (_, body) = split_received(&srv.body(id).await);
            assert_eq!(body, [&head[..], stored, b"\r\n"].concat(), "sent {sent:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn bare_lf_from_trusted_clients_is_a_line_ending() {
    bounded(30, async {
        let srv = start(server_config()).await;
        let mut c = srv.client().await; // 127.0.0.1: trusted
        c.hello().await;
        c.cmd("MAIL FROM:<printer@example.com>", 250).await;
        c.cmd("RCPT TO:<office@example.net>", 250).await;
        c.cmd("DATA", 354).await;
        c.send(
            "Subject: scan\nDate: x\nMessage-ID: <s@p>\n\nline 1\n..dotted\r\nline 3\n.\nNOOP\n",
        )
        .await;
        let id = c.expect_start("250 2.0.0 Ok: queued").await.queue_id();
        // The bare-LF end of data let the pipelined NOOP through.
        c.expect_start("250 2.0.0 Ok").await;
        let (_, body) = split_received(&srv.body(id).await);
        assert_eq!(
            body,
            b"Subject: scan\r\nDate: x\r\nMessage-ID: <s@p>\r\n\r\nline 1\r\n.dotted\r\nline 3\r\n"
        );
        // The mixed forms end DATA too for them.
        for end in ["\r\n.\n", "\n.\r\n"] {
            c.cmd("MAIL FROM:<printer@example.com>", 250).await;
            c.cmd("RCPT TO:<office@example.net>", 250).await;
            c.cmd("DATA", 354).await;
            c.send(format!("Date: x\nMessage-ID: <s@p>\n\nbody{end}"))
                .await;
            let id = c.expect_start("250 2.0.0 Ok: queued").await.queue_id();
            let (_, body) = split_received(&srv.body(id).await);
            assert_eq!(body, b"Date: x\r\nMessage-ID: <s@p>\r\n\r\nbody\r\n");
        }
        // But never CR.CR.
        c.cmd("MAIL FROM:<printer@example.com>", 250).await;
        c.cmd("RCPT TO:<office@example.net>", 250).await;
        c.cmd("DATA", 354).await;
        c.send("Date: x\r\nMessage-ID: <s@p>\r\n\r\nbody\r.\rmore\r\n.\r\n")
            .await;
        let id = c.expect_start("250 2.0.0 Ok: queued").await.queue_id();
        let (_, body) = split_received(&srv.body(id).await);
        assert_eq!(
            body,
            b"Date: x\r\nMessage-ID: <s@p>\r\n\r\nbody\r.\rmore\r\n"
        );
    })
    .await;
}
