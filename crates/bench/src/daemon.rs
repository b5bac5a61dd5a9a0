//! The real `oauthrelay` binary as a child process: a generated config in a
//! temporary state directory (the process itself is
//! `testkit::daemon::Process`, shared with the end-to-end tests: log to a
//! file, the addresses read from it, killed on drop and with the
//! benchmark).

use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use testkit::daemon::{Launch, Process, run_cli, write_private};

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
    /// More `[server]` lines (`key = value`, one per line).
    pub server_extra: String,
    /// `[[server.users]]`: name and PHC hash.
    pub users: Vec<(String, String)>,
    /// `transport = "gmail-api"` for the account (else SMTP).
    pub api: Option<ApiSpec>,
}

/// The account's Gmail API settings.
#[derive(Debug, Clone)]
pub struct ApiSpec {
    /// `api_url`: the fake Gmail API (HTTPS, trusted through `ca_file`).
    pub url: String,
    /// `max_rate`; `None`: the transport's default (2.5 a second).
    pub max_rate: Option<f64>,
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
{server_extra}
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
            server_extra = spec.server_extra,
        );
        let mut text = text;
        if let Some(api) = &spec.api {
            text.push_str(&format!(
                "transport = \"gmail-api\"\napi_url = \"{}\"\n",
                api.url
            ));
            if let Some(rate) = api.max_rate {
                text.push_str(&format!("max_rate = {rate:?}\n"));
            }
        }
        for (name, hash) in &spec.users {
            text.push_str(&format!(
                "\n[[server.users]]\nname = \"{name}\"\npassword_hash = \"{hash}\"\n"
            ));
        }
        // It holds an inline client secret: the daemon refuses such a file
        // when others can read it.
        write_private(&config, &text).context("writing the config")?;
        Ok(Instance {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            config,
            env: Vec::new(),
            runs: 0,
        })
    }

    /// `oauthrelay hash-password` with `password` on stdin.
    pub fn hash_password(bin: &Path, password: &str) -> anyhow::Result<String> {
        let mut child = Command::new(bin)
            .arg("hash-password")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", bin.display()))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(format!("{password}\n").as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "hash-password failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `oauthrelay token import --account bench` with `token` on stdin.
    pub fn import_token(&self, token: &str) -> anyhow::Result<()> {
        let out = run_cli(
            &self.bin,
            &self.config,
            &["token", "import", "--account", ACCOUNT],
            Some(token.as_bytes()),
        )
        .with_context(|| format!("running {}", self.bin.display()))?;
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
        let launch = Launch {
            bin: self.bin.clone(),
            config: self.config.clone(),
            log: self.dir.join(format!("daemon-{}.log", self.runs)),
            rust_log: "info".into(),
            env: self.env.clone(),
        };
        let process =
            Process::spawn(&launch).with_context(|| format!("starting {}", self.bin.display()))?;
        Ok(Daemon {
            log: process.log.clone(),
            started: process.started,
            process,
            smtp: None,
        })
    }
}

/// A running `oauthrelay serve`.
pub struct Daemon {
    process: Process,
    pub log: PathBuf,
    /// Just before the process was spawned.
    pub started: Instant,
    smtp: Option<SocketAddr>,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Where it accepts SMTP (known after [`wait_ready`](Self::wait_ready)).
    pub fn smtp(&self) -> SocketAddr {
        self.smtp
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn memory(&self) -> procfs::Memory {
        procfs::memory(self.pid())
    }

    /// Wait for `ready`.
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
        self.process
            .wait_log(needle, limit)
            .await
            .map_err(anyhow::Error::msg)
    }

    /// The SMTP address from the log (after `ready`).
    pub fn read_smtp_addr(&mut self) -> anyhow::Result<SocketAddr> {
        let addr = self
            .process
            .smtp_addr()
            .context("no `SMTP listening on ADDR` line in the daemon log")?;
        self.smtp = Some(addr);
        Ok(addr)
    }

    /// The value of a counter or gauge on its `/metrics` page.
    pub async fn metric(&self, name: &str) -> anyhow::Result<u64> {
        let page = self.page("/metrics").await?;
        page.lines()
            .find_map(|l| {
                let v = l.strip_prefix(name)?.strip_prefix(' ')?;
                v.trim().parse::<f64>().ok()
            })
            .map(|v| v as u64)
            .with_context(|| format!("no {name} on /metrics"))
    }

    /// A page of its HTTP listener (`/metrics`, `/readyz`, the status
    /// page `/`): the whole response, status line and headers included.
    pub async fn page(&self, path: &str) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self
            .process
            .metrics_addr()
            .context("no `metrics listening on` line in the daemon log")?;
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").as_bytes())
            .await?;
        let mut page = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut page))
            .await
            .with_context(|| format!("{path} did not answer within 5 s"))??;
        Ok(page)
    }

    /// SIGTERM, then wait (bounded) for the exit.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        let status = self
            .process
            .terminate(Duration::from_secs(60))
            .map_err(anyhow::Error::msg)?;
        if !status.success() {
            bail!("oauthrelay exited with {status} after SIGTERM");
        }
        Ok(())
    }
}
