//! Clients no one here wrote: Python's smtplib, swaks, curl and msmtp,
//! against the running daemon.

use std::process::Command;

use crate::harness::{BASE, Daemon, have_tool};

fn queue(d: &Daemon) -> Vec<serde_json::Value> {
    let out = d.cli(&["queue", "list", "--json"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn body_of(d: &Daemon, id: &str) -> String {
    let out = d.cli(&["queue", "show", id], None);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn python_smtplib_send_message_and_pipelined_sendmail() {
    if !have_tool("python3") {
        return;
    }
    let d = Daemon::start(BASE);
    let script = format!(
        r#"
import smtplib
from email.message import EmailMessage
m = EmailMessage()
m["From"] = "scanner@example.com"
m["To"] = "boss@example.com"
m["Subject"] = "Scan from smtplib"
m.set_content("Ünïcödé body\n.a line starting with a dot\n")
with smtplib.SMTP("{host}", {port}, timeout=30) as s:
    s.ehlo("python-client")
    assert s.has_extn("pipelining") and s.has_extn("size")
    s.send_message(m)
    # sendmail() with several recipients: MAIL and RCPTs back to back.
    refused = s.sendmail("cron@example.com", ["a@example.com", "b@example.com", "c@example.com"],
                         b"Subject: cron\r\n\r\nall good\r\n")
    assert refused == {{}}, refused
print("ok")
"#,
        host = d.smtp.ip(),
        port = d.smtp.port()
    );
    let (ok, out) = run(Command::new("python3").arg("-c").arg(&script));
    assert!(ok && out.contains("ok"), "{out}");
    let q = queue(&d);
    assert_eq!(q.len(), 2);
    assert_eq!(q[0]["from"], "scanner@example.com");
    assert_eq!(q[1]["recipients"].as_array().unwrap().len(), 3);
    let shown = body_of(&d, q[0]["id"].as_str().unwrap());
    assert!(shown.contains("Subject: Scan from smtplib"), "{shown}");
}

#[tokio::test]
async fn swaks_pipelining_auth_login_and_an_attachment() {
    if !have_tool("swaks") {
        return;
    }
    // A user for AUTH, hashed by our own command.
    let hash = {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = crate::harness::config_in(tmp.path(), "");
        let out = crate::harness::run_cli(&cfg, &["hash-password"], Some(b"s3cret-printer\n"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let d = Daemon::start(&format!(
        "{BASE}\n[[server.users]]\nname = \"printer\"\npassword_hash = \"{hash}\"\n"
    ));
    let server = format!("{}:{}", d.smtp.ip(), d.smtp.port());
    let tmp = tempfile::tempdir().unwrap();
    let attachment = tmp.path().join("scan.pdf");
    let pdf: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&attachment, &pdf).unwrap();

    let (ok, out) = run(Command::new("swaks")
        .args(["--server", &server, "--pipeline"])
        .args(["--from", "scanner@example.com", "--to", "boss@example.com"])
        .args([
            "--auth",
            "LOGIN",
            "--auth-user",
            "printer",
            "--auth-password",
            "s3cret-printer",
        ])
        .args(["--header", "Subject: swaks scan"])
        .arg("--attach")
        .arg(format!("@{}", attachment.display())));
    assert!(ok, "{out}");
    assert!(
        out.contains("VXNlcm5hbWU6") && out.contains("UGFzc3dvcmQ6"),
        "LOGIN challenges as devices expect: {out}"
    );
    assert!(out.contains("235 2.7.0"), "{out}");

    let (ok, out) = run(Command::new("swaks")
        .args(["--server", &server])
        .args(["--from", "scanner@example.com", "--to", "boss@example.com"])
        .args([
            "--auth",
            "LOGIN",
            "--auth-user",
            "printer",
            "--auth-password",
            "wrong",
        ]));
    assert!(!ok && out.contains("535 5.7.8"), "{out}");
    assert!(
        !d.logs().contains("s3cret-printer") && !d.logs().contains("wrong"),
        "passwords never logged"
    );

    let q = queue(&d);
    assert_eq!(q.len(), 1);
    let shown = body_of(&d, q[0]["id"].as_str().unwrap());
    assert!(shown.contains("swaks scan"), "{shown}");

    // The attachment comes back byte-exact: read the stored message from
    // the spool (the daemon must be stopped) and decode its MIME part.
    let mut d = d;
    assert!(d.terminate(std::time::Duration::from_secs(20)).success());
    let (spool, _) = spool::Spool::open(&d.dir.join("spool")).unwrap();
    let (id, _) = spool.list().into_iter().next().expect("the message");
    let stored = spool.read_body(id).unwrap().read_to_end().await.unwrap();
    spool.close().await.unwrap();
    assert_eq!(attachment_of(&stored, "scan.pdf"), pdf, "attachment intact");
}

/// The base64 MIME part of `message` whose headers name `file`, decoded.
fn attachment_of(message: &[u8], file: &str) -> Vec<u8> {
    use base64::Engine;
    let text = std::str::from_utf8(message).expect("a 7-bit MIME message");
    let (headers, _) = text.split_once("\r\n\r\n").expect("a header section");
    let unfolded = headers.replace("\r\n ", " ").replace("\r\n\t", " ");
    let boundary = unfolded
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("content-type: multipart/")
        })
        .and_then(|l| l.split("boundary=").nth(1))
        .map(|b| b.trim_matches(|c| c == '"' || c == ';' || c == ' '))
        .unwrap_or_else(|| panic!("no multipart boundary in {unfolded}"));
    let part = text
        .split(&format!("--{boundary}"))
        .find(|p| p.contains(file))
        .unwrap_or_else(|| panic!("no MIME part for {file}"));
    let (part_headers, encoded) = part
        .trim_start_matches("\r\n")
        .split_once("\r\n\r\n")
        .expect("part headers");
    assert!(
        part_headers.to_ascii_lowercase().contains("base64"),
        "{part_headers}"
    );
    let clean: String = encoded.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(clean)
        .expect("valid base64")
}

#[tokio::test]
async fn curl_smtp_upload() {
    if !have_tool("curl") {
        return;
    }
    let d = Daemon::start(BASE);
    let tmp = tempfile::tempdir().unwrap();
    let mail = tmp.path().join("mail.txt");
    std::fs::write(&mail, "From: monitor@example.com\r\nTo: ops@example.com\r\nSubject: disk alert\r\n\r\n/var is 95% full\r\n").unwrap();
    let (ok, out) = run(Command::new("curl")
        .arg("--silent")
        .arg("--show-error")
        .arg(format!(
            "smtp://{}:{}/monitor-host",
            d.smtp.ip(),
            d.smtp.port()
        ))
        .args([
            "--mail-from",
            "monitor@example.com",
            "--mail-rcpt",
            "ops@example.com",
        ])
        .arg("--upload-file")
        .arg(&mail));
    assert!(ok, "{out}");
    let q = queue(&d);
    assert_eq!(q.len(), 1);
    assert_eq!(q[0]["recipients"], serde_json::json!(["ops@example.com"]));
    assert!(body_of(&d, q[0]["id"].as_str().unwrap()).contains("Subject: disk alert"));
}

#[tokio::test]
async fn msmtp_as_a_sendmail_replacement() {
    if !have_tool("msmtp") {
        return;
    }
    let d = Daemon::start(BASE);
    let (ok, out) = {
        use std::io::Write;
        let mut child = Command::new("msmtp")
            .arg("--host")
            .arg(d.smtp.ip().to_string())
            .arg("--port")
            .arg(d.smtp.port().to_string())
            .args([
                "--auth=off",
                "--tls=off",
                "--from",
                "cron@example.com",
                "root@example.com",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"Subject: cron output\n\nline one\n.line with dot\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(ok, "{out}");
    let q = queue(&d);
    assert_eq!(q.len(), 1);
    let shown = body_of(&d, q[0]["id"].as_str().unwrap());
    assert!(shown.contains("Subject: cron output"), "{shown}");
}
