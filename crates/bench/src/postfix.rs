//! A private Postfix instance, driven through `bench/postfix.sh`. Stopped
//! when the handle is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::client::Conn;

/// `postfix.sh check`: `Ok(Some(version))` when a private instance can run,
/// `Ok(None)` (with the script's explanation printed) when it cannot.
pub fn check(script: &Path) -> anyhow::Result<Option<String>> {
    let out = Command::new(script)
        .arg("check")
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if out.status.success() {
        return Ok(Some(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ));
    }
    eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(None)
}

pub struct Postfix {
    script: PathBuf,
    dir: PathBuf,
    pub smtp: SocketAddr,
    running: bool,
}

impl Postfix {
    /// `postfix.sh setup`: config and queue under `dir`.
    pub fn setup(
        script: &Path,
        dir: &Path,
        smtp: SocketAddr,
        relay_port: u16,
        ca_file: &Path,
    ) -> anyhow::Result<Postfix> {
        run(
            script,
            &[
                "setup",
                &dir.display().to_string(),
                &smtp.port().to_string(),
                &relay_port.to_string(),
                &ca_file.display().to_string(),
            ],
        )?;
        Ok(Postfix {
            script: script.to_path_buf(),
            dir: dir.to_path_buf(),
            smtp,
            running: false,
        })
    }

    /// Start it and wait until smtpd greets.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        self.running = true;
        run(&self.script, &["start", &self.dir.display().to_string()])?;
        let t = Instant::now();
        loop {
            if let Ok(c) = Conn::open(self.smtp).await {
                let _ = c.quit().await;
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!(
                    "Postfix's smtpd on {} did not answer within 30 s",
                    self.smtp
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stop(&mut self) -> anyhow::Result<()> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        run(&self.script, &["stop", &self.dir.display().to_string()])
    }

    /// Messages still in its queue.
    pub fn queued(&self) -> u64 {
        Command::new(&self.script)
            .args(["queue", &self.dir.display().to_string()])
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn master_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("queue/pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping Postfix: {e:#}");
        }
    }
}

fn run(script: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(script)
        .args(args)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): {}{}",
            script.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
