//! Running the real `oauthrelay` binary for tests: config in a temp dir,
//! logs captured, addresses read from what it prints, signals.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::TcpStream;

pub const BIN: &str = env!("CARGO_BIN_EXE_oauthrelay");

/// A running daemon and its private state directory.
pub struct Daemon {
    pub dir: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    pub smtp: SocketAddr,
    pub metrics: Option<SocketAddr>,
    /// `RUST_LOG` for this daemon (default: `$E2E_LOG`, else `info`).
    log: Option<String>,
    _tmp: Option<tempfile::TempDir>,
}

/// Config text with `{dir}` replaced by the state directory.
pub fn config_in(dir: &Path, body: &str) -> PathBuf {
    let text = format!(
        "state_dir = \"{}\"\n{}",
        dir.display(),
        body.replace("{dir}", &dir.display().to_string())
    );
    let path = dir.join("oauthrelay.toml");
    std::fs::write(&path, text).unwrap();
    // The accounts in these configs carry an inline client_secret, which
    // oauthrelay refuses in a file group or others can read (0644 from the
    // umask): private, as the docs tell users.
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&path, private).unwrap();
    path
}

/// The smallest useful config: an ephemeral SMTP port, metrics on an
/// ephemeral port, quick shutdown.
pub const BASE: &str = "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"5s\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n";

impl Daemon {
    /// Start `oauthrelay serve` with `body` (TOML, `{dir}` = state dir).
    pub fn start(body: &str) -> Daemon {
        Daemon::start_logging(body, None)
    }

    /// Like [`Daemon::start`], with this `RUST_LOG` filter (`debug`...)
    /// instead of `$E2E_LOG`/`info`; kept across restarts.
    pub fn start_logging(body: &str, log: Option<&str>) -> Daemon {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let config = config_in(&dir, body);
        let mut d = Daemon::spawn(dir, config, log.map(str::to_string));
        d._tmp = Some(tmp);
        d
    }

    /// Start again on the same state directory and config.
    pub fn restart(mut self) -> Daemon {
        let tmp = self._tmp.take();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut d = Daemon::spawn(self.dir.clone(), self.config.clone(), self.log.take());
        d._tmp = tmp;
        d
    }

    fn spawn(dir: PathBuf, config: PathBuf, log: Option<String>) -> Daemon {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env(
                "RUST_LOG",
                log.clone()
                    .unwrap_or_else(|| std::env::var("E2E_LOG").unwrap_or_else(|_| "info".into())),
            )
            .env_remove("STATE_DIRECTORY")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn oauthrelay");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("E2E_ECHO").is_some() {
                        eprintln!("[daemon] {line}");
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let mut d = Daemon {
            dir,
            config,
            child: Some(child),
            logs,
            smtp: "0.0.0.0:0".parse().unwrap(),
            metrics: None,
            log,
            _tmp: None,
        };
        d.wait_log(" ready", Duration::from_secs(30));
        let line = d.wait_log("SMTP listening on", Duration::from_secs(1));
        d.smtp = addr_after(&line, "SMTP listening on ").expect("SMTP address in log");
        d.metrics = d
            .logs()
            .lines()
            .find_map(|l| addr_after(l, "metrics listening on http://"));
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Everything the daemon logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Wait for a log line containing `needle`; panic with the logs after `limit`.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            if start.elapsed() > limit {
                panic!(
                    "no log line with {needle:?} after {limit:?}; logs:\n{}",
                    self.logs()
                );
            }
            if let Some(c) = self.child.as_ref()
                && let Ok(Some(_)) = exited(c)
            {
                // Give the reader thread a moment to collect the last lines.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "oauthrelay exited while waiting for {needle:?}; logs:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the crash we must survive.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send a signal by name (`TERM`, `HUP`, `INT`).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM and wait for the exit status (bounded).
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.signal("TERM");
        let mut c = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > limit {
                let _ = c.kill();
                panic!(
                    "oauthrelay did not stop within {limit:?} of SIGTERM; logs:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run another `oauthrelay` command with this daemon's config.
    pub fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
        run_cli(&self.config, args, stdin)
    }

    /// Peak resident set size (VmHWM) and current RSS, in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }

    /// Reset the peak-RSS counter (Linux `clear_refs` 5).
    pub fn reset_peak_rss(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }

    /// GET a path on the metrics listener: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics.expect("metrics listener"), path).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn exited(c: &Child) -> std::io::Result<Option<()>> {
    // `Child::try_wait` needs `&mut`; peek at /proc instead.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", c.id()))?;
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|s| s.split_whitespace().next());
    Ok((state == Some("Z")).then_some(()))
}

fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let token: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | '"' | '/'))
        .collect();
    token.trim_end_matches('/').parse().ok()
}

pub fn run_cli(config: &Path, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("STATE_DIRECTORY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn oauthrelay");
    if let Some(input) = stdin {
        let mut i = child.stdin.take().unwrap();
        i.write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut s, &mut out)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A minimal SMTP client for tests: sends what it is told, returns replies.
pub struct Smtp {
    r: TokioBufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Smtp {
    pub async fn connect(addr: SocketAddr) -> Smtp {
        let s = TcpStream::connect(addr).await.unwrap();
        let (r, w) = s.into_split();
        Smtp {
            r: TokioBufReader::new(r),
            w,
        }
    }

    /// Connect and read the greeting, expecting 220.
    pub async fn open(addr: SocketAddr) -> Smtp {
        let mut s = Smtp::connect(addr).await;
        let g = s.reply().await;
        assert!(g.starts_with("220"), "greeting: {g}");
        s
    }

    /// One whole reply (all lines joined with `\n`).
    pub async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.r.read_line(&mut line))
                .await
                .expect("reply within 30 s")
                .unwrap();
            if n == 0 {
                return if all.is_empty() {
                    "<closed>".into()
                } else {
                    all
                };
            }
            let done = line.as_bytes().get(3) != Some(&b'-');
            all.push_str(line.trim_end());
            if done {
                return all;
            }
            all.push('\n');
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.unwrap();
    }

    /// Send a command line and return the reply.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// A whole transaction; returns the reply to the final dot.
    pub async fn mail(&mut self, from: &str, to: &[&str], body: &[u8]) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{from}>")).await;
        assert!(r.starts_with("250"), "MAIL: {r}");
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>")).await;
            assert!(r.starts_with("250"), "RCPT: {r}");
        }
        let r = self.cmd("DATA").await;
        assert!(r.starts_with("354"), "DATA: {r}");
        self.send(&dot_stuff(body)).await;
        self.send(b".\r\n").await;
        self.reply().await
    }
}

/// Dot-stuff a CRLF message and make sure it ends with CRLF.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut start = true;
    for &b in body {
        if start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The queue id from `250 2.0.0 Ok: queued as ID`.
pub fn queued_id(reply: &str) -> String {
    reply
        .rsplit("queued as ")
        .next()
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Whether an outside tool is installed. Missing outside CI: say so loudly
/// and skip; missing under CI=true: fail.
pub fn have_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        let msg = format!("SKIPPED: `{tool}` is not installed (.ci/run installs it)");
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{msg}; CI must run this test");
        }
        eprintln!("\n!!!! {msg} !!!!\n");
    }
    found
}
