//! Output into a pipe whose reader has gone (`oauthrelay queue list | head
//! -1`): every command that prints ends quietly, with status 0 or killed by
//! SIGPIPE (141 in a shell), as a C program would; never a panic.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use crate::harness::{BIN, config_in};

const ACCOUNT: &str = "[[accounts]]\nname = \"default\"\nemail = \"me@gmail.com\"\nclient_id = \"1.apps.googleusercontent.com\"\nclient_secret = \"s\"\ntoken_url = \"http://127.0.0.1:9/token\"\n";

/// Run `oauthrelay --config CFG ARGS` with stdout the write end of a pipe
/// whose read end is already closed, so its first write fails.
fn into_closed_pipe(cfg: &std::path::Path, args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("STATE_DIRECTORY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::piped())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    // The command may exit before it reads its input.
    let _ = input.write_all(stdin);
    drop(input);
    child.wait_with_output().unwrap()
}

fn assert_quiet(what: &str, out: &std::process::Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let status = out.status;
    assert!(
        status.code() == Some(0) || status.signal() == Some(libc_sigpipe()),
        "`{what}` into a closed pipe: {status:?}, stderr: {stderr}"
    );
    for bad in ["panicked", "Broken pipe", "os error 32", "failed printing"] {
        assert!(
            !stderr.contains(bad),
            "`{what}`: stderr says {bad:?}: {stderr}"
        );
    }
}

fn libc_sigpipe() -> i32 {
    13
}

#[test]
fn every_command_that_prints_ends_quietly_when_its_reader_has_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(tmp.path(), ACCOUNT);
    let run = |args: &[&str], stdin: &[u8]| {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .env_remove("STATE_DIRECTORY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(stdin)?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    // A queued message (sendmail without a daemon writes the queue) and a
    // stored token, so that the queue and token commands have output.
    run(
        &["sendmail", "-f", "cron@example.com", "admin@example.com"],
        b"Subject: test\n\nbody\n",
    );
    run(
        &["token", "import", "--account", "default"],
        b"1//refresh\n",
    );
    let list = run(&["queue", "list", "--json"], b"");
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let id = list[0]["id"]
        .as_str()
        .expect("the queued message")
        .to_string();

    let commands: &[(&[&str], &[u8])] = &[
        (&["--version"], b""),
        (&["--help"], b""),
        (&["help", "queue"], b""),
        (&["queue", "retry", "--help"], b""),
        (&["check-config"], b""),
        (&["token", "status"], b""),
        (&["token", "status", "--json"], b""),
        (&["token", "import", "--account", "default"], b"1//again\n"),
        (&["queue", "list"], b""),
        (&["queue", "list", "--json"], b""),
        (&["queue", "show", &id], b""),
        (&["queue", "retry", "--all"], b""),
        (&["queue", "retry", &id], b""),
        (&["hash-password"], b"correct horse\n"),
        (&["completions", "bash"], b""),
        (&["completions", "zsh"], b""),
        (&["completions", "fish"], b""),
        (&["queue", "delete", &id], b""),
    ];
    for (args, stdin) in commands {
        let out = into_closed_pipe(&cfg, args, stdin);
        assert_quiet(&args.join(" "), &out);
    }
}

/// The command line from the bug report, through a real shell and `head`.
#[test]
fn token_status_into_head_0_through_a_shell() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(tmp.path(), ACCOUNT);
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; for i in 1 2 3 4 5; do '{BIN}' --config '{}' token status | head -0 || echo \"status $?\" >&2; done",
            cfg.display()
        ))
        .env_remove("STATE_DIRECTORY")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // head -0 exits at once: oauthrelay either wrote into the pipe before
    // that (and exits 1: the account is not authorized) or was killed by
    // SIGPIPE (141). Nothing on stderr either way.
    for line in stderr.lines() {
        assert!(
            line == "status 141" || line == "status 1",
            "unexpected: {stderr}"
        );
    }
}

/// `completions SHELL` needs no configuration (it runs before the file
/// is read), so it works for a user who has none or a broken one.
#[test]
fn completions_need_no_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken.toml");
    std::fs::write(&broken, "[server\n").unwrap();
    for (shell, marker) in [
        ("bash", "complete -F _oauthrelay"),
        ("zsh", "#compdef oauthrelay"),
        ("fish", "complete -c oauthrelay"),
    ] {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&broken)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell}: {text}");
        assert!(text.contains("retry"), "{shell}: no queue retry");
    }
    let out = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values: bash, zsh, fish"));
}

/// A Microsoft account with every key that only shows when set (a
/// certificate needs real files: [`MICROSOFT_ONLY_KEYS`] covers those).
const MICROSOFT_ACCOUNT: &str = "\
[[accounts]]
name = \"m365\"
provider = \"microsoft\"
tenant = \"contoso.onmicrosoft.com\"
email = \"relay@contoso.com\"
client_id = \"0e6d1a52-7d3b-4a4b-9d51-1c2f00aa1001\"
device_auth_url = \"https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/devicecode\"
concurrency = 2
max_rate = 0.25
envelope_from = \"relay@contoso.com\"
";

/// Keys of a Microsoft account that `check-config` prints only when their
/// files exist.
const MICROSOFT_ONLY_KEYS: &[&str] = &["client_certificate_file", "client_certificate_key_file"];

/// Every key `check-config` prints for the example configuration and for
/// [`MICROSOFT_ACCOUNT`], and [`MICROSOFT_ONLY_KEYS`].
fn every_key() -> Vec<String> {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/oauthrelay.example.toml"
    );
    let tmp = tempfile::tempdir().unwrap();
    let microsoft = config_in(tmp.path(), MICROSOFT_ACCOUNT);
    let mut keys: Vec<String> = MICROSOFT_ONLY_KEYS.iter().map(|k| k.to_string()).collect();
    for config in [std::path::Path::new(example), microsoft.as_path()] {
        let out = Command::new(BIN)
            .args([
                "--config".as_ref(),
                config.as_os_str(),
                "check-config".as_ref(),
            ])
            .env_remove("STATE_DIRECTORY")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some((key, _)) = line.split_once(" = ") else {
                continue;
            };
            let key = key.trim().trim_start_matches("# ").to_string();
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    for key in [
        "provider",
        "tenant",
        "device_auth_url",
        "concurrency",
        "max_rate",
    ] {
        assert!(
            keys.iter().any(|k| k == key),
            "check-config printed no {key}"
        );
    }
    keys
}

/// oauthrelay.toml(5) is written by hand: every key `check-config` prints
/// (Gmail's and Microsoft's) must be named in it, so a new setting cannot
/// go undocumented there.
#[test]
fn the_config_man_page_names_every_key() {
    let page = concat!(env!("CARGO_MANIFEST_DIR"), "/../../man/oauthrelay.toml.5");
    let bold = bold_words(&std::fs::read_to_string(page).unwrap());
    let keys = every_key();
    assert!(
        keys.len() > 20,
        "check-config printed only {} keys",
        keys.len()
    );
    let missing: Vec<_> = keys.iter().filter(|k| !bold.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "man/oauthrelay.toml.5 does not name: {missing:?}"
    );
}

/// docs/configuration.md and the example configuration name every key too.
#[test]
fn the_configuration_guide_and_the_example_name_every_key() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let guide = std::fs::read_to_string(format!("{root}/docs/configuration.md")).unwrap();
    let example =
        std::fs::read_to_string(format!("{root}/config/oauthrelay.example.toml")).unwrap();
    let keys = every_key();
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !guide.contains(&format!("`{k}`")) && !guide.contains(&format!("`{k} =")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not name: {missing:?}"
    );
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !example.contains(&format!("{k} = ")))
        .collect();
    assert!(
        missing.is_empty(),
        "config/oauthrelay.example.toml does not name: {missing:?}"
    );
}

/// The words a man page sets in bold with `.B` and `.BR` (every other
/// argument of `.BR`).
fn bold_words(roff: &str) -> Vec<String> {
    let mut words = Vec::new();
    for line in roff.lines() {
        let (args, every) = if let Some(rest) = line.strip_prefix(".B ") {
            (rest, 1)
        } else if let Some(rest) = line.strip_prefix(".BR ") {
            (rest, 2)
        } else {
            continue;
        };
        // Arguments are separated by spaces, "quoted" ones may hold spaces.
        let mut parsed = Vec::new();
        let mut chars = args.chars().peekable();
        while let Some(&c) = chars.peek() {
            if c == ' ' {
                chars.next();
            } else if c == '"' {
                chars.next();
                parsed.push(chars.by_ref().take_while(|&c| c != '"').collect::<String>());
            } else {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ' ' {
                        break;
                    }
                    word.push(c);
                    chars.next();
                }
                parsed.push(word);
            }
        }
        for arg in parsed.iter().step_by(every) {
            words.extend(arg.replace("\\-", "-").split_whitespace().map(String::from));
        }
    }
    words
}
