//! What the spool keeps about a message besides its bytes: the envelope it
//! was received with (written once, at commit), and an opaque delivery
//! record that its owner (the delivery side) rewrites as it goes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The envelope a message was received with. It never changes after the
/// commit: what became of each recipient lives in the [`DeliveryRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Envelope sender; `""` is the null sender (bounces).
    pub sender: String,
    /// Envelope recipients, in the order the client gave them.
    pub recipients: Vec<String>,
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
    /// The client asked for SMTPUTF8.
    #[serde(default)]
    pub smtputf8: bool,
    /// The client declared `BODY=8BITMIME`.
    #[serde(default)]
    pub eight_bit: bool,
}

impl Envelope {
    /// A new envelope for `sender` and `recipients`, received now.
    pub fn new(
        sender: impl Into<String>,
        recipients: impl IntoIterator<Item = String>,
    ) -> Envelope {
        Envelope {
            sender: sender.into(),
            recipients: recipients.into_iter().collect(),
            client: None,
            helo: String::new(),
            auth_user: None,
            received: SystemTime::now(),
            smtputf8: false,
            eight_bit: false,
        }
    }
}

/// State the spool stores for the delivery side and never interprets: a
/// format number chosen by its owner and the bytes. A freshly received
/// message has none ([`DeliveryRecord::NONE`]).
///
/// Format [`DeliveryRecord::LEGACY`] is what spools written before the
/// envelope and the delivery state were split hold: the whole envelope JSON
/// of that release (recipients with their state and reply, attempts,
/// `next_attempt`, `held`...), handed over as it was found.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct DeliveryRecord {
    pub format: u16,
    pub data: Vec<u8>,
}

impl DeliveryRecord {
    /// No delivery state yet.
    pub const NONE: u16 = 0;
    /// The envelope JSON of releases before the split (segment format 1).
    pub const LEGACY: u16 = 1;

    pub fn new(format: u16, data: Vec<u8>) -> DeliveryRecord {
        DeliveryRecord { format, data }
    }

    pub fn is_none(&self) -> bool {
        self.format == Self::NONE && self.data.is_empty()
    }
}

impl std::fmt::Debug for DeliveryRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryRecord")
            .field("format", &self.format)
            .field("data", &String::from_utf8_lossy(&self.data))
            .finish()
    }
}

/// Whether a message being stored may use the free space the spool keeps
/// back from new mail (`Options::min_free_space`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// New mail: refused with `DiskFull` rather than taking the reserve.
    Respect,
    /// A message that lets the spool free space once stored (a bounce: the
    /// message it reports on can only be removed after it is queued).
    MayUse,
}

fn to_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// `SystemTime` as milliseconds since the epoch (the spool's JSON).
pub mod unix_millis {
    use super::*;
    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(to_millis(*t))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        u64::deserialize(d).map(from_millis)
    }
}

/// `Option<SystemTime>` as milliseconds since the epoch.
pub mod opt_unix_millis {
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

/// The envelope as segment format 1 stored it: recipients were objects
/// (`{"address": ..., "state": ...}`) and delivery fields sat beside the
/// envelope's (they are ignored here and handed over whole as a
/// [`DeliveryRecord::LEGACY`] record).
#[derive(Deserialize)]
pub(crate) struct LegacyEnvelope {
    sender: String,
    recipients: Vec<LegacyRecipient>,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    helo: String,
    #[serde(default)]
    auth_user: Option<String>,
    #[serde(with = "unix_millis")]
    received: SystemTime,
    #[serde(default)]
    smtputf8: bool,
    #[serde(default)]
    eight_bit: bool,
}

#[derive(Deserialize)]
struct LegacyRecipient {
    address: String,
}

impl From<LegacyEnvelope> for Envelope {
    fn from(l: LegacyEnvelope) -> Envelope {
        Envelope {
            sender: l.sender,
            recipients: l.recipients.into_iter().map(|r| r.address).collect(),
            client: l.client,
            helo: l.helo,
            auth_user: l.auth_user,
            received: l.received,
            smtputf8: l.smtputf8,
            eight_bit: l.eight_bit,
        }
    }
}
