//! Pacing: a token bucket per account, so a burst of queued mail goes out
//! at the rate the provider allows instead of running into its rate-limit
//! errors. The Gmail API charges 100 quota units per `messages.send` and
//! allows 15,000 a minute per user (2.5 sends a second); `max_rate` sets
//! an account's own rate, and each transport has a default
//! (`AccountConfig::effective_max_rate`: 2.5 for the Gmail API, none for
//! SMTP).
//!
//! Every worker of an account takes a token before each message; waiters
//! are served in order (tokio's fair mutex is held while waiting).

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// The largest burst: a few messages at once after a quiet spell.
const MAX_BURST: f64 = 5.0;

/// A token bucket: `rate` tokens a second, up to `burst`.
#[derive(Debug)]
pub(crate) struct Pacer {
    rate: f64,
    burst: f64,
    state: Mutex<Level>,
}

#[derive(Debug)]
struct Level {
    tokens: f64,
    at: Instant,
}

impl Pacer {
    /// `rate` sends a second (> 0), with a small burst: the rate rounded
    /// up, between 1 and 5.
    pub(crate) fn new(rate: f64) -> Pacer {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            1.0
        };
        let burst = rate.ceil().clamp(1.0, MAX_BURST);
        Pacer {
            rate,
            burst,
            state: Mutex::new(Level {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    pub(crate) fn rate(&self) -> f64 {
        self.rate
    }

    pub(crate) fn burst(&self) -> f64 {
        self.burst
    }

    /// Wait for a token; returns how long it waited. Cancel-safe (a
    /// cancelled wait takes nothing).
    pub(crate) async fn acquire(&self) -> Duration {
        let start = Instant::now();
        let mut st = self.state.lock().await;
        loop {
            let now = Instant::now();
            let refill = now.duration_since(st.at).as_secs_f64() * self.rate;
            st.tokens = (st.tokens + refill).min(self.burst);
            st.at = now;
            if st.tokens >= 1.0 {
                st.tokens -= 1.0;
                return start.elapsed();
            }
            let wait = (1.0 - st.tokens) / self.rate;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_100_goes_out_at_the_rate_after_a_small_burst() {
        let p = Arc::new(Pacer::new(2.5));
        assert_eq!(p.burst(), 3.0);
        let start = Instant::now();
        let mut at = Vec::new();
        // Four workers share one account's bucket.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..4 {
            let p = p.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                for _ in 0..25 {
                    p.acquire().await;
                    let _ = tx.send(Instant::now());
                }
            });
        }
        drop(tx);
        while let Some(t) = rx.recv().await {
            at.push(t.duration_since(start).as_secs_f64());
        }
        assert_eq!(at.len(), 100);
        at.sort_by(f64::total_cmp);
        // The first three at once, then one every 0.4 s.
        assert!(at[2] < 0.001, "{at:?}");
        let total = at[99];
        assert!((total - 97.0 / 2.5).abs() < 0.01, "{total}");
        // Never more than burst + rate * window in any window, e.g. the
        // fake Gmail's own bucket of the same size never runs dry.
        for (i, &t) in at.iter().enumerate() {
            let in_window = at[i..].iter().take_while(|&&u| u < t + 1.0).count();
            assert!(
                in_window as f64 <= 3.0 + 2.5,
                "{in_window} sends within 1 s from {t}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_account_refills_to_the_burst_only() {
        let p = Pacer::new(10.0);
        assert_eq!(p.burst(), 5.0);
        tokio::time::sleep(Duration::from_secs(60)).await;
        for _ in 0..5 {
            assert_eq!(p.acquire().await, Duration::ZERO);
        }
        let waited = p.acquire().await;
        assert!(waited >= Duration::from_millis(99), "{waited:?}");
    }

    /// Microsoft's default (`max_rate` 0.5, Exchange Online's 30 messages a
    /// minute per mailbox) through three connections: a burst of one, then
    /// one every 2 s, so no minute ever holds a 31st message for Exchange
    /// to delay or refuse.
    #[tokio::test(start_paused = true)]
    async fn exchanges_default_rate_keeps_every_minute_at_30() {
        let p = Arc::new(Pacer::new(oauth::config::MICROSOFT_MAX_RATE));
        assert_eq!(p.burst(), 1.0);
        let start = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..3 {
            let p = p.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                for _ in 0..40 {
                    p.acquire().await;
                    let _ = tx.send(Instant::now());
                }
            });
        }
        drop(tx);
        let mut at = Vec::new();
        while let Some(t) = rx.recv().await {
            at.push(t.duration_since(start));
        }
        assert_eq!(at.len(), 120);
        at.sort();
        for w in at.windows(2) {
            assert!(w[1] - w[0] >= Duration::from_millis(1999), "{w:?}");
        }
        let minute = Duration::from_secs(60);
        let busiest = (0..at.len())
            .map(|i| at[i..].iter().take_while(|&&u| u < at[i] + minute).count())
            .max();
        assert_eq!(busiest, Some(30), "messages within one minute");
        assert!(at[119] >= Duration::from_secs(238), "{:?}", at[119]);
    }

    #[test]
    fn rates_below_one_still_allow_one_message() {
        assert_eq!(Pacer::new(0.2).burst(), 1.0);
        assert_eq!(Pacer::new(f64::NAN).rate(), 1.0);
    }
}
