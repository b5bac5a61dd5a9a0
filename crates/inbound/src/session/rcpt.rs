//! RCPT TO, and who may relay.

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use super::reply::{Clean, Reply};
use super::{Session, Step};
use crate::metrics::Rejection;
use crate::path::{self, Path};

enum Verdict {
    Accept,
    Reject(Reply<'static>),
    Relay,
    TooMany,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// RCPT TO: the path is read from `line` (see [`crate::path`]); its
    /// parameters are ignored.
    pub(super) fn rcpt(&mut self, line: &[u8]) -> Step {
        let max = self.settings.config.max_recipients;
        let may_relay = self.trusted || self.auth_user.is_some();
        let to = match path::parse(line) {
            Some(Path::Mailbox(a)) => a,
            // RFC 5321 4.5.1: always accepted; we have no mailboxes of our
            // own, so it is relayed like any address.
            Some(Path::Postmaster) => path::postmaster(&self.settings.hostname),
            Some(Path::Null) | None => String::new(),
        };
        let verdict = match &self.txn {
            None => Verdict::Reject(Reply::Sequence("need MAIL command")),
            Some(t) if t.bdat || t.message.is_some() => {
                Verdict::Reject(Reply::Sequence("RCPT not allowed during a BDAT transfer"))
            }
            Some(_) if to.is_empty() => Verdict::Reject(Reply::BadRecipient),
            Some(t) if !t.smtputf8 && !to.is_ascii() => Verdict::Reject(Reply::NonAsciiAddress),
            Some(_) if !may_relay => Verdict::Relay,
            Some(t) if t.rcpts.len() >= max => Verdict::TooMany,
            Some(_) => Verdict::Accept,
        };
        match verdict {
            Verdict::Reject(r) => self.reply(r),
            Verdict::Relay => {
                self.shared.metrics.rejected(Rejection::Relay);
                info!(client = %self.peer, to = %Clean(&to), "relay access denied: client not in allow_networks and not authenticated");
                self.reply(Reply::RelayDenied(&to))
            }
            Verdict::TooMany => {
                self.shared.metrics.rejected(Rejection::Recipients);
                self.reply(Reply::TooManyRecipients)
            }
            Verdict::Accept => {
                if let Some(t) = self.txn.as_mut() {
                    t.rcpts.push(to);
                }
                self.reply(Reply::RcptOk)
            }
        }
    }
}
