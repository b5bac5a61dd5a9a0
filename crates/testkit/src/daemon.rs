//! The real `oauthrelay` binary under test, shared by the end-to-end tests
//! (`tests/e2e`) and the benchmark (`crates/bench`): a private config,
//! `serve` as a child process whose log goes to a file in its state
//! directory, the addresses read from what it logs, signals, `/proc`
//! memory figures, and other commands run on the same config. The child is
//! killed when the handle is dropped, and dies with the test process
//! (`PR_SET_PDEATHSIG`) if that is killed outright.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Write `text` to `path` readable by its owner only: test configs carry an
/// inline `client_secret`, which the daemon refuses in a file others can
/// read.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
}

/// How to run `oauthrelay serve`.
#[derive(Debug, Clone)]
pub struct Launch {
    pub bin: PathBuf,
    pub config: PathBuf,
    /// Where its log (stderr) goes.
    pub log: PathBuf,
    /// `RUST_LOG`.
    pub rust_log: String,
    /// Extra environment.
    pub env: Vec<(String, String)>,
}

/// A running `oauthrelay serve`.
pub struct Process {
    child: Option<Child>,
    pub log: PathBuf,
    /// Just before the process was spawned.
    pub started: Instant,
}

impl Process {
    /// Spawn it; returns at once.
    pub fn spawn(l: &Launch) -> std::io::Result<Process> {
        let stderr = fs::File::create(&l.log)?;
        let mut cmd = Command::new(&l.bin);
        cmd.arg("--config")
            .arg(&l.config)
            .arg("serve")
            .env("RUST_LOG", &l.rust_log)
            .env_remove("STATE_DIRECTORY")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .envs(l.env.iter().map(|(k, v)| (k, v)));
        // SAFETY: prctl is async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd.spawn()?;
        Ok(Process {
            child: Some(child),
            log: l.log.clone(),
            started,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Everything it logged so far.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first log line containing `needle`, if any yet.
    pub fn log_line(&self, needle: &str) -> Option<String> {
        self.logs()
            .lines()
            .find(|l| l.contains(needle))
            .map(str::to_string)
    }

    /// Whether the process has exited (or was never started).
    pub fn exited(&self) -> bool {
        let Some(c) = self.child.as_ref() else {
            return true;
        };
        let stat = fs::read_to_string(format!("/proc/{}/stat", c.id())).unwrap_or_default();
        matches!(
            stat.rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next()),
            Some("Z") | None
        )
    }

    /// One look for `needle`: `Ok(Some(line))`, `Ok(None)` (not yet), or
    /// an error with the log's tail if the daemon exited or `limit` passed
    /// since `start`.
    fn look(
        &self,
        needle: &str,
        start: Instant,
        limit: Duration,
    ) -> Result<Option<String>, String> {
        let text = self.logs();
        if let Some(l) = text.lines().find(|l| l.contains(needle)) {
            return Ok(Some(l.to_string()));
        }
        if self.exited() {
            // The last lines may still be on their way to the file.
            std::thread::sleep(Duration::from_millis(50));
            return Err(format!(
                "oauthrelay exited while waiting for {needle:?}; log {}:\n{}",
                self.log.display(),
                tail(&self.logs(), 40)
            ));
        }
        if start.elapsed() > limit {
            return Err(format!(
                "no log line with {needle:?} after {limit:?}; log {}:\n{}",
                self.log.display(),
                tail(&text, 40)
            ));
        }
        Ok(None)
    }

    /// Wait (blocking the thread) for a log line containing `needle`.
    pub fn wait_log_blocking(&self, needle: &str, limit: Duration) -> Result<String, String> {
        let start = Instant::now();
        loop {
            if let Some(l) = self.look(needle, start, limit)? {
                return Ok(l);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait for a log line containing `needle`, and when it was seen.
    pub async fn wait_log(
        &self,
        needle: &str,
        limit: Duration,
    ) -> Result<(String, Instant), String> {
        let start = Instant::now();
        loop {
            if let Some(l) = self.look(needle, start, limit)? {
                return Ok((l, Instant::now()));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The SMTP address it logged (`SMTP listening on ADDR`).
    pub fn smtp_addr(&self) -> Option<SocketAddr> {
        self.logs()
            .lines()
            .find_map(|l| addr_after(l, "SMTP listening on "))
    }

    /// The metrics address it logged (`metrics listening on http://ADDR/metrics`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.logs()
            .lines()
            .find_map(|l| addr_after(l, "metrics listening on http://"))
    }

    /// Send a signal.
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(c) = self.child.as_ref() {
            // SAFETY: signalling our own child by pid.
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }

    /// SIGKILL and reap: the crash the daemon must survive.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit (bounded; killed after `limit`).
    pub fn terminate(&mut self, limit: Duration) -> Result<ExitStatus, String> {
        self.signal(libc::SIGTERM);
        let Some(mut c) = self.child.take() else {
            return Err("not running".into());
        };
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().map_err(|e| e.to_string())? {
                return Ok(s);
            }
            if start.elapsed() > limit {
                let _ = c.kill();
                let _ = c.wait();
                return Err(format!(
                    "oauthrelay did not stop within {limit:?} of SIGTERM; log:\n{}",
                    tail(&self.logs(), 40)
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Peak resident set size (`VmHWM`) and current RSS, in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = proc_status(self.pid());
        (status_kib(&status, "VmHWM:"), status_kib(&status, "VmRSS:"))
    }

    /// Reset the peak-RSS counter (Linux `clear_refs` 5).
    pub fn reset_peak_rss(&self) {
        let _ = fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Run another `oauthrelay` command (`token import`, `queue list`...) on
/// `config`, with `stdin` piped in.
pub fn run_cli(
    bin: &Path,
    config: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> std::io::Result<Output> {
    let mut child = Command::new(bin)
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
        .spawn()?;
    if let Some(input) = stdin
        && let Some(mut i) = child.stdin.take()
    {
        i.write_all(input)?;
    }
    child.wait_with_output()
}

/// `/proc/PID/status` (empty when the process is gone).
pub fn proc_status(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

/// A `kB` field of a `/proc/PID/status` text (`VmHWM:`, `VmRSS:`...); 0
/// when missing.
pub fn status_kib(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The address logged after `marker` on `line`.
pub fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let token: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | '"' | '/'))
        .collect();
    token.parse().ok()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_from_the_log_lines() {
        let l = "2025-11-25T04:00:00.000000Z  INFO oauthrelay::serve: SMTP listening on 127.0.0.1:40123";
        assert_eq!(
            addr_after(l, "SMTP listening on "),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        let l =
            "2025-11-25T04:00:00.000000Z  INFO metrics listening on http://127.0.0.1:9925/metrics";
        assert_eq!(
            addr_after(l, "metrics listening on http://"),
            Some("127.0.0.1:9925".parse().unwrap())
        );
    }
}
