//! Failed AUTH attempts per client (a sliding window).
//!
//! An attempt is counted *before* its password is checked
//! ([`AuthLimiter::reserve`]), so many connections at once cannot all pass
//! the limit before the first failure is recorded; an attempt that turns
//! out not to be a failed guess (a success, or one never checked) is given
//! back with [`AuthLimiter::refund`].
//!
//! Clients are keyed by IPv4 address and by IPv6 /64 (what one customer
//! usually gets: a host that owns a /64 could otherwise use a new address
//! for every guess); an IPv4-mapped IPv6 address counts as its IPv4
//! address.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Clients remembered at most. When full, expired records are dropped,
/// then the stalest record of a client that is *not* limited; a limited
/// client is never forgotten before its window has passed. When every
/// record is a limited client, attempts from clients not yet known are
/// refused too (a global failure budget) rather than letting a flood of
/// addresses wash out a limited client's record.
const MAX_TRACKED: usize = 10_000;

#[derive(Debug, Default)]
pub(crate) struct AuthLimiter {
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

/// One counted attempt. Dropping it keeps it counted (a failed guess);
/// [`AuthLimiter::refund`] gives it back.
#[derive(Debug)]
pub(crate) struct Attempt {
    key: IpAddr,
    at: Instant,
}

/// Why an attempt was not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limited {
    /// This client used up `limit` attempts within the window.
    Client,
    /// The table is full of limited clients: no new client is tracked.
    Everyone,
}

/// The rate-limit key of `ip`: IPv4 address, or IPv6 /64.
pub(crate) fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::MAX >> 64))),
        v4 => v4,
    }
}

impl AuthLimiter {
    /// Whether `ip` has used up `limit` attempts within `window`.
    pub(crate) fn is_limited(&self, ip: IpAddr, limit: u32, window: Duration) -> bool {
        let key = client_key(ip);
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(&key) {
            Some(q) => {
                prune(q, now, window);
                let n = q.len();
                if n == 0 {
                    map.remove(&key);
                }
                n >= limit as usize
            }
            None => limit == 0,
        }
    }

    /// Count one attempt from `ip`, unless it has used up `limit` within
    /// `window` already.
    pub(crate) fn reserve(
        &self,
        ip: IpAddr,
        limit: u32,
        window: Duration,
    ) -> Result<Attempt, Limited> {
        let key = client_key(ip);
        let now = Instant::now();
        let limit = limit as usize;
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(&key) {
            Some(q) => {
                prune(q, now, window);
                if q.len() >= limit {
                    return Err(Limited::Client);
                }
            }
            None => {
                if limit == 0 {
                    return Err(Limited::Client);
                }
                if map.len() >= MAX_TRACKED && !make_room(&mut map, now, limit, window) {
                    return Err(Limited::Everyone);
                }
            }
        }
        map.entry(key).or_default().push_back(now);
        Ok(Attempt { key, at: now })
    }

    /// Give back an attempt that was not a failed guess.
    pub(crate) fn refund(&self, attempt: Attempt) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = map.get_mut(&attempt.key) {
            if let Some(i) = q.iter().rposition(|t| *t == attempt.at) {
                q.remove(i);
            }
            if q.is_empty() {
                map.remove(&attempt.key);
            }
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.failures.lock().unwrap().len()
    }
}

/// Make room for one more client: drop expired records, else the stalest
/// record of a client that is not limited. `false` when every record is a
/// limited client.
fn make_room(
    map: &mut HashMap<IpAddr, VecDeque<Instant>>,
    now: Instant,
    limit: usize,
    window: Duration,
) -> bool {
    map.retain(|_, q| {
        prune(q, now, window);
        !q.is_empty()
    });
    if map.len() < MAX_TRACKED {
        return true;
    }
    let victim = map
        .iter()
        .filter(|(_, q)| q.len() < limit)
        .min_by_key(|(_, q)| q.back().copied())
        .map(|(k, _)| *k);
    match victim {
        Some(k) => {
            map.remove(&k);
            true
        }
        None => false,
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn window_slides() {
        let l = AuthLimiter::default();
        let w = Duration::from_secs(60);
        for _ in 0..3 {
            assert!(!l.is_limited(ip("192.0.2.1"), 3, w));
            let _failed = l.reserve(ip("192.0.2.1"), 3, w).unwrap();
        }
        assert!(l.is_limited(ip("192.0.2.1"), 3, w));
        assert_eq!(
            l.reserve(ip("192.0.2.1"), 3, w).unwrap_err(),
            Limited::Client
        );
        assert!(!l.is_limited(ip("192.0.2.2"), 3, w));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!l.is_limited(ip("192.0.2.1"), 3, w));
    }

    /// Attempts are counted when they start: the limit holds however many
    /// are in flight, and only refunded ones free a slot.
    #[tokio::test(start_paused = true)]
    async fn attempts_count_before_they_finish() {
        let l = AuthLimiter::default();
        let w = Duration::from_secs(60);
        let a = ip("192.0.2.1");
        let in_flight: Vec<_> = (0..10).filter_map(|_| l.reserve(a, 3, w).ok()).collect();
        assert_eq!(in_flight.len(), 3);
        assert!(l.is_limited(a, 3, w));
        let mut it = in_flight.into_iter();
        l.refund(it.next().unwrap());
        assert!(!l.is_limited(a, 3, w));
        let _again = l.reserve(a, 3, w).unwrap();
        assert!(l.reserve(a, 3, w).is_err());
    }

    #[test]
    fn keys_are_ipv4_addresses_and_ipv6_slash_64s() {
        assert_eq!(client_key(ip("192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(client_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(client_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(
            client_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(client_key(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_neighbours_in_a_slash_64_share_a_limit() {
        let l = AuthLimiter::default();
        let w = Duration::from_secs(60);
        for i in 0..3u16 {
            let addr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 7, i, i, i, i + 1));
            let _failed = l.reserve(addr, 3, w).unwrap();
        }
        assert!(l.is_limited(ip("2001:db8:0:7::dead:beef"), 3, w));
        assert!(l.reserve(ip("2001:db8:0:7:1::1"), 3, w).is_err());
        assert!(!l.is_limited(ip("2001:db8:0:8::1"), 3, w));
        // IPv4-mapped addresses are their IPv4 address.
        for _ in 0..3 {
            let _failed = l.reserve(ip("::ffff:198.51.100.1"), 3, w).unwrap();
        }
        assert!(l.is_limited(ip("198.51.100.1"), 3, w));
    }

    /// A flood of new addresses cannot wash out a limited client: the
    /// stalest non-limited records go first, and once only limited clients
    /// are left, new ones are refused.
    #[tokio::test(start_paused = true)]
    async fn eviction_never_forgets_a_limited_client() {
        let l = AuthLimiter::default();
        let w = Duration::from_secs(600);
        let target = ip("192.0.2.1");
        for _ in 0..2 {
            let _failed = l.reserve(target, 2, w).unwrap();
        }
        assert!(l.is_limited(target, 2, w));
        // One failure each from many other /64s: more than the table holds.
        for i in 0..(MAX_TRACKED as u32 + 500) {
            tokio::time::advance(Duration::from_millis(1)).await;
            let addr = IpAddr::V6(Ipv6Addr::from(
                (0x2001_0db8_u128 << 96) | (u128::from(i) << 64),
            ));
            let _failed = l.reserve(addr, 2, w).unwrap();
        }
        assert_eq!(l.tracked(), MAX_TRACKED);
        assert!(
            l.is_limited(target, 2, w),
            "the limited client is remembered"
        );

        // A table of nothing but limited clients: new clients are refused.
        let l = AuthLimiter::default();
        for i in 0..MAX_TRACKED as u32 {
            let addr = IpAddr::V4(i.into());
            for _ in 0..2 {
                let _failed = l.reserve(addr, 2, w).unwrap();
            }
        }
        assert_eq!(
            l.reserve(ip("203.0.113.9"), 2, w).unwrap_err(),
            Limited::Everyone
        );
        assert!(l.is_limited(IpAddr::V4(0.into()), 2, w));
        // Once their windows pass, there is room again.
        tokio::time::advance(w).await;
        assert!(l.reserve(ip("203.0.113.9"), 2, w).is_ok());
    }
}
