//! Why an account's mail is held, as one enum rendered for humans in one
//! place (the log, `queue list`, `/readyz` and the status page all show
//! this text).

use std::fmt;
use std::time::Duration;

use oauth::{Refusal, TokenManager};
use serde::{Deserialize, Serialize};

use crate::classify::AccountSignal;

/// The first hold probe comes this long after the hold.
pub(crate) const PROBE_FIRST: Duration = Duration::from_secs(5 * 60);
/// The wait between hold probes doubles up to this.
pub(crate) const PROBE_MAX: Duration = Duration::from_secs(3600);

/// Why mail waits for a human (or for the token endpoint to answer again)
/// instead of being attempted. Holds never bounce and never age mail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HoldReason {
    /// The token manager says the account needs authorization (a dead or
    /// missing refresh token, a refused client, Gmail refusing even a fresh
    /// token, or an OAuth refusal it re-probes by itself).
    NeedsAuthorization {
        account: String,
        problem: String,
        fix: String,
    },
    /// The provider refuses the account for a reason an administrator must
    /// fix (SMTP AUTH disabled for the mailbox, the API not enabled, the
    /// account blocked for spam).
    Refused {
        account: String,
        problem: String,
        fix: String,
    },
    /// The token manager does not know the account (a reload went wrong).
    UnknownToTokenManager { account: String },
    /// The message must go through an account that is not configured (a
    /// bounce whose account was removed from the configuration).
    AccountNotConfigured { account: String },
    /// No `[[accounts]]` entry's `senders` takes the sender.
    NoRoute { sender: String },
    /// A hold recorded by an earlier release, in its words.
    Recorded { text: String },
}

impl fmt::Display for HoldReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HoldReason::NeedsAuthorization {
                account,
                problem,
                fix,
            } => write!(
                f,
                "account {account:?} needs authorization: {problem}; {fix}"
            ),
            HoldReason::Refused {
                account,
                problem,
                fix,
            } => write!(
                f,
                "account {account:?} is refused by its provider: {problem}; {fix}"
            ),
            HoldReason::UnknownToTokenManager { account } => write!(
                f,
                "account {account} is not known to the token manager (reload the daemon)"
            ),
            HoldReason::AccountNotConfigured { account } => write!(
                f,
                "account {account:?} (which this message must go through) is not configured"
            ),
            HoldReason::NoRoute { sender } => write!(
                f,
                "no [[accounts]] entry takes sender <{sender}> (check `senders`)"
            ),
            HoldReason::Recorded { text } => f.write_str(text),
        }
    }
}

/// What can lift a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifter {
    /// A probe: a fresh token and AUTH now and then (and at once on `queue
    /// retry`); the hold lifts when the upstream takes them.
    Probe,
    /// Only a person: `authorize` / `token import` (the token manager
    /// sees the new token file and releases the account), or a corrected
    /// configuration and a reload. Probing could not help.
    Person,
}

/// The wait before hold probe number `n` (1: the first after the hold):
/// [`PROBE_FIRST`], doubling, at most [`PROBE_MAX`].
pub(crate) fn probe_wait(n: u32) -> Duration {
    let factor = 2u32.saturating_pow(n.saturating_sub(1).min(16));
    PROBE_FIRST.saturating_mul(factor).min(PROBE_MAX)
}

impl HoldReason {
    /// What lifts this hold. `refusal` is the token manager's refusal of
    /// the account now, if any (it alone knows whether a new refresh token
    /// is needed).
    pub(crate) fn lifter(&self, refusal: Option<&Refusal>) -> Lifter {
        match self {
            HoldReason::NeedsAuthorization { .. } => match refusal {
                Some(r) if r.needs_person() => Lifter::Person,
                // A refusal that may be temporary (an OAuth 4xx, Gmail
                // refusing fresh tokens), or none any more: ask.
                _ => Lifter::Probe,
            },
            // The upstream refused the account (SMTP AUTH disabled, a
            // permanent AUTH reply): an administrator fixes that elsewhere.
            HoldReason::Refused { .. } => Lifter::Probe,
            // A reload fixes these; routing, not the upstream.
            HoldReason::UnknownToTokenManager { .. }
            | HoldReason::AccountNotConfigured { .. }
            | HoldReason::NoRoute { .. }
            | HoldReason::Recorded { .. } => Lifter::Person,
        }
    }

    /// Why `account`'s mail is held after `signal`: the token manager's
    /// words when it refuses the account, else the upstream's.
    pub(crate) fn after(
        tokens: &TokenManager,
        account: &str,
        signal: &AccountSignal,
    ) -> HoldReason {
        let name = account.to_string();
        match signal {
            AccountSignal::Refused { problem, fix, .. } => HoldReason::Refused {
                account: name,
                problem: problem.clone(),
                fix: fix.clone(),
            },
            other => match tokens.account_status(account) {
                Some(st) => match st.auth.refusal() {
                    Some(r) => HoldReason::from_refusal(account, r),
                    None => HoldReason::Refused {
                        problem: format!("authentication refused: {}", other.answer()),
                        fix: format!(
                            "check the account's permissions for SMTP, then run: oauthrelay queue retry --all (or: oauthrelay authorize --account {name})"
                        ),
                        account: name,
                    },
                },
                None => HoldReason::UnknownToTokenManager { account: name },
            },
        }
    }

    /// The hold the token manager's refusal of `account` means.
    pub(crate) fn from_refusal(account: &str, r: &oauth::Refusal) -> HoldReason {
        HoldReason::NeedsAuthorization {
            account: account.to_string(),
            problem: r.problem.clone(),
            fix: r.fix.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(code: &str) -> Refusal {
        Refusal {
            code: code.into(),
            problem: "p".into(),
            fix: "f".into(),
            retry_at: None,
        }
    }

    fn needs_auth() -> HoldReason {
        HoldReason::NeedsAuthorization {
            account: "a".into(),
            problem: "p".into(),
            fix: "f".into(),
        }
    }

    #[test]
    fn a_dead_grant_waits_for_a_person_a_refused_login_is_probed() {
        let h = needs_auth();
        for code in [
            "invalid_grant",
            "invalid_client",
            "unauthorized_client",
            "not_authorized",
        ] {
            assert_eq!(h.lifter(Some(&refusal(code))), Lifter::Person, "{code}");
        }
        for code in [
            "smtp_auth_rejected",
            "access_denied",
            "admin_policy_enforced",
        ] {
            assert_eq!(h.lifter(Some(&refusal(code))), Lifter::Probe, "{code}");
        }
        assert_eq!(h.lifter(None), Lifter::Probe);
        let refused = HoldReason::Refused {
            account: "a".into(),
            problem: "SMTP AUTH disabled".into(),
            fix: "enable it".into(),
        };
        assert_eq!(refused.lifter(None), Lifter::Probe);
        let no_route = HoldReason::NoRoute {
            sender: "x@y".into(),
        };
        assert_eq!(no_route.lifter(None), Lifter::Person);
        let gone = HoldReason::AccountNotConfigured {
            account: "a".into(),
        };
        assert_eq!(gone.lifter(None), Lifter::Person);
    }

    #[test]
    fn probes_start_at_five_minutes_and_double_to_an_hour() {
        let mins = |n| probe_wait(n).as_secs() / 60;
        assert_eq!(
            (1..=6).map(mins).collect::<Vec<_>>(),
            [5, 10, 20, 40, 60, 60]
        );
        assert_eq!(probe_wait(u32::MAX), PROBE_MAX);
        assert_eq!(probe_wait(0), PROBE_FIRST);
    }
}
