//! BDAT (CHUNKING, RFC 3030): binary chunks, stored exactly as sent.
//!
//! Every BDAT command is followed by its chunk, so the chunk is read even
//! when the command is refused: otherwise its bytes would be taken for
//! commands. After a chunk is refused the transaction is over; chunks the
//! client had already pipelined get the same answer until `LAST`.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::reply::Reply;
use super::{Discard, Session, SessionEnd, State, Step};
use crate::message::BodyError;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn bdat(&mut self, size: u64, last: bool) -> Step {
        self.body_start = Instant::now();
        self.body_bytes = 0;
        if let Some(then) = self.bdat_failed.clone() {
            if last {
                self.bdat_failed = None;
            }
            return self.discard_chunk(size, then);
        }
        let refusal = match &self.txn {
            None => Some(Reply::Sequence("need MAIL command")),
            Some(t) if t.rcpts.is_empty() => Some(Reply::Sequence("need RCPT command")),
            Some(_) => None,
        };
        if let Some(r) = refusal {
            return self.discard_chunk(size, r);
        }
        let needs_message = self.txn.as_ref().is_some_and(|t| t.message.is_none());
        if needs_message && let Err(e) = self.begin_message().await {
            return self.fail_chunk(size, last, BodyError::Spool(e));
        }
        let too_big = self
            .txn
            .as_ref()
            .and_then(|t| t.message.as_ref())
            .is_some_and(|m| m.would_exceed(size));
        if too_big {
            return self.fail_chunk(size, last, BodyError::TooBig);
        }
        if let Some(t) = self.txn.as_mut() {
            t.bdat = true;
        }
        self.state = State::Bdat {
            remaining: size,
            chunk: size,
            last,
        };
        Step::Again
    }

    /// A chunk size no integer holds: no chunk can be read for it, so the
    /// command is refused at once (`501`), and the transaction, which
    /// cannot go on without this chunk, ends (RFC 3030 4.1).
    pub(super) fn bdat_too_big(&mut self) -> Step {
        self.reset_transaction();
        self.reply(Reply::Syntax(
            "BDAT chunk-size [LAST], chunk-size below 2^64",
        ))
    }

    /// Store buffered chunk bytes; answer when the chunk is complete.
    pub(super) async fn bdat_step(&mut self) -> Result<Step, SessionEnd> {
        let State::Bdat {
            remaining,
            chunk,
            last,
        } = &mut self.state
        else {
            return Ok(Step::Again);
        };
        let (chunk, last) = (*chunk, *last);
        let avail = self.rbuf.len().saturating_sub(self.pos);
        let take = (*remaining).min(avail as u64);
        *remaining -= take;
        let left = *remaining;
        if take > 0 {
            let start = self.pos;
            self.pos += take as usize;
            self.body_bytes += take;
            let bytes = self.rbuf.get(start..self.pos).unwrap_or_default();
            let pushed = match self.txn.as_mut().and_then(|t| t.message.as_mut()) {
                Some(m) => m.push(bytes).await,
                None => Err(BodyError::Spool(spool::SpoolError::Closed)),
            };
            if let Err(e) = pushed {
                self.state = State::Command;
                return Ok(self.fail_chunk(left, last, e));
            }
        }
        if left > 0 {
            return Ok(Step::NeedMore);
        }
        self.state = State::Command;
        if !last {
            return Ok(self.reply(Reply::BdatChunk(chunk)));
        }
        let r = self.finish_message().await;
        let step = self.reply(r);
        self.flush().await?;
        Ok(step)
    }

    /// Refuse the rest of this chunk (`remaining` bytes) and end the
    /// transaction; later chunks of it get the same answer.
    fn fail_chunk(&mut self, remaining: u64, last: bool, e: BodyError) -> Step {
        self.abort_message(&e);
        let then = e.reply();
        if !last {
            self.bdat_failed = Some(then.clone());
        }
        self.discard_chunk(remaining, then)
    }

    /// Read `size` bytes, throw them away, then answer `then`.
    fn discard_chunk(&mut self, size: u64, then: Reply<'static>) -> Step {
        self.state = State::Discard(Discard::Bdat {
            remaining: size,
            then,
        });
        Step::Again
    }
}
