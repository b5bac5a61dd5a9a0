//! The real `oauthrelay` binary as a child process: a generated config in a
//! temporary state directory, logs to a file, the listen address read from
//! the log. The child is killed when the handle is dropped, and dies with
//! the benchmark (`PR_SET_PDEATHSIG`) if that is killed outright.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::procfs;
use crate::upstream::{CLIENT_ID, CLIENT_SECRET, EMAIL};

pub const ACCOUNT: &str = "bench";

/// What goes into the generated config.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `[server] listen` (port 0: any).
    pub listen: SocketAddr,
    /// `[delivery] concurrency`.
    pub concurrency: usize,
    /// `[server] max_connections`.
    pub max_connections: usize,
    /// The fake Gmail's port.
    pub upstream_port: u16,
    pub ca_file: PathBuf,
    pub token_url: String,
}

/// A state directory with its config; daemons run on it one at a time.
pub struct Instance {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Extra environment for `serve`.
    pub env: Vec<(String, String)>,
    runs: u32,
}

impl Instance {
    /// Write the config into `dir` (created).
    pub fn create(bin: &Path, dir: &Path, spec: Spec) -> anyhow::Result<Instance> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("oauthrelay.toml");
        let text = format!(
            r#"state_dir = "{dir}"

[server]
listen = ["{listen}"]
hostname = "relay.bench.test"
max_connections = {max_conn}

[metrics]
listen = "127.0.0.1:0"

[delivery]
concurrency = {concurrency}

[[accounts]]
name = "{ACCOUNT}"
email = "{EMAIL}"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
smtp_host = "127.0.0.1"
smtp_port = {port}
smtp_tls = "implicit"
ca_file = "{ca}"
token_url = "{token_url}"
"#,
            dir = dir.display(),
            listen = spec.listen,
            max_conn = spec.max_connections,
            concurrency = spec.concurrency,
            port = spec.upstream_port,
            ca = spec.ca_file.display(),
            token_url = spec.token_url,
        );
        fs::write(&config, text).context("writing the config")?;
        // It holds an inline client secret: the daemon refuses such a file
        // when others can read it.
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&config, fs::Permissions::from_mode(0o600))
                .context("chmod 600 the config")?;
        }
        Ok(Instance {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            config,
            env: Vec::new(),
            runs: 0,
        })
    }

    /// `oauthrelay token import --account bench` with `token` on stdin.
    pub fn import_token(&self, token: &str) -> anyhow::Result<()> {
        let mut child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(["token", "import", "--account", ACCOUNT])
            .env_remove("STATE_DIRECTORY")
            .env_remove("CREDENTIALS_DIRECTORY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.bin.display()))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(token.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "token import failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Start `oauthrelay serve`; returns once it logged `ready`.
    pub async fn start(&mut self) -> anyhow::Result<Daemon> {
        let mut d = self.spawn()?;
        d.wait_ready().await?;
        d.read_smtp_addr()?;
        Ok(d)
    }

    /// Start `oauthrelay serve` without waiting for anything.
    pub fn spawn(&mut self) -> anyhow::Result<Daemon> {
        self.runs += 1;
        let log = self.dir.join(format!("daemon-{}.log", self.runs));
        let stderr = fs::File::create(&log).context("creating the daemon log")?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env("RUST_LOG", "info")
            .env_remove("STATE_DIRECTORY")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
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
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        Ok(Daemon {
            child: Some(child),
            log,
            started,
            smtp: None,
        })
    }
}

/// A running `oauthrelay serve`.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    /// Just before the process was spawned.
    pub started: Instant,
    smtp: Option<SocketAddr>,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Where it accepts SMTP (known after [`wait_ready`](Self::wait_ready)).
    pub fn smtp(&self) -> SocketAddr {
        self.smtp
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn memory(&self) -> procfs::Memory {
        procfs::memory(self.pid())
    }

    /// Wait for `ready` and read the SMTP address from `SMTP listening on`.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        self.wait_log(" ready", Duration::from_secs(60)).await?;
        Ok(())
    }

    /// Wait for a log line containing `needle`; returns the line and when
    /// it was first seen. Fails if the daemon exits or `limit` passes.
    pub async fn wait_log(
        &self,
        needle: &str,
        limit: Duration,
    ) -> anyhow::Result<(String, Instant)> {
        let start = Instant::now();
        loop {
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.contains(needle)) {
                return Ok((l.to_string(), Instant::now()));
            }
            if self.exited() {
                bail!(
                    "oauthrelay exited while waiting for {needle:?}; log {}:\n{}",
                    self.log.display(),
                    tail(&text, 30)
                );
            }
            if start.elapsed() > limit {
                bail!(
                    "no log line with {needle:?} after {limit:?}; log {}:\n{}",
                    self.log.display(),
                    tail(&text, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The SMTP address from the log (after `ready`).
    pub fn read_smtp_addr(&mut self) -> anyhow::Result<SocketAddr> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let addr = text
            .lines()
            .find_map(|l| addr_after(l, "SMTP listening on "))
            .context("no `SMTP listening on ADDR` line in the daemon log")?;
        self.smtp = Some(addr);
        Ok(addr)
    }

    /// The value of a counter or gauge on its `/metrics` page (address
    /// from the `metrics listening on http://ADDR/metrics` log line).
    pub async fn metric(&self, name: &str) -> anyhow::Result<u64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let addr = text
            .lines()
            .find_map(|l| addr_after(l, "metrics listening on http://"))
            .context("no `metrics listening on` line in the daemon log")?;
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
            .await?;
        let mut page = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut page))
            .await
            .context("/metrics did not answer within 5 s")??;
        page.lines()
            .find_map(|l| {
                let v = l.strip_prefix(name)?.strip_prefix(' ')?;
                v.trim().parse::<f64>().ok()
            })
            .map(|v| v as u64)
            .with_context(|| format!("no {name} on /metrics"))
    }

    fn exited(&self) -> bool {
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

    /// SIGTERM, then wait (bounded) for the exit.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait()? {
                if !status.success() {
                    bail!("oauthrelay exited with {status} after SIGTERM");
                }
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = c.kill();
                let _ = c.wait();
                bail!("oauthrelay did not stop within 60 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let token: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | '"' | '/'))
        .collect();
    token.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_address_is_read_from_the_log_line() {
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
