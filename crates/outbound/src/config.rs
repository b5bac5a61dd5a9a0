//! `[delivery]`: how hard and how often we try to hand mail to Gmail.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[delivery]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Simultaneous upstream connections (workers) per account.
    pub concurrency: usize,
    /// First retry delay; doubles with jitter on every further attempt.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Cap on the retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Age after which a message that still cannot be delivered fails
    /// permanently (bounce, `Status: 5.4.7`). RFC 5321 4.5.4.1 suggests 4-5
    /// days. Decided after an attempt that left recipients deferred for a
    /// temporary reason; mail held for authorization or paused by the daily
    /// limit never expires.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// TCP connect and TLS handshake deadline.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deadline for each reply from the upstream server (RFC 5321 4.5.3.2
    /// gives 5 minutes for most commands; Gmail answers in milliseconds).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Deadline for the reply to the end of the message (RFC 5321: 10 min).
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// An authenticated connection idle this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// On shutdown, how long running transactions may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long an account pauses after Gmail's `454 4.7.0 Too many login
    /// attempts` (login throttling).
    #[serde(with = "humantime_serde")]
    pub login_throttle_pause: Duration,
    /// First pause after Gmail's `550 5.4.5 Daily user sending limit
    /// exceeded`; doubles on each further hit, up to 24 hours. Mail is kept
    /// queued, never bounced.
    #[serde(with = "humantime_serde")]
    pub daily_limit_pause: Duration,
    /// Who gets what nobody else can: a bounce that cannot be delivered
    /// (its recipient refused for good, or a failing message whose sender
    /// is the null sender) goes here with the report attached, as
    /// Postfix's double bounces do. `None`: the first account's email.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postmaster: Option<String>,
    /// The local domain (`[local] domain`, set by the daemon, not a key of
    /// `[delivery]`): an envelope sender in it, or an unqualified one, goes
    /// upstream as the account's address. `None`: only unqualified senders.
    #[serde(skip)]
    pub local_domain: Option<String>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            concurrency: 4,
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            max_age: Duration::from_secs(5 * 86_400),
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            login_throttle_pause: Duration::from_secs(5 * 60),
            daily_limit_pause: Duration::from_secs(3600),
            postmaster: None,
            local_domain: None,
        }
    }
}
