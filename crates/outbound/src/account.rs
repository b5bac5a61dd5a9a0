//! Per-account delivery state, owned by the scheduler alone: pauses
//! (backoff, login throttling, daily limit, rate limits) and holds (the
//! account cannot authenticate, or its provider refuses it). Workers only
//! report [`AccountSignal`]s.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::DeliveryConfig;
use crate::classify::AccountSignal;
use crate::decide::backoff;
use crate::hold::HoldReason;

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
    /// The provider asked to slow down.
    RateLimited,
}

impl PauseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseKind::Unreachable => "unreachable",
            PauseKind::LoginThrottled => "login_throttled",
            PauseKind::DailyLimit => "daily_limit",
            PauseKind::RateLimited => "rate_limited",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Pause {
    pub until: Instant,
    pub until_wall: SystemTime,
    pub kind: PauseKind,
    pub reason: String,
}

/// What the scheduler knows about one account.
#[derive(Debug, Default, Clone)]
pub(crate) struct Runtime {
    pub pause: Option<Pause>,
    pub hold: Option<HoldReason>,
    /// Consecutive connection-level failures.
    pub failures: u32,
    /// Consecutive daily-limit hits.
    pub daily_hits: u32,
    /// After a pause or hold: one attempt at a time until one succeeds.
    pub probing: bool,
}

impl Runtime {
    /// Apply a signal a worker reported, at `now` (`wall`: the same moment
    /// on the wall clock). `hold` is the reason for signals that hold.
    /// Several workers failing at once (the server is down) count as one
    /// failure.
    pub(crate) fn apply(
        &mut self,
        sig: &AccountSignal,
        hold: Option<HoldReason>,
        cfg: &DeliveryConfig,
        now: Instant,
        wall: SystemTime,
        jitter: f64,
    ) {
        let ongoing = |rt: &Runtime, kind| {
            rt.pause
                .as_ref()
                .is_some_and(|p| p.until > now && p.kind == kind)
        };
        let (kind, d) = match sig {
            AccountSignal::AuthFailed(_) | AccountSignal::Refused { .. } => {
                if let Some(h) = hold {
                    self.hold = Some(h);
                }
                self.probing = true;
                return;
            }
            AccountSignal::Unreachable(_) => {
                if !ongoing(self, PauseKind::Unreachable) {
                    self.failures = self.failures.saturating_add(1);
                }
                (
                    PauseKind::Unreachable,
                    backoff(cfg.retry_initial, cfg.retry_max, self.failures, jitter),
                )
            }
            AccountSignal::LoginThrottled(_) => {
                (PauseKind::LoginThrottled, cfg.login_throttle_pause)
            }
            AccountSignal::DailyLimit { until, .. } => {
                if !ongoing(self, PauseKind::DailyLimit) {
                    self.daily_hits = self.daily_hits.saturating_add(1);
                }
                let factor = 2u32.saturating_pow(self.daily_hits.saturating_sub(1).min(16));
                let d = match until {
                    Some(t) => t.duration_since(wall).unwrap_or_default(),
                    None => cfg.daily_limit_pause.saturating_mul(factor),
                };
                (PauseKind::DailyLimit, d.min(DAILY_LIMIT_MAX_PAUSE))
            }
            AccountSignal::RateLimited { until, .. } => {
                let d = match until {
                    Some(t) => t.duration_since(wall).unwrap_or_default(),
                    None => backoff(cfg.retry_initial, cfg.retry_max, 1, jitter),
                };
                (PauseKind::RateLimited, d)
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
            reason: sig.to_string(),
        });
        self.probing = true;
    }

    /// The session opened and authenticated. This alone does not end a
    /// run of connection-level failures: an upstream that takes the login
    /// and then answers `421` to every transaction must keep the account
    /// backing off (see [`Runtime::recovered`]).
    pub(crate) fn connected(&mut self) {
        self.probing = false;
    }

    /// The upstream accepted a message.
    pub(crate) fn delivered(&mut self) {
        self.daily_hits = 0;
        self.probing = false;
    }

    /// An attempt reached the upstream and ended without account-level
    /// trouble: the next connection-level failure starts the backoff at
    /// `retry_initial` again.
    pub(crate) fn recovered(&mut self) {
        self.failures = 0;
    }

    /// Paused or held right now.
    pub(crate) fn blocked(&self, now: Instant) -> bool {
        self.hold.is_some() || self.pause.as_ref().is_some_and(|p| p.until > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::Answer;

    fn cfg() -> DeliveryConfig {
        DeliveryConfig {
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            ..DeliveryConfig::default()
        }
    }

    fn down() -> AccountSignal {
        AccountSignal::Unreachable(Answer::error("down"))
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_failures_count_once() {
        let mut rt = Runtime::default();
        let (now, wall) = (Instant::now(), SystemTime::now());
        rt.apply(&down(), None, &cfg(), now, wall, 0.0);
        rt.apply(&down(), None, &cfg(), now, wall, 0.0);
        assert_eq!(rt.failures, 1);
        assert!(rt.blocked(Instant::now()));
        rt.recovered();
        assert_eq!(rt.failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_good_login_does_not_end_a_run_of_421s() {
        let mut rt = Runtime::default();
        let c = cfg();
        for n in 1..=4u32 {
            // Each attempt logs in, then the server says 421; the previous
            // pause is over by then.
            if let Some(p) = &rt.pause {
                tokio::time::advance(p.until - Instant::now()).await;
            }
            rt.connected();
            rt.apply(&down(), None, &c, Instant::now(), SystemTime::now(), 0.0);
            assert_eq!(rt.failures, n);
            let p = rt.pause.as_ref().unwrap();
            assert_eq!(p.until - Instant::now(), c.retry_initial * 2u32.pow(n - 1));
        }
        rt.delivered();
        assert_eq!(rt.failures, 4, "a delivery in an attempt that ended in 421");
        rt.recovered();
        assert_eq!(rt.failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn daily_limit_pauses_hours_up_to_a_day() {
        let mut rt = Runtime::default();
        let limit = AccountSignal::DailyLimit {
            answer: Answer::error("550 5.4.5"),
            until: None,
        };
        rt.apply(&limit, None, &cfg(), Instant::now(), SystemTime::now(), 0.0);
        let p = rt.pause.clone().unwrap();
        assert_eq!(p.until - Instant::now(), Duration::from_secs(3600));
        assert_eq!(p.kind, PauseKind::DailyLimit);
        for _ in 0..10 {
            let until = rt.pause.as_ref().unwrap().until;
            tokio::time::advance(until - Instant::now()).await;
            rt.apply(&limit, None, &cfg(), Instant::now(), SystemTime::now(), 0.0);
        }
        let p = rt.pause.as_ref().unwrap();
        assert_eq!(p.until - Instant::now(), DAILY_LIMIT_MAX_PAUSE);
    }

    #[tokio::test(start_paused = true)]
    async fn held_until_released() {
        let mut rt = Runtime::default();
        let reason = HoldReason::NoRoute {
            sender: "x@y".into(),
        };
        rt.apply(
            &AccountSignal::AuthFailed(Answer::error("535")),
            Some(reason.clone()),
            &cfg(),
            Instant::now(),
            SystemTime::now(),
            0.0,
        );
        assert_eq!(rt.hold, Some(reason));
        assert!(rt.blocked(Instant::now()));
    }
}
