//! Delivery metrics (names and meanings in `docs/operations.md`). Every
//! delivery counter carries the `account` that sent (or tried to send).

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

const RESULTS: [AttemptResult; 3] = [
    AttemptResult::Sent,
    AttemptResult::Deferred,
    AttemptResult::Failed,
];

impl AttemptResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Sent => "sent",
            AttemptResult::Deferred => "deferred",
            AttemptResult::Failed => "failed",
        }
    }

    fn index(self) -> usize {
        match self {
            AttemptResult::Sent => 0,
            AttemptResult::Deferred => 1,
            AttemptResult::Failed => 2,
        }
    }
}

impl EncodeLabelValue for AttemptResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// `reason` label of `oauthrelay_messages_dropped_total`: why the last
/// copy of a failure report could not be delivered, so nobody was told.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum DropReason {
    /// `postmaster_refused`: the upstream refused the postmaster's copy
    /// for good (its address is wrong, or refused as a recipient).
    PostmasterRefused,
    /// `postmaster_expired`: the postmaster's copy was still undelivered
    /// after `[delivery] max_age`.
    PostmasterExpired,
}

const DROP_REASONS: [DropReason; 2] =
    [DropReason::PostmasterRefused, DropReason::PostmasterExpired];

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::PostmasterRefused => "postmaster_refused",
            DropReason::PostmasterExpired => "postmaster_expired",
        }
    }
}

impl EncodeLabelValue for DropReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabel {
    reason: DropReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabel {
    account: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    account: String,
    result: AttemptResult,
}

/// Totals over every account (for tests and `send-test`; not exported).
#[derive(Clone, Default)]
struct Totals {
    delivered: Counter,
    bounced: Counter,
    failed: Counter,
    dropped: Counter,
    attempts: [Counter; 3],
}

/// The outbound side's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    delivered: Family<AccountLabel, Counter>,
    bounced: Family<AccountLabel, Counter>,
    failed: Family<AccountLabel, Counter>,
    attempts: Family<AttemptLabels, Counter>,
    dropped: Family<DropLabel, Counter>,
    duration: Histogram,
    totals: Totals,
}

impl Metrics {
    /// Register `oauthrelay_messages_delivered_total{account}`,
    /// `oauthrelay_messages_bounced_total{account}`,
    /// `oauthrelay_messages_failed_total{account}`,
    /// `oauthrelay_delivery_attempts_total{account,result}`,
    /// `oauthrelay_messages_dropped_total{reason}` (every reason at 0 from
    /// the start) and `oauthrelay_delivery_duration_seconds` in `registry`.
    /// The series of each account appear at 0 when delivery starts with it
    /// (see [`Metrics::accounts`]).
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics::unregistered();
        registry.register(
            "oauthrelay_messages_delivered",
            "Messages handed to Gmail for at least one recipient, counted once when they leave the queue",
            m.delivered.clone(),
        );
        registry.register(
            "oauthrelay_messages_bounced",
            "Bounces (delivery status notifications) generated and queued, for senders or, when a bounce cannot be delivered, for the postmaster",
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
            "oauthrelay_messages_dropped",
            "Failure reports nobody could receive: the postmaster's copy of an undeliverable bounce failed for good, so the mail was dropped (see the ERROR log line)",
            m.dropped.clone(),
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
        let m = Metrics {
            delivered: Family::default(),
            bounced: Family::default(),
            failed: Family::default(),
            attempts: Family::default(),
            dropped: Family::default(),
            duration: Histogram::new(exponential_buckets(0.001, 4.0, 14)),
            totals: Totals::default(),
        };
        for reason in DROP_REASONS {
            let _ = m.dropped.get_or_create(&DropLabel { reason });
        }
        m
    }

    /// Export every series of these accounts (at 0 until something
    /// happens), so dashboards and `increase()` alerts see them before the
    /// first attempt. Series of accounts a reload removed stay. With no
    /// account at all, the families still appear, with `account=""` (no
    /// account: in PromQL the same as no label), all at 0: scrapers and
    /// `absent()` see them, and nothing is ever counted there.
    pub fn accounts<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut names: Vec<&str> = names.into_iter().collect();
        if names.is_empty() {
            names.push("");
        }
        for name in names {
            let label = AccountLabel {
                account: name.to_string(),
            };
            let _ = self.delivered.get_or_create(&label);
            let _ = self.bounced.get_or_create(&label);
            let _ = self.failed.get_or_create(&label);
            for result in RESULTS {
                let _ = self.attempts.get_or_create(&AttemptLabels {
                    account: name.to_string(),
                    result,
                });
            }
        }
    }

    fn label(account: &str) -> AccountLabel {
        AccountLabel {
            account: account.to_string(),
        }
    }

    pub(crate) fn attempt(&self, account: &str, result: AttemptResult) {
        self.attempts
            .get_or_create(&AttemptLabels {
                account: account.to_string(),
                result,
            })
            .inc();
        self.totals.attempts[result.index()].inc();
    }

    pub(crate) fn delivered(&self, account: &str) {
        self.delivered.get_or_create(&Self::label(account)).inc();
        self.totals.delivered.inc();
    }

    pub(crate) fn observe_delivery(&self, seconds: f64) {
        self.duration.observe(seconds);
    }

    pub(crate) fn bounced(&self, account: &str) {
        self.bounced.get_or_create(&Self::label(account)).inc();
        self.totals.bounced.inc();
    }

    pub(crate) fn failed(&self, account: &str) {
        self.failed.get_or_create(&Self::label(account)).inc();
        self.totals.failed.inc();
    }

    pub(crate) fn dropped(&self, reason: DropReason) {
        self.dropped.get_or_create(&DropLabel { reason }).inc();
        self.totals.dropped.inc();
    }

    /// `oauthrelay_messages_dropped_total` so far, all reasons.
    pub fn dropped_count(&self) -> u64 {
        self.totals.dropped.get()
    }

    /// `oauthrelay_messages_delivered_total` so far, all accounts.
    pub fn delivered_count(&self) -> u64 {
        self.totals.delivered.get()
    }

    /// `oauthrelay_messages_bounced_total` so far, all accounts: bounces
    /// generated.
    pub fn bounced_count(&self) -> u64 {
        self.totals.bounced.get()
    }

    /// `oauthrelay_messages_failed_total` so far, all accounts: messages
    /// that left the queue with a failed recipient.
    pub fn failed_count(&self) -> u64 {
        self.totals.failed.get()
    }

    /// `oauthrelay_delivery_attempts_total{result}` so far, all accounts.
    pub fn attempts_count(&self, result: AttemptResult) -> u64 {
        self.totals.attempts[result.index()].get()
    }

    /// `oauthrelay_delivery_attempts_total{account,result}` so far.
    pub fn account_attempts_count(&self, account: &str, result: AttemptResult) -> u64 {
        self.attempts
            .get_or_create(&AttemptLabels {
                account: account.to_string(),
                result,
            })
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_account_has_every_series_from_the_start() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.accounts(["a", "b"]);
        m.attempt("b", AttemptResult::Sent);
        m.delivered("b");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for series in [
            "oauthrelay_delivery_attempts_total{account=\"a\",result=\"sent\"} 0",
            "oauthrelay_delivery_attempts_total{account=\"a\",result=\"deferred\"} 0",
            "oauthrelay_delivery_attempts_total{account=\"a\",result=\"failed\"} 0",
            "oauthrelay_delivery_attempts_total{account=\"b\",result=\"sent\"} 1",
            "oauthrelay_messages_delivered_total{account=\"a\"} 0",
            "oauthrelay_messages_delivered_total{account=\"b\"} 1",
            "oauthrelay_messages_bounced_total{account=\"a\"} 0",
            "oauthrelay_messages_failed_total{account=\"b\"} 0",
            "oauthrelay_messages_dropped_total{reason=\"postmaster_refused\"} 0",
            "oauthrelay_messages_dropped_total{reason=\"postmaster_expired\"} 0",
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
        assert_eq!(m.attempts_count(AttemptResult::Sent), 1);

        // No account configured: the families are there all the same.
        let mut registry = Registry::default();
        let none = Metrics::new(&mut registry);
        none.accounts([]);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for series in [
            "oauthrelay_delivery_attempts_total{account=\"\",result=\"sent\"} 0",
            "oauthrelay_messages_delivered_total{account=\"\"} 0",
            "oauthrelay_messages_bounced_total{account=\"\"} 0",
            "oauthrelay_messages_failed_total{account=\"\"} 0",
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
        assert_eq!(m.account_attempts_count("a", AttemptResult::Sent), 0);
        assert_eq!(m.delivered_count(), 1);
    }
}
