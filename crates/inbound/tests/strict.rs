//! Strict parameters: sizes that do not fit in 64 bits, DSN parameters
//! (DSN is not advertised), and arguments to commands that take none.

mod common;

use common::*;
use inbound::ByteSize;

/// A SIZE too big for any integer is over every limit: `552`, never a
/// wrapped-around small number that passes.
#[tokio::test]
async fn an_overflowing_size_parameter_gets_552() {
    bounded(20, async {
        let mut cfg = config();
        cfg.max_message_size = ByteSize(1000);
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        for size in [
            "99999999999999999999999",
            "18446744073709551616",
            "18446744073709551615",
            "100000000000000000000000000000000000000000000000000000001",
        ] {
            let r = c
                .cmd_start(
                    &format!("MAIL FROM:<a@example.com> SIZE={size}"),
                    "552 5.3.4",
                )
                .await;
            assert_eq!(
                r.first(),
                "552 5.3.4 Message size exceeds fixed maximum message size"
            );
        }
        // Leading zeros are still the number they spell.
        c.cmd_start(
            "MAIL FROM:<a@example.com> SIZE=000000000000000000000000999",
            "250 2.1.0",
        )
        .await;
        c.cmd("RSET", 250).await;
        c.cmd_start(
            "MAIL FROM:<a@example.com> SIZE=000000000000000000000001001",
            "552 5.3.4",
        )
        .await;
        // The same with an address literal (read through another path).
        c.cmd_start(
            "MAIL FROM:<a@[192.0.2.1]> SIZE=99999999999999999999999",
            "552 5.3.4",
        )
        .await;
        assert!(srv.messages().await.is_empty());
    })
    .await;
}

/// A BDAT chunk size that does not fit is a syntax error at once: the
/// server does not wait for a chunk it cannot count, and the session goes
/// on.
#[tokio::test]
async fn an_overflowing_bdat_size_gets_501_at_once() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        for line in [
            "BDAT 99999999999999999999999999 LAST",
            "BDAT 18446744073709551616",
            "BDAT 100000000000000000000000000000000000005 LAST",
        ] {
            c.cmd_start(line, "501 5.5.4").await;
        }
        // The transaction is over (RFC 3030: a refused BDAT fails it).
        c.send("BDAT 5 LAST\r\nhello").await;
        c.expect_start("503 5.5.1").await;
        // A new transaction works.
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        c.send("BDAT 5 LAST\r\nhello").await;
        c.expect_start("250 2.0.0 Ok: queued").await;
        assert_eq!(srv.messages().await.len(), 1);
    })
    .await;
}

/// DSN (RFC 3461) is not advertised, so its parameters are refused rather
/// than accepted and ignored (the client would believe they are honoured).
#[tokio::test]
async fn dsn_parameters_are_refused_without_dsn() {
    bounded(20, async {
        let srv = start(config()).await;
        let mut c = srv.client().await;
        let ehlo = c.hello().await;
        assert!(!ehlo.text().contains("DSN"), "{ehlo:?}");
        for line in [
            "MAIL FROM:<a@example.com> RET=HDRS",
            "MAIL FROM:<a@example.com> RET=FULL",
            "MAIL FROM:<a@example.com> ENVID=QQ314159",
            "MAIL FROM:<a@example.com> SIZE=10 ENVID=x",
        ] {
            let r = c.cmd_start(line, "555 5.5.4").await;
            assert!(
                r.first().contains("RET") || r.first().contains("ENVID"),
                "{r:?}"
            );
        }
        // Other parameters of extensions we do not advertise.
        for line in [
            "MAIL FROM:<a@example.com> REQUIRETLS",
            "MAIL FROM:<a@example.com> HOLDFOR=10",
            "MAIL FROM:<a@example.com> MT-PRIORITY=3",
            "MAIL FROM:<a@example.com> BY=120;R",
            "MAIL FROM:<a@example.com> AUTH=<>",
        ] {
            c.cmd_start(line, "555 5.5.4").await;
        }
        c.cmd("MAIL FROM:<a@example.com> SIZE=10 BODY=8BITMIME", 250)
            .await;
        for line in [
            "RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE",
            "RCPT TO:<b@example.net> NOTIFY=NEVER",
            "RCPT TO:<b@example.net> ORCPT=rfc822;b@example.net",
        ] {
            let r = c.cmd_start(line, "555 5.5.4").await;
            assert!(
                r.first().contains("NOTIFY") || r.first().contains("ORCPT"),
                "{r:?}"
            );
        }
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        c.cmd("DATA", 354).await;
        c.send("Subject: x\r\n\r\nhi\r\n.\r\n").await;
        let id = c.expect(250).await.queue_id();
        assert_eq!(
            srv.spool.message(id).unwrap().envelope.recipients[0],
            "b@example.net"
        );
    })
    .await;
}

/// `MAIL ... AUTH=` (RFC 4954 5) is fine once AUTH is advertised.
#[tokio::test]
async fn the_auth_parameter_is_taken_when_auth_is_offered() {
    bounded(20, async {
        let mut cfg = config();
        cfg.users = users();
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        let ehlo = c.hello().await;
        assert!(ehlo.text().contains("AUTH PLAIN LOGIN"), "{ehlo:?}");
        c.cmd("MAIL FROM:<a@example.com> AUTH=<>", 250).await;
    })
    .await;
}

/// Commands that take no argument refuse one (RFC 5321 4.1.1): the
/// command is not carried out.
#[tokio::test]
async fn commands_without_arguments_refuse_one() {
    bounded(20, async {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(dir.path());
        let mut cfg = config();
        cfg.tls = Some(inbound::TlsConfig {
            cert_file: certs.cert_file.clone(),
            key_file: certs.key_file.clone(),
        });
        let srv = start(cfg).await;
        let mut c = srv.client().await;
        c.hello().await;
        let r = c.cmd_start("STARTTLS foo", "501 5.5.4").await;
        assert_eq!(r.first(), "501 5.5.4 Syntax: STARTTLS");
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd("RCPT TO:<b@example.net>", 250).await;
        c.cmd_start("DATA x", "501 5.5.4 Syntax: DATA").await;
        c.cmd_start("RSET x", "501 5.5.4 Syntax: RSET").await;
        // RSET x did not reset: the transaction goes on.
        c.cmd_start("QUIT now", "501 5.5.4 Syntax: QUIT").await;
        // Trailing white space is no argument.
        c.cmd("DATA \t ", 354).await;
        c.send("Subject: x\r\n\r\nhi\r\n.\r\n").await;
        c.expect(250).await;
        c.cmd("RSET ", 250).await;
        // NOOP and HELP may have one (RFC 5321 4.1.1.9, 4.1.1.8).
        c.cmd("NOOP anything", 250).await;
        c.cmd("HELP MAIL", 214).await;
        c.cmd("QUIT", 221).await;
        c.expect_closed().await;
        assert_eq!(srv.messages().await.len(), 1);
    })
    .await;
}
