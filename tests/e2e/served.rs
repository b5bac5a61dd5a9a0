//! Running `oauthrelay serve` with its environment and stderr under the
//! test's control (`$JOURNAL_STREAM`, `$NOTIFY_SOCKET`, `--log-format`),
//! and small HTTP and promtool helpers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::BIN;

/// An account that is configured but not authorized: its series exist,
/// its mail is held. The token endpoint is never called (no token).
pub const UNAUTHORIZED: &str = "\n[[accounts]]\nname = \"default\"\nemail = \"me@example.com\"\nclient_id = \"id.apps.googleusercontent.com\"\nclient_secret = \"not-a-real-secret\"\ntoken_url = \"http://127.0.0.1:9/token\"\n";

/// `oauthrelay serve` with full control of its environment and stderr.
pub struct Served {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Served {
    /// Start `oauthrelay --config CONFIG ARGS... serve` with `env` added to
    /// a clean environment. With `journal`, stderr is a pipe named by
    /// `$JOURNAL_STREAM`, as systemd sets it up.
    pub fn start(config: &Path, args: &[&str], env: &[(&str, String)], journal: bool) -> Served {
        let (reader, writer) = std::io::pipe().unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(config)
            .args(args)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if journal {
            use std::os::fd::AsRawFd;
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::fstat(writer.as_raw_fd(), &mut st) }, 0);
            cmd.env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino));
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stderr(Stdio::from(writer));
        let child = cmd.spawn().expect("spawn oauthrelay");
        // Our copy of the write end is gone with `cmd`: EOF comes when the
        // daemon exits.
        drop(cmd);
        let lines = Arc::new(Mutex::new(Vec::new()));
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("E2E_ECHO").is_some() {
                        eprintln!("[daemon] {line}");
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Served {
            child: Some(child),
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The first line containing `needle`, waiting up to `limit`.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            let exited = self.child.as_mut().map(|c| c.try_wait().ok().flatten());
            if start.elapsed() > limit || matches!(exited, Some(Some(_))) {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "no log line with {needle:?} (exited: {exited:?}); logs:\n{}",
                    self.lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address after `marker` in the log (`SMTP listening on `...).
    pub fn addr(&mut self, marker: &str) -> SocketAddr {
        let line = self.wait_for(marker, Duration::from_secs(30));
        let rest = &line[line.find(marker).unwrap() + marker.len()..];
        let token: String = rest
            .chars()
            .take_while(|c| !c.is_whitespace() && !matches!(c, '"' | '/' | ','))
            .collect();
        token
            .parse()
            .unwrap_or_else(|_| panic!("no address in {line}"))
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Wait for the exit (bounded); the status.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                // Let the reader collect the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return s;
            }
            if start.elapsed() > limit {
                let _ = c.kill();
                panic!(
                    "oauthrelay did not exit within {limit:?}; logs:\n{}",
                    self.lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(30))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// GET `path` with these request headers: (status, headers, body).
pub async fn get(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// Run `promtool ARGS` with `stdin`; (success, output).
pub fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A file of the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}
