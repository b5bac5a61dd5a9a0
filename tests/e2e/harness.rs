//! Running the real `oauthrelay` binary for tests: config in a temp dir,
//! logs captured, addresses read from what it prints, signals.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use testkit::daemon::{Launch, Process, write_private};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::TcpStream;

pub const BIN: &str = env!("CARGO_BIN_EXE_oauthrelay");

/// A running daemon and its private state directory (the process itself is
/// `testkit::daemon::Process`, which the benchmark uses too).
pub struct Daemon {
    pub dir: PathBuf,
    pub config: PathBuf,
    process: Process,
    pub smtp: SocketAddr,
    pub metrics: Option<SocketAddr>,
    /// `RUST_LOG` for this daemon (default: `$E2E_LOG`, else `info`).
    log: Option<String>,
    runs: u32,
    _tmp: Option<tempfile::TempDir>,
}

/// Config text with `{dir}` replaced by the state directory (written 0600:
/// the accounts carry an inline client_secret, which oauthrelay refuses in a
/// file group or others can read).
pub fn config_in(dir: &Path, body: &str) -> PathBuf {
    let text = format!(
        "state_dir = \"{}\"\n{}",
        dir.display(),
        body.replace("{dir}", &dir.display().to_string())
    );
    let path = dir.join("oauthrelay.toml");
    write_private(&path, &text).unwrap();
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
        let mut d = Daemon::spawn(dir, config, log.map(str::to_string), 1);
        d._tmp = Some(tmp);
        d
    }

    /// Start again on the same state directory and config.
    pub fn restart(mut self) -> Daemon {
        let tmp = self._tmp.take();
        self.process.kill9();
        let mut d = Daemon::spawn(
            self.dir.clone(),
            self.config.clone(),
            self.log.take(),
            self.runs + 1,
        );
        d._tmp = tmp;
        d
    }

    fn spawn(dir: PathBuf, config: PathBuf, log: Option<String>, runs: u32) -> Daemon {
        let launch = Launch {
            bin: BIN.into(),
            config: config.clone(),
            log: dir.join(format!("daemon-{runs}.log")),
            rust_log: log
                .clone()
                .unwrap_or_else(|| std::env::var("E2E_LOG").unwrap_or_else(|_| "info".into())),
            env: Vec::new(),
        };
        let process = Process::spawn(&launch).expect("spawn oauthrelay");
        let mut d = Daemon {
            dir,
            config,
            process,
            smtp: "0.0.0.0:0".parse().unwrap(),
            metrics: None,
            log,
            runs,
            _tmp: None,
        };
        d.wait_log(" ready", Duration::from_secs(30));
        d.smtp = d.process.smtp_addr().expect("SMTP address in log");
        d.metrics = d.process.metrics_addr();
        d
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Everything the daemon logged so far.
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// Wait for a log line containing `needle`; panic with the logs after `limit`.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> String {
        self.process
            .wait_log_blocking(needle, limit)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// SIGKILL: the crash we must survive.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Send a signal by name (`TERM`, `HUP`, `INT`).
    pub fn signal(&self, sig: &str) {
        let n = match sig {
            "TERM" => libc::SIGTERM,
            "HUP" => libc::SIGHUP,
            "INT" => libc::SIGINT,
            "KILL" => libc::SIGKILL,
            other => panic!("unknown signal {other}"),
        };
        self.process.signal(n);
    }

    /// SIGTERM and wait for the exit status (bounded).
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.process
            .terminate(limit)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Run another `oauthrelay` command with this daemon's config.
    pub fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
        run_cli(&self.config, args, stdin)
    }

    /// Peak resident set size (VmHWM) and current RSS, in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        self.process.memory_kib()
    }

    /// Reset the peak-RSS counter (Linux `clear_refs` 5).
    pub fn reset_peak_rss(&self) {
        self.process.reset_peak_rss();
    }

    /// GET a path on the metrics listener: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics.expect("metrics listener"), path).await
    }
}

pub fn run_cli(config: &Path, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    testkit::daemon::run_cli(Path::new(BIN), config, args, stdin).expect("spawn oauthrelay")
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
        Smtp::over(TcpStream::connect(addr).await.unwrap())
    }

    /// A client on a connected stream (one bound to a chosen address).
    pub fn over(s: TcpStream) -> Smtp {
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

/// A CLI command (`authorize`, ...) whose stdout is read line by line while
/// it runs, as a person at the terminal would: wait for a line, answer on
/// stdin, wait for the exit.
pub struct Interactive {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Interactive {
    /// `oauthrelay --config CONFIG ARGS...` with no display (no browser
    /// opens) and no systemd directories; stdin piped when `stdin`.
    pub fn start(config: &Path, args: &[&str], stdin: bool) -> Interactive {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("STATE_DIRECTORY")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY")
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn oauthrelay");
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout piped");
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Interactive {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first printed line for which `pick` gives something, waiting
    /// up to `limit` for it.
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        mut pick: impl FnMut(&str) -> Option<String>,
    ) -> String {
        let deadline = std::time::Instant::now() + limit;
        let mut i = 0;
        loop {
            while i < self.seen.len() {
                if let Some(v) = pick(&self.seen[i]) {
                    return v;
                }
                i += 1;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("no {what} within {limit:?}:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// The first printed line containing `needle`, waiting up to `limit`.
    pub fn wait_line(&mut self, needle: &str, limit: Duration) -> String {
        self.wait_for(&format!("line with {needle:?}"), limit, |l| {
            l.contains(needle).then(|| l.to_string())
        })
    }

    /// Type `line` and Enter.
    pub fn paste(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin piped");
        std::io::Write::write_all(stdin, format!("{line}\n").as_bytes()).expect("write stdin");
        std::io::Write::flush(stdin).expect("flush stdin");
    }

    /// Wait for the exit (bounded by `limit`): (success, all stdout, stderr).
    pub fn finish(mut self, limit: Duration) -> (bool, String, String) {
        let deadline = std::time::Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "the command did not exit within {limit:?}:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(l);
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status.success(), self.seen.join("\n"), err)
    }
}
