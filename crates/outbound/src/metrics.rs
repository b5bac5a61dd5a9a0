//! Delivery metrics (names and meanings in `docs/configuration.md`).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `result` label of `oauthrelay_delivery_attempts_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum AttemptResult {
    /// `sent`: every recipient tried in the attempt was delivered.
    Sent,
    /// `deferred`: at least one recipient is to be tried again (includes
    /// held and paused accounts).
    Deferred,
    /// `failed`: at least one recipient failed for good and none is left
    /// to retry.
    Failed,
}

impl AttemptResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Sent => "sent",
            AttemptResult::Deferred => "deferred",
            AttemptResult::Failed => "failed",
        }
    }
}

impl EncodeLabelValue for AttemptResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    result: AttemptResult,
}

/// The outbound side's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    delivered: Counter,
    bounced: Counter,
    failed: Counter,
    attempts: Family<AttemptLabels, Counter>,
    duration: Histogram,
}

impl Metrics {
    /// Register `oauthrelay_messages_delivered_total`,
    /// `oauthrelay_messages_bounced_total`, `oauthrelay_messages_failed_total`,
    /// `oauthrelay_delivery_attempts_total{result}` and
    /// `oauthrelay_delivery_duration_seconds` in `registry`.
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics::unregistered();
        // Every result is exported from the start (at 0), so dashboards and
        // alerts see the series before the first attempt.
        for result in [
            AttemptResult::Sent,
            AttemptResult::Deferred,
            AttemptResult::Failed,
        ] {
            let _ = m.attempts.get_or_create(&AttemptLabels { result });
        }
        registry.register(
            "oauthrelay_messages_delivered",
            "Messages handed to Gmail for at least one recipient, counted once when they leave the queue",
            m.delivered.clone(),
        );
        registry.register(
            "oauthrelay_messages_bounced",
            "Bounces (delivery status notifications) generated and queued for senders",
            m.bounced.clone(),
        );
        registry.register(
            "oauthrelay_messages_failed",
            "Messages that left the queue with at least one recipient that failed permanently",
            m.failed.clone(),
        );
        registry.register(
            "oauthrelay_delivery_attempts",
            "Delivery attempts by result",
            m.attempts.clone(),
        );
        registry.register(
            "oauthrelay_delivery_duration_seconds",
            "Time from a message's arrival to Gmail's 250 for it",
            m.duration.clone(),
        );
        m
    }

    /// Metrics that are counted but not exported (tests, `send-test`).
    pub fn unregistered() -> Metrics {
        Metrics {
            delivered: Counter::default(),
            bounced: Counter::default(),
            failed: Counter::default(),
            attempts: Family::default(),
            duration: Histogram::new(exponential_buckets(0.001, 4.0, 14)),
        }
    }

    pub(crate) fn attempt(&self, result: AttemptResult) {
        self.attempts.get_or_create(&AttemptLabels { result }).inc();
    }

    pub(crate) fn delivered(&self) {
        self.delivered.inc();
    }

    pub(crate) fn observe_delivery(&self, seconds: f64) {
        self.duration.observe(seconds);
    }

    pub(crate) fn bounced(&self) {
        self.bounced.inc();
    }

    pub(crate) fn failed(&self) {
        self.failed.inc();
    }

    /// `oauthrelay_messages_delivered_total` so far.
    pub fn delivered_count(&self) -> u64 {
        self.delivered.get()
    }

    /// `oauthrelay_messages_bounced_total` so far: bounces generated.
    pub fn bounced_count(&self) -> u64 {
        self.bounced.get()
    }

    /// `oauthrelay_messages_failed_total` so far: messages that left the
    /// queue with a failed recipient.
    pub fn failed_count(&self) -> u64 {
        self.failed.get()
    }

    /// `oauthrelay_delivery_attempts_total{result}` so far.
    pub fn attempts_count(&self, result: AttemptResult) -> u64 {
        self.attempts.get_or_create(&AttemptLabels { result }).get()
    }
}
