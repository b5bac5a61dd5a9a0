//! The standard `process_*` metrics (as Prometheus' Go and Python clients
//! export them) and `oauthrelay_build_info`, read on each scrape.
//!
//! Only what the hardened unit lets the process see is used:
//! `getrusage`/`getrlimit` and `/proc/self` (`ProcSubset=pid` hides
//! `/proc/stat`, so the start time is taken when `main` starts rather than
//! computed from the boot time).

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

static STARTED: OnceLock<SystemTime> = OnceLock::new();

/// Note the process start time; call first thing in `main`.
pub fn mark_start() {
    let _ = STARTED.set(SystemTime::now());
}

/// When the process started (or, if never marked, when first asked).
pub fn started() -> SystemTime {
    *STARTED.get_or_init(SystemTime::now)
}

/// Register the process collector and the build information.
pub fn register(registry: &mut Registry) {
    registry.register(
        "oauthrelay_build",
        "The running oauthrelay version (always 1)",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    registry.register_collector(Box::new(ProcessCollector));
}

#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(cpu) = cpu_seconds() {
            let c = ConstCounter::new(cpu);
            c.encode(encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent in seconds.",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?)?;
        }
        if let Some((virt, rss)) = memory_bytes() {
            gauge(
                &mut encoder,
                "process_resident_memory",
                "Resident memory size in bytes.",
                Unit::Bytes,
                rss as f64,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory",
                "Virtual memory size in bytes.",
                Unit::Bytes,
                virt as f64,
            )?;
        }
        if let Some(n) = open_fds() {
            let g = ConstGauge::new(n as i64);
            g.encode(encoder.encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors.",
                None,
                g.metric_type(),
            )?)?;
        }
        if let Some(n) = max_fds() {
            let g = ConstGauge::new(n as i64);
            g.encode(encoder.encode_descriptor(
                "process_max_fds",
                "Maximum number of open file descriptors.",
                None,
                g.metric_type(),
            )?)?;
        }
        let start = started()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        gauge(
            &mut encoder,
            "process_start_time",
            "Start time of the process since unix epoch in seconds.",
            Unit::Seconds,
            start,
        )
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Unit,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, Some(&unit), g.metric_type())?)
}

/// User plus system CPU time of the whole process.
fn cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage writes only into `usage`, which lives here.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// Virtual and resident size from `/proc/self/statm` (in pages).
fn memory_bytes() -> Option<(u64, u64)> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut fields = statm.split_whitespace().map(|f| f.parse::<u64>().ok());
    let (virt, rss) = (fields.next()??, fields.next()??);
    // SAFETY: sysconf has no memory effects.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    Some((virt * page, rss * page))
}

/// Entries of `/proc/self/fd`, less the one reading it.
fn open_fds() -> Option<usize> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count();
    Some(n.saturating_sub(1))
}

fn max_fds() -> Option<u64> {
    // SAFETY: getrlimit writes only into `lim`, which lives here.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_reads_itself() {
        mark_start();
        let mut registry = Registry::default();
        register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
                .parse()
                .unwrap()
        };
        assert!(value("process_cpu_seconds_total") > 0.0);
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(start <= now && start > now - 600.0, "{start} vs {now}");
        assert!(
            text.contains(&format!(
                "oauthrelay_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }
}
