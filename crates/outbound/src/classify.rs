//! What an upstream's typed replies mean (`docs/gmail-replies.md`): per
//! recipient outcomes, and conditions that concern the whole account.
//! Written once against [`Reply`]; another transport maps its own errors to
//! the same [`RcptOutcome`]s and [`AccountSignal`]s.

use std::fmt;
use std::time::SystemTime;

use crate::reply::{Answer, Reply};

/// The outcome for one recipient of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The upstream took it (`250` to the end of the message). `remote_id`:
    /// the provider's id for the message when it gives one (Gmail API).
    Delivered(Answer),
    /// Try again later.
    Deferred(Answer),
    /// Permanent failure (a 5xx after a successful AUTH): bounce. (Expiry
    /// after `max_age` is decided after the attempt.)
    Failed(Answer),
    /// `452 4.5.3` too many recipients: send in the next transaction now.
    Again,
}

/// A condition that stops the whole account for a while. Workers report
/// it; the scheduler alone changes the account's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountSignal {
    /// `421`, a network/TLS/timeout error, the token endpoint failing:
    /// back off on the retry schedule.
    Unreachable(Answer),
    /// `454 4.7.0 Too many login attempts`: pause for minutes.
    LoginThrottled(Answer),
    /// `550 5.4.5 Daily user sending limit exceeded`: pause for hours (until
    /// `until` when the provider says).
    DailyLimit {
        answer: Answer,
        until: Option<SystemTime>,
    },
    /// The provider asks to slow down (an HTTP `429` with `Retry-After`,
    /// Exchange's `4.3.2`): pause until `until`, or on the retry schedule.
    RateLimited {
        answer: Answer,
        until: Option<SystemTime>,
    },
    /// Authentication failed even with a fresh token, or the token manager
    /// refused one: hold the account's mail; the token manager says why and
    /// what fixes it.
    AuthFailed(Answer),
    /// The provider refuses the account for a reason an administrator must
    /// fix: hold its mail with these words.
    Refused {
        answer: Answer,
        problem: String,
        fix: String,
    },
}

impl AccountSignal {
    /// The answer that caused it.
    pub fn answer(&self) -> &Answer {
        match self {
            AccountSignal::Unreachable(a)
            | AccountSignal::LoginThrottled(a)
            | AccountSignal::AuthFailed(a)
            | AccountSignal::DailyLimit { answer: a, .. }
            | AccountSignal::RateLimited { answer: a, .. }
            | AccountSignal::Refused { answer: a, .. } => a,
        }
    }

    /// Whether mail the signal stops may age towards `max_age`: only when
    /// the upstream or the network is failing; never for throttling, the
    /// daily limit or authentication trouble.
    pub fn ages_mail(&self) -> bool {
        matches!(self, AccountSignal::Unreachable(_))
    }

    /// Whether the account's mail is held (waits for a human) rather than
    /// paused.
    pub fn holds(&self) -> bool {
        matches!(
            self,
            AccountSignal::AuthFailed(_) | AccountSignal::Refused { .. }
        )
    }
}

impl fmt::Display for AccountSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.answer().fmt(f)
    }
}

/// The replies of one SMTP transaction. `None` where a command got no reply
/// (an earlier one failed without pipelining, or the server closed).
#[derive(Debug, Default, Clone)]
pub(crate) struct TxReplies {
    pub mail: Option<Reply>,
    pub rcpts: Vec<Option<Reply>>,
    /// The reply to the end of the message, when it was sent.
    pub data: Option<Reply>,
    /// The server refused a BDAT chunk (it may not have read it).
    pub chunk_refused: bool,
}

impl TxReplies {
    pub(crate) fn accepted(&self) -> usize {
        self.rcpts
            .iter()
            .filter(|r| r.as_ref().is_some_and(Reply::is_positive))
            .count()
    }

    pub(crate) fn mail_ok(&self) -> bool {
        self.mail.as_ref().is_some_and(Reply::is_positive)
    }

    /// A `530`/`535` to any command: the session lost its authentication.
    pub(crate) fn auth_failure(&self) -> Option<&Reply> {
        self.mail
            .iter()
            .chain(self.rcpts.iter().flatten())
            .chain(self.data.iter())
            .find(|r| r.is_auth_failure() && !r.is_smtp_auth_disabled())
    }
}

/// One transaction's replies, classified.
#[derive(Debug, Default)]
pub(crate) struct Classified {
    /// One entry per recipient of the transaction, in order.
    pub rcpts: Vec<RcptOutcome>,
    pub signal: Option<AccountSignal>,
    /// The server said `421`: the connection is gone.
    pub closed: bool,
}

/// A reply that is not a success, as an outcome and maybe a signal.
/// `mailbox` is the account's address (for the words of a hold).
fn negative(r: &Reply, mailbox: &str) -> (RcptOutcome, Option<AccountSignal>) {
    let answer = Answer::Reply(r.clone());
    if r.is_outbound_spam_block() {
        return (
            RcptOutcome::Deferred(answer),
            Some(crate::exchange::outbound_spam(r, mailbox)),
        );
    }
    if r.is_smtp_auth_disabled() {
        return (
            RcptOutcome::Deferred(answer),
            Some(crate::exchange::auth_disabled(r, mailbox)),
        );
    }
    if r.is_rate_limited() {
        return (
            RcptOutcome::Deferred(answer.clone()),
            Some(AccountSignal::RateLimited {
                answer,
                until: None,
            }),
        );
    }
    if r.is_daily_limit() {
        return (
            RcptOutcome::Deferred(answer.clone()),
            Some(AccountSignal::DailyLimit {
                answer,
                until: None,
            }),
        );
    }
    if r.is_closing() {
        return (
            RcptOutcome::Deferred(answer.clone()),
            Some(AccountSignal::Unreachable(answer)),
        );
    }
    if r.is_auth_failure() && !r.is_smtp_auth_disabled() {
        // 530/535 after a successful AUTH: the session lost its
        // authentication. Never a verdict on the message: hold.
        return (
            RcptOutcome::Deferred(answer.clone()),
            Some(AccountSignal::AuthFailed(answer)),
        );
    }
    if r.is_login_throttle() {
        return (
            RcptOutcome::Deferred(answer.clone()),
            Some(AccountSignal::LoginThrottled(answer)),
        );
    }
    if r.is_permanent() {
        return (RcptOutcome::Failed(answer), None);
    }
    (RcptOutcome::Deferred(answer), None)
}

/// Classify a complete transaction of `n` recipients.
pub(crate) fn classify(replies: &TxReplies, n: usize, mailbox: &str) -> Classified {
    let mut out = Classified::default();
    let Some(mail) = &replies.mail else {
        out.rcpts = vec![RcptOutcome::Deferred(Answer::error("no reply to MAIL FROM")); n];
        return out;
    };
    if !mail.is_positive() {
        let (o, s) = negative(mail, mailbox);
        out.closed = mail.is_closing();
        out.rcpts = vec![o; n];
        out.signal = s;
        return out;
    }
    let mut accepted = Vec::new();
    let mut closing: Option<Answer> = None;
    for i in 0..n {
        let o = match (replies.rcpts.get(i).and_then(Option::as_ref), &closing) {
            (_, Some(t)) => RcptOutcome::Deferred(t.clone()),
            (None, None) => RcptOutcome::Deferred(Answer::error("no reply to RCPT TO")),
            (Some(r), None) if r.is_positive() => {
                accepted.push(i);
                RcptOutcome::Again // decided by the data reply below
            }
            (Some(r), None) if r.is_too_many_recipients() => RcptOutcome::Again,
            (Some(r), None) => {
                let (o, s) = negative(r, mailbox);
                if r.is_closing() {
                    closing = Some(Answer::Reply(r.clone()));
                    out.closed = true;
                }
                if s.is_some() {
                    out.signal = s;
                }
                o
            }
        };
        out.rcpts.push(o);
    }
    if !accepted.is_empty() {
        let (o, s) = match &replies.data {
            Some(d) if d.is_positive() => (RcptOutcome::Delivered(Answer::Reply(d.clone())), None),
            Some(d) => {
                out.closed |= d.is_closing();
                negative(d, mailbox)
            }
            None => (
                RcptOutcome::Deferred(
                    closing
                        .clone()
                        .unwrap_or_else(|| Answer::error("no reply to the end of the message")),
                ),
                None,
            ),
        };
        for &i in &accepted {
            out.rcpts[i] = o.clone();
        }
        if s.is_some() {
            out.signal = s;
        }
    } else if out.rcpts.iter().all(|o| *o == RcptOutcome::Again) {
        // Refused even the first recipient as "too many": trying again at
        // once would loop.
        let answer = replies
            .rcpts
            .iter()
            .flatten()
            .next()
            .map(|r| Answer::Reply(r.clone()))
            .unwrap_or_else(|| Answer::error("too many recipients"));
        for o in &mut out.rcpts {
            *o = RcptOutcome::Deferred(answer.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::Status;

    fn r(code: u16, esc: [u16; 3], text: &str) -> Option<Reply> {
        Some(Reply::new(code, Some(Status(esc)), text))
    }

    #[test]
    fn mixed_recipients() {
        let replies = TxReplies {
            mail: r(250, [2, 1, 0], "OK"),
            rcpts: vec![
                r(250, [2, 1, 5], "OK"),
                r(550, [5, 1, 1], "no such user"),
                r(451, [4, 3, 0], "later"),
                r(452, [4, 5, 3], "Your message has too many recipients"),
            ],
            data: r(250, [2, 0, 0], "OK  123 id - gsmtp"),
            chunk_refused: false,
        };
        let c = classify(&replies, 4, "me@example.com");
        assert!(matches!(c.rcpts[0], RcptOutcome::Delivered(_)));
        assert_eq!(
            c.rcpts[1].clone(),
            RcptOutcome::Failed(Answer::Reply(
                Reply::parse("550 5.1.1 no such user").unwrap()
            ))
        );
        assert!(
            matches!(&c.rcpts[2], RcptOutcome::Deferred(a) if a.to_string() == "451 4.3.0 later")
        );
        assert_eq!(c.rcpts[3], RcptOutcome::Again);
        assert!(c.signal.is_none() && !c.closed);
    }

    #[test]
    fn an_authentication_reply_after_auth_holds_and_never_fails() {
        for stage in 0..3 {
            let bad = r(535, [5, 7, 8], "Username and Password not accepted");
            let mut replies = TxReplies {
                mail: r(250, [2, 1, 0], "OK"),
                rcpts: vec![r(250, [2, 1, 5], "OK")],
                data: r(250, [2, 0, 0], "OK"),
                chunk_refused: false,
            };
            match stage {
                0 => replies.mail = bad,
                1 => replies.rcpts[0] = bad,
                _ => replies.data = bad,
            }
            let c = classify(&replies, 1, "me@example.com");
            assert!(
                matches!(c.rcpts[0], RcptOutcome::Deferred(_)),
                "{stage}: {c:?}"
            );
            assert!(
                matches!(c.signal, Some(AccountSignal::AuthFailed(_))),
                "{stage}"
            );
        }
    }

    #[test]
    fn all_too_many_is_deferred_not_looped() {
        let replies = TxReplies {
            mail: r(250, [2, 1, 0], "OK"),
            rcpts: vec![r(452, [4, 5, 3], "too many recipients")],
            data: None,
            chunk_refused: false,
        };
        let c = classify(&replies, 1, "me@example.com");
        assert!(matches!(c.rcpts[0], RcptOutcome::Deferred(_)));
    }
}
