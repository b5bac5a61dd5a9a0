//! DATA: the command, and the body streaming through the dot decoder.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::reply::Reply;
use super::{Discard, Session, SessionEnd, State, Step};
use crate::dot::{Borrowing, DotDecoder};
use crate::message::BodyError;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn data(&mut self) -> Result<Step, SessionEnd> {
        let check = match &self.txn {
            None => Some("need MAIL command"),
            Some(t) if t.bdat => Some("DATA cannot be mixed with BDAT"),
            Some(t) if t.rcpts.is_empty() => Some("need RCPT command"),
            Some(_) => None,
        };
        if let Some(why) = check {
            return Ok(self.reply(Reply::Sequence(why)));
        }
        if let Err(e) = self.begin_message().await {
            self.abort_message(&BodyError::Spool(e.clone()));
            return Ok(self.reply(Reply::Storage(e)));
        }
        self.state = State::Data(DotDecoder::new(self.settings.end_of_data(self.ip)));
        let step = self.reply(Reply::DataGo);
        self.body_start = Instant::now();
        self.body_bytes = 0;
        // The client waits for the 354 (RFC 2920): send it now.
        self.flush().await?;
        Ok(step)
    }

    /// Decode what is buffered and store it.
    pub(super) async fn data_step(&mut self) -> Result<Step, SessionEnd> {
        let State::Data(dot) = &mut self.state else {
            return Ok(Step::Again);
        };
        let input = self.rbuf.get(self.pos..).unwrap_or_default();
        // Usually the decoded bytes are a piece of the input itself (no
        // stuffed dot, no bare LF): then they go to the spool from `rbuf`,
        // and only otherwise through `scratch`.
        let mut sink = Borrowing::new(input, &mut self.scratch);
        let (used, done) = dot.decode(input, &mut sink);
        let decoded = sink.into_bytes();
        self.pos += used;
        self.body_bytes += used as u64;
        let pushed = match self.txn.as_mut().and_then(|t| t.message.as_mut()) {
            Some(m) => m.push(decoded).await,
            None => Err(BodyError::Spool(spool::SpoolError::Closed)),
        };
        if let Err(e) = pushed {
            self.abort_message(&e);
            if let State::Data(dot) = std::mem::replace(&mut self.state, State::Command) {
                self.state = State::Discard(Discard::Data {
                    dot,
                    then: e.reply(),
                });
            }
            return Ok(Step::Again);
        }
        if !done {
            return Ok(Step::NeedMore);
        }
        self.state = State::Command;
        let r = self.finish_message().await;
        let step = self.reply(r);
        self.flush().await?;
        Ok(step)
    }
}
