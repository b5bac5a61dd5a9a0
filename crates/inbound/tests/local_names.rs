//! Local names (issue 8 item 2): a trusted or authenticated client's bare
//! names (`MAIL FROM:<scanner>`, `RCPT TO:<root>`) are qualified and
//! expanded through the binary's [`inbound::LocalNames`]; strangers still
//! get `501`; a local session (`handle_local`) is trusted whatever
//! allow_networks says.

mod common;

use std::sync::Arc;

use common::*;
use inbound::Settings;

struct Names;

impl inbound::LocalNames for Names {
    fn qualify(&self, name: &str) -> String {
        format!("{name}@local.test")
    }
    fn expand(&self, rcpt: &str) -> Vec<String> {
        match rcpt {
            "root" | "root@local.test" => {
                vec!["admin@example.org".into(), "ops@example.org".into()]
            }
            r if !r.contains('@') => vec!["postmaster@example.org".into()],
            r => vec![r.to_string()],
        }
    }
}

fn settings(cfg: inbound::ServerConfig) -> Settings {
    Settings::new(cfg, HOST, accept_all())
        .unwrap()
        .with_local_names(Arc::new(Names))
}

const MESSAGE: &[u8] = b"Subject: s\r\n\r\nbody\r\n";

#[tokio::test]
async fn trusted_clients_get_bare_names_qualified_and_expanded() {
    bounded(20, async {
        let mut cfg = config();
        cfg.allow_networks = vec!["127.0.0.1/32".parse().unwrap()];
        cfg.users = users();
        let srv = start(cfg.clone()).await;
        // Without local names (a bare `Settings`), bare names are refused.
        let mut c = srv.client().await;
        c.hello().await;
        c.cmd_start("MAIL FROM:<scanner>", "501 5.1.7").await;
        srv.inbound.reload(settings(cfg));

        let mut c = srv.client().await;
        c.hello().await;
        c.cmd("MAIL FROM:<scanner>", 250).await;
        c.cmd("RCPT TO:<root>", 250).await;
        c.cmd("RCPT TO:<www-data>", 250).await;
        c.cmd("RCPT TO:<x@example.net>", 250).await;
        c.cmd("DATA", 354).await;
        c.send(MESSAGE).await;
        let r = c.cmd(".", 250).await;
        let env = srv.spool.message(r.queue_id()).unwrap().envelope;
        assert_eq!(env.sender, "scanner@local.test");
        assert_eq!(
            env.recipients,
            [
                "admin@example.org",
                "ops@example.org",
                "postmaster@example.org",
                "x@example.net"
            ]
        );

        // A stranger (outside allow_networks, not authenticated): refused.
        let mut s = srv.client_from("127.0.0.2").await;
        s.hello().await;
        s.cmd_start("MAIL FROM:<scanner>", "501 5.1.7").await;
        s.cmd("MAIL FROM:<a@example.com>", 250).await;
        s.cmd_start("RCPT TO:<root>", "5").await;
        // ... until it authenticates.
        let mut a = srv.client_from("127.0.0.2").await;
        a.hello().await;
        a.auth_plain(USER, PASSWORD).await;
        a.cmd("MAIL FROM:<printer>", 250).await;
        a.cmd("RCPT TO:<root>", 250).await;
    })
    .await;
}

#[tokio::test]
async fn a_local_session_is_trusted_whatever_allow_networks_says() {
    bounded(20, async {
        let mut cfg = config();
        cfg.allow_networks = Vec::new();
        cfg.users = users();
        let srv = start(cfg.clone()).await;
        srv.inbound.reload(settings(cfg));
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let task = {
            let inbound = srv.inbound.clone();
            let stop = srv.shutdown.clone();
            tokio::spawn(async move { inbound.handle_local(theirs, stop).await })
        };
        let mut c = Client::over(Box::new(ours));
        c.greeting().await;
        c.ehlo().await;
        let r = c.send_mail("cron", &["root"], MESSAGE).await;
        assert_eq!(r.code, 250, "{r:?}");
        c.cmd_start("QUIT", "221").await;
        task.await.unwrap();
        let env = srv.spool.message(r.queue_id()).unwrap().envelope;
        assert_eq!(env.sender, "cron@local.test");
        assert_eq!(env.recipients, ["admin@example.org", "ops@example.org"]);
    })
    .await;
}
