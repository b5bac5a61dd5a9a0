//! Printers, scanners and old clients against the real daemon (issue 8
//! items 6 and 7, issue 10 item 7): bare-LF messages from smtplib after
//! AUTH from outside `allow_networks` arrive byte-exact at the fake Gmail;
//! addresses without angle brackets from trusted clients; `AUTH=LOGIN` in
//! EHLO; the implicit-TLS listener (`listen_tls`); `bare_lf_end_networks`.

use std::path::PathBuf;
use std::process::Command;

use testkit::daemon::write_private;
use testkit::gmail::TlsMode;

use crate::fakes::{EMAIL, FAST_DELIVERY, T, Upstream, prepended_fields};
use crate::harness::{Daemon, Smtp, config_in, have_tool, run_cli};

const PASSWORD: &str = "s3cret-scanner";

/// An argon2 hash of [`PASSWORD`], from our own `hash-password`.
fn password_hash() -> String {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(tmp.path(), "");
    let out = run_cli(
        &cfg,
        &["hash-password"],
        Some(format!("{PASSWORD}\n").as_bytes()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The test CA's server certificate (`localhost`, `127.0.0.1`) and key as
/// files for `[server.tls]`.
fn tls_files(up: &Upstream) -> (PathBuf, PathBuf) {
    let cert = up.aux.path().join("relay-cert.pem");
    let key = up.aux.path().join("relay-key.pem");
    write_private(&cert, up.ca.server_cert_pem()).unwrap();
    write_private(&key, up.ca.server_key_pem()).unwrap();
    (cert, key)
}

/// A relay to the fakes with `server` added to `[server]` (its own keys
/// first, then tables such as `[server.tls]`), one user `scanner`.
fn relay(up: &Upstream, server: &str) -> Daemon {
    let account = up.account("default", EMAIL, &["*"], true);
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"5s\"\n{server}\n\n[[server.users]]\nname = \"scanner\"\npassword_hash = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[delivery]\n{FAST_DELIVERY}\n{account}",
        password_hash()
    );
    up.import(&config, "default", EMAIL);
    Daemon::start(&config)
}

fn python(script: &str) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "python: {text}");
    text
}

/// The message smtplib is given: bare LF line endings, lines that start
/// with dots (smtplib doubles them), a lone dot line, no final newline.
const LF_MESSAGE: &[u8] = b"From: Scanner <scanner@example.com>\nTo: Boss <boss@example.org>\nSubject: bare LF scan\nDate: Tue, 24 Nov 2026 10:00:00 +0000\nMessage-ID: <bare-lf-1@e2e.test>\n\n.leading dot\n..two dots\n.\n\nlast line";

/// `LF_MESSAGE` as it must arrive: every line ended by CRLF (smtplib ends
/// the last line with the CRLF it adds before the final dot).
fn lf_message_crlf() -> Vec<u8> {
    let mut v = String::from_utf8(LF_MESSAGE.to_vec())
        .unwrap()
        .replace('\n', "\r\n")
        .into_bytes();
    v.extend_from_slice(b"\r\n");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_bare_lf_after_auth_from_outside_allow_networks_arrives_byte_exact() {
    if !have_tool("python3") {
        return;
    }
    let up = Upstream::start(TlsMode::Implicit).await;
    // Loopback is outside allow_networks; AUTH without TLS is allowed from
    // loopback (require_tls_for_auth exempts it).
    let d = relay(&up, "allow_networks = [\"192.0.2.0/24\"]");
    let hex: String = LF_MESSAGE.iter().map(|b| format!("{b:02x}")).collect();
    let out = python(&format!(
        r#"
import smtplib
msg = bytes.fromhex("{hex}")
with smtplib.SMTP("{host}", {port}, timeout=30) as s:
    code, text = s.ehlo("scanner-lf")
    text = text.decode()
    assert "AUTH PLAIN LOGIN" in text and "AUTH=LOGIN PLAIN" in text, text
    # Outside allow_networks: nothing is relayed before AUTH.
    s.mail("scanner@example.com")
    code, _ = s.rcpt("boss@example.org")
    assert code == 554, code
    s.rset()
    s.login("scanner", "{PASSWORD}")
    refused = s.sendmail("scanner@example.com", ["boss@example.org"], msg)
    assert refused == {{}}, refused
print("sent")
"#,
        host = d.smtp.ip(),
        port = d.smtp.port()
    ));
    assert!(out.contains("sent"), "{out}");

    let msgs = up.gmail.wait_for_messages(1, T).await;
    assert_eq!(msgs.len(), 1, "{}", d.logs());
    let m = &msgs[0];
    assert_eq!(m.mail_from, "scanner@example.com");
    assert_eq!(
        prepended_fields(&m.data, &lf_message_crlf()),
        ["Received"],
        "the client's lines arrive CRLF-ended, their dot-stuffing removed"
    );
    assert!(m.text().contains(" with ESMTPA id "), "{}", m.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls_port_delivers_with_smtplib_smtp_ssl() {
    if !have_tool("python3") {
        return;
    }
    let up = Upstream::start(TlsMode::Implicit).await;
    let (cert, key) = tls_files(&up);
    let d = relay(
        &up,
        &format!(
            "allow_networks = [\"192.0.2.0/24\"]\nlisten_tls = [\"127.0.0.1:0\"]\n\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"",
            cert.display(),
            key.display()
        ),
    );
    let logs = d.logs();
    let tls_addr: std::net::SocketAddr = logs
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once("SMTP with implicit TLS (smtps) listening on ")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no smtps listener logged: {logs}"));
    assert_ne!(tls_addr, d.smtp);

    let hex: String = LF_MESSAGE.iter().map(|b| format!("{b:02x}")).collect();
    let out = python(&format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context(cafile="{ca}")
msg = bytes.fromhex("{hex}")
with smtplib.SMTP_SSL("localhost", {port}, context=ctx, timeout=30) as s:
    code, text = s.ehlo("scanner-465")
    text = text.decode()
    assert "STARTTLS" not in text, text
    assert "AUTH=LOGIN PLAIN" in text, text
    s.login("scanner", "{PASSWORD}")
    refused = s.sendmail("scanner@example.com", ["boss@example.org"], msg)
    assert refused == {{}}, refused
    print("sent", s.sock.version())
"#,
        ca = up.ca_file.display(),
        port = tls_addr.port()
    ));
    assert!(out.contains("sent TLSv1."), "{out}");

    // swaks, as a device configured for "SSL/TLS" on 465 would talk.
    let mut swaks_tls = have_tool("swaks");
    if swaks_tls {
        let out = Command::new("swaks")
            .args([
                "--server",
                "127.0.0.1",
                "--port",
                &tls_addr.port().to_string(),
            ])
            .args(["--tls-on-connect", "--tls-verify", "--tls-ca-path"])
            .arg(&up.ca_file)
            .args(["--ehlo", "swaks-465", "--auth", "LOGIN"])
            .args(["--auth-user", "scanner", "--auth-password", PASSWORD])
            .args(["--from", "scanner@example.com", "--to", "boss@example.org"])
            .args(["--header", "Subject: swaks on 465"])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if text.contains("TLS not available") {
            let msg =
                "SKIPPED: swaks has no TLS (Net::SSLeay; .ci/run installs libnet-ssleay-perl)";
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
            eprintln!("\n!!!! {msg} !!!!\n");
            swaks_tls = false;
        } else {
            assert!(
                out.status.success() && text.contains("250 2.0.0 Ok: queued"),
                "{text}"
            );
        }
    }

    let msgs = up.gmail.wait_for_messages(1, T).await;
    assert!(!msgs.is_empty(), "{}", d.logs());
    assert_eq!(
        prepended_fields(&msgs[0].data, &lf_message_crlf()),
        ["Received"]
    );
    assert!(
        msgs[0].text().contains(" with ESMTPSA id "),
        "{}",
        msgs[0].text()
    );

    // Plain SMTP on the TLS port: the handshake fails, the log says so
    // and names the listener.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
        s.write_all(b"EHLO plain-on-465\r\n").await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(T, s.read_to_end(&mut got))
            .await
            .expect("the server closes the connection");
        assert!(!got.starts_with(b"220"), "{got:?}");
    }
    let line = d.wait_log("TLS handshake failed from unknown[127.0.0.1]", T);
    assert!(line.contains("smtps"), "{line}");
    let (_, text) = d.http_get("/metrics").await;
    assert!(
        text.contains("oauthrelay_smtp_tls_handshakes_total{listener=\"smtps\",result=\"ok\"} 2")
            || (!swaks_tls
                && text.contains(
                    "oauthrelay_smtp_tls_handshakes_total{listener=\"smtps\",result=\"ok\"} 1"
                )),
        "{text}"
    );
    assert!(
        text.contains(
            "oauthrelay_smtp_tls_handshakes_total{listener=\"smtps\",result=\"failed\"} 1"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn listen_tls_without_a_certificate_is_a_config_error_at_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(
        tmp.path(),
        "[server]\nlisten = [\"127.0.0.1:0\"]\nlisten_tls = [\"127.0.0.1:0\"]\n",
    );
    let out = run_cli(&cfg, &["check-config"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // Line 4: config_in puts state_dir on line 1.
    assert!(
        err.contains(&format!("{}:4:", cfg.display()))
            && err.contains("listen_tls needs [server.tls]"),
        "{err}"
    );
}

/// Printer cases from a trusted network (loopback, the default
/// allow_networks) and the same commands from a stranger.
#[tokio::test]
async fn addresses_without_brackets_from_a_trusted_network_only() {
    let d = Daemon::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nallow_networks = [\"127.0.0.1/32\"]\nshutdown_grace = \"5s\"\n\n[[server.users]]\nname = \"scanner\"\npassword_hash = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        password_hash()
    ));
    let mut s = Smtp::open(d.smtp).await;
    let e = s.cmd("EHLO printer").await;
    assert!(e.contains("250-AUTH=LOGIN PLAIN"), "{e}");
    for (cmd, want) in [
        ("MAIL FROM:scanner@example.com", "250 2.1.0"),
        ("RCPT TO:office@example.org", "250 2.1.5"),
        ("DATA", "354"),
    ] {
        let r = s.cmd(cmd).await;
        assert!(r.starts_with(want), "{cmd}: {r}");
    }
    s.send(b"Subject: scan\r\n\r\npage\r\n.\r\n").await;
    let r = s.reply().await;
    assert!(r.starts_with("250 2.0.0 Ok: queued"), "{r}");

    // From 127.0.0.2 (outside allow_networks, not authenticated).
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = sock.connect(d.smtp).await.unwrap();
    let mut s = Smtp::over(stream);
    assert!(s.reply().await.starts_with("220"));
    s.cmd("EHLO printer").await;
    let r = s.cmd("MAIL FROM:scanner@example.com").await;
    assert!(r.starts_with("501 5.5.4"), "{r}");
    d.wait_log(
        "address without angle brackets refused from unknown[127.0.0.2]",
        T,
    );
}

/// `bare_lf_end_networks = []`: even loopback (in allow_networks) must end
/// DATA with CRLF.CRLF; `LF.LF` and `CR.CR` are content.
#[tokio::test]
async fn bare_lf_end_networks_empty_requires_crlf_dot_crlf_from_loopback() {
    let d = Daemon::start(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nbare_lf_end_networks = []\nshutdown_grace = \"5s\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let mut s = Smtp::open(d.smtp).await;
    s.cmd("EHLO cron").await;
    assert!(
        s.cmd("MAIL FROM:<cron@example.com>")
            .await
            .starts_with("250")
    );
    assert!(s.cmd("RCPT TO:<ops@example.org>").await.starts_with("250"));
    assert!(s.cmd("DATA").await.starts_with("354"));
    s.send(b"Subject: lf\n\nbody\n.\nMAIL FROM:<evil@example.com>\nmore\r.\rstill\r\n.\r\n")
        .await;
    let r = s.reply().await;
    assert!(r.starts_with("250 2.0.0 Ok: queued"), "{r}");
    // Exactly one reply: the next command gets its own.
    assert!(s.cmd("NOOP").await.starts_with("250 2.0.0 Ok"));
    // One message: the MAIL FROM line after LF.LF was content.
    let q = crate::fakes::queue(&d);
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0]["from"], "cron@example.com");

    // The default (bare_lf_end_networks = allow_networks): LF.LF ends it.
    let d = Daemon::start(crate::harness::BASE);
    let mut s = Smtp::open(d.smtp).await;
    s.cmd("EHLO cron").await;
    assert!(
        s.cmd("MAIL FROM:<cron@example.com>")
            .await
            .starts_with("250")
    );
    assert!(s.cmd("RCPT TO:<ops@example.org>").await.starts_with("250"));
    assert!(s.cmd("DATA").await.starts_with("354"));
    s.send(b"Subject: lf\n\nbody\n.\n").await;
    let r = s.reply().await;
    assert!(r.starts_with("250 2.0.0 Ok: queued"), "{r}");
}

/// Socket activation with two sockets: the one named `smtps`
/// (`FileDescriptorName=smtps`) speaks implicit TLS, the other plain SMTP.
#[tokio::test]
async fn socket_activation_names_the_implicit_tls_socket() {
    if !have_tool("systemd-socket-activate") || !have_tool("python3") {
        return;
    }
    let ca = testkit::ca::TestCa::new();
    let tmp = tempfile::tempdir().unwrap();
    let cert = tmp.path().join("cert.pem");
    let key = tmp.path().join("key.pem");
    write_private(&cert, ca.server_cert_pem()).unwrap();
    write_private(&key, ca.server_key_pem()).unwrap();
    let ca_file = ca.write_to(tmp.path());
    let cfg = config_in(
        tmp.path(),
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"5s\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let log = tmp.path().join("daemon.log");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (plain, tls) = (free(), free());
    let mut activator = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{plain}")])
        .args(["-l", &format!("127.0.0.1:{tls}")])
        .arg("--fdname=smtp:smtps")
        .args(["-E", "RUST_LOG=info", "-E", "PATH=/usr/bin:/bin"])
        .arg("sh")
        .arg("-c")
        .arg("exec \"$0\" --config \"$1\" serve 2>\"$2\"")
        .arg(crate::harness::BIN)
        .arg(&cfg)
        .arg(&log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the activator listens on the TLS port; the client's
    // connection starts the daemon.
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", tls)).is_err() {
        assert!(start.elapsed() < T, "activator never listened");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let out = python(&format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context(cafile="{ca}")
with smtplib.SMTP_SSL("127.0.0.1", {tls}, context=ctx, timeout=30) as s:
    code, text = s.ehlo("activated-465")
    assert code == 250, (code, text)
    print("tls ok", s.sock.version())
with smtplib.SMTP("127.0.0.1", {plain}, timeout=30) as s:
    code, text = s.ehlo("activated-25")
    assert b"STARTTLS" in text, text
    print("plain ok")
"#,
        ca = ca_file.display()
    ));
    assert!(
        out.contains("tls ok TLSv1.") && out.contains("plain ok"),
        "{out}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!(
            "SMTP with implicit TLS (smtps) listening on 127.0.0.1:{tls}"
        )) && text.contains(&format!("SMTP listening on 127.0.0.1:{plain}")),
        "{text}"
    );
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", activator.id()))
        .unwrap_or_default();
    for pid in children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let _ = activator.kill();
    let _ = activator.wait();
}
