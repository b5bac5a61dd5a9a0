//! Message ids: microseconds since the Unix epoch, made strictly increasing,
//! so ids sort by the time the message started arriving and are unique within
//! one spool (the lock file guarantees a single writer).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A queue id, shown as 14 or more upper-case hex digits (`0006427A1B2C3D`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(u64);

impl MessageId {
    /// The raw value (microseconds since the epoch at allocation).
    pub fn as_u64(self) -> u64 {
        self.0
    }

    pub fn from_u64(v: u64) -> MessageId {
        MessageId(v)
    }

    /// When the id was allocated.
    pub fn time(self) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_micros(self.0)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:014X}", self.0)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MessageId {
    type Err = String;
    fn from_str(s: &str) -> Result<MessageId, String> {
        let s = s.trim();
        if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{s:?} is not a queue id (hex digits, as `queue list` shows)"
            ));
        }
        u64::from_str_radix(s, 16)
            .map(MessageId)
            .map_err(|e| format!("{s:?} is not a queue id: {e}"))
    }
}

impl Serialize for MessageId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MessageId, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hands out strictly increasing ids.
#[derive(Debug)]
pub(crate) struct IdGen {
    last: AtomicU64,
}

impl IdGen {
    pub(crate) fn new(after: u64) -> IdGen {
        IdGen {
            last: AtomicU64::new(after),
        }
    }

    pub(crate) fn next(&self) -> MessageId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let candidate = now.max(last + 1);
            match self.last.compare_exchange_weak(
                last,
                candidate,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return MessageId(candidate),
                Err(actual) => last = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_round_trip() {
        let g = IdGen::new(0);
        let a = g.next();
        let b = g.next();
        assert!(b > a);
        assert!(
            a.to_string() < b.to_string(),
            "text form sorts like the value"
        );
        assert_eq!(a.to_string().parse::<MessageId>().unwrap(), a);
        assert!("xyz".parse::<MessageId>().is_err());
    }

    #[test]
    fn ids_stay_ahead_of_recovered_ones() {
        let far = u64::MAX / 2;
        let g = IdGen::new(far);
        assert!(g.next().as_u64() > far);
    }
}
