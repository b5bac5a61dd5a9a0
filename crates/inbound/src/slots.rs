//! Connection slots: who may open a session now.
//!
//! `max_connections` sessions in all; of these, `reserved_connections` only
//! for clients in `allow_networks`, so strangers can never take the slot a
//! printer or a cron job needs; and at most `max_connections_per_client`
//! for any one outside client, an IPv4 address or an IPv6 /64 (one host
//! can use every address of its /64), so one stranger cannot take all the
//! slots other outside clients (users who authenticate) share.
//!
//! A slot is held by a [`Slot`] and given back when it is dropped. The
//! table of outside clients only holds clients with a session open.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::ratelimit::client_key;

/// The limits in force when a connection arrives (from the settings of
/// that moment: a reload changes them for the next connection).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub total: usize,
    /// Slots only trusted clients may take (less than `total`).
    pub reserved: usize,
    pub per_client: usize,
}

/// Why a connection gets no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// `max_connections` sessions are open.
    Total,
    /// Every slot outside clients may use is taken; the reserved ones are
    /// kept for `allow_networks`.
    Outside,
    /// This outside client has `max_connections_per_client` open.
    Client,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    outside: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// Every open session of a listener.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    counts: Mutex<Counts>,
}

/// One open session's slot; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<Slots>,
    /// The outside client's key; `None` for a trusted client.
    client: Option<IpAddr>,
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sessions open now.
    pub(crate) fn open(&self) -> usize {
        self.lock().total
    }

    /// A slot for a client (`trusted`: in `allow_networks`) within `limits`.
    pub(crate) fn take(
        self: &Arc<Self>,
        ip: IpAddr,
        trusted: bool,
        limits: Limits,
    ) -> Result<Slot, Full> {
        let mut c = self.lock();
        if c.total >= limits.total {
            return Err(Full::Total);
        }
        if trusted {
            c.total += 1;
            return Ok(Slot {
                slots: self.clone(),
                client: None,
            });
        }
        if c.outside >= limits.total.saturating_sub(limits.reserved) {
            return Err(Full::Outside);
        }
        let key = client_key(ip);
        let mine = c.per_client.get(&key).copied().unwrap_or(0);
        if mine >= limits.per_client {
            return Err(Full::Client);
        }
        c.per_client.insert(key, mine + 1);
        c.total += 1;
        c.outside += 1;
        Ok(Slot {
            slots: self.clone(),
            client: Some(key),
        })
    }

    /// A slot whatever the limits (a session the caller started itself,
    /// [`Inbound::handle`](crate::Inbound::handle)).
    pub(crate) fn force(self: &Arc<Self>) -> Slot {
        self.lock().total += 1;
        Slot {
            slots: self.clone(),
            client: None,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.slots.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(key) = self.client {
            c.outside = c.outside.saturating_sub(1);
            if let Some(n) = c.per_client.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_client.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const LIMITS: Limits = Limits {
        total: 10,
        reserved: 3,
        per_client: 2,
    };

    #[test]
    fn outside_clients_get_their_share_and_no_more() {
        let slots = Arc::new(Slots::default());
        let a = ip("192.0.2.1");
        let mut held: Vec<Slot> = (0..2)
            .map(|_| slots.take(a, false, LIMITS).unwrap())
            .collect();
        assert_eq!(slots.take(a, false, LIMITS).unwrap_err(), Full::Client);
        // Other outside clients fill the outside share (10 - 3)...
        for i in 2..7 {
            let other = ip(&format!("198.51.100.{i}"));
            held.push(slots.take(other, false, LIMITS).unwrap());
        }
        assert_eq!(
            slots.take(ip("203.0.113.1"), false, LIMITS).unwrap_err(),
            Full::Outside
        );
        // ...and the reserved slots are still there for trusted clients.
        for _ in 0..3 {
            held.push(slots.take(ip("127.0.0.1"), true, LIMITS).unwrap());
        }
        assert_eq!(slots.open(), 10);
        assert_eq!(
            slots.take(ip("127.0.0.1"), true, LIMITS).unwrap_err(),
            Full::Total
        );
        // Slots come back when sessions end.
        held.clear();
        assert_eq!(slots.open(), 0);
        assert!(slots.lock().per_client.is_empty());
        let _again = slots.take(a, false, LIMITS).unwrap();
    }

    #[test]
    fn an_ipv6_slash_64_is_one_client() {
        let slots = Arc::new(Slots::default());
        let _one = slots.take(ip("2001:db8:1:2::1"), false, LIMITS).unwrap();
        let _two = slots
            .take(ip("2001:db8:1:2:ffff::9"), false, LIMITS)
            .unwrap();
        assert_eq!(
            slots
                .take(ip("2001:db8:1:2:dead:beef:0:1"), false, LIMITS)
                .unwrap_err(),
            Full::Client
        );
        // The next /64 is another client.
        let _three = slots.take(ip("2001:db8:1:3::1"), false, LIMITS).unwrap();
    }

    #[test]
    fn trusted_clients_have_no_per_client_limit() {
        let slots = Arc::new(Slots::default());
        let held: Vec<Slot> = (0..10)
            .map(|_| slots.take(ip("127.0.0.1"), true, LIMITS).unwrap())
            .collect();
        assert_eq!(held.len(), 10);
        let _forced = slots.force();
        assert_eq!(slots.open(), 11);
    }
}
