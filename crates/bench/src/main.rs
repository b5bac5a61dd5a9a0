//! `oauthrelay-bench`: oauthrelay's benchmark, side by side with Postfix.
//!
//! ```text
//! cargo build --release -p oauthrelay -p bench
//! target/release/oauthrelay-bench [--vs-postfix] [--workloads 1k,1m,idle,memory,logins,startup,api]
//! ```
//!
//! The fakes (`testkit`: token endpoint, fake Gmail over TLS + XOAUTH2,
//! fake Gmail API over HTTPS) run
//! in this process on their own threads; the real `oauthrelay` binary runs
//! as a child with a generated config; with `--vs-postfix` a private Postfix
//! instance (`bench/postfix.sh`) relays to a second fake Gmail, and the two
//! systems take turns. See `docs/benchmarks.md`.

mod client;
mod daemon;
mod postfix;
mod procfs;
mod report;
mod stats;
mod upstream;
mod workloads;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "oauthrelay-bench",
    about = "Benchmark oauthrelay (and optionally Postfix) relaying to a fake Gmail"
)]
pub struct Args {
    /// Workloads to run, comma-separated: 1k, 1m, idle, memory, logins,
    /// startup, api (1 KB and 1 MB through the Gmail API transport beside
    /// SMTP, then pacing at the default max_rate).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1k,1m,idle,memory,logins,startup,api"
    )]
    pub workloads: Vec<String>,
    /// Also run a private Postfix instance through bench/postfix.sh and
    /// alternate runs with it.
    #[arg(long)]
    pub vs_postfix: bool,
    /// Runs per system for the 1k, 1m and idle workloads (alternating).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Length of each load run's measurement window, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Concurrent client sessions for `1k`.
    #[arg(long, default_value_t = 20)]
    pub sessions_1k: usize,
    /// Concurrent client sessions for `1m`.
    #[arg(long, default_value_t = 10)]
    pub sessions_1m: usize,
    /// Keep each client session's connection for all its messages
    /// (`smtp-source -d`). Default: one connection per message, QUIT after
    /// it (`smtp-source`'s default).
    #[arg(long)]
    pub reuse: bool,
    /// oauthrelay's `[delivery] concurrency` (upstream connections).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// `max_rate` of the Gmail API account in the `api` workload's
    /// throughput runs (sends per second; high, so the relay and not its
    /// pacing is measured: the transport's default is 2.5).
    #[arg(long, default_value_t = 10_000.0)]
    pub api_max_rate: f64,
    /// Messages of the `api` workload's pacing run (at the default
    /// max_rate of 2.5 a second; 0: skip it).
    #[arg(long, default_value_t = 20)]
    pub api_paced_messages: usize,
    /// Messages for the `idle` workload.
    #[arg(long, default_value_t = 200)]
    pub idle_messages: usize,
    /// Messages queued before the `startup` workload restarts the daemon.
    #[arg(long, default_value_t = 10_000)]
    pub startup_messages: u64,
    /// Size of the big message of the `memory` workload, in bytes.
    #[arg(long, default_value_t = 30 * 1024 * 1024)]
    pub big_message: usize,
    /// Idle SMTP sessions held open by the `memory` workload.
    #[arg(long, default_value_t = 1000)]
    pub idle_sessions: usize,
    /// Sequential failed logins (one address each) of the `logins` workload.
    #[arg(long, default_value_t = 100)]
    pub sequential_logins: usize,
    /// Parallel failed logins of the `logins` workload (from as many
    /// addresses, then from one).
    #[arg(long, default_value_t = 60)]
    pub parallel_logins: usize,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// Worker threads of the fake upstreams.
    #[arg(long, default_value_t = 1)]
    pub upstream_threads: usize,
    /// The oauthrelay binary. Default: `oauthrelay` next to this program.
    #[arg(long)]
    pub oauthrelay: Option<PathBuf>,
    /// The Postfix side's script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/postfix.sh"))]
    pub postfix_script: PathBuf,
    /// Where the temporary state directories go (same disk as production
    /// would use: the spool's fsync is what is measured).
    #[arg(long)]
    pub tmpdir: Option<PathBuf>,
    /// Extra environment for the oauthrelay daemon (KEY=VALUE, repeatable;
    /// for experiments such as MALLOC_ARENA_MAX=1).
    #[arg(long = "daemon-env", value_name = "KEY=VALUE")]
    pub daemon_env: Vec<String>,
    /// Keep the temporary directory (configs, logs, Postfix's maillog).
    #[arg(long)]
    pub keep: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    raise_fd_limit();
    let upstream_rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.upstream_threads.max(1))
        .thread_name("upstream")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("oauthrelay-bench: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client_rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .thread_name("client")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("oauthrelay-bench: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = upstream_rt.handle().clone();
    let result = client_rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        // Dropping the benchmark future on a signal drops every child
        // handle: daemons are killed and Postfix is stopped.
        tokio::select! {
            r = workloads::run_all(args, handle) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (SIGINT); children stopped")),
            _ = term.recv() => Err(anyhow::anyhow!("terminated (SIGTERM); children stopped")),
        }
    });
    client_rt.shutdown_timeout(Duration::from_secs(2));
    upstream_rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("oauthrelay-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// 1,000 idle sessions need more descriptors than a default soft limit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(65_536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
