//! Accounts through the binary (issue 3): first consent with `authorize`
//! (browser and paste), secret files others can read, `send-test`, and
//! SIGHUP bringing new routing and accounts to a running daemon.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::gmail::TlsMode;
use testkit::google::{Consent, browse};

use crate::fakes::{
    CLIENT_SECRET, EMAIL, FAST_DELIVERY, T, Upstream, message, metric, metrics, submit, until,
    wait_queue_empty, wait_state, with_id,
};
use crate::harness::{BASE, BIN, Daemon, Interactive, Smtp, config_in, run_cli};

/// `oauthrelay authorize --account NAME --no-browser`, read as it runs.
fn authorize(config: &std::path::Path, account: &str, paste: bool) -> Interactive {
    Interactive::start(
        config,
        &["authorize", "--account", account, "--no-browser"],
        paste,
    )
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_in_a_browser_then_the_running_daemon_sends_the_held_mail() {
    let up = Upstream::start(TlsMode::Implicit).await;
    up.google.set_consent(Consent::approve(EMAIL));
    // The default token file: <state dir>/tokens/default.json.
    let d = Daemon::start(&up.config(
        FAST_DELIVERY,
        &[up.account("default", EMAIL, &["*"], false)],
    ));
    let id = submit(
        &d,
        "a@example.com",
        &["r@example.org"],
        &message("auth1", "before consent", "x\r\n"),
    )
    .await;
    wait_state(&d, &id, "held").await;
    let (status, body) = d.http_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"account\":\"default\""), "{body}");

    let mut auth = authorize(&d.config, "default", false);
    let url = auth.wait_line(&up.google.auth_url(), T).trim().to_string();
    let visit = browse(&url, T).await.expect("the browser's visit");
    assert_eq!(visit.consent_status, 302, "{visit:?}");
    let back = visit.redirected_to.clone().unwrap();
    assert!(back.starts_with("http://127.0.0.1:"), "{back}");
    assert_eq!(visit.final_status, Some(200), "{visit:?}");
    assert!(visit.final_body.contains("Authorized"), "{visit:?}");
    let (ok, out, err) = auth.finish(T);
    assert!(ok, "authorize failed:\n{out}\n{err}");
    assert!(
        out.contains(&format!(
            "Authorized: account 'default' ({EMAIL}) now has a refresh token"
        )),
        "{out}"
    );
    assert!(
        out.contains("Next:") && out.contains("oauthrelay token status --account default"),
        "next steps: {out}"
    );
    up.assert_no_secrets("authorize's output", &format!("{out}{err}"));

    // What Google was asked for.
    let asked = up.google.last_consent_request().unwrap();
    assert_eq!(asked.get("code_challenge_method"), Some("S256"));
    assert_eq!(asked.get("access_type"), Some("offline"));
    assert_eq!(asked.get("prompt"), Some("consent"));
    assert!(asked.get("state").is_some_and(|s| s.len() >= 16));
    assert!(
        asked
            .get("redirect_uri")
            .is_some_and(|r| r.starts_with("http://127.0.0.1:"))
    );

    let token_file = d.dir.join("tokens").join("default.json");
    assert_eq!(mode(&token_file), 0o600, "token file mode");
    assert_eq!(mode(token_file.parent().unwrap()), 0o700, "token dir mode");
    let stored = std::fs::read_to_string(&token_file).unwrap();
    assert!(
        up.google
            .issued_refresh_tokens()
            .iter()
            .any(|t| stored.contains(t.as_str())),
        "the refresh token from the code exchange is stored"
    );

    // The running daemon notices the new token and sends the held mail.
    wait_queue_empty(&d, T).await;
    let msgs = up.gmail.messages();
    assert_eq!(with_id(&msgs, "auth1").len(), 1);
    assert_eq!(msgs[0].auth_user, EMAIL);
    let (status, body) = until("readyz 200", T, async || {
        match d.http_get("/readyz").await {
            (200, b) => Ok((200, b)),
            (s, b) => Err(format!("{s} {b}")),
        }
    })
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        metric(
            &metrics(&d).await,
            "oauthrelay_account_authorized{account=\"default\"}"
        ),
        1.0
    );
    up.assert_no_secrets("the daemon's log", &d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_by_pasting_the_redirect_address() {
    let up = Upstream::start(TlsMode::Implicit).await;
    up.google.set_consent(Consent::approve(EMAIL));
    let cfg = config_in(
        up.aux.path(),
        &up.config(
            FAST_DELIVERY,
            &[up.account("default", EMAIL, &["*"], false)],
        ),
    );
    let mut auth = authorize(&cfg, "default", true);
    let url = auth.wait_line(&up.google.auth_url(), T).trim().to_string();
    // The browser is on another machine: it gets Google's redirect but
    // cannot load it; the user copies the address from its address bar.
    let (status, headers, _) = testkit::google::http_get(&url, T).await.unwrap();
    assert_eq!(status, 302);
    let location = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("location"))
        .map(|(_, v)| v.clone())
        .expect("a redirect");
    assert!(location.contains("code=") && location.contains("state="));
    // A wrong paste first: explained, and the command keeps waiting.
    auth.paste("4/0AbCdEf-just-the-code");
    auth.wait_line("That is not the redirect address", T);
    auth.paste(&location);
    let (ok, out, err) = auth.finish(T);
    assert!(ok, "authorize failed:\n{out}\n{err}");
    assert!(
        out.contains("Authorized: account 'default'"),
        "{out}\n{err}"
    );
    up.assert_no_secrets("authorize's output", &format!("{out}{err}"));

    let st = run_cli(&cfg, &["token", "status", "--json"], None);
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stdout)
    );
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st[0]["authorized"], true, "{st}");
    assert_eq!(st[0]["refresh_token_stored"], true, "{st}");
    let token_file = up.aux.path().join("tokens").join("default.json");
    assert_eq!(mode(&token_file), 0o600);
    assert_eq!(mode(token_file.parent().unwrap()), 0o700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_secret_file_others_can_read_is_refused_with_the_chmod_that_fixes_it() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let secret = up.aux.path().join("default.secret");
    std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let account = up.account("default", EMAIL, &["*"], true).replace(
        &format!("client_secret = \"{CLIENT_SECRET}\"\n"),
        &format!("client_secret_file = \"{}\"\n", secret.display()),
    );
    assert!(account.contains("client_secret_file"));
    let cfg = config_in(up.aux.path(), &up.config(FAST_DELIVERY, &[account]));
    let fix = format!("chmod 600 {}", secret.display());

    let out = run_cli(&cfg, &["check-config"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check-config accepted it: {err}");
    assert!(err.contains(&fix), "names the file and the fix: {err}");

    // serve refuses to start, and says the same.
    let err = serve_refuses(&cfg);
    assert!(err.contains(&fix), "{err}");
    assert!(!err.contains(CLIENT_SECRET), "{err}");

    // The fix it names works.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run_cli(&cfg, &["check-config"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_prints_each_step_and_gmail_gets_the_message() {
    let up = Upstream::start(TlsMode::Starttls).await;
    let body = up.config(FAST_DELIVERY, &[up.account("default", EMAIL, &["*"], true)]);
    up.import(&body, "default", EMAIL);
    let cfg = config_in(up.aux.path(), &body);
    let out = run_cli(
        &cfg,
        &[
            "send-test",
            "--account",
            "default",
            "--to",
            "friend@example.org",
        ],
        None,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let port = up.gmail.port();
    for step in [
        format!("account default: {EMAIL} via 127.0.0.1:{port} (STARTTLS)"),
        "access token for default: ok".into(),
        "connected to".into(),
        "STARTTLS: 220".into(),
        "TLS established".into(),
        format!("AUTH XOAUTH2 as {EMAIL}: 235"),
        format!("MAIL FROM:<{EMAIL}>: 250"),
        "RCPT TO:<friend@example.org>: 250".into(),
        "OK: ".into(),
    ] {
        assert!(stdout.contains(&step), "no step {step:?} in:\n{stdout}");
    }
    up.assert_no_secrets("send-test's output", &format!("{stdout}{stderr}"));

    let msgs = up.gmail.wait_for_messages(1, T).await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.rcpt_to, ["friend@example.org"]);
    assert_eq!(m.mail_from, EMAIL);
    assert_eq!(m.auth_user, EMAIL);
    let mid = m.message_id.clone().unwrap();
    assert!(
        stdout.contains(&format!("(Message-ID {mid})")),
        "prints the Message-ID Gmail got ({mid}):\n{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_new_senders_and_a_new_account() {
    const SECOND: &str = "other.sender@gmail.com";
    let up = Upstream::start(TlsMode::Implicit).await;
    let first = |senders: &[&str]| up.account("default", EMAIL, senders, true);
    let second = up.account("second", SECOND, &["*@other.org"], true);
    // Both accounts' tokens exist; the daemon starts with only the first.
    let both = up.config(FAST_DELIVERY, &[first(&["*@example.com"]), second.clone()]);
    up.import(&both, "default", EMAIL);
    up.import(&both, "second", SECOND);
    let d = Daemon::start(&up.config(FAST_DELIVERY, &[first(&["*@example.com"])]));

    let mut s = Smtp::open(d.smtp).await;
    s.cmd("EHLO e2e.test").await;
    let r = s.cmd("MAIL FROM:<app@other.org>").await;
    assert!(r.starts_with("550 5.7.1"), "no account takes it yet: {r}");
    s.cmd("QUIT").await;

    // Add the second account and narrow the first; reload.
    config_in(&d.dir, &both);
    d.signal("HUP");
    d.wait_log("configuration reloaded", T);
    submit(
        &d,
        "app@other.org",
        &["r@example.org"],
        &message("hup-other", "via second", "x\r\n"),
    )
    .await;
    submit(
        &d,
        "app@example.com",
        &["r@example.org"],
        &message("hup-example", "via default", "x\r\n"),
    )
    .await;
    wait_queue_empty(&d, T).await;
    let msgs = up.gmail.messages();
    assert_eq!(with_id(&msgs, "hup-other")[0].auth_user, SECOND);
    assert_eq!(with_id(&msgs, "hup-example")[0].auth_user, EMAIL);

    // The other way: example.com is no longer routed anywhere.
    config_in(
        &d.dir,
        &up.config(FAST_DELIVERY, &[first(&["*@other.org"]), second]),
    );
    d.signal("HUP");
    until("the second reload", T, async || {
        let n = d.logs().matches("configuration reloaded").count();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} reloads"))
        }
    })
    .await;
    let mut s = Smtp::open(d.smtp).await;
    s.cmd("EHLO e2e.test").await;
    let r = s.cmd("MAIL FROM:<app@example.com>").await;
    assert!(r.starts_with("550 5.7.1"), "refused after the reload: {r}");
    s.cmd("QUIT").await;

    // A broken file is logged and the running configuration kept (the
    // queue commands read the file too, so watch Gmail instead).
    config_in(&d.dir, "[delivery]\nconcurency = 4\n");
    d.signal("HUP");
    d.wait_log("configuration not reloaded", T);
    let mut s = Smtp::open(d.smtp).await;
    s.cmd("EHLO e2e.test").await;
    let r = s.cmd("MAIL FROM:<app@example.com>").await;
    assert!(r.starts_with("550 5.7.1"), "routing unchanged: {r}");
    s.cmd("QUIT").await;
    submit(
        &d,
        "app@other.org",
        &["r@example.org"],
        &message("hup-kept", "still routed", "x\r\n"),
    )
    .await;
    until("hup-kept delivered", T, async || {
        match with_id(&up.gmail.messages(), "hup-kept").len() {
            1 => Ok(()),
            n => Err(format!("{n} copies")),
        }
    })
    .await;

    // A file without its accounts, or emptied (an editor's half-done
    // save), is refused the same way: it would drop every account.
    config_in(&d.dir, BASE);
    d.signal("HUP");
    d.wait_log("no [[accounts]] any more", T);
    std::fs::write(d.dir.join("oauthrelay.toml"), "").unwrap();
    d.signal("HUP");
    d.wait_log("the configuration file is empty", T);
    submit(
        &d,
        "app@other.org",
        &["r@example.org"],
        &message("hup-empty", "still routed", "x\r\n"),
    )
    .await;
    until("hup-empty delivered", T, async || {
        match with_id(&up.gmail.messages(), "hup-empty").len() {
            1 => Ok(()),
            n => Err(format!("{n} copies")),
        }
    })
    .await;
}

/// `oauthrelay --config CFG ARGS` with `$CREDENTIALS_DIRECTORY` set to
/// `credentials` (as systemd sets it for the unit), or unset (a command
/// run by hand).
fn cli_with_credentials(
    cfg: &std::path::Path,
    args: &[&str],
    credentials: Option<&std::path::Path>,
) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("STATE_DIRECTORY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null());
    if let Some(dir) = credentials {
        cmd.env("CREDENTIALS_DIRECTORY", dir);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Start `serve`, expect it to exit non-zero by itself; its stderr.
fn serve_refuses(cfg: &std::path::Path) -> String {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(cfg)
        .arg("serve")
        .env_remove("STATE_DIRECTORY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > T {
            let _ = child.kill();
            panic!("serve started");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "serve must exit non-zero: {err}");
    err
}

/// The setup docs/gmail-setup.md and the unit describe: the secret in a
/// root-only file named by `client_secret_file`, loaded into the unit as
/// the credential `default.client_secret` (systemd makes it 0440: root's
/// file, read access for the dynamic user by ACL). Inside the unit the
/// credential is used; the commands run by hand read the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_setup_credential_in_the_unit_and_the_same_file_for_the_commands() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let secret = up.aux.path().join("default.secret");
    let creds = up.aux.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let credential = creds.join("default.client_secret");
    let account = |source: &str| {
        up.account("default", EMAIL, &["*"], true)
            .replace(&format!("client_secret = \"{CLIENT_SECRET}\"\n"), source)
    };
    let with_file = account(&format!("client_secret_file = \"{}\"\n", secret.display()));
    let cfg = config_in(up.aux.path(), &up.config(FAST_DELIVERY, &[with_file]));

    // Which one is read shows at Google: the file holds a wrong secret, the
    // credential the right one (then the other way round).
    std::fs::write(&secret, "GOCSPX-wrong\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&credential, format!("{CLIENT_SECRET}\n")).unwrap();
    std::fs::set_permissions(&credential, std::fs::Permissions::from_mode(0o440)).unwrap();
    let (ok, out, err) = cli_with_credentials(&cfg, &["check-config"], Some(&creds));
    assert!(
        ok,
        "the unit's view, credential 0440 and the file:\n{out}\n{err}"
    );
    // (import clears any cached access token: send-test must refresh, with
    // the client secret.)
    let import = || {
        let refresh = up
            .google
            .issue_refresh_token(crate::fakes::CLIENT_ID, EMAIL);
        let out = run_cli(
            &cfg,
            &["token", "import", "--account", "default"],
            Some(format!("{refresh}\n").as_bytes()),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    import();
    let send = [
        "send-test",
        "--account",
        "default",
        "--to",
        "friend@example.org",
    ];
    let (ok, out, err) = cli_with_credentials(&cfg, &send, Some(&creds));
    assert!(ok, "send-test with the credential's secret:\n{out}\n{err}");

    // By hand (sudo oauthrelay ...): no $CREDENTIALS_DIRECTORY, the file.
    std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
    std::fs::write(&credential, "GOCSPX-wrong\n").unwrap();
    import();
    let (ok, out, err) = cli_with_credentials(&cfg, &send, None);
    assert!(ok, "send-test with the file's secret:\n{out}\n{err}");
    up.assert_no_secrets("send-test's output", &format!("{out}{err}"));
}

/// With the secret only as a credential, the commands run by hand cannot
/// see it. `token status` and `token import` do not need it; `authorize`
/// does, and says what to add. Other accounts' problems (a secret file
/// others can read, a token directory others can write) do not stop the
/// commands for this one, and check-config reports every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_commands_work_without_the_client_secret_and_despite_other_broken_accounts() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let inline = format!("client_secret = \"{CLIENT_SECRET}\"\n");
    let only_credential = up
        .account("default", EMAIL, &["*"], true)
        .replace(&inline, "");
    let bad_secret = up.aux.path().join("other.secret");
    std::fs::write(&bad_secret, "GOCSPX-x\n").unwrap();
    std::fs::set_permissions(&bad_secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let readable_secret = up
        .account("other", "other@gmail.com", &["*@other.org"], true)
        .replace(
            &inline,
            &format!("client_secret_file = \"{}\"\n", bad_secret.display()),
        );
    let open_dir = up.aux.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let writable_dir = format!(
        "{}token_file = \"{}\"\n",
        up.account("third", "third@gmail.com", &["*@third.org"], false),
        open_dir.join("third.json").display()
    );
    let cfg = config_in(
        up.aux.path(),
        &up.config(
            FAST_DELIVERY,
            &[only_credential, readable_secret, writable_dir],
        ),
    );

    let refresh = up
        .google
        .issue_refresh_token(crate::fakes::CLIENT_ID, EMAIL);
    let out = run_cli(
        &cfg,
        &["token", "import", "--account", "default"],
        Some(format!("{refresh}\n").as_bytes()),
    );
    assert!(
        out.status.success(),
        "token import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, out, err) = cli_with_credentials(
        &cfg,
        &["token", "status", "--account", "default", "--json"],
        None,
    );
    assert!(ok, "token status --account default:\n{out}\n{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st[0]["account"], "default");
    assert_eq!(st[0]["refresh_token_stored"], true, "{st}");
    assert_eq!(st[0]["authorized"], true, "{st}");

    // All accounts: those that resolve are listed (a secret is not needed
    // for that), the one that does not is named with its fix; exit 1.
    let (ok, out, err) = cli_with_credentials(&cfg, &["token", "status"], None);
    assert!(!ok, "{out}\n{err}");
    assert!(out.contains(&format!("default <{EMAIL}>")), "{out}");
    assert!(out.contains("other <other@gmail.com>"), "{out}");
    assert!(
        err.contains(&format!("chmod go-w {}", open_dir.display())),
        "{err}"
    );

    // check-config names every problem, not just the first.
    let (ok, out, err) = cli_with_credentials(&cfg, &["check-config"], None);
    assert!(!ok, "{out}\n{err}");
    for problem in [
        "no client secret".to_string(),
        format!("chmod 600 {}", bad_secret.display()),
        format!("chmod go-w {}", open_dir.display()),
    ] {
        assert!(err.contains(&problem), "no {problem:?} in:\n{err}");
    }

    // authorize needs the secret: a clear error about this account only.
    let (ok, out, err) = cli_with_credentials(
        &cfg,
        &["authorize", "--account", "default", "--no-browser"],
        None,
    );
    assert!(!ok, "{out}\n{err}");
    assert!(
        err.contains("no client secret")
            && err.contains("$CREDENTIALS_DIRECTORY is not set")
            && err.contains("LoadCredential=default.client_secret:FILE")
            && err.contains("client_secret_file"),
        "{err}"
    );
    assert!(!err.contains("other.secret"), "{err}");
}

/// An inline client_secret makes the config file a secret file: readable
/// by group or others, it is refused (check-config, serve), naming the file
/// and the chmod; the fix works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_client_secret_in_a_config_others_can_read_is_refused() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let cfg = config_in(
        up.aux.path(),
        &up.config(FAST_DELIVERY, &[up.account("default", EMAIL, &["*"], true)]),
    );
    let fix = format!("chmod 600 {}", cfg.display());
    for m in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(m)).unwrap();
        let (ok, out, err) = cli_with_credentials(&cfg, &["check-config"], None);
        assert!(!ok, "check-config accepted a {m:o} config:\n{out}\n{err}");
        assert!(
            err.starts_with(&format!("{}:", cfg.display())) && err.contains(&fix),
            "names the file, the line and the fix: {err}"
        );
        assert!(
            err.contains("client_secret_file") && err.contains("default.client_secret"),
            "names the other ways: {err}"
        );
        assert!(!err.contains(CLIENT_SECRET), "{err}");
    }
    let err = serve_refuses(&cfg);
    assert!(err.contains(&fix), "{err}");
    assert!(!err.contains(CLIENT_SECRET), "{err}");

    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, out, err) = cli_with_credentials(&cfg, &["check-config"], None);
    assert!(ok, "{out}\n{err}");

    // Without an inline secret the config may be readable by all.
    let secret = up.aux.path().join("default.secret");
    std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let account = up.account("default", EMAIL, &["*"], true).replace(
        &format!("client_secret = \"{CLIENT_SECRET}\"\n"),
        &format!("client_secret_file = \"{}\"\n", secret.display()),
    );
    let cfg = config_in(up.aux.path(), &up.config(FAST_DELIVERY, &[account]));
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out, err) = cli_with_credentials(&cfg, &["check-config"], None);
    assert!(ok, "{out}\n{err}");
}

/// `token import` on a terminal: the pasted refresh token is not echoed
/// (like `hash-password`), and the terminal gets its echo back afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_import_on_a_terminal_does_not_echo_the_token() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let up = Upstream::start(TlsMode::Implicit).await;
    let cfg = config_in(
        up.aux.path(),
        &up.config(FAST_DELIVERY, &[up.account("default", EMAIL, &["*"], true)]),
    );
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two new descriptors; the rest may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both are fresh descriptors we own.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let echo = |fd: &OwnedFd| {
        // SAFETY: termios is plain data; fd is a terminal.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
        t.c_lflag & libc::ECHO != 0
    };
    assert!(echo(&master), "a fresh terminal echoes");

    let child = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .args(["token", "import", "--account", "default"])
        .env_remove("STATE_DIRECTORY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::from(slave))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Type only once the command has turned the echo off (the terminal
    // echoes what arrives while it is on); give up waiting after a while,
    // and type anyway.
    let start = Instant::now();
    while echo(&master) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let refresh = up
        .google
        .issue_refresh_token(crate::fakes::CLIENT_ID, EMAIL);
    let mut typing = std::fs::File::from(master.try_clone().unwrap());
    typing.write_all(format!("{refresh}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(echo(&master), "echo restored after the command");

    // Everything the terminal showed: the typed line must not be there.
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut shown = Vec::new();
    let mut buf = [0u8; 4096];
    let mut reader = std::fs::File::from(master);
    while let Ok(n) = std::io::Read::read(&mut reader, &mut buf) {
        if n == 0 {
            break;
        }
        shown.extend_from_slice(&buf[..n]);
    }
    let shown = String::from_utf8_lossy(&shown);
    assert!(
        !shown.contains(&refresh[..16]),
        "the terminal echoed the refresh token: {shown:?}"
    );
    assert!(
        stderr.contains("not shown"),
        "a prompt that says so: {stderr}"
    );
    let stored = std::fs::read_to_string(up.token_file("default")).unwrap();
    assert!(stored.contains(&refresh), "the token was stored");
}
