//! What the benchmark reads from `/proc`: memory of a process, CPU time of
//! processes and of this process's threads, machine-wide CPU use.

use std::collections::HashMap;
use std::fs;

/// Memory of one process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// `VmHWM`: peak resident set size (since start or the last reset).
    pub peak_kib: u64,
    /// `VmRSS`: resident set size now.
    pub rss_kib: u64,
    /// Of which `RssAnon` (heap, stacks) and `RssFile` (the binary's code
    /// and data, shared libraries: pages the kernel can drop and re-read).
    pub anon_kib: u64,
    pub file_kib: u64,
}

impl std::fmt::Display for Memory {
    /// `RSS 8.18 MB (anonymous 1.36 MB, file-backed 6.82 MB)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |k: u64| k as f64 / 1024.0;
        write!(
            f,
            "RSS {:.2} MB (anonymous {:.2} MB, file-backed {:.2} MB)",
            mb(self.rss_kib),
            mb(self.anon_kib),
            mb(self.file_kib)
        )
    }
}

/// `VmHWM` and `VmRSS` of `pid`; zeros when the process is gone.
pub fn memory(pid: u32) -> Memory {
    use testkit::daemon::{proc_status, status_kib};
    let status = proc_status(pid);
    Memory {
        peak_kib: status_kib(&status, "VmHWM:"),
        rss_kib: status_kib(&status, "VmRSS:"),
        anon_kib: status_kib(&status, "RssAnon:"),
        file_kib: status_kib(&status, "RssFile:"),
    }
}

/// Reset `pid`'s peak RSS to its current RSS (Linux `clear_refs` 5).
pub fn reset_peak(pid: u32) -> std::io::Result<()> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime from a `stat` line, in ticks.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    // Fields after the command name (which may contain spaces): state is
    // field 3, utime 14, stime 15 (1-based), i.e. index 11 and 12 here.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn stat_ppid(stat: &str) -> Option<u32> {
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds (user + system) a process has used so far.
pub fn process_cpu(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_cpu_ticks(&s))
        .map(|t| t as f64 / ticks_per_second())
        .unwrap_or(0.0)
}

/// CPU seconds used so far by this process's threads, grouped by the
/// thread-name prefix before the first `-` (`upstream-0` -> `upstream`).
pub fn own_threads_cpu() -> HashMap<String, f64> {
    let mut out = HashMap::new();
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return out;
    };
    let tps = ticks_per_second();
    for t in tasks.flatten() {
        let p = t.path();
        let comm = fs::read_to_string(p.join("comm")).unwrap_or_default();
        let group = comm.trim().split('-').next().unwrap_or("").to_string();
        if let Some(ticks) = fs::read_to_string(p.join("stat"))
            .ok()
            .and_then(|s| stat_cpu_ticks(&s))
        {
            *out.entry(group).or_insert(0.0) += ticks as f64 / tps;
        }
    }
    out
}

/// Machine-wide CPU seconds: (busy, total) summed over all CPUs.
pub fn machine_cpu() -> (f64, f64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest counted in user)
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let tps = ticks_per_second();
    ((total - idle) as f64 / tps, total as f64 / tps)
}

/// `pid` and all its descendants.
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut parent = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(pp) = fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| stat_ppid(&s))
            {
                parent.insert(pid, pp);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| **pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// Sum of the proportional set size (`Pss`: each shared page divided among
/// the processes that map it) over `root` and its descendants, in KiB: the
/// memory a multi-process server really occupies.
pub fn tree_pss_kib(root: u32) -> u64 {
    process_tree(root).into_iter().map(pss_kib).sum()
}

/// `Pss` of one process from `smaps_rollup`, in KiB.
pub fn pss_kib(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    testkit::daemon::status_kib(&s, "Pss:")
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The file system a directory is on, from `/proc/self/mounts`.
pub struct FileSystem {
    /// Its type (`ext4`, `tmpfs`, ...) and the device.
    pub name: String,
    /// Kept in memory only (`tmpfs`, `ramfs`): fsync costs nothing.
    pub volatile: bool,
}

pub fn file_system(dir: &std::path::Path) -> Option<FileSystem> {
    let dir = fs::canonicalize(dir).ok()?;
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    // The last, longest mount point above `dir` is the one in force.
    let (dev, mnt, kind) = mounts
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?, w.next()?, w.next()?))
        })
        .filter(|(_, mnt, _)| dir.starts_with(mnt))
        .fold(None::<(&str, &str, &str)>, |best, m| match best {
            Some(b) if b.1.len() > m.1.len() => Some(b),
            _ => Some(m),
        })?;
    Some(FileSystem {
        name: format!("{kind} on {dev}, mounted at {mnt}"),
        volatile: matches!(kind, "tmpfs" | "ramfs"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_parse_with_spaces_in_the_name() {
        let stat = "123 (a b) S 1 123 123 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0";
        assert_eq!(stat_cpu_ticks(stat), Some(300));
        assert_eq!(stat_ppid(stat), Some(1));
    }

    #[test]
    fn own_memory_is_readable() {
        let m = memory(std::process::id());
        assert!(m.rss_kib > 0 && m.peak_kib >= m.rss_kib);
    }
}
