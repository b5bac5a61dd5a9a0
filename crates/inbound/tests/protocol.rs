//! Greeting, EHLO, the full transaction, sequencing and syntax errors,
//! pipelining, 8-bit/UTF-8 passthrough, the headers we add, the envelope.

mod common;

use std::sync::Arc;

use common::*;

const MESSAGE: &[u8] = b"Date: Tue, 1 Jul 2003 10:52:37 +0200\r\nMessage-ID: <abc@client.test>\r\nFrom: a@example.com\r\nSubject: hello\r\n\r\nbody line 1\r\n.leading dot\r\n\r\nlast line\r\n";

#[tokio::test]
async fn greeting_and_ehlo_capabilities() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        let g = c.greeting().await;
        assert_eq!(g.first(), format!("220 {HOST} ESMTP oauthrelay"));
        let e = c.ehlo().await;
        assert_eq!(e.lines[0], format!("{HOST} Hello client.test [127.0.0.1]"));
        let caps: Vec<&str> = e.lines[1..].iter().map(String::as_str).collect();
        assert_eq!(
            caps,
            [
                "SIZE 36700160",
                "8BITMIME",
                "PIPELINING",
                "SMTPUTF8",
                "ENHANCEDSTATUSCODES",
                "CHUNKING"
            ],
            "no STARTTLS without [server.tls], no AUTH without users"
        );
        let h = c.cmd("HELO client.test", 250).await;
        assert_eq!(h.first(), format!("250 {HOST}"));
        c.cmd_start("QUIT", "221 2.0.0").await;
        c.expect_closed().await;
        srv.stop().await;
    })
    .await;
}

#[tokio::test]
async fn size_in_ehlo_follows_the_limit() {
    bounded(20, async {
        let mut cfg = config();
        cfg.max_message_size = inbound::ByteSize(1234);
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        let e = c.hello().await;
        assert!(e.lines.contains(&"SIZE 1234".to_string()), "{e:?}");
    })
    .await;
}

#[tokio::test]
async fn full_transaction_is_stored_byte_exact() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.hello().await;
        let r = c.send_mail("alice@example.com", &["bob@example.net"], MESSAGE).await;
        assert_eq!(r.code, 250, "{r:?}");
        let id = r.queue_id();
        c.cmd_start("QUIT", "221 2.0.0").await;
        c.expect_closed().await;

        let msgs = srv.messages().await;
        assert_eq!(msgs.len(), 1);
        let (stored_id, env, body) = &msgs[0];
        assert_eq!(*stored_id, id);
        let (received, rest) = split_received(body);
        assert_eq!(rest, MESSAGE, "client bytes stored exactly");
        let prefix = format!(
            "Received: from client.test ([127.0.0.1]) by {HOST} (oauthrelay) with ESMTP id {id} for <bob@example.net>; "
        );
        assert!(received.starts_with(&prefix), "{received}");
        assert!(received.ends_with(" +0000\r\n"), "{received}");

        assert_eq!(env.sender, "alice@example.com");
        assert_eq!(env.recipients.len(), 1);
        assert_eq!(env.recipients[0], "bob@example.net");
        let client = env.client.as_deref().unwrap();
        assert!(client.starts_with("127.0.0.1:"), "{client}");
        assert_eq!(env.helo, "client.test");
        assert_eq!(env.auth_user, None);
        assert!(!env.smtputf8 && !env.eight_bit);
        assert_eq!(srv.spool.message(*stored_id).unwrap().size, body.len() as u64);
        let age = std::time::SystemTime::now().duration_since(env.received).unwrap();
        assert!(age.as_secs() < 60);
        srv.stop().await;
    })
    .await;
}

#[tokio::test]
async fn several_recipients_and_messages_per_session() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.hello().await;
        let a = c
            .send_mail(
                "a@example.com",
                &["r1@example.net", "r2@example.net", "r1@example.net"],
                MESSAGE,
            )
            .await
            .queue_id();
        let b = c
            .send_mail("", &["r3@example.net"], MESSAGE)
            .await
            .queue_id();
        assert!(b > a);
        let env = srv.spool.message(a).unwrap().envelope;
        let rcpts: Vec<_> = env.recipients.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            rcpts,
            ["r1@example.net", "r2@example.net", "r1@example.net"]
        );
        let (received, _) = split_received(&srv.body(a).await);
        assert!(
            !received.contains(" for <"),
            "no `for` with several recipients: {received}"
        );
        let env = srv.spool.message(b).unwrap().envelope;
        assert_eq!(env.sender, "", "null sender kept");
        let text = srv.metrics_text();
        assert!(
            text.contains("oauthrelay_messages_received_total 2"),
            "{text}"
        );
        assert!(
            text.contains("oauthrelay_smtp_connections_accepted_total 1"),
            "{text}"
        );
    })
    .await;
}

#[tokio::test]
async fn sequencing_and_syntax_errors() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.greeting().await;
        c.cmd_start("MAIL FROM:<a@example.com>", "503 5.5.1").await;
        c.cmd_start("STARTTLS", "502 5.5.1").await;
        c.ehlo().await;
        c.cmd_start("RCPT TO:<b@example.com>", "503 5.5.1").await;
        c.cmd_start("DATA", "503 5.5.1").await;
        c.cmd_start("BDAT 0 LAST", "503 5.5.1").await;
        c.cmd_start("FROB", "500 5.5.1").await;
        c.cmd_start("", "500 5.5.2").await;
        // (A bare `MAIL FROM:a@example.com` is taken from this trusted
        // client, as from old printers: tests/printers.rs.)
        c.cmd_start("MAIL FROM:a@example.com>", "501 5.5.4").await;
        c.cmd_start("MAIL FROM:<a@@example.com>", "501 5.1.7").await;
        c.cmd_start("MAIL FROM:<a@example.com> FROB=1", "555 5.5.4")
            .await;
        c.cmd_start("MAIL FROM:<a@example.com> SIZE=abc", "501 5.5.4")
            .await;
        c.cmd_start("MAIL FROM:<a@example.com>", "250 2.1.0").await;
        c.cmd_start("MAIL FROM:<a@example.com>", "503 5.5.1").await;
        c.cmd_start("DATA", "503 5.5.1").await;
        c.cmd_start("RCPT TO:<>", "501 5.1.3").await;
        c.cmd_start("RCPT TO:b@example.com>", "501 5.5.4").await;
        c.cmd_start("RCPT TO:<b@example.com>", "250 2.1.5").await;
        c.cmd_start("RSET", "250 2.0.0").await;
        c.cmd_start("RCPT TO:<b@example.com>", "503 5.5.1").await;
        c.cmd_start("NOOP", "250 2.0.0").await;
        c.cmd_start("NOOP whatever", "250 2.0.0").await;
        c.cmd_start("VRFY bob", "252 2.5.0").await;
        c.cmd_start("EXPN list", "502 5.5.1").await;
        c.cmd_start("HELP", "214 2.0.0").await;
        c.cmd_start("AUTH PLAIN", "503 5.5.1").await;
        c.cmd_start("quit", "221 2.0.0").await;
        c.expect_closed().await;
        assert!(srv.messages().await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn ehlo_resets_the_transaction() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.ehlo().await;
        c.cmd_start("RCPT TO:<b@example.com>", "503 5.5.1").await;
    })
    .await;
}

#[tokio::test]
async fn pipelined_commands_get_every_reply_in_order() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.greeting().await;
        c.send(
            "EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<r1@example.net>\r\n\
             RCPT TO:<>\r\nRCPT TO:<r2@example.net>\r\nNOOP\r\nVRFY x\r\nRSET\r\nFROB\r\n\
             MAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<r3@example.net>\r\nDATA\r\n",
        )
        .await;
        c.expect(250).await;
        for start in [
            "250 2.1.0", "250 2.1.5", "501 5.1.3", "250 2.1.5", "250 2.0.0", "252 2.5.0", "250 2.0.0",
            "500 5.5.1", "250 2.1.0", "250 2.1.5", "354",
        ] {
            c.expect_start(start).await;
        }
        // The body, the next transaction and QUIT, all in one write.
        c.send(
            "Subject: one\r\n\r\nfirst\r\n.\r\nMAIL FROM:<b@example.com>\r\nRCPT TO:<r4@example.net>\r\nDATA\r\n",
        )
        .await;
        let first = c.expect_start("250 2.0.0 Ok: queued as").await.queue_id();
        c.expect_start("250 2.1.0").await;
        c.expect_start("250 2.1.5").await;
        c.expect(354).await;
        c.send("Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n").await;
        let second = c.expect_start("250 2.0.0 Ok: queued as").await.queue_id();
        c.expect_start("221 2.0.0").await;
        c.expect_closed().await;
        let env = srv.spool.message(first).unwrap().envelope;
        assert!(env.eight_bit);
        assert_eq!(env.recipients[0], "r3@example.net");
        let (_, rest) = split_received(&srv.body(second).await);
        assert!(rest.starts_with(b"Subject: two\r\nDate: "), "{}", String::from_utf8_lossy(&rest));
        assert!(rest.ends_with(b"\r\n\r\nsecond\r\n"));
    })
    .await;
}

#[tokio::test]
async fn many_pipelined_commands_in_one_write() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.hello().await;
        let n = 2000;
        c.send("NOOP\r\n".repeat(n)).await;
        for _ in 0..n {
            c.expect_start("250 2.0.0").await;
        }
        c.cmd("QUIT", 221).await;
    })
    .await;
}

#[tokio::test]
async fn eight_bit_and_utf8_pass_through() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd_start("MAIL FROM:<jörg@exämple.de>", "553 5.6.7")
            .await;
        c.cmd_start(
            "MAIL FROM:<jörg@exämple.de> SMTPUTF8 BODY=8BITMIME",
            "250 2.1.0",
        )
        .await;
        c.cmd_start("RCPT TO:<usér@例え.jp>", "250 2.1.5").await;
        c.cmd("DATA", 354).await;
        let mut body = "Date: x\r\nMessage-ID: <m@x>\r\nSubject: grüße 你好\r\n\r\n"
            .as_bytes()
            .to_vec();
        body.extend_from_slice(&[0x80, 0xff, 0xfe, b'\t', 0x00, 0x7f, b'\r', b'\n']);
        body.extend_from_slice("ünïcödé line\r\n".as_bytes());
        let mut wire = Vec::new();
        inbound::dot::stuff(&body, &mut wire);
        c.send(&wire).await;
        let id = c.expect(250).await.queue_id();
        let (_, rest) = split_received(&srv.body(id).await);
        assert_eq!(rest, body);
        let env = srv.spool.message(id).unwrap().envelope;
        assert_eq!(env.sender, "jörg@exämple.de");
        assert_eq!(env.recipients[0], "usér@例え.jp");
        assert!(env.smtputf8 && env.eight_bit);

        c.cmd_start("MAIL FROM:<a@example.com>", "250").await;
        c.cmd_start("RCPT TO:<usér@例え.jp>", "553 5.6.7").await;
    })
    .await;
}

fn header_section(stored: &[u8]) -> String {
    let (_, rest) = split_received(stored);
    let end = rest
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

#[tokio::test]
async fn date_and_message_id_are_added_only_when_missing() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.hello().await;

        // Neither: both added at the end of the header section.
        let body = b"From: a@example.com\r\nSubject: x\r\n\r\nhello\r\nDate: in the body\r\n";
        let id = c
            .send_mail("a@example.com", &["b@example.net"], body)
            .await
            .queue_id();
        let (_, rest) = split_received(&srv.body(id).await);
        let text = String::from_utf8(rest).unwrap();
        let expected_start = "From: a@example.com\r\nSubject: x\r\nDate: ";
        assert!(text.starts_with(expected_start), "{text}");
        let mid = format!("\r\nMessage-ID: <{id}.");
        assert!(text.contains(&mid), "{text}");
        assert!(
            text.contains(&format!("@{HOST}>\r\n\r\nhello\r\nDate: in the body\r\n")),
            "{text}"
        );
        assert_eq!(
            text.matches("\r\nDate: ").count(),
            2,
            "one added, one in the body"
        );

        // Both present: nothing added.
        let id = c
            .send_mail("a@example.com", &["b@example.net"], MESSAGE)
            .await
            .queue_id();
        assert_eq!(split_received(&srv.body(id).await).1, MESSAGE);

        // Only Date (any case): Message-ID added.
        let body = b"dAtE: today\r\nSubject: y\r\n\r\nbody\r\n";
        let id = c
            .send_mail("a@example.com", &["b@example.net"], body)
            .await
            .queue_id();
        let h = header_section(&srv.body(id).await);
        assert!(
            h.starts_with("dAtE: today\r\nSubject: y\r\nMessage-ID: <"),
            "{h}"
        );
        assert!(!h.contains("\r\nDate:"), "{h}");

        // Folded headers are kept whole.
        let body = b"Subject: a\r\n  folded\r\nMessage-Id: <x@y>\r\n\r\nb\r\n";
        let id = c
            .send_mail("a@example.com", &["b@example.net"], body)
            .await
            .queue_id();
        let h = header_section(&srv.body(id).await);
        assert!(
            h.starts_with("Subject: a\r\n  folded\r\nMessage-Id: <x@y>\r\nDate: "),
            "{h}"
        );
        assert!(!h.contains("Message-ID:"), "{h}");

        // No header/body separator: added after the last header.
        let body = b"Subject: only headers\r\n";
        let id = c
            .send_mail("a@example.com", &["b@example.net"], body)
            .await
            .queue_id();
        let (_, rest) = split_received(&srv.body(id).await);
        let text = String::from_utf8(rest).unwrap();
        assert!(
            text.starts_with("Subject: only headers\r\nDate: "),
            "{text}"
        );
        assert!(text.ends_with(&format!("@{HOST}>\r\n")), "{text}");

        // No headers at all: added before the first line, then the empty
        // line that ends the header section (as Postfix's cleanup does), so
        // the text does not read as a malformed header.
        let body = b"just text\r\nmore\r\n";
        let id = c
            .send_mail("a@example.com", &["b@example.net"], body)
            .await
            .queue_id();
        let (_, rest) = split_received(&srv.body(id).await);
        let text = String::from_utf8(rest).unwrap();
        assert!(text.starts_with("Date: "), "{text}");
        assert!(
            text.ends_with(&format!("@{HOST}>\r\n\r\njust text\r\nmore\r\n")),
            "{text}"
        );
        let (headers, body_part) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(body_part, "just text\r\nmore\r\n", "{text}");
        assert!(
            headers
                .lines()
                .all(|l| l.starts_with("Date: ") || l.starts_with("Message-ID: ")),
            "only our headers before the empty line: {text}"
        );

        // Headers, then text without the empty line: the same.
        let body = b"Subject: no separator\r\ntext right away\r\n";
        let id = c
            .send_mail("a@example.com", &["b@example.net"], body)
            .await
            .queue_id();
        let (_, rest) = split_received(&srv.body(id).await);
        let text = String::from_utf8(rest).unwrap();
        assert!(
            text.starts_with("Subject: no separator\r\nDate: "),
            "{text}"
        );
        assert!(
            text.ends_with(&format!("@{HOST}>\r\n\r\ntext right away\r\n")),
            "{text}"
        );

        // Nothing to add: the client's bytes are kept as they are.
        let body = b"Date: today\r\nMessage-ID: <m@x>\r\ntext right away\r\n";
        let id = c
            .send_mail("a@example.com", &["b@example.net"], body)
            .await
            .queue_id();
        assert_eq!(split_received(&srv.body(id).await).1, body);

        // Empty message.
        let id = c
            .send_mail("a@example.com", &["b@example.net"], b"")
            .await
            .queue_id();
        let (_, rest) = split_received(&srv.body(id).await);
        let text = String::from_utf8(rest).unwrap();
        assert!(
            text.starts_with("Date: ") && text.contains("\r\nMessage-ID: <"),
            "{text}"
        );
    })
    .await;
}

#[tokio::test]
async fn sender_policy_is_asked_at_mail() {
    bounded(20, async {
        let policy: inbound::SenderPolicy = Arc::new(|s: &str| s.ends_with("@allowed.example"));
        let srv = start_with_policy(config(), policy).await;
        let mut c = srv.client().await;
        c.hello().await;
        let r = c
            .cmd_start("MAIL FROM:<x@other.example>", "550 5.7.1")
            .await;
        assert!(r.text().contains("<x@other.example>"), "{r:?}");
        c.cmd_start("MAIL FROM:<x@allowed.example>", "250 2.1.0")
            .await;
        let text = srv.metrics_text();
        assert!(
            text.contains("oauthrelay_messages_rejected_total{reason=\"sender\"} 1"),
            "{text}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_session_runs_over_an_in_memory_stream() {
    bounded(20, async {
        let mut cfg = config();
        cfg.allow_networks.push("192.0.2.0/24".parse().unwrap());
        let srv = start(cfg).await;
        let run = |peer: &str| {
            let (ours, theirs) = tokio::io::duplex(1024);
            let inbound = srv.inbound.clone();
            let token = srv.shutdown.clone();
            let peer = peer.parse().unwrap();
            let session = tokio::spawn(async move { inbound.handle(theirs, peer, token).await });
            (Client::over(Box::new(ours)), session)
        };

        let (mut c, session) = run("192.0.2.9:4000");
        c.hello().await;
        let id = c
            .send_mail("a@example.com", &["b@example.net"], MESSAGE)
            .await
            .queue_id();
        c.cmd("QUIT", 221).await;
        session.await.unwrap();
        let env = srv.spool.message(id).unwrap().envelope;
        assert_eq!(env.client.as_deref(), Some("192.0.2.9:4000"));
        let (received, _) = split_received(&srv.body(id).await);
        assert!(
            received.starts_with("Received: from client.test ([192.0.2.9]) by"),
            "{received}"
        );

        let (mut c, session) = run("[2001:db8::5]:25");
        c.expect_start("554 5.7.1 2001:db8::5 is not allowed to relay")
            .await;
        c.expect_closed().await;
        session.await.unwrap();
        assert_eq!(srv.inbound.active_sessions(), 0);
    })
    .await;
}

/// `<Postmaster>` without a domain (RFC 5321 4.5.1) is
/// `postmaster@<our host name>`, as a recipient and as a sender; it is never
/// the null sender.
#[tokio::test]
async fn postmaster_without_a_domain_is_ours() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.hello().await;
        let a = c
            .send_mail("Postmaster", &["Postmaster", "postMASTER"], MESSAGE)
            .await
            .queue_id();
        let b = c.send_mail("", &["postmaster"], MESSAGE).await.queue_id();
        let env = srv.spool.message(a).unwrap().envelope;
        assert_eq!(env.sender, format!("postmaster@{HOST}"));
        let rcpts: Vec<_> = env.recipients.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            rcpts,
            [format!("postmaster@{HOST}"), format!("postmaster@{HOST}")]
        );
        assert_eq!(
            srv.spool.message(b).unwrap().envelope.sender,
            "",
            "<> stays null"
        );
    })
    .await;
}

/// Address literals (RFC 5321 4.1.3: `[IPv4]`, `[IPv6:...]`), which
/// devices without a domain use, are queued as written, with their
/// parameters read as usual; malformed ones get a 501.
#[tokio::test]
async fn address_literals_are_accepted() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.hello().await;
        let id = c
            .send_mail(
                "scanner@[192.0.2.1]",
                &["a@[IPv6:2001:db8::1]", "b@example.com"],
                MESSAGE,
            )
            .await
            .queue_id();
        let env = srv.spool.message(id).unwrap().envelope;
        assert_eq!(env.sender, "scanner@[192.0.2.1]");
        let rcpts: Vec<_> = env.recipients.iter().map(|r| r.as_str()).collect();
        assert_eq!(rcpts, ["a@[IPv6:2001:db8::1]", "b@example.com"]);

        c.cmd_start("MAIL FROM:<s@[192.0.2.1]> SIZE=99999999999", "552 5.3.4")
            .await;
        c.cmd_start("MAIL FROM:<s@[192.0.2.1]> BODY=BINARYMIME", "555")
            .await;
        c.cmd_start("MAIL FROM:<s@[192.0.2.256]>", "501 5.1.7")
            .await;
        c.cmd_start("MAIL FROM:<s@[tag:content]>", "501 5.1.7")
            .await;
        c.cmd_start("MAIL FROM:<s@[192.0.2.1]> BODY=8BITMIME", "250 2.1.0")
            .await;
        c.cmd_start("RCPT TO:<x@[IPv6:2001:db8::g]>", "501 5.1.3")
            .await;
        c.cmd_start("RCPT TO:<x@[198.51.100.7]>", "250 2.1.5").await;
        c.cmd("DATA", 354).await;
        let mut wire = Vec::new();
        inbound::dot::stuff(MESSAGE, &mut wire);
        c.send(&wire).await;
        let id = c.reply().await.queue_id();
        let env = srv.spool.message(id).unwrap().envelope;
        assert_eq!(env.sender, "s@[192.0.2.1]");
        assert!(env.eight_bit, "BODY=8BITMIME was read");
        assert_eq!(env.recipients[0], "x@[198.51.100.7]");
    })
    .await;
}
