//! Results and how they are printed.

use std::fmt::Write as _;
use std::time::Duration;

use crate::stats::{Latency, median, ms};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// oauthrelay relaying over SMTP (XOAUTH2) to the fake Gmail.
    Oauthrelay,
    Postfix,
    /// oauthrelay with `transport = "gmail-api"`, to the fake Gmail API.
    GmailApi,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Oauthrelay => "oauthrelay",
            System::Postfix => "postfix",
            System::GmailApi => "gmail-api",
        }
    }

    /// Tags Message-IDs and state directories apart.
    pub fn letter(self) -> char {
        match self {
            System::Oauthrelay => 'o',
            System::Postfix => 'p',
            System::GmailApi => 'g',
        }
    }
}

/// Where the CPU went during a run, in cores (CPU seconds per second).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    /// The oauthrelay process (not measured for Postfix's many processes).
    pub relay: Option<f64>,
    /// The fake upstreams' threads.
    pub upstream: f64,
    /// The load generator's threads.
    pub client: f64,
    /// The whole machine (everything, other users included).
    pub machine: f64,
    /// The whole machine during the second before the run (what others
    /// were using: the bench and the relay were idle).
    pub background: f64,
}

/// One throughput run.
#[derive(Debug, Clone)]
pub struct LoadRun {
    pub system: System,
    /// The name in the run's line (the system's, or the transport's in
    /// the `api` workload).
    pub label: &'static str,
    pub window: Duration,
    /// Client `250`s within the window.
    pub accepted: u64,
    /// Upstream `250`s within the window (of messages the client got a
    /// `250` for).
    pub e2e: u64,
    /// Client `250`s in all (transactions in flight at the deadline finish).
    pub acked_total: u64,
    /// Of those, how many reached the upstream.
    pub delivered_total: u64,
    /// From the start to the last upstream `250` of the run.
    pub drained_after: Option<Duration>,
    pub latency: Latency,
    /// Upstream `MAIL` to upstream `250` (the relay's outgoing transaction).
    pub upstream_tx: Latency,
    /// Upstream `250` to the next `MAIL` on the same connection.
    pub upstream_gap: Latency,
    pub errors: u64,
    pub first_error: Option<String>,
    /// oauthrelay: `VmHWM`; Postfix: the largest sampled sum of PSS over
    /// its processes (every 500 ms).
    pub peak_rss_kib: u64,
    pub upstream_connections: u64,
    pub cpu: Cpu,
    /// oauthrelay: spool fdatasyncs during the run (to the end of the
    /// catch-up) and the writes (commits, updates, removals) they
    /// acknowledged.
    pub spool_syncs: Option<(u64, u64)>,
}

impl LoadRun {
    pub fn accept_rate(&self) -> f64 {
        self.accepted as f64 / self.window.as_secs_f64()
    }
    pub fn e2e_rate(&self) -> f64 {
        self.e2e as f64 / self.window.as_secs_f64()
    }
    /// Everything acknowledged, over the time to the last upstream `250`
    /// (includes the catch-up after the clients stopped).
    pub fn drain_rate(&self) -> f64 {
        match self.drained_after {
            Some(d) if self.delivered_total == self.acked_total => {
                self.acked_total as f64 / d.as_secs_f64()
            }
            _ => f64::NAN,
        }
    }

    pub fn line(&self) -> String {
        let mut s = format!(
            "  {:<10} accept {:>8.1}/s  end-to-end {:>8.1}/s  p50 {:>7.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  peak RSS {:>6.1} MB  upstream conns {:>3}  acked {} delivered {}",
            self.label,
            self.accept_rate(),
            self.e2e_rate(),
            ms(self.latency.p50),
            ms(self.latency.p99),
            ms(self.latency.max),
            self.peak_rss_kib as f64 / 1024.0,
            self.upstream_connections,
            self.acked_total,
            self.delivered_total,
        );
        if let Some(d) = self.drained_after {
            let _ = write!(s, " (all by {:.2} s)", d.as_secs_f64());
        }
        let (tx, gap) = match self.system {
            System::GmailApi => (
                "upstream request (request head -> 200)",
                "between requests on a connection (200 -> next request)",
            ),
            _ => (
                "upstream transaction (MAIL -> 250)",
                "between transactions on a connection (250 -> next MAIL)",
            ),
        };
        let _ = write!(
            s,
            "\n             {tx}: mean {:.2} ms  p50 {:.2} ms  p99 {:.2} ms; {gap}: mean {:.2} ms  p50 {:.2} ms  p99 {:.2} ms",
            ms(self.upstream_tx.mean),
            ms(self.upstream_tx.p50),
            ms(self.upstream_tx.p99),
            ms(self.upstream_gap.mean),
            ms(self.upstream_gap.p50),
            ms(self.upstream_gap.p99)
        );
        if let Some((syncs, ops)) = self.spool_syncs {
            let _ = write!(
                s,
                "\n             spool: {syncs} fdatasyncs acknowledged {ops} writes ({:.1} per sync; {:.0} syncs/s over the window)",
                ops as f64 / syncs.max(1) as f64,
                syncs as f64 / self.window.as_secs_f64(),
            );
        }
        let c = &self.cpu;
        let _ = write!(
            s,
            "\n             cpu (cores): relay {}  fake upstream {:.2}  client {:.2}  machine {:.2} of {} (background before the run {:.2})",
            c.relay
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "-".into()),
            c.upstream,
            c.client,
            c.machine,
            cores(),
            c.background,
        );
        if self.errors > 0 {
            let _ = write!(
                s,
                "\n             {} client error(s), first: {}",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            );
        }
        s
    }
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// One idle-latency run.
#[derive(Debug, Clone)]
pub struct IdleRun {
    pub system: System,
    /// Client `250` to upstream `250`.
    pub to_250: Latency,
    /// Client `250` to upstream `MAIL`.
    pub to_mail: Latency,
    pub upstream_connections: u64,
    pub missing: usize,
    /// Messages whose upstream `250` came before the client had read its
    /// own `250` (counted as 0 ms): delivery starts at the commit, in
    /// parallel with the reply to the client.
    pub upstream_first: usize,
}

impl IdleRun {
    pub fn line(&self) -> String {
        format!(
            "  {:<10} 250->upstream 250: p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms | 250->upstream MAIL: p50 {:>6.2} ms  p99 {:>6.2} ms | {} messages ({} upstream 250 before the client read its 250), upstream conns {}{}",
            self.system.name(),
            ms(self.to_250.p50),
            ms(self.to_250.p99),
            ms(self.to_250.max),
            ms(self.to_mail.p50),
            ms(self.to_mail.p99),
            self.to_250.count,
            self.upstream_first,
            self.upstream_connections,
            if self.missing > 0 {
                format!(", {} NOT delivered", self.missing)
            } else {
                String::new()
            }
        )
    }
}

/// A row of a side-by-side table.
pub struct Row {
    pub label: &'static str,
    pub ours: f64,
    pub theirs: Option<f64>,
    /// Larger is better (rates) or smaller is better (latency, memory).
    pub higher_is_better: bool,
    pub decimals: usize,
}

impl Row {
    /// How many times better oauthrelay is.
    pub fn advantage(&self) -> Option<f64> {
        let t = self.theirs?;
        let r = if self.higher_is_better {
            self.ours / t
        } else {
            t / self.ours
        };
        r.is_finite().then_some(r)
    }
}

pub fn table(title: &str, rows: &[Row], with_postfix: bool) -> String {
    let footnote = "(advantage: how many times better oauthrelay is; rates oauthrelay/postfix, latency and memory postfix/oauthrelay)";
    table_of(
        title,
        rows,
        "oauthrelay",
        with_postfix.then_some(("postfix", "advantage", footnote)),
    )
}

/// A side-by-side table: the `ours` column, and, with `theirs`, its name,
/// the ratio column's name and a footnote saying how to read the ratio.
pub fn table_of(
    title: &str,
    rows: &[Row],
    ours: &str,
    theirs: Option<(&str, &str, &str)>,
) -> String {
    let mut s = format!("\n{title}\n");
    let _ = writeln!(
        s,
        "  {:<30} {:>14}{}",
        "",
        ours,
        match theirs {
            Some((name, ratio, _)) => format!(" {name:>14} {ratio:>11}"),
            None => String::new(),
        }
    );
    for r in rows {
        let _ = write!(s, "  {:<30} {:>14.*}", r.label, r.decimals, r.ours);
        if theirs.is_some() {
            match r.theirs {
                Some(t) => {
                    let _ = write!(s, " {:>14.*}", r.decimals, t);
                }
                None => {
                    let _ = write!(s, " {:>14}", "-");
                }
            }
            match r.advantage() {
                Some(a) => {
                    let _ = write!(s, " {:>10.2}x", a);
                }
                None => {
                    let _ = write!(s, " {:>11}", "-");
                }
            }
        }
        s.push('\n');
    }
    if let Some((_, _, footnote)) = theirs {
        let _ = writeln!(s, "  {footnote}");
    }
    s
}

/// Median of a field over the runs of one system.
pub fn med<T>(runs: &[T], f: impl Fn(&T) -> f64) -> f64 {
    median(&runs.iter().map(f).collect::<Vec<_>>())
}

/// A target of the Proof issue and how it fared.
pub struct Target {
    pub what: String,
    pub target: String,
    pub measured: String,
    /// `None`: cannot be judged in this run (no Postfix to compare with).
    pub met: Option<bool>,
}

pub fn targets(list: &[Target]) -> String {
    let mut s = String::from("\nTargets (issue 5)\n");
    for t in list {
        let _ = writeln!(
            s,
            "  {:<46} {:<16} {:<34} {}",
            t.what,
            t.target,
            t.measured,
            match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "n/a",
            }
        );
    }
    s
}
