//! Why an account's mail is held, as one enum rendered for humans in one
//! place (the log, `queue list`, `/readyz` and the status page all show
//! this text).

use std::fmt;

use serde::{Deserialize, Serialize};

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

impl HoldReason {
    /// The hold the token manager's refusal of `account` means.
    pub(crate) fn from_refusal(account: &str, r: &oauth::Refusal) -> HoldReason {
        HoldReason::NeedsAuthorization {
            account: account.to_string(),
            problem: r.problem.clone(),
            fix: r.fix.clone(),
        }
    }
}
