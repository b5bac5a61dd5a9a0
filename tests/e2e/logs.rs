//! The log as a sysadmin and their tools read it: JSON lines that parse
//! and carry the queue id and client, journal priorities under
//! `$JOURNAL_STREAM`, and the fail2ban filter in contrib/ on the daemon's
//! own lines.

use std::process::Command;
use std::time::Duration;

use crate::harness::{BASE, Smtp, config_in, have_tool, queued_id};
use crate::served::{Served, UNAUTHORIZED, repo};

#[tokio::test]
async fn json_logs_parse_line_by_line_and_carry_queue_id_and_client() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(tmp.path(), &format!("{BASE}\n[log]\nformat = \"json\"\n"));
    let mut d = Served::start(&cfg, &[], &[], false);
    d.wait_for("\"message\":\"ready\"", Duration::from_secs(30));
    let smtp = d.addr("SMTP listening on ");
    let mut s = Smtp::open(smtp).await;
    s.cmd("EHLO json.test").await;
    let reply = s
        .mail(
            "a@example.com",
            &["b@example.com"],
            b"Subject: j\r\n\r\nx\r\n",
        )
        .await;
    let id = queued_id(&reply);
    s.cmd("QUIT").await;
    let out = crate::harness::run_cli(&cfg, &["queue", "delete", &id], None);
    assert!(out.status.success(), "{out:?}");
    d.wait_for("removed by queue delete", Duration::from_secs(10));
    d.wait_for("disconnect from", Duration::from_secs(10));
    assert!(d.stop().success());

    let events: Vec<serde_json::Value> = d
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for e in &events {
        assert!(
            e["timestamp"].is_string() && e["level"].is_string() && e["message"].is_string(),
            "{e}"
        );
    }
    let find = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        events
            .iter()
            .find(|e| pred(e))
            .cloned()
            .unwrap_or_else(|| panic!("no such event in {events:#?}"))
    };
    let queued = find(&|e| e["message"].as_str().unwrap().ends_with("(queued)"));
    assert_eq!(queued["queue_id"], id.as_str(), "{queued}");
    assert!(
        queued["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{queued}"
    );
    assert_eq!(queued["level"], "INFO");
    let connect = find(&|e| e["message"] == "connect from unknown[127.0.0.1]");
    assert_eq!(connect["client"], queued["client"]);
    let disconnect = find(&|e| {
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=1 quit=1")
    });
    assert_eq!(disconnect["client"], queued["client"]);
    let deleted = find(&|e| {
        e["message"]
            .as_str()
            .unwrap()
            .contains("removed by queue delete")
    });
    assert_eq!(deleted["queue_id"], id.as_str(), "{deleted}");

    // --log-format wins over the file.
    let mut d = Served::start(&cfg, &["--log-format", "text"], &[], false);
    let ready = d.wait_for(" ready", Duration::from_secs(30));
    assert!(!ready.starts_with('{'), "{ready}");
}

#[tokio::test]
async fn under_the_journal_every_line_carries_its_priority() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(tmp.path(), &format!("{BASE}{UNAUTHORIZED}"));
    let mut d = Served::start(&cfg, &[], &[], true);
    d.wait_for("ready", Duration::from_secs(30));
    let smtp = d.addr("SMTP listening on ");
    // A client that drops in the middle of DATA: a warning.
    let mut s = Smtp::open(smtp).await;
    s.cmd("EHLO journal.test").await;
    s.cmd("MAIL FROM:<a@example.com>").await;
    s.cmd("RCPT TO:<b@example.com>").await;
    assert!(s.cmd("DATA").await.starts_with("354"));
    s.send(b"Subject: cut\r\n\r\nhalf").await;
    drop(s);
    d.wait_for("lost connection after DATA", Duration::from_secs(10));
    assert!(d.stop().success());

    let lines = d.lines();
    let prio = |needle: &str| {
        let l = lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {lines:#?}"));
        l[1..2].parse::<u8>().unwrap()
    };
    assert_eq!(
        prio("account needs authorization"),
        3,
        "err: journalctl -p err shows it"
    );
    assert_eq!(prio("lost connection after DATA"), 4);
    assert_eq!(prio("connect from unknown[127.0.0.1]"), 6);
    assert_eq!(prio("ready"), 6);
    for l in &lines {
        let b = l.as_bytes();
        assert!(
            b.len() > 3 && b[0] == b'<' && b[1].is_ascii_digit() && b[2] == b'>',
            "every line has a priority: {l:?}"
        );
        assert!(
            !b[3].is_ascii_digit(),
            "no timestamp under the journal (it adds its own): {l:?}"
        );
    }

    // JOURNAL_STREAM naming another stream (a redirect in ExecStart=):
    // plain lines.
    let mut d = Served::start(&cfg, &[], &[("JOURNAL_STREAM", "1:1".to_string())], false);
    let ready = d.wait_for("ready", Duration::from_secs(30));
    assert!(!ready.starts_with('<'), "{ready}");
}

/// Run a daemon with `format` (`journal`: text under `$JOURNAL_STREAM`)
/// and one user, loopback treated as outside `allow_networks`: fail AUTH
/// four times (once with a user name that carries another address),
/// succeed once; then, in a second session, send junk commands without
/// authenticating until the daemon closes it. Its log lines.
async fn auth_failures_logged(format: &str) -> Vec<String> {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().unwrap();
    let hash = crate::harness::run_cli(
        &config_in(tmp.path(), BASE),
        &["hash-password"],
        Some(b"right-password\n"),
    );
    let hash = String::from_utf8(hash.stdout).unwrap();
    let log_format = if format == "json" { "json" } else { "text" };
    let cfg = config_in(
        tmp.path(),
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nallow_networks = [\"192.0.2.0/24\"]\nuntrusted_junk_command_limit = 3\nshutdown_grace = \"5s\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[log]\nformat = \"{log_format}\"\n\n[[server.users]]\nname = \"printer\"\npassword_hash = \"{}\"\n",
            hash.trim()
        ),
    );
    let mut d = Served::start(&cfg, &[], &[], format == "journal");
    let smtp = d.addr("SMTP listening on ");
    let mut s = Smtp::open(smtp).await;
    s.cmd("EHLO attacker").await;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    for (user, pass) in [
        ("printer", "guess1"),
        ("printer", "guess2"),
        ("printer", "guess3"),
        // A user name that tries to get another address banned.
        ("x from unknown[203.0.113.9]", "nope"),
    ] {
        let r = s
            .cmd(&format!(
                "AUTH PLAIN {}",
                b64(format!("\0{user}\0{pass}").as_bytes())
            ))
            .await;
        assert!(r.starts_with("535"), "{r}");
    }
    let r = s
        .cmd(&format!("AUTH PLAIN {}", b64(b"\0printer\0right-password")))
        .await;
    assert!(r.starts_with("235"), "a good login is not a failure: {r}");
    s.cmd("QUIT").await;
    d.wait_for("disconnect from", Duration::from_secs(10));
    // A scanner: commands that do nothing, never logging in.
    let mut s = Smtp::open(smtp).await;
    s.cmd("EHLO scanner").await;
    let mut last = String::new();
    for _ in 0..4 {
        last = s.cmd("NOOP").await;
    }
    assert!(last.starts_with("421 4.7.0 "), "{last}");
    d.wait_for(
        "too many commands without authentication",
        Duration::from_secs(10),
    );
    assert!(d.stop().success());
    d.lines()
}

#[tokio::test]
async fn the_fail2ban_filter_bans_on_the_daemons_own_auth_failures() {
    let mut runs = Vec::new();
    for format in ["text", "json", "journal"] {
        runs.push((format, auth_failures_logged(format).await));
    }
    if !have_tool("fail2ban-regex") {
        return;
    }
    // The filter includes fail2ban's common.conf from its own directory.
    let tmp = tempfile::tempdir().unwrap();
    let filter_d = tmp.path().join("filter.d");
    std::fs::create_dir(&filter_d).unwrap();
    std::fs::copy(
        "/etc/fail2ban/filter.d/common.conf",
        filter_d.join("common.conf"),
    )
    .unwrap();
    let filter = filter_d.join("oauthrelay.conf");
    std::fs::copy(repo("contrib/fail2ban/filter.d/oauthrelay.conf"), &filter).unwrap();
    for (format, lines) in runs {
        // A file gets the lines as written; the journal backend hands
        // fail2ban "HOST IDENT[PID]: MESSAGE", the priority prefix gone.
        let (lines, args): (Vec<String>, &[&str]) = if format == "journal" {
            let lines = lines
                .iter()
                .map(|l| format!("relay oauthrelay[4242]: {}", &l[3..]))
                .collect();
            (lines, &["-d", "{NONE}"])
        } else {
            (lines, &[])
        };
        let log = tmp.path().join(format!("{format}.log"));
        std::fs::write(&log, lines.join("\n") + "\n").unwrap();
        // `-o ip`: the address each match would ban, one per line.
        let out = Command::new("fail2ban-regex")
            .args(args)
            .args(["-o", "ip"])
            .arg(&log)
            .arg(&filter)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{format}: {text}");
        let banned: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(
            banned,
            ["127.0.0.1"; 5],
            "{format}: the four failures and the junk commands, each for the \
             client's own address (never the one in the user name); log:\n{}",
            lines.join("\n")
        );
    }
}

#[tokio::test]
async fn a_flood_of_refused_connections_is_one_line_then_a_summary() {
    use tokio::io::AsyncReadExt;
    let tmp = tempfile::tempdir().unwrap();
    // Loopback is outside allow_networks and no user may log in: every
    // connection is refused at once.
    let cfg = config_in(
        tmp.path(),
        "[server]\nlisten = [\"127.0.0.1:0\"]\nallow_networks = [\"192.0.2.0/24\"]\nshutdown_grace = \"5s\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let mut d = Served::start(&cfg, &[], &[], false);
    d.wait_for(" ready", Duration::from_secs(30));
    let smtp = d.addr("SMTP listening on ");
    for _ in 0..200 {
        let mut c = tokio::net::TcpStream::connect(smtp).await.unwrap();
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut reply))
            .await
            .expect("refused at once")
            .unwrap();
        assert!(reply.starts_with("554 5.7.1 "), "{reply}");
    }
    // The minute is not over: the summary comes at shutdown.
    assert!(d.stop().success());
    let lines = d.lines();
    let full: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("refused: not in [server] allow_networks"))
        .collect();
    assert_eq!(full.len(), 1, "one line for the first: {lines:#?}");
    assert!(full[0].contains("client=127.0.0.1:"), "{}", full[0]);
    let summary: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("more connection"))
        .collect();
    assert_eq!(summary.len(), 1, "{lines:#?}");
    assert!(
        summary[0]
            .contains("INFO refused 199 more connections from outside [server] allow_networks in ")
            && summary[0].contains(" s, from 1 address; most from unknown[127.0.0.1] (199)"),
        "{}",
        summary[0]
    );
    assert!(lines.len() < 30, "no flood in the log: {lines:#?}");
}
