//! Prometheus metrics for accounts and token refreshes.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    account: String,
    result: RefreshOutcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum RefreshOutcome {
    ok,
    error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabels {
    account: String,
}

/// `oauthrelay_token_refreshes_total{account,result}` (one per token
/// request to Google; result `ok` or `error`) and
/// `oauthrelay_account_authorized{account}` (1 while the account can get
/// tokens, 0 when it needs authorization). Cheap to clone; clones share the
/// same series.
#[derive(Clone, Default)]
pub struct OAuthMetrics {
    refreshes: Family<RefreshLabels, Counter>,
    authorized: Family<AccountLabels, Gauge>,
}

impl OAuthMetrics {
    /// Create the metrics and register them in `registry`.
    pub fn register(registry: &mut Registry) -> OAuthMetrics {
        let m = OAuthMetrics::default();
        registry.register(
            "oauthrelay_token_refreshes",
            "Access-token requests to the token endpoint, by account and result",
            m.refreshes.clone(),
        );
        registry.register(
            "oauthrelay_account_authorized",
            "1 while the account can get access tokens, 0 when it needs authorization",
            m.authorized.clone(),
        );
        m
    }

    /// Make an account's series exist (at zero) before anything happens.
    pub(crate) fn init_account(&self, account: &str, authorized: bool) {
        for result in [RefreshOutcome::ok, RefreshOutcome::error] {
            let _ = self.refreshes.get_or_create(&RefreshLabels {
                account: account.to_string(),
                result,
            });
        }
        self.set_authorized(account, authorized);
    }

    pub(crate) fn refresh(&self, account: &str, ok: bool) {
        let result = if ok {
            RefreshOutcome::ok
        } else {
            RefreshOutcome::error
        };
        self.refreshes
            .get_or_create(&RefreshLabels {
                account: account.to_string(),
                result,
            })
            .inc();
    }

    pub(crate) fn set_authorized(&self, account: &str, authorized: bool) {
        self.authorized
            .get_or_create(&AccountLabels {
                account: account.to_string(),
            })
            .set(i64::from(authorized));
    }

    pub(crate) fn remove_account(&self, account: &str) {
        for result in [RefreshOutcome::ok, RefreshOutcome::error] {
            self.refreshes.remove(&RefreshLabels {
                account: account.to_string(),
                result,
            });
        }
        self.authorized.remove(&AccountLabels {
            account: account.to_string(),
        });
    }

    /// Current value of `oauthrelay_token_refreshes_total{account,result}`.
    pub fn refresh_count(&self, account: &str, ok: bool) -> u64 {
        let result = if ok {
            RefreshOutcome::ok
        } else {
            RefreshOutcome::error
        };
        self.refreshes
            .get_or_create(&RefreshLabels {
                account: account.to_string(),
                result,
            })
            .get()
    }

    /// Current value of `oauthrelay_account_authorized{account}`.
    pub fn authorized(&self, account: &str) -> i64 {
        self.authorized
            .get_or_create(&AccountLabels {
                account: account.to_string(),
            })
            .get()
    }
}
