//! What the spool keeps about a message besides its bytes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::MessageId;

/// The envelope and delivery state of one queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Envelope sender; `""` is the null sender (bounces).
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// Client address (`ip:port`), or `None` for local submission and bounces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// HELO/EHLO name the client gave.
    #[serde(default)]
    pub helo: String,
    /// SMTP AUTH user, when the client authenticated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// When the message was accepted.
    #[serde(with = "unix_millis")]
    pub received: SystemTime,
    /// Stored size in bytes (set by the spool at commit).
    #[serde(default)]
    pub size: u64,
    /// The client asked for SMTPUTF8.
    #[serde(default)]
    pub smtputf8: bool,
    /// The client declared `BODY=8BITMIME`.
    #[serde(default)]
    pub eight_bit: bool,
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
    /// The last temporary error, for `queue list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why delivery is held (for example an account that needs `authorize`).
    /// Set and cleared with [`Envelope::set_held`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
    /// Since when the message has been held (this hold).
    #[serde(
        default,
        with = "opt_unix_millis",
        skip_serializing_if = "Option::is_none"
    )]
    pub held_since: Option<SystemTime>,
    /// Milliseconds spent held in earlier holds: time that does not count
    /// towards `max_age`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_ms: u64,
    /// Account this message must go through (bounces use the account of the
    /// message they report on); `None`: routed by sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// For a bounce we generated: the message it reports on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounce_of: Option<MessageId>,
}

impl Envelope {
    /// A new envelope for `sender` and `recipients`, received now.
    pub fn new(
        sender: impl Into<String>,
        recipients: impl IntoIterator<Item = String>,
    ) -> Envelope {
        Envelope {
            sender: sender.into(),
            recipients: recipients.into_iter().map(Recipient::new).collect(),
            client: None,
            helo: String::new(),
            auth_user: None,
            received: SystemTime::now(),
            size: 0,
            smtputf8: false,
            eight_bit: false,
            attempts: 0,
            next_attempt: None,
            last_error: None,
            held: None,
            held_since: None,
            held_ms: 0,
            account: None,
            bounce_of: None,
        }
    }

    /// Recipients not yet delivered or failed.
    pub fn pending(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients
            .iter()
            .filter(|r| r.state == RcptState::Pending)
    }

    /// Mark the message held for `reason`, or no longer held (`None`), at
    /// `now`; the time spent held is kept so that it does not age the
    /// message.
    pub fn set_held(&mut self, reason: Option<String>, now: SystemTime) {
        match reason {
            Some(r) => {
                self.held_since.get_or_insert(now);
                self.held = Some(r);
            }
            None => {
                if let Some(since) = self.held_since.take() {
                    let ms = now.duration_since(since).unwrap_or_default().as_millis();
                    self.held_ms = self
                        .held_ms
                        .saturating_add(u64::try_from(ms).unwrap_or(u64::MAX));
                }
                self.held = None;
            }
        }
    }

    /// How long the message has been in the queue at `now`, not counting
    /// the time it was held (waiting for an account to be authorized).
    pub fn queue_age(&self, now: SystemTime) -> Duration {
        let total = now.duration_since(self.received).unwrap_or_default();
        let ongoing = self
            .held_since
            .map(|s| now.duration_since(s).unwrap_or_default())
            .unwrap_or_default();
        total
            .saturating_sub(Duration::from_millis(self.held_ms))
            .saturating_sub(ongoing)
    }

    /// Whether every recipient has a final outcome.
    pub fn is_done(&self) -> bool {
        self.pending().next().is_none()
    }
}

/// One recipient and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
    #[serde(default)]
    pub state: RcptState,
    /// The upstream's last reply for this recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// Failed because it was still undelivered after `max_age` (`reply` is
    /// the last temporary reply), not because of a permanent reply.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expired: bool,
}

impl Recipient {
    pub fn new(address: impl Into<String>) -> Recipient {
        Recipient {
            address: address.into(),
            state: RcptState::Pending,
            reply: None,
            expired: false,
        }
    }
}

/// Where a recipient stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptState {
    #[default]
    Pending,
    Delivered,
    Failed,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn to_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

mod unix_millis {
    use super::*;
    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(to_millis(*t))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        u64::deserialize(d).map(from_millis)
    }
}

mod opt_unix_millis {
    use super::*;
    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&to_millis(*t)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Option::<u64>::deserialize(d).map(|o| o.map(from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_held_does_not_age_the_message() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let h = Duration::from_secs(3600);
        let mut e = Envelope::new("a@example.com", ["b@example.com".to_string()]);
        e.received = t0;
        e.set_held(Some("needs authorize".into()), t0 + h);
        // Held again for another reason: the hold goes on.
        e.set_held(Some("still".into()), t0 + 2 * h);
        assert_eq!(e.queue_age(t0 + 3 * h), h);
        e.set_held(None, t0 + 5 * h);
        assert_eq!(e.held, None);
        assert_eq!(e.queue_age(t0 + 6 * h), 2 * h);
        // It survives the spool's JSON.
        let back: Envelope = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back.queue_age(t0 + 6 * h), 2 * h);
    }
}
