//! The most recent delivery attempts, kept in memory for the status page:
//! one entry per line the worker logs (a message whose recipients got
//! different answers gives one entry per outcome, as in the log).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use spool::MessageId;

use crate::decide::LogStatus;
use crate::reply::Status;

/// How many attempts [`History`] keeps.
pub const HISTORY_LEN: usize = 50;

/// One outcome of one delivery attempt, as its log line tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// When the attempt ended.
    pub at: SystemTime,
    pub queue_id: MessageId,
    pub account: String,
    /// The recipients this outcome is about.
    pub recipients: Vec<String>,
    pub status: LogStatus,
    /// The enhanced status code (`dsn=` in the log).
    pub dsn: Status,
    /// From the message's arrival to the end of the attempt.
    pub delay: Duration,
    /// Which attempt of the message this was (1 for the first).
    pub attempt: u32,
    /// Where it went (`host[ip]:port`), when a connection was made.
    pub relay: Option<String>,
    /// The upstream's reply, or the error that kept it from replying.
    pub reply: String,
}

/// A ring of the last [`HISTORY_LEN`] attempts. Clones share it.
#[derive(Debug, Clone, Default)]
pub(crate) struct History {
    ring: Arc<Mutex<VecDeque<AttemptRecord>>>,
}

impl History {
    pub(crate) fn push(&self, r: AttemptRecord) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == HISTORY_LEN {
            ring.pop_front();
        }
        ring.push_back(r);
    }

    /// Newest first.
    pub(crate) fn recent(&self) -> Vec<AttemptRecord> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> AttemptRecord {
        AttemptRecord {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(n),
            queue_id: MessageId::from_u64(n),
            account: "default".into(),
            recipients: vec![format!("r{n}@example.org")],
            status: LogStatus::Sent,
            dsn: Status::new(2, 0, 0),
            delay: Duration::from_millis(n),
            attempt: 1,
            relay: None,
            reply: "250 2.0.0 OK".into(),
        }
    }

    #[test]
    fn keeps_the_last_fifty_newest_first() {
        let h = History::default();
        assert!(h.recent().is_empty());
        for n in 1..=(HISTORY_LEN as u64 + 7) {
            h.push(record(n));
        }
        let recent = h.recent();
        assert_eq!(recent.len(), HISTORY_LEN);
        assert_eq!(recent[0], record(HISTORY_LEN as u64 + 7));
        assert_eq!(recent[HISTORY_LEN - 1], record(8));
    }
}
