//! systemd's watchdog (`WatchdogSec=`): `WATCHDOG=1` every half period,
//! but only while the parts that take and move mail answer. A daemon whose
//! spool writer hangs in `fdatasync` on a dying disk, or whose scheduler
//! loop is stuck, still accepts TCP connections and serves `/healthz`;
//! without the pings systemd kills and restarts it.
//!
//! Checked on every tick, each within the tick:
//! - the SMTP accept loops still run (their task has not ended);
//! - the spool writer thread takes a [`spool::Spool::ping`];
//! - the delivery scheduler's loop answers [`outbound::Outbound::ping`].
//!
//! The tick itself runs on the same runtime as sessions and workers, so a
//! runtime whose threads are all blocked stops the pings too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// What the watchdog looks at.
pub struct Parts {
    /// Cleared when the SMTP accept loops have ended.
    pub smtp_running: Arc<AtomicBool>,
    pub spool: spool::Spool,
    pub outbound: outbound::Outbound,
}

/// Start pinging if systemd asked for it (`$WATCHDOG_USEC`, and
/// `$WATCHDOG_PID` unset or ours).
pub fn start(parts: Parts, stop: CancellationToken) -> Option<JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled()?;
    let every = (period / 2).max(Duration::from_millis(10));
    info!(
        "systemd watchdog: {} (pinging every {})",
        humantime::format_duration(period),
        humantime::format_duration(every)
    );
    Some(tokio::spawn(run(parts, every, stop)))
}

async fn run(parts: Parts, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // What was stuck at the last tick, to log changes only.
    let mut stuck: Vec<&'static str> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A stuck part must not hold up shutdown either.
        let now = tokio::select! {
            _ = stop.cancelled() => return,
            now = check(&parts, every) => now,
        };
        if now.is_empty() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            if !stuck.is_empty() {
                info!("watchdog: every part answers again; pinging systemd");
            }
        } else if now != stuck {
            error!(
                "watchdog: {} not answering within {}; not pinging systemd, which restarts oauthrelay after WatchdogSec",
                now.join(", "),
                humantime::format_duration(every)
            );
        }
        stuck = now;
    }
}

/// The parts that did not answer within `limit`.
async fn check(parts: &Parts, limit: Duration) -> Vec<&'static str> {
    let (spool, scheduler) = tokio::join!(
        tokio::time::timeout(limit, parts.spool.ping()),
        tokio::time::timeout(limit, parts.outbound.ping()),
    );
    let mut stuck = Vec::new();
    if !parts.smtp_running.load(Ordering::Acquire) {
        stuck.push("the SMTP listener");
    }
    if !matches!(spool, Ok(Ok(()))) {
        stuck.push("the spool writer");
    }
    if !matches!(scheduler, Ok(true)) {
        stuck.push("the delivery scheduler");
    }
    stuck
}
