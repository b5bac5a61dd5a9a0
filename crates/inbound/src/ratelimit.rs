//! Failed AUTH attempts per client address (a sliding window).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Addresses remembered at most; beyond it the stalest are forgotten, so a
/// flood of addresses cannot grow memory without bound.
const MAX_TRACKED: usize = 10_000;

#[derive(Debug, Default)]
pub(crate) struct AuthLimiter {
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl AuthLimiter {
    /// Whether `ip` has used up `limit` failures within `window`.
    pub(crate) fn is_limited(&self, ip: IpAddr, limit: u32, window: Duration) -> bool {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(&ip) {
            Some(q) => {
                prune(q, now, window);
                let n = q.len();
                if n == 0 {
                    map.remove(&ip);
                }
                n >= limit as usize
            }
            None => limit == 0,
        }
    }

    /// Record one failure from `ip`.
    pub(crate) fn record_failure(&self, ip: IpAddr, limit: u32, window: Duration) {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            map.retain(|_, q| {
                prune(q, now, window);
                !q.is_empty()
            });
            if map.len() >= MAX_TRACKED {
                // Still full of live entries: drop the one whose newest
                // failure is oldest.
                if let Some(victim) = map
                    .iter()
                    .min_by_key(|(_, q)| q.back().copied())
                    .map(|(ip, _)| *ip)
                {
                    map.remove(&victim);
                }
            }
        }
        let q = map.entry(ip).or_default();
        prune(q, now, window);
        q.push_back(now);
        // Only the newest `limit` failures matter.
        while q.len() > (limit as usize).max(1) {
            q.pop_front();
        }
    }
}

fn prune(q: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while let Some(&t) = q.front() {
        if now.saturating_duration_since(t) >= window {
            q.pop_front();
        } else {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn window_slides() {
        let l = AuthLimiter::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let w = Duration::from_secs(60);
        for _ in 0..3 {
            assert!(!l.is_limited(ip, 3, w));
            l.record_failure(ip, 3, w);
        }
        assert!(l.is_limited(ip, 3, w));
        assert!(!l.is_limited(other, 3, w));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!l.is_limited(ip, 3, w));
    }
}
