//! A message's delivery state: owned by the delivery side, stored by the
//! spool as an opaque record (`spool::DeliveryRecord`) it never reads.
//!
//! Record formats: [`FORMAT`] is this JSON; `DeliveryRecord::LEGACY` is the
//! whole envelope JSON of releases before the split, read once and written
//! back in the current format at the next update.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use spool::{DeliveryRecord, Envelope, MessageId, Queued, opt_unix_millis};

use crate::hold::HoldReason;
use crate::reply::Answer;

/// The record format written now.
pub const FORMAT: u16 = 2;

/// Where one recipient stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptState {
    #[default]
    Pending,
    Delivered,
    Failed,
}

impl RcptState {
    pub fn as_str(self) -> &'static str {
        match self {
            RcptState::Pending => "pending",
            RcptState::Delivered => "delivered",
            RcptState::Failed => "failed",
        }
    }
}

/// One recipient's outcome so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptStatus {
    #[serde(default)]
    pub state: RcptState,
    /// The upstream's last answer for this recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Answer>,
    /// Failed because it was still undelivered after `max_age`, not because
    /// of a permanent reply (`answer` is the last temporary one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expired: bool,
    /// Failed, and its bounce is queued (or none is due: null sender).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reported: bool,
}

/// A hold of this message, with when it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub reason: HoldReason,
    #[serde(with = "spool::unix_millis")]
    pub since: SystemTime,
}

/// Why the message is in the queue, for `queue list` (`state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueState {
    Queued,
    Deferred,
    Held,
    Failed,
}

impl QueueState {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueState::Queued => "queued",
            QueueState::Deferred => "deferred",
            QueueState::Held => "held",
            QueueState::Failed => "failed",
        }
    }
}

/// Everything delivery keeps about one message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryState {
    /// One per envelope recipient, in the same order.
    pub recipients: Vec<RcptStatus>,
    /// Delivery attempts so far.
    #[serde(default)]
    pub attempts: u32,
    /// When the next attempt is due; `None`: as soon as possible.
    #[serde(
        default,
        with = "opt_unix_millis",
        skip_serializing_if = "Option::is_none"
    )]
    pub next_attempt: Option<SystemTime>,
    /// The last temporary problem, for `queue list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<Answer>,
    /// Held, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<Hold>,
    /// Since when the account was paused by something that does not age
    /// mail (login throttling, the daily limit) when the last attempt ended.
    #[serde(
        default,
        with = "opt_unix_millis",
        skip_serializing_if = "Option::is_none"
    )]
    pub paused_since: Option<SystemTime>,
    /// Milliseconds spent held or paused like that in earlier periods: time
    /// that does not count towards `max_age`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_ms: u64,
    /// Account this message must go through (bounces use the account of the
    /// message they report on); `None`: routed by sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// For a bounce we generated: the message it reports on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounce_of: Option<MessageId>,
    /// For a bounce: the recipients (indices) of `bounce_of` it reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<usize>,
    /// For a bounce: it goes to the postmaster (the message it reports on
    /// was a bounce or had the null sender). If it fails, nobody is left
    /// to tell.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub postmaster_copy: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl DeliveryState {
    /// A fresh state for a message with `n` recipients.
    pub fn new(n: usize) -> DeliveryState {
        DeliveryState {
            recipients: vec![RcptStatus::default(); n],
            ..DeliveryState::default()
        }
    }

    /// The state of a queued message, from its spool record. A record that
    /// cannot be read counts as a fresh one (logged): the message is
    /// attempted again rather than lost.
    pub fn of(id: MessageId, q: &Queued) -> DeliveryState {
        let n = q.envelope.recipients.len();
        let decoded = match q.delivery.format {
            DeliveryRecord::NONE if q.delivery.data.is_empty() => Ok(DeliveryState::new(n)),
            DeliveryRecord::LEGACY => legacy(&q.delivery.data),
            FORMAT => {
                serde_json::from_slice::<DeliveryState>(&q.delivery.data).map_err(|e| e.to_string())
            }
            other => Err(format!("unknown delivery record format {other}")),
        };
        let mut state = decoded.unwrap_or_else(|e| {
            tracing::error!(queue_id = %id, "cannot read the message's delivery record ({e}); delivering it as new");
            DeliveryState::new(n)
        });
        state.recipients.resize(n, RcptStatus::default());
        state
    }

    /// The record to store.
    pub fn to_record(&self) -> DeliveryRecord {
        // Plain data: serialising to JSON cannot fail.
        DeliveryRecord::new(FORMAT, serde_json::to_vec(self).unwrap_or_default())
    }

    /// Indices of recipients not yet delivered or failed.
    pub fn pending(&self) -> impl Iterator<Item = usize> + '_ {
        self.recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == RcptState::Pending)
            .map(|(i, _)| i)
    }

    /// Every recipient has its final outcome.
    pub fn is_done(&self) -> bool {
        self.pending().next().is_none()
    }

    /// Failed recipients whose bounce is not queued yet.
    pub fn unreported(&self) -> Vec<usize> {
        self.recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == RcptState::Failed && !r.reported)
            .map(|(i, _)| i)
            .collect()
    }

    /// How long the message has aged at `now`: time in the queue minus the
    /// time it was held or paused by something that does not age mail.
    pub fn age(&self, env: &Envelope, now: SystemTime) -> Duration {
        let total = now.duration_since(env.received).unwrap_or_default();
        let ongoing = |t: Option<SystemTime>| {
            t.map(|s| now.duration_since(s).unwrap_or_default())
                .unwrap_or_default()
        };
        total
            .saturating_sub(Duration::from_millis(self.held_ms))
            .saturating_sub(ongoing(self.hold.as_ref().map(|h| h.since)))
            .saturating_sub(ongoing(self.paused_since))
    }

    /// End the hold and the non-aging pause at `now`, keeping their time
    /// out of the message's age.
    pub fn end_waits(&mut self, now: SystemTime) {
        let since: Vec<SystemTime> = self
            .hold
            .take()
            .map(|h| h.since)
            .into_iter()
            .chain(self.paused_since.take())
            .collect();
        // Both can be set only if a hold followed a pause; count the
        // overlap once, from the earlier start.
        if let Some(start) = since.into_iter().min() {
            let ms = now.duration_since(start).unwrap_or_default().as_millis();
            self.held_ms = self
                .held_ms
                .saturating_add(u64::try_from(ms).unwrap_or(u64::MAX));
        }
    }

    /// Hold the message for `reason` from `now` (a hold already in force
    /// keeps its start).
    pub fn hold(&mut self, reason: HoldReason, now: SystemTime) {
        let since = self
            .hold
            .as_ref()
            .map(|h| h.since)
            .or(self.paused_since.take())
            .unwrap_or(now);
        self.hold = Some(Hold { reason, since });
    }

    /// What `queue list` calls the message.
    pub fn queue_state(&self, now: SystemTime) -> QueueState {
        if self.hold.is_some() {
            QueueState::Held
        } else if self.is_done() && self.recipients.iter().any(|r| r.state == RcptState::Failed) {
            QueueState::Failed
        } else if self.attempts > 0 || self.next_attempt.is_some_and(|t| t > now) {
            QueueState::Deferred
        } else {
            QueueState::Queued
        }
    }
}

/// The envelope JSON of releases before the split (the delivery fields of
/// it; the envelope's own fields are the spool's).
#[derive(Deserialize)]
struct LegacyEnvelope {
    recipients: Vec<LegacyRecipient>,
    #[serde(default)]
    attempts: u32,
    #[serde(default, with = "opt_unix_millis")]
    next_attempt: Option<SystemTime>,
    #[serde(default)]
    last_error: Option<String>,
    #[serde(default)]
    held: Option<String>,
    #[serde(default, with = "opt_unix_millis")]
    held_since: Option<SystemTime>,
    #[serde(default)]
    held_ms: u64,
    #[serde(default)]
    account: Option<String>,
    #[serde(default)]
    bounce_of: Option<MessageId>,
}

#[derive(Deserialize)]
struct LegacyRecipient {
    #[serde(default)]
    state: RcptState,
    #[serde(default)]
    reply: Option<String>,
    #[serde(default)]
    expired: bool,
}

fn legacy(json: &[u8]) -> Result<DeliveryState, String> {
    let l: LegacyEnvelope = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    Ok(DeliveryState {
        recipients: l
            .recipients
            .into_iter()
            .map(|r| RcptStatus {
                state: r.state,
                answer: r.reply.as_deref().map(Answer::parse_legacy),
                expired: r.expired,
                // That release bounced only once every recipient was done,
                // and a message it had failed is done: its bounce is queued
                // (or is found by the bounce scan of the next attempt).
                reported: false,
            })
            .collect(),
        attempts: l.attempts,
        next_attempt: l.next_attempt,
        last_error: l.last_error.as_deref().map(Answer::parse_legacy),
        hold: l.held.map(|text| Hold {
            reason: HoldReason::Recorded { text },
            since: l.held_since.unwrap_or(SystemTime::UNIX_EPOCH),
        }),
        paused_since: None,
        postmaster_copy: false,
        held_ms: l.held_ms,
        account: l.account,
        bounce_of: l.bounce_of,
        reports: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::Reply;
    use std::time::UNIX_EPOCH;

    #[test]
    fn time_held_or_paused_does_not_age_the_message() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let h = Duration::from_secs(3600);
        let mut env = Envelope::new("a@example.com", ["b@example.com".to_string()]);
        env.received = t0;
        let mut s = DeliveryState::new(1);
        s.hold(
            HoldReason::Recorded {
                text: "needs authorize".into(),
            },
            t0 + h,
        );
        // Held again for another reason: the hold goes on.
        s.hold(HoldReason::NoRoute { sender: "x".into() }, t0 + 2 * h);
        assert_eq!(s.age(&env, t0 + 3 * h), h);
        s.end_waits(t0 + 5 * h);
        assert_eq!(s.hold, None);
        assert_eq!(s.age(&env, t0 + 6 * h), 2 * h);
        // A daily-limit pause does not count either.
        s.paused_since = Some(t0 + 6 * h);
        assert_eq!(s.age(&env, t0 + 8 * h), 2 * h);
        s.end_waits(t0 + 8 * h);
        assert_eq!(s.age(&env, t0 + 9 * h), 3 * h);
        // It survives the record.
        let q = Queued {
            envelope: std::sync::Arc::new(env.clone()),
            size: 1,
            delivery: s.to_record(),
        };
        let back = DeliveryState::of(MessageId::from_u64(1), &q);
        assert_eq!(back, s);
        assert_eq!(back.age(&env, t0 + 9 * h), 3 * h);
    }

    #[test]
    fn the_previous_release_s_records_are_read() {
        let json = br#"{"sender":"cron@example.com","recipients":[{"address":"d@example.org","state":"delivered","reply":"250 2.0.0 OK  1764000000 x - gsmtp"},{"address":"p@example.org","state":"pending","reply":"451 4.3.0 Temporary System Problem. Try again later. - gsmtp"},{"address":"f@example.org","state":"failed","reply":"550 5.1.1 The email account that you tried to reach does not exist. - gsmtp"}],"helo":"","received":1764000010000,"size":23,"smtputf8":false,"eight_bit":false,"attempts":2,"next_attempt":1764000600000,"last_error":"451 4.3.0 Temporary System Problem. Try again later. - gsmtp","held":"account \"default\" needs authorization: invalid_grant; run: oauthrelay authorize --account default","held_since":1764000300000,"held_ms":5000,"account":"default"}"#;
        let env = Envelope::new(
            "cron@example.com",
            ["d@example.org", "p@example.org", "f@example.org"].map(String::from),
        );
        let q = Queued {
            envelope: std::sync::Arc::new(env),
            size: 23,
            delivery: DeliveryRecord::new(DeliveryRecord::LEGACY, json.to_vec()),
        };
        let s = DeliveryState::of(MessageId::from_u64(1), &q);
        assert_eq!(s.attempts, 2);
        assert_eq!(s.recipients[0].state, RcptState::Delivered);
        assert_eq!(s.recipients[2].state, RcptState::Failed);
        let Some(Answer::Reply(r)) = &s.recipients[2].answer else {
            panic!("{s:?}")
        };
        assert_eq!(
            (r.code, r.status.map(|x| x.to_string())),
            (550, Some("5.1.1".into()))
        );
        assert_eq!(
            s.last_error,
            Some(Answer::Reply(
                Reply::parse("451 4.3.0 Temporary System Problem. Try again later. - gsmtp")
                    .unwrap()
            ))
        );
        assert_eq!(s.held_ms, 5000);
        assert_eq!(s.account.as_deref(), Some("default"));
        assert_eq!(s.queue_state(UNIX_EPOCH), QueueState::Held);
        assert!(
            s.hold
                .as_ref()
                .unwrap()
                .reason
                .to_string()
                .contains("needs authorization")
        );
    }
}
