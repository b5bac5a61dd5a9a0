//! The command line as a sysadmin meets it: check-config, sendmail, queue
//! commands with and without a running daemon, running with no config.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{BASE, BIN, Daemon, config_in, run_cli};

#[test]
fn check_config_reports_file_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(
        tmp.path(),
        "[server]\nlisten = [\"127.0.0.1:2525\"]\nmax_message_size = \"lots\"\n",
    );
    let out = run_cli(&cfg, &["check-config"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let expected = format!("{}:4:", cfg.display());
    assert!(
        err.starts_with(&expected) && err.contains("invalid size"),
        "{err}"
    );

    let cfg = config_in(tmp.path(), "[delivery]\nconcurency = 4\n");
    let out = run_cli(&cfg, &["check-config"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":3:1: unknown key `concurency`; did you mean `concurrency`?"),
        "{err}"
    );
}

#[test]
fn check_config_points_at_the_limit_that_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    // Line 1 is state_dir (config_in), line 2 the [server] header.
    for (body, line, key) in [
        (
            "[server]\nlisten = [\"127.0.0.1:0\"]\ncommand_timeout = \"0s\"\n",
            4,
            "command_timeout",
        ),
        ("[server]\ndata_timeout = \"0s\"\n", 3, "data_timeout"),
        ("[server]\nmax_recipients = 0\n", 3, "max_recipients"),
        ("[server]\nmax_line_length = 100\n", 3, "max_line_length"),
    ] {
        let cfg = config_in(tmp.path(), body);
        let out = run_cli(&cfg, &["check-config"], None);
        assert_eq!(out.status.code(), Some(1), "{body}");
        let err = String::from_utf8_lossy(&out.stderr);
        let col = body.lines().nth(line - 2).unwrap().find(" = ").unwrap() + 4;
        assert!(
            err.starts_with(&format!("{}:{line}:{col}: ", cfg.display())) && err.contains(key),
            "{body}: {err}"
        );
    }
}

#[test]
fn the_example_config_is_valid_and_documents_every_key() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/oauthrelay.example.toml"
    );
    let out = Command::new(BIN)
        .args(["--config", example, "check-config"])
        .env_remove("STATE_DIRECTORY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective = String::from_utf8_lossy(&out.stdout);
    let text = std::fs::read_to_string(example).unwrap();
    // Every key the program knows appears (commented) in the example.
    for line in effective.lines() {
        let Some((key, _)) = line.split_once(" = ") else {
            continue;
        };
        let key = key.trim();
        assert!(
            text.contains(&format!("# {key} = ")) || text.contains(&format!("{key} = ")),
            "config/oauthrelay.example.toml does not document `{key}`"
        );
    }
    for key in [
        "cert_file",
        "key_file",
        "password_hash",
        "client_id",
        "client_secret",
        "client_secret_file",
        "token_file",
        "senders",
        "rewrite_from",
        "service_account_key_file",
        "smtp_host",
        "smtp_port",
        "smtp_tls",
        "ca_file",
        "auth_url",
        "token_url",
        "scopes",
        "transport",
        "api_url",
        "max_rate",
        "envelope_from",
        "provider",
        "tenant",
        "device_auth_url",
        "concurrency",
        "client_certificate_file",
        "client_certificate_key_file",
    ] {
        assert!(text.contains(&format!("{key} = ")), "example lacks {key}");
    }
}

#[test]
fn check_config_redacts_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(
        tmp.path(),
        "[[accounts]]\nname = \"default\"\nemail = \"me@gmail.com\"\nclient_id = \"1.apps.googleusercontent.com\"\nclient_secret = \"GOCSPX-do-not-print-me\"\n",
    );
    // A file with an inline secret must be private.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run_cli(&cfg, &["check-config"], None);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert!(!all.contains("do-not-print-me"), "{all}");
    assert!(all.contains("<redacted>"), "{all}");
}

#[test]
fn check_config_redacts_password_hashes() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = config_in(tmp.path(), "");
    let out = run_cli(&empty, &["hash-password"], Some(b"printer-password\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let cfg = config_in(
        tmp.path(),
        &format!("[[server.users]]\nname = \"printer\"\npassword_hash = \"{hash}\"\n"),
    );
    let out = run_cli(&cfg, &["check-config"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{all}");
    // The salt and digest (everything after the parameters) never appear.
    let digest = hash.rsplit('$').next().unwrap();
    assert!(!all.contains(digest), "{all}");
    assert!(!all.contains("$argon2id$"), "{all}");
    assert!(
        stdout.contains("name = \"printer\"") && stdout.contains("password_hash = \"<redacted>\""),
        "{stdout}"
    );
}

#[test]
fn check_config_refuses_a_plaintext_password() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(
        tmp.path(),
        "[[server.users]]\nname = \"printer\"\npassword_hash = \"hunter2\"\n",
    );
    let out = run_cli(&cfg, &["check-config"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    // config_in puts `state_dir` on line 1: the value is on line 4.
    assert!(
        err.starts_with(&format!("{}:4:", cfg.display())),
        "the error points at password_hash: {err}"
    );
    assert!(
        err.contains("not a PHC hash") && err.contains("oauthrelay hash-password"),
        "{err}"
    );
    assert!(
        !err.contains("hunter2"),
        "the password is not echoed: {err}"
    );
    assert!(out.stdout.is_empty(), "no effective settings printed");
}

#[tokio::test]
async fn sendmail_queues_through_the_daemon_and_without_it() {
    let mut d = Daemon::start(BASE);
    let out = d.cli(
        &["sendmail", "-t", "-oi", "-f", "cron@example.com"],
        Some(b"To: ops@example.com\nBcc: hidden@example.com\nSubject: cron\n\nline\n.\nstill body with -oi\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = d.cli(&["queue", "list", "--json"], None);
    let q: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(q[0]["from"], "cron@example.com");
    assert_eq!(
        q[0]["recipients"],
        serde_json::json!(["ops@example.com", "hidden@example.com"])
    );
    let shown = String::from_utf8_lossy(
        &d.cli(&["queue", "show", q[0]["id"].as_str().unwrap()], None)
            .stdout,
    )
    .into_owned();
    assert!(!shown.contains("Bcc:"), "Bcc removed: {shown}");
    assert!(
        shown.contains("From: cron@example.com"),
        "From added: {shown}"
    );

    // Usage errors are 64.
    let out = d.cli(&["sendmail", "-Q"], Some(b""));
    assert_eq!(out.status.code(), Some(64));
    let out = d.cli(&["sendmail"], Some(b"Subject: x\n\ny\n"));
    assert_eq!(out.status.code(), Some(64), "no recipients");

    // With the daemon stopped, sendmail still queues (like Postfix's maildrop).
    assert!(d.terminate(Duration::from_secs(20)).success());
    let out = run_cli(
        &d.config,
        &["sendmail", "late@example.com"],
        Some(b"Subject: while down\n\nqueued anyway\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = run_cli(&d.config, &["queue", "list", "--json"], None);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let q: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(q.as_array().unwrap().len(), 2, "{q}");
    assert_eq!(q[1]["recipients"], serde_json::json!(["late@example.com"]));
}

#[tokio::test]
async fn queue_commands_work_with_and_without_the_daemon() {
    let mut d = Daemon::start(BASE);
    let mut s = crate::harness::Smtp::open(d.smtp).await;
    s.cmd("EHLO q").await;
    let r1 = s
        .mail(
            "a@example.com",
            &["b@example.com"],
            b"Subject: one\r\n\r\n1\r\n",
        )
        .await;
    let r2 = s
        .mail(
            "a@example.com",
            &["c@example.com"],
            b"Subject: two\r\n\r\n2\r\n",
        )
        .await;
    let (id1, id2) = (
        crate::harness::queued_id(&r1),
        crate::harness::queued_id(&r2),
    );

    let text = String::from_utf8_lossy(&d.cli(&["queue", "list"], None).stdout).into_owned();
    assert!(
        text.contains(&id1) && text.contains("b@example.com") && text.contains("2 Requests"),
        "{text}"
    );
    let out = d.cli(&["queue", "delete", &id1], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.cli(&["queue", "delete", &id1], None);
    assert!(!out.status.success(), "deleting twice is an error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no message"));
    assert!(d.cli(&["queue", "retry", &id2], None).status.success());
    assert!(d.cli(&["queue", "retry", "--all"], None).status.success());
    assert!(
        !d.cli(&["queue", "show", "not-an-id"], None)
            .status
            .success()
    );

    assert!(d.terminate(Duration::from_secs(20)).success());
    // Offline: the spool is opened directly.
    let out = run_cli(&d.config, &["queue", "list", "--json"], None);
    let q: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(q.as_array().unwrap().len(), 1);
    assert_eq!(q[0]["id"], id2.as_str());
    assert!(
        run_cli(&d.config, &["queue", "delete", &id2], None)
            .status
            .success()
    );
    let out = run_cli(&d.config, &["queue", "list"], None);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Mail queue is empty"));
}

/// Run `oauthrelay serve` with no configuration file anywhere (HOME is
/// `home`, `STATE_DIRECTORY` as given) until it logs `ready`, then SIGTERM
/// it. The log and exit status; `None` when the default port is taken.
fn serve_without_config(
    home: &std::path::Path,
    state_directory: Option<&std::path::Path>,
) -> Option<(String, std::process::ExitStatus)> {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_DATA_HOME")
        .env_remove("OAUTHRELAY_CONFIG")
        .env_remove("STATE_DIRECTORY")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped());
    if let Some(dir) = state_directory {
        cmd.env("STATE_DIRECTORY", dir);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut g = lines.lock().unwrap();
                g.push_str(&l);
                g.push('\n');
            }
        })
    };
    let start = std::time::Instant::now();
    while !lines.lock().unwrap().contains("ready") && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().unwrap();
    // The last lines: the reader ends at the end of the daemon's stderr.
    reader.join().unwrap();
    let log = lines.lock().unwrap().clone();
    if log.contains("Address already in use") {
        // Something else (a real relay?) holds the default port.
        eprintln!("!!!! SKIPPED: 127.0.0.1:2525 is in use on this machine !!!!");
        return None;
    }
    Some((log, status))
}

#[test]
fn serve_runs_with_no_config_file_at_all() {
    // Both runs bind the default port 127.0.0.1:2525, so they are one test
    // (tests run in parallel).
    let home = tempfile::tempdir().unwrap();
    let Some((log, status)) = serve_without_config(home.path(), None) else {
        return;
    };
    assert!(log.contains("SMTP listening on 127.0.0.1:2525"), "{log}");
    let spool = home.path().join(".local/share/oauthrelay/spool");
    assert!(
        log.contains(&spool.display().to_string()),
        "spool in the per-user data dir: {log}"
    );
    assert!(spool.join("lock").exists());
    assert!(status.success(), "{log}");

    // Under systemd (StateDirectory=): the spool goes under
    // $STATE_DIRECTORY (the first one, when several are passed), not HOME.
    let home = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let both = std::ffi::OsString::from(format!(
        "{}:{}",
        state.path().display(),
        home.path().join("second").display()
    ));
    let Some((log, status)) = serve_without_config(home.path(), Some(std::path::Path::new(&both)))
    else {
        return;
    };
    let spool = state.path().join("spool");
    assert!(
        log.contains(&format!("spool {}:", spool.display())),
        "spool under $STATE_DIRECTORY, as logged: {log}"
    );
    assert!(spool.join("lock").exists(), "{log}");
    assert!(
        !home.path().join(".local").exists() && !home.path().join("second").exists(),
        "nothing in the per-user data dir or the second state directory"
    );
    assert!(status.success(), "{log}");
}

#[tokio::test]
async fn a_second_daemon_on_the_same_spool_refuses_to_start() {
    let d = Daemon::start(BASE);
    let spool = d.dir.join("spool");
    let mut second = Command::new(BIN)
        .arg("--config")
        .arg(&d.config)
        .arg("serve")
        .env_remove("STATE_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = second.kill();
            panic!("a second daemon on the same spool kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "spool {} is in use by another oauthrelay process (pid {})",
            spool.display(),
            d.pid()
        )),
        "names the spool and the process holding its lock: {err}"
    );
    assert!(!err.contains("SMTP listening"), "it never listened: {err}");

    // The first one is unharmed: it still takes mail and holds the lock.
    let mut s = crate::harness::Smtp::open(d.smtp).await;
    s.cmd("EHLO first").await;
    let r = s
        .mail(
            "a@example.com",
            &["b@example.com"],
            b"Subject: still here\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let lock = std::fs::read_to_string(spool.join("lock")).unwrap();
    assert_eq!(lock.trim(), d.pid().to_string());
}
