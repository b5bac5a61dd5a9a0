//! Per-account delivery state shared by the scheduler and the workers:
//! pauses (backoff, login throttling, daily limit) and holds (the account
//! cannot authenticate).

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::DeliveryConfig;
use crate::classify::AccountSignal;

/// Gmail's daily limit is a rolling 24 hours: never pause longer.
pub(crate) const DAILY_LIMIT_MAX_PAUSE: Duration = Duration::from_secs(24 * 3600);

/// Why an account is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseKind {
    /// Connection failures, `421`s or the token endpoint failing.
    Unreachable,
    /// `454 4.7.0 Too many login attempts`.
    LoginThrottled,
    /// `550 5.4.5 Daily user sending limit exceeded`.
    DailyLimit,
}

#[derive(Debug, Clone)]
pub(crate) struct Pause {
    pub until: Instant,
    pub until_wall: SystemTime,
    pub kind: PauseKind,
    pub reason: String,
}

#[derive(Debug, Default)]
pub(crate) struct Runtime {
    pub pause: Option<Pause>,
    pub held: Option<String>,
    /// Consecutive connection-level failures.
    pub failures: u32,
    /// Consecutive daily-limit hits.
    pub daily_hits: u32,
    /// After a pause or hold: one attempt at a time until one succeeds.
    pub probing: bool,
    /// Messages waiting for this account (ready, deferred or held), and in
    /// flight; kept by the scheduler for `account_states()`.
    pub queued: usize,
    pub in_flight: usize,
}

/// The shared cell.
#[derive(Debug, Default)]
pub(crate) struct AccountCell {
    pub rt: Mutex<Runtime>,
}

impl AccountCell {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Runtime> {
        self.rt.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a signal did to the account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    Paused { until: SystemTime },
    Held { reason: String },
}

/// `initial * 2^(n-1)` capped at `max`, times a jitter factor in [1, 1.2)
/// (capped again): never sooner than the schedule says, and concurrent
/// retries spread out.
pub(crate) fn backoff(initial: Duration, max: Duration, n: u32) -> Duration {
    let n = n.max(1);
    let factor = 2u32.saturating_pow((n - 1).min(30));
    let base = initial.saturating_mul(factor).min(max);
    let jittered = base.mul_f64(1.0 + fastrand::f64() * 0.2);
    jittered.min(max.max(initial))
}

impl Runtime {
    /// Apply a signal seen by a worker. Several workers failing at once
    /// (the server is down) count as one failure.
    pub(crate) fn apply(&mut self, sig: &AccountSignal, cfg: &DeliveryConfig) -> Effect {
        let now = Instant::now();
        let wall = SystemTime::now();
        let (kind, d) = match sig {
            AccountSignal::Held(reason) => {
                self.held = Some(reason.clone());
                self.probing = true;
                return Effect::Held {
                    reason: reason.clone(),
                };
            }
            AccountSignal::Unreachable(_) => {
                let ongoing = self
                    .pause
                    .as_ref()
                    .is_some_and(|p| p.until > now && p.kind == PauseKind::Unreachable);
                if !ongoing {
                    self.failures = self.failures.saturating_add(1);
                }
                (
                    PauseKind::Unreachable,
                    backoff(cfg.retry_initial, cfg.retry_max, self.failures),
                )
            }
            AccountSignal::LoginThrottled(_) => {
                (PauseKind::LoginThrottled, cfg.login_throttle_pause)
            }
            AccountSignal::DailyLimit(_) => {
                let ongoing = self
                    .pause
                    .as_ref()
                    .is_some_and(|p| p.until > now && p.kind == PauseKind::DailyLimit);
                if !ongoing {
                    self.daily_hits = self.daily_hits.saturating_add(1);
                }
                let factor = 2u32.saturating_pow(self.daily_hits.saturating_sub(1).min(16));
                (
                    PauseKind::DailyLimit,
                    cfg.daily_limit_pause
                        .saturating_mul(factor)
                        .min(DAILY_LIMIT_MAX_PAUSE),
                )
            }
        };
        // Never shorten a longer pause already in force.
        let (until, until_wall) = match &self.pause {
            Some(p) if p.until > now + d => (p.until, p.until_wall),
            _ => (now + d, wall + d),
        };
        self.pause = Some(Pause {
            until,
            until_wall,
            kind,
            reason: sig.text().to_string(),
        });
        self.probing = true;
        Effect::Paused { until: until_wall }
    }

    /// The session opened and authenticated. This alone does not end a
    /// run of connection-level failures: a Gmail that takes the login and
    /// then answers `421` to every transaction must keep the account backing
    /// off (see [`Runtime::recovered`]).
    pub(crate) fn connected(&mut self) {
        self.probing = false;
    }

    /// Gmail accepted a message.
    pub(crate) fn delivered(&mut self) {
        self.daily_hits = 0;
        self.probing = false;
    }

    /// An attempt reached Gmail and ended without account-level trouble
    /// (no `421`, no connection failure, no pause or hold): the next
    /// connection-level failure starts the backoff at `retry_initial` again.
    pub(crate) fn recovered(&mut self) {
        self.failures = 0;
    }

    /// Paused or held right now.
    pub(crate) fn blocked(&self, now: Instant) -> bool {
        self.held.is_some() || self.pause.as_ref().is_some_and(|p| p.until > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DeliveryConfig {
        DeliveryConfig {
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            ..DeliveryConfig::default()
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let (i, m) = (Duration::from_secs(60), Duration::from_secs(3600));
        for n in 1..8u32 {
            let d = backoff(i, m, n);
            let base = (i * 2u32.pow(n - 1)).min(m);
            assert!(d >= base && d <= base.mul_f64(1.2).min(m), "n={n} d={d:?}");
        }
        assert_eq!(backoff(i, m, 40), m);
    }

    #[tokio::test]
    async fn concurrent_failures_count_once() {
        let mut rt = Runtime::default();
        let c = cfg();
        rt.apply(&AccountSignal::Unreachable("down".into()), &c);
        rt.apply(&AccountSignal::Unreachable("down".into()), &c);
        assert_eq!(rt.failures, 1);
        assert!(rt.blocked(Instant::now()));
        rt.recovered();
        assert_eq!(rt.failures, 0);
    }

    #[tokio::test]
    async fn a_good_login_does_not_end_a_run_of_421s() {
        let mut rt = Runtime::default();
        let c = cfg();
        for n in 1..=4u32 {
            // Each attempt logs in, then Gmail says 421; the previous pause
            // is over by then.
            rt.pause = None;
            rt.connected();
            let Effect::Paused { until } = rt.apply(&AccountSignal::Unreachable("421".into()), &c)
            else {
                panic!("not paused")
            };
            assert_eq!(rt.failures, n);
            let d = until.duration_since(SystemTime::now()).unwrap();
            let base = c.retry_initial * 2u32.pow(n - 1);
            assert!(
                d >= base - Duration::from_secs(1) && d <= base.mul_f64(1.2),
                "n={n} {d:?}"
            );
        }
        rt.delivered();
        assert_eq!(rt.failures, 4, "a delivery in an attempt that ended in 421");
        rt.recovered();
        assert_eq!(rt.failures, 0);
    }

    #[tokio::test]
    async fn daily_limit_pauses_hours_up_to_a_day() {
        let mut rt = Runtime::default();
        let c = cfg();
        let t0 = SystemTime::now();
        let Effect::Paused { until } = rt.apply(&AccountSignal::DailyLimit("550 5.4.5".into()), &c)
        else {
            panic!("not paused")
        };
        let d = until.duration_since(t0).unwrap();
        assert!(
            d >= Duration::from_secs(3599) && d <= Duration::from_secs(3601),
            "{d:?}"
        );
        for _ in 0..10 {
            rt.pause = None;
            rt.apply(&AccountSignal::DailyLimit("550 5.4.5".into()), &c);
        }
        let p = rt.pause.as_ref().unwrap();
        let d = p.until_wall.duration_since(SystemTime::now()).unwrap();
        assert!(d <= DAILY_LIMIT_MAX_PAUSE && d > Duration::from_secs(23 * 3600));
    }

    #[tokio::test]
    async fn held_until_released() {
        let mut rt = Runtime::default();
        let e = rt.apply(&AccountSignal::Held("needs authorize".into()), &cfg());
        assert_eq!(
            e,
            Effect::Held {
                reason: "needs authorize".into()
            }
        );
        assert!(rt.blocked(Instant::now()));
    }
}
