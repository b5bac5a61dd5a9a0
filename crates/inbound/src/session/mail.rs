//! MAIL FROM.

use std::borrow::Cow;

use smtp_proto::{MAIL_BODY_8BITMIME, MAIL_BODY_BINARYMIME, MAIL_SMTPUTF8, MailFrom};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use super::reply::{Clean, Reply};
use super::{Session, Step, Txn};
use crate::metrics::Rejection;
use crate::path::{self, Path};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// MAIL FROM: `from` has the parameters; the path is read from `line`
    /// (see [`crate::path`]).
    pub(super) fn mail(&mut self, from: MailFrom<Cow<'_, str>>, line: &[u8]) -> Step {
        if self.helo.is_none() {
            return self.reply(Reply::Sequence("send HELO/EHLO first"));
        }
        if self.txn.is_some() {
            return self.reply(Reply::Sequence("nested MAIL command"));
        }
        self.bdat_failed = None;
        let params = path::params(line).unwrap_or_default();
        if let Some(p) = super::params::unadvertised_mail(params, self.auth_offered()) {
            return self.reply(Reply::UnsupportedParameter(p));
        }
        // smtp-proto's `from.size` wraps an overlong number around.
        let Ok(size) = super::params::declared_size(params) else {
            self.shared.metrics.rejected(Rejection::Size);
            return self.reply(Reply::SizeExceeded);
        };
        let size = size.unwrap_or(0);
        if size > self.settings.config.max_message_size.0 {
            self.shared.metrics.rejected(Rejection::Size);
            return self.reply(Reply::SizeExceeded);
        }
        // A declared size that does not fit above the spool's reserve is
        // refused now (as Postfix does with queue_minfree), before the
        // client sends it.
        if size > 0
            && let Some(room) = self.shared.spool.room_for_mail()
            && size > room
        {
            self.shared.metrics.rejected(Rejection::Storage);
            // Readiness and the spool's log say new mail is refused.
            self.shared.spool.refused_for_space();
            info!(client = %self.peer, size, room, "MAIL refused: the declared SIZE does not fit in the spool's free space above [spool] min_free_space");
            return self.reply(Reply::Storage(spool::SpoolError::DiskFull));
        }
        if from.flags & MAIL_BODY_BINARYMIME != 0 {
            return self.reply(Reply::UnsupportedParameter("BODY=BINARYMIME"));
        }
        let sender = match path::parse(line) {
            Some(Path::Null) => String::new(),
            Some(Path::Postmaster) => path::postmaster(&self.settings.hostname),
            Some(Path::Mailbox(a)) => a,
            // `MAIL FROM:<scanner>` from a printer: qualified for clients
            // that may relay, as Postfix's append_at_myorigin does.
            Some(Path::Unqualified(name)) => match self.local_names() {
                Some(local) => local.qualify(&name),
                None => return self.reply(Reply::BadSender),
            },
            None => return self.reply(Reply::BadSender),
        };
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        if !smtputf8 && !sender.is_ascii() {
            return self.reply(Reply::NonAsciiAddress);
        }
        if !(self.settings.sender_allowed)(&sender) {
            self.shared.metrics.rejected(Rejection::Sender);
            info!(client = %self.peer, from = %Clean(&sender), "sender refused: no account accepts this sender");
            return self.reply(Reply::SenderRejected(&sender));
        }
        self.txn = Some(Txn {
            sender,
            rcpts: Vec::new(),
            smtputf8,
            eight_bit: from.flags & MAIL_BODY_8BITMIME != 0,
            message: None,
            bdat: false,
        });
        self.reply(Reply::MailOk)
    }
}
