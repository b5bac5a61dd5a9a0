//! `logins`: oauthrelay's memory under password guessing. Every failed
//! AUTH costs an argon2id check (19 MiB of working memory with the
//! `hash-password` defaults); the relay must bound how many run at once and
//! give their memory back, whatever the attack.
//!
//! Clients connect from loopback aliases (127.0.1.x, 127.0.2.x...) while
//! only 127.0.0.1 is in `allow_networks`, so each address is a separate
//! outside client to the relay (its own AUTH failure budget), as from a
//! botnet.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{Bench, conditions, free_addr_any};
use crate::client::{Conn, SmtpError};
use crate::daemon::{Daemon, Instance};
use crate::procfs::{self, Memory};
use crate::report::Target;

const USER: &str = "scanner";
const PASSWORD: &str = "correct horse battery staple";

/// How many of a phase's attempts got each reply.
#[derive(Debug, Default)]
struct Outcomes {
    /// `535`: the password was checked and was wrong.
    rejected: usize,
    /// `454`: refused without a check (rate limit, or no check slot free).
    refused: usize,
    /// `421` at connect (connection limits).
    not_admitted: usize,
    /// Anything else, or a broken connection.
    other: usize,
}

impl Outcomes {
    fn add(&mut self, r: Result<String, SmtpError>) {
        match r {
            Ok(l) if l.starts_with("535") => self.rejected += 1,
            Ok(l) if l.starts_with("454") => self.refused += 1,
            Ok(l) if l.starts_with("421") => self.not_admitted += 1,
            _ => self.other += 1,
        }
    }

    fn line(&self) -> String {
        let mut s = format!(
            "{} checked and refused (535), {} refused unchecked (454)",
            self.rejected, self.refused
        );
        if self.not_admitted > 0 {
            s.push_str(&format!(", {} not admitted (421)", self.not_admitted));
        }
        if self.other > 0 {
            s.push_str(&format!(", {} other", self.other));
        }
        s
    }
}

/// One failed login from `from`: connect, EHLO, AUTH PLAIN with a wrong
/// password, QUIT. Returns the AUTH reply (or the `421` at connect).
async fn failed_login(from: IpAddr, addr: SocketAddr, guess: usize) -> Result<String, SmtpError> {
    use base64::Engine as _;
    let mut c = Conn::connect_from(from, addr).await?;
    let greeting = c.reply().await?;
    if !greeting.starts_with("220") {
        return Ok(greeting);
    }
    c.command("EHLO guesser.bench.test", "EHLO", "250").await?;
    let creds =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0wrong guess {guess}"));
    let r = c.ask(&format!("AUTH PLAIN {creds}")).await?;
    let _ = c.quit().await;
    Ok(r)
}

fn address(net: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, net, (i % 250 + 1) as u8))
}

fn mb(k: u64) -> f64 {
    k as f64 / 1024.0
}

/// RSS now and the peak since the last reset.
fn show(what: &str, took: Duration, outcomes: &Outcomes, m: Memory) {
    println!(
        "  {what} in {:.1} s: {}; RSS after {:.2} MB, peak {:.2} MB",
        took.as_secs_f64(),
        outcomes.line(),
        mb(m.rss_kib),
        mb(m.peak_kib)
    );
}

impl Bench {
    pub(super) async fn logins(&mut self, targets: &mut Vec<Target>) -> anyhow::Result<()> {
        println!(
            "\n== logins: oauthrelay's RSS under password guessing ({} sequential and {} parallel failed logins from distinct addresses, {} parallel from one), {}",
            self.args.sequential_logins,
            self.args.parallel_logins,
            self.args.parallel_logins,
            conditions().await
        );
        let hash = Instance::hash_password(&self.bin, PASSWORD)?;
        let mut spec = self.spec(free_addr_any());
        spec.server_extra = "allow_networks = [\"127.0.0.1/32\"]\n".into();
        spec.users = vec![(USER.into(), hash)];
        let dir = self.next_dir("logins");
        let mut inst = Instance::create(&self.bin, &dir, spec)?;
        for kv in &self.args.daemon_env {
            if let Some((k, v)) = kv.split_once('=') {
                inst.env.push((k.to_string(), v.to_string()));
            }
        }
        let mut d = inst.start().await?;
        let pid = d.pid();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = d.memory();
        println!(
            "  idle after start: RSS {:.2} MB (peak so far {:.2} MB)",
            mb(idle.rss_kib),
            mb(idle.peak_kib)
        );
        let addr = d.smtp();
        procfs::reset_peak(pid).context("resetting the peak RSS (clear_refs)")?;
        let mut peak = 0;

        // Sequential, one address each (under every per-address limit).
        let n = self.args.sequential_logins;
        let mut o = Outcomes::default();
        let t = Instant::now();
        for i in 0..n {
            o.add(failed_login(address(1, i), addr, i).await);
        }
        let m = d.memory();
        peak = peak.max(m.peak_kib);
        show(
            &format!("{n} sequential failed logins from {n} addresses"),
            t.elapsed(),
            &o,
            m,
        );

        // Parallel, one address each.
        let n = self.args.parallel_logins;
        let (o, took) = parallel(addr, n, |i| address(2, i)).await;
        let m = d.memory();
        peak = peak.max(m.peak_kib);
        show(
            &format!("{n} parallel failed logins from {n} addresses"),
            took,
            &o,
            m,
        );

        // Parallel, all from one address (the per-address limits).
        let (o, took) = parallel(addr, n, |_| address(3, 0)).await;
        let m = d.memory();
        peak = peak.max(m.peak_kib);
        show(
            &format!("{n} parallel failed logins from one address"),
            took,
            &o,
            m,
        );

        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = d.memory();
        println!(
            "  idle 5 s later: RSS {:.2} MB (anonymous {:.2} MB)",
            mb(after.rss_kib),
            mb(after.anon_kib)
        );
        still_serves(&d).await?;
        d.terminate().await?;
        targets.push(Target {
            what: "password guessing: peak RSS".into(),
            target: "< 64 MB".into(),
            measured: format!("{:.2} MB, {:.2} MB after", mb(peak), mb(after.rss_kib)),
            met: Some(mb(peak) < 64.0),
        });
        Ok(())
    }
}

/// `n` failed logins at once, the `i`-th from `from(i)`.
async fn parallel(
    addr: SocketAddr,
    n: usize,
    from: impl Fn(usize) -> IpAddr,
) -> (Outcomes, Duration) {
    let t = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(failed_login(from(i), addr, i)))
        .collect();
    let mut o = Outcomes::default();
    for task in tasks {
        match task.await {
            Ok(r) => o.add(r),
            Err(_) => o.other += 1,
        }
    }
    (o, t.elapsed())
}

/// After the storm, the trusted client is still served.
async fn still_serves(d: &Daemon) -> anyhow::Result<()> {
    let c = Conn::open(d.smtp())
        .await
        .context("a loopback client after the guessing")?;
    c.quit().await.context("QUIT after the guessing")?;
    Ok(())
}
