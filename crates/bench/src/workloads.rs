//! The workloads: `1k`, `1m` (throughput), `idle` (latency on an idle
//! relay), `memory`, `logins` (memory under password guessing),
//! `startup`, and `api` (1 KB and 1 MB through the Gmail API transport
//! beside SMTP, plus pacing at the default `max_rate`).

mod api;
mod logins;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::runtime::Handle;

use crate::Args;
use crate::client::{self, Conn, Load, MessageTemplate};
use crate::daemon::{ApiSpec, Daemon, Instance, Spec};
use crate::postfix::{self, Postfix};
use crate::procfs;
use crate::report::{self, Cpu, IdleRun, LoadRun, Row, System, Target, med};
use crate::stats::{Latency, ms};
use crate::upstream::{Arrivals, Sink, Upstreams};

/// How long a run may take to hand everything it accepted upstream.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(180);

struct Bench {
    args: Args,
    bin: PathBuf,
    up: Upstreams,
    /// Postfix's private instance (set up once, started per run).
    postfix: Option<Postfix>,
    runs: u32,
    // Dropped last: Postfix is stopped before its queue directory goes.
    tmp: PathBuf,
    _tmp_guard: Option<tempfile::TempDir>,
}

pub async fn run_all(args: Args, upstream: Handle) -> anyhow::Result<()> {
    let bin = match &args.oauthrelay {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for the bench binary")?
            .join("oauthrelay"),
    };
    if !bin.is_file() {
        bail!(
            "{} not found: build it first (cargo build --release -p oauthrelay -p bench) or pass --oauthrelay PATH",
            bin.display()
        );
    }
    let tmp_guard = match &args.tmpdir {
        Some(d) => tempfile::Builder::new()
            .prefix("oauthrelay-bench-")
            .tempdir_in(d)?,
        None => tempfile::Builder::new()
            .prefix("oauthrelay-bench-")
            .tempdir()?,
    };
    let tmp = tmp_guard.path().to_path_buf();
    print_file_system(&tmp);
    // Postfix's processes (user postfix) read the CA file below it.
    set_mode(&tmp, 0o755)?;
    let up = Upstreams::start(upstream, &tmp).await?;

    print_machine(&args, &bin);
    let postfix = if args.vs_postfix {
        match postfix::check(&args.postfix_script)? {
            Some(version) => {
                println!(
                    "postfix: {version} (private instance via {})",
                    args.postfix_script.display()
                );
                let pf_dir = tmp.join("postfix");
                let smtp = free_addr()?;
                Some(Postfix::setup(
                    &args.postfix_script,
                    &pf_dir,
                    smtp,
                    up.gmail_postfix.port(),
                    &up.ca_file,
                )?)
            }
            None => {
                println!("postfix: not available, running oauthrelay only");
                None
            }
        }
    } else {
        None
    };
    let keep = args.keep;
    let mut b = Bench {
        args,
        bin,
        up,
        postfix,
        runs: 0,
        tmp,
        _tmp_guard: Some(tmp_guard),
    };
    if keep && let Some(g) = b._tmp_guard.take() {
        println!("keeping {}", g.keep().display());
    }

    let mut targets = Vec::new();
    let workloads = b.args.workloads.clone();
    for w in &workloads {
        match w.as_str() {
            "1k" => {
                let sessions = b.args.sessions_1k;
                b.throughput("1k", 1024, sessions, &mut targets).await?
            }
            "1m" => {
                let sessions = b.args.sessions_1m;
                b.throughput("1m", 1024 * 1024, sessions, &mut targets)
                    .await?
            }
            "idle" => b.idle(&mut targets).await?,
            "memory" => b.memory(&mut targets).await?,
            "logins" => b.logins(&mut targets).await?,
            "startup" => b.startup(&mut targets).await?,
            "api" => b.api().await?,
            other => {
                bail!("unknown workload {other:?} (1k, 1m, idle, memory, logins, startup, api)")
            }
        }
    }
    print!("{}", report::targets(&targets));
    println!("load average at the end: {:.2}", procfs::load_average());
    if let Some(p) = b.postfix.as_mut() {
        p.stop()?;
    }
    Ok(())
}

fn print_machine(args: &Args, bin: &Path) {
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "machine: {} cores, {:.1} GiB RAM, kernel {}, load average {:.2}",
        report::cores(),
        mem as f64 / 1024.0 / 1024.0,
        kernel.trim(),
        procfs::load_average()
    );
    let version = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let built = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| format!("built {}", utc(d.as_secs())))
        .unwrap_or_default();
    println!(
        "oauthrelay: {} ({version}, {built}); [delivery] concurrency = {}; client: {} connection{}, no pipelining",
        bin.display(),
        args.concurrency,
        if args.reuse {
            "one long-lived"
        } else {
            "a new"
        },
        if args.reuse {
            " per session"
        } else {
            " per message (QUIT after each)"
        },
    );
}

/// Say which file system the spools and Postfix's queue are on: on tmpfs
/// an fsync costs nothing and the figures no longer measure durability.
fn print_file_system(dir: &Path) {
    match procfs::file_system(dir) {
        Some(fs) if fs.volatile => println!(
            "WARNING: {} is on {} (memory): fsync is free there, so these figures do not \
             measure \"on stable storage before 250\"; pass --tmpdir DIR on a real disk",
            dir.display(),
            fs.name
        ),
        Some(fs) => println!("spools and queues: {} ({})", dir.display(), fs.name),
        None => println!("spools and queues: {} (file system unknown)", dir.display()),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` for seconds since the epoch.
fn utc(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn set_mode(p: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))
}

/// A free loopback port (bound and released).
fn free_addr() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// The daemon's group commits so far: (fdatasyncs, writes they acknowledged).
async fn spool_syncs(d: &Daemon) -> anyhow::Result<(u64, u64)> {
    Ok((
        d.metric("oauthrelay_spool_syncs_total").await?,
        d.metric("oauthrelay_spool_synced_operations_total").await?,
    ))
}

/// Snapshot of CPU counters at the start of a window.
struct CpuMark {
    relay: Option<(u32, f64)>,
    threads: HashMap<String, f64>,
    machine: f64,
    at: Instant,
}

impl CpuMark {
    fn now(relay_pid: Option<u32>) -> CpuMark {
        CpuMark {
            relay: relay_pid.map(|p| (p, procfs::process_cpu(p))),
            threads: procfs::own_threads_cpu(),
            machine: procfs::machine_cpu().0,
            at: Instant::now(),
        }
    }

    fn since(&self) -> Cpu {
        let secs = self.at.elapsed().as_secs_f64();
        let threads = procfs::own_threads_cpu();
        let delta = |k: &str| {
            threads.get(k).copied().unwrap_or(0.0) - self.threads.get(k).copied().unwrap_or(0.0)
        };
        Cpu {
            relay: self.relay.map(|(p, c)| (procfs::process_cpu(p) - c) / secs),
            upstream: delta("upstream") / secs,
            client: (delta("client") + delta("oauthrelay")) / secs,
            machine: (procfs::machine_cpu().0 - self.machine) / secs,
            background: 0.0,
        }
    }
}

/// Samples the sum of a process tree's PSS in the background (Postfix).
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    task: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let task = std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    p.fetch_max(procfs::tree_pss_kib(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
            .ok();
        RssSampler { stop, peak, task }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

impl Bench {
    fn next_dir(&mut self, what: &str) -> PathBuf {
        self.runs += 1;
        self.tmp.join(format!("{:02}-{what}", self.runs))
    }

    /// A state directory with its config (account not yet authorized).
    fn instance(&mut self, what: &str, listen: SocketAddr) -> anyhow::Result<Instance> {
        let spec = self.spec(listen);
        self.instance_of(what, spec)
    }

    /// A state directory with its config from `spec`.
    fn instance_of(&mut self, what: &str, spec: Spec) -> anyhow::Result<Instance> {
        let dir = self.next_dir(what);
        let mut inst = Instance::create(&self.bin, &dir, spec)?;
        for kv in &self.args.daemon_env {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--daemon-env {kv:?}: expected KEY=VALUE"))?;
            inst.env.push((k.to_string(), v.to_string()));
        }
        Ok(inst)
    }

    fn spec(&self, listen: SocketAddr) -> Spec {
        Spec {
            listen,
            concurrency: self.args.concurrency,
            max_connections: self.args.idle_sessions + 100,
            upstream_port: self.up.gmail.port(),
            ca_file: self.up.ca_file.clone(),
            token_url: self.up.google.token_url(),
            server_extra: String::new(),
            users: Vec::new(),
            api: None,
        }
    }

    /// A fresh state directory with an authorized account, started.
    async fn fresh_daemon(&mut self, what: &str) -> anyhow::Result<(Instance, Daemon)> {
        let mut inst = self.instance(what, free_addr_any())?;
        inst.import_token(&self.up.refresh_token())?;
        let d = inst.start().await?;
        Ok((inst, d))
    }

    /// The same with `transport = "gmail-api"` (the fake Gmail API over
    /// HTTPS) and a token with only the `gmail.send` scope; `max_rate`:
    /// `None` for the transport's default pacing.
    async fn fresh_api_daemon(
        &mut self,
        what: &str,
        max_rate: Option<f64>,
    ) -> anyhow::Result<(Instance, Daemon)> {
        let mut spec = self.spec(free_addr_any());
        spec.api = Some(ApiSpec {
            url: self.up.gmail_api.url(),
            max_rate,
        });
        let mut inst = self.instance_of(what, spec)?;
        inst.import_token(&self.up.send_refresh_token())?;
        let d = inst.start().await?;
        Ok((inst, d))
    }

    fn upstream_of(&self, system: System) -> Sink<'_> {
        match system {
            System::Oauthrelay => Sink::Smtp(&self.up.gmail),
            System::Postfix => Sink::Smtp(&self.up.gmail_postfix),
            System::GmailApi => Sink::Api(&self.up.gmail_api),
        }
    }

    /// Systems in the order they take turns.
    fn systems(&self) -> Vec<System> {
        let mut v = vec![System::Oauthrelay];
        if self.postfix.is_some() {
            v.push(System::Postfix);
        }
        v
    }

    async fn start_postfix(&mut self) -> anyhow::Result<SocketAddr> {
        let p = self.postfix.as_mut().context("Postfix is not set up")?;
        p.start().await?;
        Ok(p.smtp)
    }

    fn stop_postfix(&mut self) -> anyhow::Result<()> {
        if let Some(p) = self.postfix.as_mut() {
            let left = p.queued();
            p.stop()?;
            if left > 0 {
                println!("    (postfix still had {left} message(s) queued when stopped)");
            }
        }
        Ok(())
    }

    // ---- 1k / 1m ------------------------------------------------------------

    /// `sessions` clients sending for the measurement window (`--duration`,
    /// `--reuse`), as many messages as they can.
    pub(super) fn window_load(&self, sessions: usize) -> Load {
        Load {
            sessions,
            duration: Duration::from_secs_f64(self.args.duration),
            reuse: self.args.reuse,
            max_messages: None,
        }
    }

    async fn throughput(
        &mut self,
        name: &str,
        size: usize,
        sessions: usize,
        targets: &mut Vec<Target>,
    ) -> anyhow::Result<()> {
        let tpl = MessageTemplate::new(size);
        let load = self.window_load(sessions);
        println!(
            "\n== {name}: {size}-byte messages, {sessions} sessions, {:.0} s window, {} round(s), {}",
            self.args.duration,
            self.args.rounds,
            conditions().await
        );
        let systems = self.systems();
        let runs = self
            .load_rounds(name, &tpl, &load, &systems, |s| s.name())
            .await?;
        let ours = &runs["oauthrelay"];
        let theirs = runs.get("postfix");
        let rows = load_rows(ours, theirs.map(Vec::as_slice));
        print!(
            "{}",
            report::table(
                &format!(
                    "{name} summary: medians of {} run(s) per system (postfix peak RSS: largest sampled sum of PSS over its processes)",
                    self.args.rounds
                ),
                &rows,
                theirs.is_some()
            )
        );
        // A run that lost mail or whose clients saw errors meets nothing.
        let lost: u64 = runs
            .values()
            .flatten()
            .map(|r| r.acked_total.saturating_sub(r.delivered_total))
            .sum();
        let errors: u64 = runs.values().flatten().map(|r| r.errors).sum();
        let clean = lost == 0 && errors == 0;
        if !clean {
            println!(
                "  NOT CLEAN: {lost} acknowledged message(s) not delivered, {errors} client error(s): no target is met"
            );
        }
        let e2e = &rows[1];
        match e2e.advantage() {
            Some(a) => targets.push(Target {
                what: format!("{name} end-to-end rate vs Postfix"),
                target: ">= 2x".into(),
                measured: format!(
                    "{a:.2}x ({:.0} vs {:.0}/s)",
                    e2e.ours,
                    e2e.theirs.unwrap_or(0.0)
                ),
                met: Some(clean && a >= 2.0),
            }),
            None => targets.push(Target {
                what: format!("{name} end-to-end rate"),
                target: ">= 2x Postfix".into(),
                measured: format!("{:.0}/s (no Postfix run)", e2e.ours),
                met: None,
            }),
        }
        let p99 = rows[4].ours;
        targets.push(Target {
            what: format!("{name} client p99 under load"),
            target: "<= 50 ms".into(),
            measured: format!("{p99:.1} ms"),
            met: Some(clean && p99 <= 50.0),
        });
        Ok(())
    }

    /// `rounds` rounds of `load`, the systems taking turns; each run's
    /// line printed as it ends. By system label.
    async fn load_rounds(
        &mut self,
        name: &str,
        tpl: &MessageTemplate,
        load: &Load,
        systems: &[System],
        label: impl Fn(System) -> &'static str,
    ) -> anyhow::Result<HashMap<&'static str, Vec<LoadRun>>> {
        let mut runs: HashMap<&'static str, Vec<LoadRun>> = HashMap::new();
        for round in 1..=self.args.rounds {
            for &system in systems {
                let tag = format!("{name}{round}{}", system.letter());
                let mut r = self.load_run(system, tpl, load, &tag).await?;
                r.label = label(system);
                println!("  round {round}:{}", r.line().trim_start_matches(' '));
                runs.entry(r.label).or_default().push(r);
            }
        }
        Ok(runs)
    }

    async fn load_run(
        &mut self,
        system: System,
        tpl: &MessageTemplate,
        load: &Load,
        tag: &str,
    ) -> anyhow::Result<LoadRun> {
        match system {
            System::Oauthrelay | System::GmailApi => {
                let (_inst, mut d) = if system == System::GmailApi {
                    let rate = self.args.api_max_rate;
                    self.fresh_api_daemon(tag, Some(rate)).await?
                } else {
                    self.fresh_daemon(tag).await?
                };
                let addr = d.smtp();
                let pid = d.pid();
                let syncs = spool_syncs(&d).await?;
                let mut r = self
                    .measure(system, addr, Some(pid), tpl, load, tag)
                    .await?;
                r.peak_rss_kib = d.memory().peak_kib;
                let after = spool_syncs(&d).await?;
                r.spool_syncs = Some((after.0 - syncs.0, after.1 - syncs.1));
                d.terminate().await?;
                Ok(r)
            }
            System::Postfix => {
                let addr = self.start_postfix().await?;
                let pid = self.postfix.as_ref().and_then(Postfix::master_pid);
                let sampler = pid.map(RssSampler::start);
                let r = self.measure(system, addr, None, tpl, load, tag).await;
                let peak = sampler.map(RssSampler::finish).unwrap_or(0);
                self.stop_postfix()?;
                let mut r = r?;
                r.peak_rss_kib = peak;
                Ok(r)
            }
        }
    }

    /// Warm up (one message end to end), then apply `load` and wait for
    /// everything acknowledged to reach the upstream.
    async fn measure(
        &self,
        system: System,
        addr: SocketAddr,
        relay_pid: Option<u32>,
        tpl: &MessageTemplate,
        load: &Load,
        tag: &str,
    ) -> anyhow::Result<LoadRun> {
        let gmail = self.upstream_of(system);
        warm_up(addr, gmail, &format!("{tag}w")).await?;
        let background = background_cpu().await;
        gmail.clear();
        let base = gmail.count();
        let conns0 = gmail.connections();
        let mark = CpuMark::now(relay_pid);
        let t0 = Instant::now();
        let res = client::run(addr, tpl, load, tag, t0).await;
        let cpu = Cpu {
            background,
            ..mark.since()
        };
        let deadline = t0 + load.duration;
        let wanted = res.ids();
        let arrivals = Arrivals::wait(gmail, base, &wanted, DRAIN_TIMEOUT).await;
        let last = arrivals.accepted.values().map(|(_, a)| *a).max();
        Ok(LoadRun {
            system,
            label: system.name(),
            window: load.duration,
            accepted: res.acks.iter().filter(|a| a.at <= deadline).count() as u64,
            e2e: arrivals
                .accepted
                .values()
                .filter(|(_, a)| *a <= deadline)
                .count() as u64,
            acked_total: res.acks.len() as u64,
            delivered_total: arrivals.accepted.len() as u64,
            drained_after: last.map(|l| l.saturating_duration_since(t0)),
            latency: Latency::of(&res.acks.iter().map(|a| a.latency).collect::<Vec<_>>()),
            upstream_tx: Latency::of(
                &arrivals
                    .accepted
                    .values()
                    .map(|(m, a)| a.saturating_duration_since(*m))
                    .collect::<Vec<_>>(),
            ),
            upstream_gap: Latency::of(&arrivals.gaps),
            errors: res.errors,
            first_error: res.first_error,
            peak_rss_kib: 0,
            upstream_connections: gmail.connections() - conns0,
            cpu,
            spool_syncs: None,
        })
    }

    // ---- idle -----------------------------------------------------------------

    async fn idle(&mut self, targets: &mut Vec<Target>) -> anyhow::Result<()> {
        let n = self.args.idle_messages;
        println!(
            "\n== idle: {n} messages one at a time (20 ms apart), time from the client's 250 to the upstream's, {} round(s), {}",
            self.args.rounds,
            conditions().await
        );
        let mut runs: HashMap<&'static str, Vec<IdleRun>> = HashMap::new();
        for round in 1..=self.args.rounds {
            for system in self.systems() {
                let tag = format!("idle{round}{}", system.letter());
                let r = match system {
                    System::Oauthrelay => {
                        let (_inst, mut d) = self.fresh_daemon(&tag).await?;
                        let r = self.idle_run(system, d.smtp(), n, &tag).await;
                        d.terminate().await?;
                        r?
                    }
                    System::Postfix => {
                        let addr = self.start_postfix().await?;
                        let r = self.idle_run(system, addr, n, &tag).await;
                        self.stop_postfix()?;
                        r?
                    }
                    System::GmailApi => bail!("the idle workload runs over SMTP"),
                };
                println!("  round {round}:{}", r.line().trim_start_matches(' '));
                runs.entry(system.name()).or_default().push(r);
            }
        }
        let ours = &runs["oauthrelay"];
        let theirs = runs.get("postfix");
        let row = |label, f: &dyn Fn(&IdleRun) -> f64| Row {
            label,
            ours: med(ours, f),
            theirs: theirs.map(|t| med(t, f)),
            higher_is_better: false,
            decimals: 2,
        };
        let rows = vec![
            row("250 -> upstream 250 p50 (ms)", &|r| ms(r.to_250.p50)),
            row("250 -> upstream 250 p99 (ms)", &|r| ms(r.to_250.p99)),
            row("250 -> upstream MAIL p50 (ms)", &|r| ms(r.to_mail.p50)),
            row("250 -> upstream MAIL p99 (ms)", &|r| ms(r.to_mail.p99)),
        ];
        print!(
            "{}",
            report::table(
                &format!("idle summary: medians of {} run(s)", self.args.rounds),
                &rows,
                theirs.is_some()
            )
        );
        let missing: usize = runs.values().flatten().map(|r| r.missing).sum();
        if missing > 0 {
            println!("  NOT CLEAN: {missing} message(s) never reached the upstream");
        }
        let p50 = rows[0].ours;
        targets.push(Target {
            what: "idle: client 250 -> upstream 250, p50".into(),
            target: "<= 2 ms".into(),
            measured: match rows[0].theirs {
                Some(t) => format!("{p50:.2} ms (postfix {t:.2} ms)"),
                None => format!("{p50:.2} ms"),
            },
            met: Some(missing == 0 && p50 <= 2.0),
        });
        Ok(())
    }

    async fn idle_run(
        &self,
        system: System,
        addr: SocketAddr,
        n: usize,
        tag: &str,
    ) -> anyhow::Result<IdleRun> {
        let gmail = self.upstream_of(system);
        warm_up(addr, gmail, &format!("{tag}w")).await?;
        gmail.clear();
        let base = gmail.count();
        let conns0 = gmail.connections();
        let tpl = MessageTemplate::new(1024);
        let mut conn = Conn::open(addr).await?;
        let mut to_250 = Vec::with_capacity(n);
        let mut to_mail = Vec::with_capacity(n);
        let mut missing = 0;
        let mut upstream_first = 0;
        for i in 0..n {
            let id = format!("<{tag}.{i}@bench.test>");
            let acked = conn.send(&tpl, &id, i as u64).await?;
            let wanted = HashMap::from([(id.clone(), acked)]);
            let got = Arrivals::wait(gmail, base, &wanted, Duration::from_secs(30)).await;
            match got.accepted.get(&id) {
                Some((mail_at, accepted_at)) => {
                    if *accepted_at < acked {
                        upstream_first += 1;
                    }
                    to_mail.push(mail_at.saturating_duration_since(acked));
                    to_250.push(accepted_at.saturating_duration_since(acked));
                }
                None => missing += 1,
            }
            gmail.clear();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = conn.quit().await;
        Ok(IdleRun {
            system,
            to_250: Latency::of(&to_250),
            to_mail: Latency::of(&to_mail),
            upstream_connections: gmail.connections() - conns0,
            missing,
            upstream_first,
        })
    }

    // ---- memory ---------------------------------------------------------------

    async fn memory(&mut self, targets: &mut Vec<Target>) -> anyhow::Result<()> {
        println!(
            "\n== memory: oauthrelay's RSS idle, with one {} MB message, with {} idle sessions, {}",
            self.args.big_message as f64 / 1e6,
            self.args.idle_sessions,
            conditions().await
        );
        // The account starts unauthorized so nothing is delivered while the
        // inbound side is measured; a token import then lets the big
        // message go out, which measures the outbound side.
        let mut inst = self.instance("memory", free_addr_any())?;
        let mut d = inst.start().await?;
        let pid = d.pid();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = d.memory();
        println!(
            "  idle after start: RSS {:.2} MB (anonymous {:.2} MB, file-backed {:.2} MB; peak so far {:.2} MB)",
            idle.rss_kib as f64 / 1024.0,
            idle.anon_kib as f64 / 1024.0,
            idle.file_kib as f64 / 1024.0,
            idle.peak_kib as f64 / 1024.0
        );

        // One big message on the inbound side.
        let tpl = MessageTemplate::new(self.args.big_message);
        procfs::reset_peak(pid).context("resetting the peak RSS (clear_refs)")?;
        let before = d.memory();
        let mut c = Conn::open(d.smtp()).await?;
        let t = Instant::now();
        c.send(&tpl, "<memory.big@bench.test>", 0).await?;
        let took = t.elapsed();
        let _ = c.quit().await;
        let after = d.memory();
        let inbound_increase = after.peak_kib.saturating_sub(before.rss_kib);
        println!(
            "  {} MB message received in {:.2} s: RSS before {:.2} MB, peak during {:.2} MB: increase {:.2} MB",
            self.args.big_message as f64 / 1e6,
            took.as_secs_f64(),
            before.rss_kib as f64 / 1024.0,
            after.peak_kib as f64 / 1024.0,
            inbound_increase as f64 / 1024.0
        );

        // The same message delivered (outbound side).
        self.up.gmail.clear_messages();
        let base = self.up.gmail.stats().messages;
        procfs::reset_peak(pid)?;
        let before = d.memory();
        inst.import_token(&self.up.refresh_token())?;
        let wanted = HashMap::from([("<memory.big@bench.test>".to_string(), Instant::now())]);
        let got = Arrivals::wait(
            Sink::Smtp(&self.up.gmail),
            base,
            &wanted,
            Duration::from_secs(60),
        )
        .await;
        let after = d.memory();
        let outbound_increase = after.peak_kib.saturating_sub(before.rss_kib);
        if got.accepted.is_empty() {
            println!("  the big message was NOT delivered within 60 s of the token import");
        } else {
            println!(
                "  delivered after token import: RSS before {:.2} MB, peak during {:.2} MB: increase {:.2} MB",
                before.rss_kib as f64 / 1024.0,
                after.peak_kib as f64 / 1024.0,
                outbound_increase as f64 / 1024.0
            );
        }

        // Idle again, now that it has fetched a token and kept an upstream
        // connection (closed after its idle timeout or not).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle_after = d.memory();
        println!("  idle after delivering: {idle_after}");

        // Watched: what Prometheus scrapes and a person looks at.
        for path in ["/metrics", "/readyz", "/"] {
            let page = d.page(path).await?;
            if !page.starts_with("HTTP/1.0 200") && !page.starts_with("HTTP/1.1 200") {
                bail!("{path} answered {:?}", page.lines().next().unwrap_or(""));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let watched = d.memory();
        println!("  after /metrics, /readyz and the status page: {watched}");

        // Idle sessions.
        let before = d.memory();
        let n = self.args.idle_sessions;
        let mut conns = Vec::with_capacity(n);
        let addr = d.smtp();
        while conns.len() < n {
            let batch = (n - conns.len()).min(100);
            let opened: Vec<_> = (0..batch).map(|_| tokio::spawn(Conn::open(addr))).collect();
            for c in opened {
                conns.push(c.await?.context("opening an idle session")?);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let with = d.memory();
        println!(
            "  {n} idle sessions (greeted, after EHLO): RSS {:.2} MB in total ({:.2} MB before: {:.1} KiB per session)",
            with.rss_kib as f64 / 1024.0,
            before.rss_kib as f64 / 1024.0,
            with.rss_kib.saturating_sub(before.rss_kib) as f64 / n as f64
        );
        drop(conns);
        d.terminate().await?;

        let mb = |k: u64| k as f64 / 1024.0;
        targets.push(Target {
            what: "idle RSS".into(),
            target: "<= 10 MB".into(),
            measured: format!(
                "{:.2} MB after start, {:.2} MB after delivering, {:.2} MB after the pages",
                mb(idle.rss_kib),
                mb(idle_after.rss_kib),
                mb(watched.rss_kib)
            ),
            met: Some(mb(idle.rss_kib.max(idle_after.rss_kib).max(watched.rss_kib)) <= 10.0),
        });
        targets.push(Target {
            what: format!(
                "{:.0} MB message: peak RSS increase (inbound)",
                self.args.big_message as f64 / 1e6
            ),
            target: "<= 8 MB".into(),
            measured: format!(
                "{:.2} MB (outbound {:.2} MB)",
                mb(inbound_increase),
                mb(outbound_increase)
            ),
            met: Some(mb(inbound_increase) <= 8.0),
        });
        targets.push(Target {
            what: format!("{n} idle SMTP sessions: total RSS"),
            target: "<= 64 MB".into(),
            measured: format!("{:.2} MB", mb(with.rss_kib)),
            met: Some(mb(with.rss_kib) <= 64.0),
        });
        Ok(())
    }

    // ---- startup --------------------------------------------------------------

    async fn startup(&mut self, targets: &mut Vec<Target>) -> anyhow::Result<()> {
        let n = self.args.startup_messages;
        println!(
            "\n== startup: {n} messages in the spool, then start, {}",
            conditions().await
        );
        let listen = free_addr()?;
        let mut inst = self.instance("startup", listen)?;
        // Fill the spool while the account is unauthorized (mail is held).
        let d = inst.start().await?;
        let tpl = MessageTemplate::new(1024);
        let load = Load {
            sessions: 20,
            duration: Duration::from_secs(600),
            reuse: true,
            max_messages: Some(n),
        };
        let t = Instant::now();
        let res = client::run(d.smtp(), &tpl, &load, "startup", Instant::now()).await;
        if res.acks.len() as u64 != n {
            bail!(
                "filling the spool: {} of {n} accepted ({} errors, first: {})",
                res.acks.len(),
                res.errors,
                res.first_error.unwrap_or_default()
            );
        }
        println!(
            "  queued {n} messages in {:.2} s with the account unauthorized",
            t.elapsed().as_secs_f64()
        );
        let mut d = d;
        d.terminate().await?;
        inst.import_token(&self.up.refresh_token())?;
        self.up.gmail.clear_messages();
        let base = self.up.gmail.stats().messages;

        let d = inst.spawn()?;
        let t0 = d.started;
        // Listening: the first SMTP greeting on the configured port.
        let greeted = loop {
            if let Ok(mut c) = Conn::connect(listen).await
                && c.expect("greeting", "220").await.is_ok()
            {
                let at = Instant::now();
                let _ = c.quit().await;
                break at;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("no SMTP greeting within 60 s of the start");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let ready = d.wait_log(" ready", Duration::from_secs(60)).await?.1;
        self.up
            .gmail
            .wait_for_stats(Duration::from_secs(60), |s| s.messages > base)
            .await;
        let first = self.up.gmail.messages().iter().map(|m| m.accepted_at).min();
        let wanted = res.ids();
        let arrivals =
            Arrivals::wait(Sink::Smtp(&self.up.gmail), base, &wanted, DRAIN_TIMEOUT).await;
        let all = arrivals.accepted.values().map(|(_, a)| *a).max();
        let recovered = std::fs::read_to_string(&d.log)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("recovered from"))
            .map(|l| l.split(": ").last().unwrap_or(l).to_string())
            .unwrap_or_default();
        let mut d = d;
        d.terminate().await?;
        let secs = |i: Option<Instant>| i.map(|i| i.saturating_duration_since(t0).as_secs_f64());
        println!("  daemon log: {recovered}");
        println!(
            "  from process start: first SMTP greeting {:.3} s, `ready` logged {:.3} s, first upstream 250 {}, all {} delivered {} ({} of {n})",
            secs(Some(greeted)).unwrap_or(0.0),
            secs(Some(ready)).unwrap_or(0.0),
            secs(first)
                .map(|s| format!("{s:.3} s"))
                .unwrap_or_else(|| "NEVER".into()),
            n,
            secs(all)
                .map(|s| format!("{s:.2} s"))
                .unwrap_or_else(|| "-".into()),
            arrivals.accepted.len(),
        );
        let listening = secs(Some(greeted)).unwrap_or(f64::INFINITY);
        let delivering = secs(first).unwrap_or(f64::INFINITY);
        targets.push(Target {
            what: format!("start-up with {n} queued: listening"),
            target: "<= 1 s".into(),
            measured: format!("{listening:.3} s"),
            met: Some(listening <= 1.0),
        });
        targets.push(Target {
            what: format!("start-up with {n} queued: first delivery"),
            target: "<= 1 s".into(),
            measured: format!(
                "{delivering:.3} s (all in {})",
                secs(all)
                    .map(|s| format!("{s:.1} s"))
                    .unwrap_or_else(|| "-".into())
            ),
            met: Some(delivering <= 1.0 && arrivals.accepted.len() as u64 == n),
        });
        Ok(())
    }
}

/// The summary rows of throughput runs: medians of `ours` and `theirs`.
fn load_rows(ours: &[LoadRun], theirs: Option<&[LoadRun]>) -> Vec<Row> {
    let row = |label, f: &dyn Fn(&LoadRun) -> f64, hib, decimals| Row {
        label,
        ours: med(ours, f),
        theirs: theirs.map(|t| med(t, f)),
        higher_is_better: hib,
        decimals,
    };
    vec![
        row("accept rate (msg/s)", &|r| r.accept_rate(), true, 1),
        row("end-to-end rate (msg/s)", &|r| r.e2e_rate(), true, 1),
        row("incl. catch-up (msg/s)", &|r| r.drain_rate(), true, 1),
        row("client latency p50 (ms)", &|r| ms(r.latency.p50), false, 2),
        row("client latency p99 (ms)", &|r| ms(r.latency.p99), false, 2),
        row("client latency max (ms)", &|r| ms(r.latency.max), false, 2),
        row(
            "peak RSS (MB)",
            &|r| r.peak_rss_kib as f64 / 1024.0,
            false,
            1,
        ),
    ]
}

/// The load average and the background CPU use, for a workload's header.
async fn conditions() -> String {
    let load = procfs::load_average();
    format!(
        "load average {load:.2} (counts this benchmark's own processes too), background CPU {:.2} cores",
        background_cpu().await
    )
}

/// Machine-wide CPU use (cores) over one second in which the benchmark
/// does nothing: what the other users of the machine take.
async fn background_cpu() -> f64 {
    let (b0, _) = procfs::machine_cpu();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    (procfs::machine_cpu().0 - b0) / t.elapsed().as_secs_f64()
}

/// `127.0.0.1:0`.
fn free_addr_any() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// One message end to end, so connections, processes and tokens are warm.
async fn warm_up(addr: SocketAddr, gmail: Sink<'_>, tag: &str) -> anyhow::Result<()> {
    gmail.clear();
    let base = gmail.count();
    let tpl = MessageTemplate::new(1024);
    let mut c = Conn::open(addr).await.context("warm-up: connecting")?;
    let id = format!("<{tag}@bench.test>");
    let at = c.send(&tpl, &id, 0).await.context("warm-up: sending")?;
    let _ = c.quit().await;
    let wanted = HashMap::from([(id, at)]);
    let got = Arrivals::wait(gmail, base, &wanted, Duration::from_secs(30)).await;
    if got.accepted.is_empty() {
        bail!("warm-up: the message did not reach the upstream within 30 s");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::utc(1_764_043_200), "2025-11-25 04:00:00 UTC");
    }
}
