//! What Gmail's replies mean (`../shared/gmail.md`, "How to classify"):
//! per-recipient outcomes, and conditions that concern the whole account.

use std::fmt;

use crate::reply::Reply;
use crate::transaction::TxReplies;

/// The outcome for one recipient of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// Gmail took it (`250` to the end of the message).
    Delivered(Reply),
    /// Try again later; the text is the reply or error.
    Deferred(String),
    /// Permanent failure (a 5xx after a successful AUTH): bounce. (Expiry
    /// after `max_age` is decided by the worker, after the attempt.)
    Failed(String),
    /// `452 4.5.3` too many recipients: send in the next transaction now.
    Again,
}

/// A condition that stops the whole account for a while.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountSignal {
    /// `421`, a network/TLS/timeout error, the token endpoint failing:
    /// back off on the retry schedule.
    Unreachable(String),
    /// `454 4.7.0 Too many login attempts`: pause for minutes.
    LoginThrottled(String),
    /// `550 5.4.5 Daily user sending limit exceeded`: pause for hours.
    DailyLimit(String),
    /// Authentication failed even with a fresh token, or Google refused the
    /// account's credentials: hold its mail until it is authorized again.
    Held(String),
}

impl AccountSignal {
    pub fn text(&self) -> &str {
        match self {
            AccountSignal::Unreachable(t)
            | AccountSignal::LoginThrottled(t)
            | AccountSignal::DailyLimit(t)
            | AccountSignal::Held(t) => t,
        }
    }
}

impl fmt::Display for AccountSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
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
fn negative(r: &Reply) -> (RcptOutcome, Option<AccountSignal>) {
    let text = r.to_string();
    if r.is_daily_limit() {
        return (
            RcptOutcome::Deferred(text.clone()),
            Some(AccountSignal::DailyLimit(text)),
        );
    }
    if r.is_closing() {
        return (
            RcptOutcome::Deferred(text.clone()),
            Some(AccountSignal::Unreachable(text)),
        );
    }
    if r.is_permanent() {
        // 530 after a successful AUTH means the session lost its
        // authentication, not that the message is bad.
        if r.code == 530 {
            return (RcptOutcome::Deferred(text), None);
        }
        return (RcptOutcome::Failed(text), None);
    }
    (RcptOutcome::Deferred(text), None)
}

/// Classify a complete transaction of `n` recipients.
pub(crate) fn classify(replies: &TxReplies, n: usize) -> Classified {
    let mut out = Classified::default();
    let Some(mail) = &replies.mail else {
        out.rcpts = vec![RcptOutcome::Deferred("no reply to MAIL FROM".into()); n];
        return out;
    };
    if !mail.is_positive() {
        let (o, s) = negative(mail);
        out.closed = mail.is_closing();
        out.rcpts = vec![o; n];
        out.signal = s;
        return out;
    }
    let mut accepted = Vec::new();
    let mut closing: Option<String> = None;
    for i in 0..n {
        let o = match (replies.rcpts.get(i).and_then(Option::as_ref), &closing) {
            (_, Some(t)) => RcptOutcome::Deferred(t.clone()),
            (None, None) => RcptOutcome::Deferred("no reply to RCPT TO".into()),
            (Some(r), None) if r.is_positive() => {
                accepted.push(i);
                RcptOutcome::Deferred(String::new()) // decided by the data reply
            }
            (Some(r), None) if r.is_too_many_recipients() => RcptOutcome::Again,
            (Some(r), None) => {
                let (o, s) = negative(r);
                if r.is_closing() {
                    closing = Some(r.to_string());
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
            Some(d) if d.is_positive() => (RcptOutcome::Delivered(d.clone()), None),
            Some(d) => {
                out.closed |= d.is_closing();
                negative(d)
            }
            None => (
                RcptOutcome::Deferred(
                    closing
                        .clone()
                        .unwrap_or_else(|| "no reply to the end of the message".into()),
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
        // Gmail refused even the first recipient as "too many": trying again
        // at once would loop.
        let text = replies
            .rcpts
            .iter()
            .flatten()
            .next()
            .map(|r| r.to_string())
            .unwrap_or_default();
        for o in &mut out.rcpts {
            *o = RcptOutcome::Deferred(text.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: u16, esc: [u8; 3], text: &str) -> Option<Reply> {
        Some(Reply::new(code, Some(esc), text))
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
        };
        let c = classify(&replies, 4);
        assert!(matches!(c.rcpts[0], RcptOutcome::Delivered(_)));
        assert_eq!(
            c.rcpts[1],
            RcptOutcome::Failed("550 5.1.1 no such user".into())
        );
        assert_eq!(c.rcpts[2], RcptOutcome::Deferred("451 4.3.0 later".into()));
        assert_eq!(c.rcpts[3], RcptOutcome::Again);
        assert!(c.signal.is_none() && !c.closed);
    }

    #[test]
    fn daily_limit_never_fails() {
        let replies = TxReplies {
            mail: r(250, [2, 1, 0], "OK"),
            rcpts: vec![r(250, [2, 1, 5], "OK")],
            data: r(550, [5, 4, 5], "Daily user sending limit exceeded."),
        };
        let c = classify(&replies, 1);
        assert!(matches!(c.rcpts[0], RcptOutcome::Deferred(_)));
        assert!(matches!(c.signal, Some(AccountSignal::DailyLimit(_))));
    }

    #[test]
    fn mail_421_closes_and_backs_off() {
        let replies = TxReplies {
            mail: r(421, [4, 7, 0], "Try again later, closing connection."),
            ..Default::default()
        };
        let c = classify(&replies, 2);
        assert!(c.closed);
        assert!(matches!(c.signal, Some(AccountSignal::Unreachable(_))));
        assert!(
            c.rcpts
                .iter()
                .all(|o| matches!(o, RcptOutcome::Deferred(_)))
        );
    }

    #[test]
    fn size_refusal_fails_everyone() {
        let replies = TxReplies {
            mail: r(
                552,
                [5, 3, 4],
                "Your message exceeded Google's message size limits.",
            ),
            ..Default::default()
        };
        let c = classify(&replies, 2);
        assert!(c.rcpts.iter().all(|o| matches!(o, RcptOutcome::Failed(_))));
    }

    #[test]
    fn all_too_many_is_deferred_not_looped() {
        let replies = TxReplies {
            mail: r(250, [2, 1, 0], "OK"),
            rcpts: vec![r(452, [4, 5, 3], "too many recipients")],
            data: None,
        };
        let c = classify(&replies, 1);
        assert!(matches!(c.rcpts[0], RcptOutcome::Deferred(_)));
    }
}
