//! `sendmail` as its callers run it (issue 8 items 1, 2, 5; issue 10 item
//! 1): each caller's exact command line through a link named `sendmail`,
//! the `mailq` and `newaliases` links, Symfony's `-bs` dialogue, local
//! names through an aliases file, injection payloads, and a user other than
//! root submitting while the daemon is stopped (the maildrop). Every
//! message is checked at the fake Gmail: exactly once, at the alias target
//! where the recipient was `root`, and nothing else.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use testkit::gmail::{ReceivedMessage, TlsMode};

use crate::fakes::{EMAIL, FAST_DELIVERY, T, Upstream, wait_queue_empty};
use crate::harness::{BIN, Daemon, have_tool};

const DOMAIN: &str = "host.e2e.test";
const ADMIN: &str = "admin@example.org";

/// Links named `sendmail`, `mailq` and `newaliases` to the binary.
fn links(dir: &Path) {
    for name in ["sendmail", "mailq", "newaliases"] {
        std::os::unix::fs::symlink(BIN, dir.join(name)).unwrap();
    }
}

/// Run `dir/link ARGS` with `stdin`, the config named by
/// `$OAUTHRELAY_CONFIG` (a link gets no --config).
fn run(dir: &Path, link: &str, config: &Path, args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(dir.join(link))
        .args(args)
        .env("OAUTHRELAY_CONFIG", config)
        .env_remove("STATE_DIRECTORY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let _ = input.write_all(stdin);
    drop(input);
    child.wait_with_output().unwrap()
}

fn show(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A relay with one account, `[local]` with DOMAIN and an aliases file
/// (`root` -> ADMIN); `extra` is appended to `[local]`.
async fn relay(up: &Upstream, extra: &str) -> Daemon {
    let aliases = up.aux.path().join("aliases");
    std::fs::write(
        &aliases,
        format!("# test aliases\npostmaster: root\nroot: {ADMIN}\n"),
    )
    .unwrap();
    let config = format!(
        "{}\n[local]\ndomain = \"{DOMAIN}\"\naliases = \"{}\"\n{extra}",
        up.config(FAST_DELIVERY, &[up.account("default", EMAIL, &["*"], true)]),
        aliases.display()
    );
    up.import(&config, "default", EMAIL);
    Daemon::start(&config)
}

fn message(subject: &str, headers: &str) -> Vec<u8> {
    format!(
        "{headers}Subject: {subject}\nMessage-ID: <{subject}@e2e.test>\n\nbody of {subject}\n.leading dot\n"
    )
    .into_bytes()
}

fn with_subject<'a>(msgs: &'a [ReceivedMessage], subject: &str) -> Vec<&'a ReceivedMessage> {
    msgs.iter()
        .filter(|m| m.header("Subject").as_deref() == Some(subject))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_callers_command_line_through_the_links() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let d = relay(&up, "").await;
    let bin = tempfile::tempdir().unwrap();
    links(bin.path());
    let cfg = d.config.clone();

    // (subject, args, headers, where it must arrive)
    let cases: Vec<(&str, Vec<&str>, String, Vec<&str>)> = vec![
        (
            "debian-cron-unset",
            vec!["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
            "From: root (Cron Daemon)\nTo: root\n".into(),
            vec![ADMIN],
        ),
        (
            "debian-cron-set",
            vec![
                "-FCronDaemon",
                "-i",
                "-B8BITMIME",
                "-oem",
                "ops@example.org",
            ],
            "From: root (Cron Daemon)\nTo: ops@example.org\n".into(),
            vec!["ops@example.org"],
        ),
        (
            "cronie-unset",
            vec![
                "-FCronDaemon",
                "-i",
                "-odi",
                "-oem",
                "-oi",
                "-t",
                "-f",
                "root",
            ],
            "To: root\n".into(),
            vec![ADMIN],
        ),
        (
            "cronie-set",
            vec![
                "-FCronDaemon",
                "-i",
                "-odi",
                "-oem",
                "-oi",
                "-t",
                "-f",
                "root",
            ],
            "To: ops@example.org\n".into(),
            vec!["ops@example.org"],
        ),
        (
            "php",
            vec!["-t", "-i"],
            "To: Customer <customer@example.org>\nFrom: shop@example.com\n".into(),
            vec!["customer@example.org"],
        ),
        (
            "msmtp-style",
            vec!["-t", "-f", "app@example.com"],
            "To: a@example.org, root\nCc: Team <b@example.org>\n".into(),
            vec!["a@example.org", ADMIN, "b@example.org"],
        ),
        (
            "bundled-ti",
            vec!["-ti"],
            "To: c@example.org\nBcc: hidden@example.org\n".into(),
            vec!["c@example.org", "hidden@example.org"],
        ),
        (
            "local-no-alias",
            vec!["-i", "www-data"],
            "".into(),
            vec![EMAIL],
        ),
    ];
    for (subject, args, headers, _) in &cases {
        let out = run(
            bin.path(),
            "sendmail",
            &cfg,
            args,
            &message(subject, headers),
        );
        assert!(out.status.success(), "{subject}: {}", show(&out));
        assert!(
            out.stderr.is_empty(),
            "{subject}: no warning: {}",
            show(&out)
        );
    }

    // Symfony Mailer / Laravel: `sendmail -bs`, an SMTP dialogue on stdin.
    let dialogue = "EHLO [127.0.0.1]\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<symfony@example.org>\r\nRCPT TO:<root>\r\nDATA\r\nSubject: symfony-bs\r\nMessage-ID: <symfony-bs@e2e.test>\r\n\r\nhello\r\n..dot\r\n.\r\nQUIT\r\n";
    let out = run(bin.path(), "sendmail", &cfg, &["-bs"], dialogue.as_bytes());
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", show(&out));
    assert!(said.starts_with("220 "), "{said}");
    assert!(
        said.contains("250 2.0.0") && said.contains("221 "),
        "{said}"
    );

    // What `-bv` says, sending nothing.
    let out = run(
        bin.path(),
        "sendmail",
        &cfg,
        &["-bv", "root", "x@example.net"],
        b"",
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        text.contains(&format!("root -> <{ADMIN}> (via alias root)")),
        "{text}"
    );
    assert!(
        text.contains("x@example.net -> <x@example.net> (deliverable)"),
        "{text}"
    );

    let expected = cases.len() + 1;
    up.gmail.wait_for_messages(expected, T).await;
    // Every message was in the queue when its `sendmail` exited, and
    // anything one of them caused (a bounce) is queued before it is
    // removed: once the queue is empty, all of it has arrived.
    wait_queue_empty(&d, T).await;
    let msgs = up.gmail.messages();
    for (subject, _, _, want) in &cases {
        let got = with_subject(&msgs, subject);
        assert_eq!(got.len(), 1, "{subject} arrives exactly once: {msgs:#?}");
        let mut rcpts = got[0].rcpt_to.clone();
        rcpts.sort();
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(rcpts, want, "{subject}");
        let text = got[0].text();
        assert!(!text.contains("Bcc:"), "{subject}: {text}");
        assert!(text.contains("\r\n.leading dot\r\n"), "{subject}: {text}");
    }
    let cron = with_subject(&msgs, "debian-cron-unset")[0];
    // A local sender goes upstream as the account's address (issue 8 item 3).
    assert_eq!(cron.mail_from, EMAIL);
    let cronie = with_subject(&msgs, "cronie-unset")[0];
    assert_eq!(
        cronie.header("From").as_deref(),
        Some(format!("CronDaemon <root@{DOMAIN}>").as_str()),
        "-F names the From: added"
    );
    let sy = with_subject(&msgs, "symfony-bs");
    assert_eq!(sy.len(), 1);
    let mut r = sy[0].rcpt_to.clone();
    r.sort();
    assert_eq!(r, [ADMIN, "symfony@example.org"]);
    assert!(sy[0].text().contains("\r\n.dot\r\n"));
    assert_eq!(msgs.len(), expected, "nothing else arrived: {msgs:#?}");

    // mailq: the queue list; newaliases: what the aliases map.
    let out = run(bin.path(), "mailq", &cfg, &[], b"");
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Mail queue is empty"),
        "{}",
        show(&out)
    );
    let out = run(bin.path(), "newaliases", &cfg, &[], b"");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", show(&out));
    assert!(text.contains("2 alias(es)"), "{text}");
    assert!(text.contains(&format!("root -> <{ADMIN}>")), "{text}");
    assert!(text.contains(&format!("postmaster -> <{ADMIN}>")), "{text}");
    // -bp and -bi are the same.
    let out = run(bin.path(), "sendmail", &cfg, &["-bi"], b"");
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_addresses_and_injection_send_nothing() {
    let up = Upstream::start(TlsMode::Implicit).await;
    let d = relay(&up, "").await;
    let bin = tempfile::tempdir().unwrap();
    links(bin.path());
    let cfg = d.config.clone();
    let body = b"Subject: injected\nMessage-ID: <injected@e2e.test>\n\nx\n";

    let to_bad = message("bad-to", "To: root, not an address\n");
    let out = run(bin.path(), "sendmail", &cfg, &["-t", "-i"], &to_bad);
    assert_eq!(out.status.code(), Some(65), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("To: header line 1"),
        "{}",
        show(&out)
    );

    let payload = "a@example.com>\r\nRCPT TO:<victim@evil.test>\r\nDATA\r\nSubject: owned\r\n\r\nowned\r\n.\r\n";
    for args in [
        vec!["-f", payload, "ok@example.org"],
        vec![payload],
        vec![
            "ok@example.org",
            "victim@evil.test\r\nRCPT TO:<v2@evil.test>",
        ],
        vec!["-F", "x\r\nBcc: victim@evil.test", "ok@example.org"],
        vec!["-F", "x\n\nbody", "ok@example.org"],
    ] {
        let out = run(bin.path(), "sendmail", &cfg, &args, body);
        assert_eq!(out.status.code(), Some(65), "{args:?}: {}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("control character"), "{args:?}: {err}");
        assert!(
            !err.contains('\r'),
            "the error escapes what it quotes: {err:?}"
        );
    }
    let header_injection = b"To: ok@example.org\r\nBcc: x\r\n\r\nbody\n";
    let out = run(
        bin.path(),
        "sendmail",
        &cfg,
        &["-t", "-F", "Name\r\nBcc: victim@evil.test"],
        header_injection,
    );
    assert_eq!(out.status.code(), Some(65), "{}", show(&out));

    // One good message last: once it is there, nothing else came before it.
    let good = message("the-good-one", "To: ok@example.org\n");
    let out = run(bin.path(), "sendmail", &cfg, &["-t", "-i"], &good);
    assert!(out.status.success(), "{}", show(&out));
    let msgs = up.gmail.wait_for_messages(1, T).await;
    wait_queue_empty(&d, T).await;
    let msgs = if up.gmail.messages().len() > msgs.len() {
        up.gmail.messages()
    } else {
        msgs
    };
    assert_eq!(msgs.len(), 1, "only the intended message: {msgs:#?}");
    assert_eq!(msgs[0].rcpt_to, ["ok@example.org"]);
    assert!(msgs.iter().all(|m| !m.text().contains("owned")));
}

/// A copy of the binary installed as the package does: setgid the maildrop
/// group, in a directory every user can reach.
fn setgid_copy(dir: &Path, gid: u32) -> PathBuf {
    let to = dir.join("sendmail");
    std::fs::copy(BIN, &to).unwrap();
    std::os::unix::fs::chown(&to, Some(0), Some(gid)).unwrap();
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o2755)).unwrap();
    to
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_submits_while_the_daemon_is_stopped() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !have_tool("setpriv") {
        assert!(!ci, "this test needs root and setpriv under CI");
        eprintln!("SKIPPED: needs root (to make an unprivileged user's submission) and setpriv");
        return;
    }
    const GID: u32 = 64_917; // the maildrop group; needs no /etc/group entry
    let up = Upstream::start(TlsMode::Implicit).await;
    // A directory every user can enter: the binary, a config users can read
    // (no secret in it), and the maildrop (0770 root:GID).
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let maildrop = shared.path().join("maildrop");
    std::fs::create_dir(&maildrop).unwrap();
    std::os::unix::fs::chown(&maildrop, Some(0), Some(GID)).unwrap();
    std::fs::set_permissions(&maildrop, std::fs::Permissions::from_mode(0o770)).unwrap();
    let sendmail = setgid_copy(shared.path(), GID);

    let mut d = relay(&up, &format!("maildrop = \"{}\"\n", maildrop.display())).await;
    let user_cfg = shared.path().join("user.toml");
    std::fs::write(
        &user_cfg,
        format!(
            "state_dir = \"{}\"\n[server]\nlisten = [\"{}\"]\n[local]\ndomain = \"{DOMAIN}\"\nmaildrop = \"{}\"\n",
            d.dir.display(),
            d.smtp,
            maildrop.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&user_cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(d.terminate(Duration::from_secs(20)).success());

    let submit = |args: &[&str], stdin: &[u8]| {
        use std::io::Write;
        let mut child = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&sendmail)
            .args(args)
            .env("OAUTHRELAY_CONFIG", &user_cfg)
            .env_remove("STATE_DIRECTORY")
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = submit(
        &["-t", "-i", "-v"],
        &message("while-down", "To: root, late@example.org\n"),
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("left in the maildrop"),
        "{}",
        show(&out)
    );
    let files: Vec<_> = std::fs::read_dir(&maildrop).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "one file, no temporary left");
    let meta = files[0].metadata().unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (65534, GID));
    assert_eq!(meta.mode() & 0o777, 0o640, "nothing world-readable");

    // Without the group (not setgid, as a plain copy would be): nothing is
    // queued, and the caller is told to try again (75).
    std::fs::set_permissions(&sendmail, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = submit(&["x@example.org"], b"Subject: no\n\nno\n");
    assert_eq!(out.status.code(), Some(75), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing was queued"),
        "{}",
        show(&out)
    );

    let d = d.restart();
    d.wait_log("maildrop: ", T);
    let msgs = up.gmail.wait_for_messages(1, T).await;
    wait_queue_empty(&d, T).await;
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    let mut rcpts = msgs[0].rcpt_to.clone();
    rcpts.sort();
    assert_eq!(rcpts, [ADMIN, "late@example.org"]);
    assert_eq!(
        msgs[0].mail_from, EMAIL,
        "a local sender goes as the account"
    );
    assert_eq!(
        msgs[0].header("From").as_deref(),
        Some(format!("nobody@{DOMAIN}").as_str())
    );
    assert!(
        std::fs::read_dir(&maildrop).unwrap().next().is_none(),
        "imported files are removed"
    );
    assert!(d.logs().contains("from uid=65534 (nobody)"), "{}", d.logs());
}
