//! The command line as a newcomer meets it (issue 15): `check-config`
//! names every problem at once, each at its key; `token import` tries the
//! token before storing it; `token status` reads as text; `queue show
//! --json`; `queue list` flags like mailq, with a hold reason said once.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use crate::fakes::{CLIENT_ID, EMAIL, FAST_DELIVERY, T, Upstream, submit, until};
use crate::harness::{BASE, BIN, Daemon, config_in, run_cli};
use testkit::gmail::TlsMode;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The line (1-based) of the first line of `cfg` containing `needle`, and
/// the column of `at` on it.
fn place(cfg: &std::path::Path, needle: &str, at: &str) -> String {
    let body = std::fs::read_to_string(cfg).unwrap();
    let (i, line) = body
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in {body}"));
    let col = line.find(at).unwrap() + 1;
    format!("{}:{}:{col}: ", cfg.display(), i + 1)
}

#[test]
fn check_config_names_every_problem_at_its_key_in_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let secret = dir.join("client.secret");
    std::fs::write(&secret, "GOCSPX-x\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let token = dir.join("default.json");
    std::fs::write(&token, "{}").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let key = dir.join("tls.key");
    std::fs::write(&key, "not a key").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let body = format!(
        "[server]
listen = [\"localhost:25\"]
max_recipients = \"many\"

[server.tls]
cert_file = \"{d}/missing-cert.pem\"
key_file = \"{d}/tls.key\"

[delivery]
concurency = 4

[[accounts]]
name = \"default\"
email = \"me@example.com\"
client_id = \"{CLIENT_ID}\"
client_secret_file = \"{d}/client.secret\"
token_file = \"{d}/default.json\"
ca_file = \"{d}/missing-ca.pem\"
",
        d = dir.display()
    );
    let cfg = config_in(dir, &body);
    let out = run_cli(&cfg, &["check-config"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    for (needle, at, what) in [
        ("listen = ", "[", "host names are not accepted"),
        ("max_recipients", "\"many\"", "invalid type"),
        ("cert_file", "\"", "cannot read TLS certificate file"),
        ("key_file", "\"", "chmod o-rwx"),
        ("concurency", "concurency", "did you mean `concurrency`?"),
        (
            "client_secret_file",
            "\"",
            &format!("chmod 600 {}", secret.display()),
        ),
        (
            "token_file",
            "\"",
            &format!("chmod 600 {}", token.display()),
        ),
        ("ca_file", "\"", "missing-ca.pem"),
    ] {
        let at = place(&cfg, needle, at);
        assert!(
            err.lines().any(|l| l.starts_with(&at) && l.contains(what)),
            "no {what:?} at {at:?} in:\n{err}"
        );
    }
    assert!(err.contains("8 problems found"), "{err}");

    // `serve` refuses to start with the same words (exit 78).
    let out = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "serve"])
        .env_remove("STATE_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let log = text(&out.stderr);
    assert!(log.contains("did you mean `concurrency`?"), "{log}");

    // With the value errors fixed, the file problems are what is left, and
    // serve names them the way check-config does.
    let fixed = body
        .replace("\"localhost:25\"", "\"127.0.0.1:0\"")
        .replace("max_recipients = \"many\"", "max_recipients = 10")
        .replace("concurency", "concurrency");
    let cfg = config_in(dir, &format!("{fixed}\n[metrics]\nlisten = \"\"\n"));
    let check = text(&run_cli(&cfg, &["check-config"], None).stderr);
    let out = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "serve"])
        .env_remove("STATE_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    let log = text(&out.stderr);
    for line in check
        .lines()
        .filter(|l| l.starts_with(&*cfg.to_string_lossy()))
    {
        assert!(log.contains(line), "serve does not say {line:?}:\n{log}");
    }
}

#[test]
fn check_config_prints_every_effective_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(
        tmp.path(),
        &format!(
            "{BASE}\n[[accounts]]\nname = \"default\"\nemail = \"{EMAIL}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"x\"\n"
        ),
    );
    let out = run_cli(&cfg, &["check-config"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let effective = text(&out.stdout);
    let tokens = tmp.path().join("tokens").join("default.json");
    for line in [
        "hostname = ".to_string(),
        format!("token_file = \"{}\"", tokens.display()),
        format!("state_dir = \"{}\"", tmp.path().display()),
        format!("dir = \"{}\"", tmp.path().join("spool").display()),
    ] {
        assert!(effective.contains(&line), "no {line:?} in:\n{effective}");
    }
    // What it prints is itself a valid configuration.
    let again = tmp.path().join("effective.toml");
    testkit::daemon::write_private(&again, &effective).unwrap();
    let out = run_cli(&again, &["check-config"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_import_tries_the_token_and_refuses_a_revoked_one() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let body = up.config(FAST_DELIVERY, &[up.account("default", EMAIL, &["*"], true)]);
    let cfg = config_in(up.aux.path(), &body);
    let token_file = up.token_file("default");

    // Revoked: refused, nothing stored.
    let revoked = up.google.issue_refresh_token(CLIENT_ID, EMAIL);
    up.google.revoke_refresh_token(&revoked);
    let out = run_cli(
        &cfg,
        &["token", "import", "--account", "default"],
        Some(format!("{revoked}\n").as_bytes()),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("invalid_grant") && err.contains("nothing was stored"),
        "{err}"
    );
    assert!(
        err.contains("oauthrelay authorize --account default"),
        "{err}"
    );
    assert!(!err.contains(&revoked), "the token is never printed: {err}");
    assert!(!token_file.exists(), "a refused token was stored");

    // Good: tried, stored.
    let good = up.google.issue_refresh_token(CLIENT_ID, EMAIL);
    let out = run_cli(
        &cfg,
        &["token", "import", "--account", "default"],
        Some(format!("{good}\n").as_bytes()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("tried it"),
        "{}",
        text(&out.stdout)
    );
    assert!(token_file.exists());

    // The endpoint cannot be reached: stored, with a warning.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let unreachable = body.replace(
        &up.google.token_url(),
        &format!("http://127.0.0.1:{port}/token"),
    );
    assert_ne!(unreachable, body);
    let cfg = config_in(up.aux.path(), &unreachable);
    let other = up.google.issue_refresh_token(CLIENT_ID, EMAIL);
    let out = run_cli(
        &cfg,
        &["token", "import", "--account", "default"],
        Some(format!("{other}\n").as_bytes()),
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning") && err.contains("could not reach the token endpoint"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_status_reads_as_text() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let d = up.relay("");
    submit(
        &d,
        "app@example.com",
        &["x@example.org"],
        b"Subject: s\r\n\r\nb\r\n",
    )
    .await;
    let status = until("a refresh in token status", T, async || {
        let s = text(&d.cli(&["token", "status"], None).stdout);
        if s.contains("last refresh:") {
            Ok(s)
        } else {
            Err(s)
        }
    })
    .await;
    assert!(!status.contains('{') && !status.contains('"'), "{status}");
    let line = status
        .lines()
        .find(|l| l.contains("last refresh:"))
        .unwrap();
    assert!(line.trim_end().ends_with(", ok"), "{line}");
    assert!(
        status.contains("access token:      valid until "),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_show_json_and_queue_list_marks_held_mail_and_says_why_once() {
    let up = Upstream::start(TlsMode::Implicit).await;
    // No token: the account needs authorization, its mail is held.
    let body = up.config(FAST_DELIVERY, &[up.account("default", EMAIL, &["*"], true)]);
    let d = Daemon::start(&body);
    let one = submit(
        &d,
        "app@example.com",
        &["a@example.org"],
        b"Subject: one\r\n\r\n1\r\n",
    )
    .await;
    let two = submit(
        &d,
        "app@example.com",
        &["b@example.org"],
        b"Subject: two\r\n\r\n2\r\n",
    )
    .await;
    let list = until("both messages held", T, async || {
        let s = text(&d.cli(&["queue", "list"], None).stdout);
        if s.matches("(held").count() == 2 {
            Ok(s)
        } else {
            Err(s)
        }
    })
    .await;
    for id in [&one, &two] {
        assert!(
            list.lines().any(|l| l.starts_with(&format!("{id:<15}! "))),
            "{id} not flagged `!`:\n{list}"
        );
    }
    assert_eq!(
        list.matches("needs authorization").count(),
        1,
        "the reason once:\n{list}"
    );
    assert!(list.contains("above)"), "{list}");

    let out = d.cli(&["queue", "show", &one, "--json"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["entry"]["id"], one.as_str());
    assert_eq!(v["entry"]["state"], "held");
    assert_eq!(v["envelope"]["recipients"][0], "a@example.org");
    assert!(
        v["headers"].as_str().unwrap().contains("Subject: one"),
        "{v}"
    );
}
