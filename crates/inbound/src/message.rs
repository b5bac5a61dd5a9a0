//! One message on its way into the spool: our `Received:` header, then the
//! client's bytes exactly, with `Date:`/`Message-ID:` added at the end of the
//! header section when missing. Bytes go to the spool as they arrive, so
//! memory does not grow with the message (only the header section is held
//! back, up to [`HEADER_HOLD_LIMIT`](crate::received::HEADER_HOLD_LIMIT)).

use std::sync::Arc;
use std::time::SystemTime;

use spool::{DeliveryRecord, Envelope, MessageId, MessageWriter, Reserve, Spool, SpoolError};

use crate::received::{Feed, HeaderScan, message_id, rfc5322_date};
use crate::session::reply::Reply;

/// Why a body could not be taken.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("message exceeds the size limit")]
    TooBig,
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl BodyError {
    /// The reply the client gets once the rest of the body is read.
    pub(crate) fn reply(&self) -> Reply<'static> {
        match self {
            BodyError::TooBig => Reply::SizeExceeded,
            BodyError::Spool(e) => Reply::Storage(e.clone()),
        }
    }
}

pub(crate) struct Message {
    writer: MessageWriter,
    headers: HeaderScan,
    host: Arc<str>,
    started: SystemTime,
    /// Bytes the client sent (what the size limit applies to).
    client_bytes: u64,
    /// Bytes stored, our headers included.
    stored: u64,
    limit: u64,
}

impl Message {
    /// Start a message; `received` builds the `Received:` header for the id
    /// the spool allocated.
    pub(crate) async fn begin(
        spool: &Spool,
        limit: u64,
        host: Arc<str>,
        received: impl FnOnce(MessageId, SystemTime) -> String,
    ) -> Result<Message, SpoolError> {
        let started = SystemTime::now();
        let mut m = Message {
            writer: spool.begin(Reserve::Respect),
            headers: HeaderScan::default(),
            host,
            started,
            client_bytes: 0,
            stored: 0,
            limit,
        };
        let header = received(m.writer.id(), started);
        m.write(header.as_bytes()).await?;
        Ok(m)
    }

    pub(crate) fn id(&self) -> MessageId {
        self.writer.id()
    }

    /// Whether `more` client bytes would take the message over the limit.
    pub(crate) fn would_exceed(&self, more: u64) -> bool {
        self.client_bytes.saturating_add(more) > self.limit
    }

    /// Append client bytes.
    pub(crate) async fn push(&mut self, data: &[u8]) -> Result<(), BodyError> {
        if data.is_empty() {
            return Ok(());
        }
        if self.would_exceed(data.len() as u64) {
            return Err(BodyError::TooBig);
        }
        self.client_bytes += data.len() as u64;
        match self.headers.feed(data) {
            Feed::Pass => self.write(data).await?,
            Feed::Held => {}
            Feed::End { at } => {
                let missing = self.headers_missing();
                let held = self.headers.take_held();
                let (head, rest) = held.split_at(at.min(held.len()));
                self.write(head).await?;
                let added = self.write_missing(&missing).await?;
                // The header section ended at a line that is neither a
                // header nor empty (a message with no headers at all, or
                // body text right after them): the headers we added must
                // not run into it, or it would read as a malformed header.
                // Like Postfix's cleanup, put the missing empty line in.
                if added && !(rest.starts_with(b"\r\n") || rest.starts_with(b"\n")) {
                    self.write(b"\r\n").await?;
                }
                self.write(rest).await?;
            }
            Feed::Overflow => {
                let missing = self.headers_missing();
                let held = self.headers.take_held();
                self.write_missing(&missing).await?;
                self.write(&held).await?;
            }
        }
        Ok(())
    }

    /// Add what is missing and make the message durable. Returns its id and
    /// stored size.
    pub(crate) async fn finish(
        mut self,
        envelope: Envelope,
    ) -> Result<(MessageId, u64), SpoolError> {
        if !self.headers.is_done() {
            let missing = self.headers_missing();
            let crlf = self.headers.needs_line_ending();
            let held = self.headers.take_held();
            self.write(&held).await?;
            if crlf {
                self.write(b"\r\n").await?;
            }
            self.write_missing(&missing).await?;
        }
        let stored = self.stored;
        let id = self
            .writer
            .commit(envelope, DeliveryRecord::default())
            .await?;
        Ok((id, stored))
    }

    fn headers_missing(&self) -> Missing {
        Missing {
            date: !self.headers.has_date,
            message_id: !self.headers.has_message_id,
        }
    }

    /// Write the missing `Date:`/`Message-ID:`; whether there were any.
    async fn write_missing(&mut self, missing: &Missing) -> Result<bool, SpoolError> {
        if !missing.date && !missing.message_id {
            return Ok(false);
        }
        let mut s = String::with_capacity(128);
        if missing.date {
            s.push_str("Date: ");
            rfc5322_date(self.started, &mut s);
            s.push_str("\r\n");
        }
        if missing.message_id {
            s.push_str("Message-ID: ");
            s.push_str(&message_id(self.writer.id(), &self.host));
            s.push_str("\r\n");
        }
        self.write(s.as_bytes()).await?;
        Ok(true)
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.stored += bytes.len() as u64;
        self.writer.write(bytes).await
    }
}

struct Missing {
    date: bool,
    message_id: bool,
}
