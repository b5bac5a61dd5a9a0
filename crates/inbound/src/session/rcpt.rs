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
            // `RCPT TO:<root>`: a local name, for clients that may relay.
            Some(Path::Unqualified(name)) if self.local_names().is_some() => name,
            // RFC 5321 4.5.1: always accepted; we have no mailboxes of our
            // own, so it is relayed like any address.
            Some(Path::Postmaster) => path::postmaster(&self.settings.hostname),
            Some(Path::Null | Path::Unqualified(_)) | None => String::new(),
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
                // Local names resolved here (aliases, the postmaster), so the
                // queue holds where the mail really goes.
                let targets = match self.local_names() {
                    Some(local) => local.expand(&to),
                    None => vec![to.clone()],
                };
                let Some(t) = self.txn.as_mut() else {
                    return self.reply(Reply::Sequence("need MAIL command"));
                };
                let new: Vec<String> = targets.into_iter().fold(Vec::new(), |mut v, a| {
                    if !v.contains(&a) {
                        v.push(a);
                    }
                    v
                });
                if t.rcpts.len() + new.len() > max {
                    self.shared.metrics.rejected(Rejection::Recipients);
                    return self.reply(Reply::TooManyRecipients);
                }
                if new.len() != 1 || new.first() != Some(&to) {
                    info!(client = %self.peer, to = %Clean(&to), "local recipient {} -> {}", Clean(&to), Clean(&new.join(", ")));
                }
                t.rcpts.extend(new);
                self.reply(Reply::RcptOk)
            }
        }
    }
}
