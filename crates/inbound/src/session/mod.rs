//! One SMTP session: framing, the state machine, deadlines and replies.
//!
//! The session reads into a small buffer, handles every complete command
//! in it (pipelining, RFC 2920), queues the replies, and writes them all at
//! once when it is about to wait for the client again. Its state is one
//! [`State`]; each verb lives in its own file.

mod auth;
mod bdat;
mod conn;
mod data;
mod ehlo;
mod mail;
mod params;
mod rcpt;
pub(crate) mod reply;
mod starttls;
mod summary;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use smtp_proto::{Error as ParseError, Request};
use spool::{Envelope, Spool};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::dot::DotDecoder;
use crate::message::{BodyError, Message};
use crate::metrics::{Metrics, Refusal, Rejection};
use crate::password::Verifier;
use crate::ratelimit::AuthLimiter;
use crate::server::ListenerKind;
use crate::settings::Settings;

pub(crate) use auth::AuthStep;
use conn::Conn;
use reply::{Clean, Reply, ReplyCtx};
use summary::{Summary, Verb};

/// Read buffer while reading commands (grown only for longer
/// `max_line_length`).
const COMMAND_BUF: usize = 4 << 10;
/// Largest read buffer while a body streams in.
const BODY_BUF: usize = 64 << 10;
/// Queued replies beyond this are written even if more commands wait.
const OUT_FLUSH_AT: usize = 16 << 10;
/// Reply buffer capacity kept between writes.
const OUT_KEEP: usize = 1 << 10;
/// The most a slow body's deadline is extended by `min_data_rate`.
const MAX_DATA_EXTENSION: Duration = Duration::from_secs(24 * 3600);
/// Bound on the final close (TLS close_notify, FIN).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What every session of one listener shares.
pub(crate) struct Shared {
    pub spool: Spool,
    pub metrics: Metrics,
    pub limiter: AuthLimiter,
    pub verifier: Verifier,
    /// The log of connections refused at connect (rate-limited).
    pub refusals: crate::refusals::RefusalLog,
}

/// The session's state: what the next bytes from the client are.
pub(crate) enum State {
    /// A command line.
    Command,
    /// The client's answer to an AUTH challenge.
    Auth(AuthStep),
    /// A DATA body, being stored.
    Data(DotDecoder),
    /// The bytes of a BDAT chunk, being stored.
    Bdat {
        remaining: u64,
        chunk: u64,
        last: bool,
    },
    /// A body that will not be stored (too big, refused, or the spool
    /// failed): read to its end, then answer `then`.
    Discard(Discard),
}

pub(crate) enum Discard {
    Data {
        dot: DotDecoder,
        then: Reply<'static>,
    },
    Bdat {
        remaining: u64,
        then: Reply<'static>,
    },
}

/// The client's HELO/EHLO.
pub(crate) struct Helo {
    pub name: String,
    pub esmtp: bool,
}

/// A mail transaction, from MAIL to the end of the body.
pub(crate) struct Txn {
    pub sender: String,
    pub rcpts: Vec<String>,
    pub smtputf8: bool,
    pub eight_bit: bool,
    /// Open from DATA or the first BDAT until the end of the body.
    pub message: Option<Message>,
    /// BDAT chunks have been sent in this transaction.
    pub bdat: bool,
}

/// What to do after a step.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Keep going with the buffered input.
    Again,
    /// Wait for more input.
    NeedMore,
    /// Send what is queued and close.
    Close,
    /// Send what is queued and start TLS.
    StartTls,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionEnd {
    #[error("the client closed the connection")]
    Eof,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("timeout")]
    Timeout,
    #[error("shutting down")]
    Shutdown,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

#[derive(Debug, Clone, Copy)]
enum Expiry {
    Timeout,
    Shutdown,
}

/// Framing result for line-oriented states.
enum Framed {
    Line(std::ops::Range<usize>),
    TooLong,
    NeedMore,
}

pub(crate) struct Session<S> {
    conn: Conn<S>,
    rbuf: Vec<u8>,
    /// Start of unread bytes in `rbuf`.
    pos: usize,
    /// The last read filled the buffer (a body is streaming: grow it).
    read_full: bool,
    out: Vec<u8>,
    /// Decoded DATA bytes on their way to the spool, when they are not an
    /// unchanged piece of `rbuf` (a stuffed dot, a bare LF: see
    /// [`crate::dot::Borrowing`]).
    scratch: Vec<u8>,
    settings: Arc<Settings>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    peer: SocketAddr,
    ip: IpAddr,
    /// The listener the client came in on.
    listener: ListenerKind,
    trusted: bool,
    /// Outside `allow_networks` and no `[[server.users]]`: told so, then
    /// closed (only [`Inbound::handle`](crate::Inbound::handle) gets here;
    /// the accept loop refuses such clients itself).
    refused: bool,
    /// Commands that did nothing, while outside `allow_networks` and not
    /// authenticated (`untrusted_junk_command_limit`).
    junk: u32,
    helo: Option<Helo>,
    auth_user: Option<String>,
    txn: Option<Txn>,
    /// A BDAT transaction failed: later chunks of it are read, thrown away
    /// and answered with this, until `LAST`, MAIL or RSET.
    bdat_failed: Option<Reply<'static>>,
    state: State,
    errors: u32,
    cmd_deadline: Instant,
    body_start: Instant,
    body_bytes: u64,
    /// Set when shutdown began while a body was streaming.
    grace_end: Option<Instant>,
    /// Discarding the rest of an overlong line.
    skipping_line: bool,
    /// Commands and their outcomes, for the `disconnect from` line.
    summary: Summary,
}

fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(365 * 24 * 3600))
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(crate) fn new(
        stream: S,
        peer: SocketAddr,
        listener: ListenerKind,
        settings: Arc<Settings>,
        shared: Arc<Shared>,
        shutdown: CancellationToken,
    ) -> Session<S> {
        let ip = peer.ip().to_canonical();
        let trusted = settings.trusts(ip);
        let refused = !trusted && settings.users.is_empty();
        let now = Instant::now();
        let mut session = Session {
            conn: Conn::Plain(stream),
            rbuf: Vec::new(),
            pos: 0,
            read_full: false,
            out: Vec::new(),
            scratch: Vec::new(),
            // Set from the command timeout below.
            cmd_deadline: now,
            settings,
            shared,
            shutdown,
            peer,
            ip,
            listener,
            trusted,
            refused,
            junk: 0,
            helo: None,
            auth_user: None,
            txn: None,
            bdat_failed: None,
            state: State::Command,
            errors: 0,
            body_start: now,
            body_bytes: 0,
            grace_end: None,
            skipping_line: false,
            summary: Summary::default(),
        };
        session.touch();
        session
    }

    /// Run the session to its end. It is logged the way Postfix's smtpd
    /// does: `connect from`, how it ended if not by QUIT, and `disconnect
    /// from` with the commands counted.
    pub(crate) async fn run(mut self) {
        let ip = self.ip;
        info!(client = %self.peer, trusted = self.trusted, listener = self.listener.label(), "connect from unknown[{ip}]");
        let end = self.serve().await;
        self.log_end(&end);
        if !matches!(end, Err(SessionEnd::Io(_) | SessionEnd::Tls(_))) {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.conn.shutdown()).await;
        }
        info!(client = %self.peer, "disconnect from unknown[{ip}]{}", self.summary);
    }

    /// Say why a session ended, when it was not the usual way.
    fn log_end(&self, end: &Result<(), SessionEnd>) {
        let (ip, last) = (self.ip, self.summary.last_command());
        // In a body: what was received of it, and the message it was for.
        let body = if self.in_body() {
            format!(" ({} bytes)", self.body_bytes)
        } else {
            String::new()
        };
        let id = self
            .txn
            .as_ref()
            .and_then(|t| t.message.as_ref())
            .map(|m| m.id().to_string());
        match end {
            Ok(()) => {}
            Err(SessionEnd::Shutdown) => debug!(client = %self.peer, "closed for shutdown"),
            Err(SessionEnd::Eof | SessionEnd::Io(_)) if self.in_body() => warn!(
                client = %self.peer,
                queue_id = id.as_deref().unwrap_or(""),
                error = %end.as_ref().err().map(ToString::to_string).unwrap_or_default(),
                "lost connection after {last}{body} from unknown[{ip}]; the message was not queued"
            ),
            Err(SessionEnd::Eof) => {
                info!(client = %self.peer, "lost connection after {last} from unknown[{ip}]")
            }
            Err(SessionEnd::Io(e)) => {
                info!(client = %self.peer, error = %e, "lost connection after {last} from unknown[{ip}]")
            }
            Err(SessionEnd::Timeout) => {
                info!(client = %self.peer, queue_id = id.as_deref().unwrap_or(""), "timeout after {last}{body} from unknown[{ip}]")
            }
            Err(SessionEnd::Tls(e)) => warn!(
                client = %self.peer,
                listener = self.listener.label(),
                "TLS handshake failed from unknown[{ip}]: {e}{}",
                tls_hint(e)
            ),
        }
    }

    async fn serve(&mut self) -> Result<(), SessionEnd> {
        if self.refused {
            self.shared.metrics.refused(Refusal::Network);
            self.shared
                .refusals
                .refused(self.peer, &self.shutdown, None);
            let ip = self.ip;
            let _ = self.reply(Reply::NetworkRefused(ip));
            return self.flush().await;
        }
        if self.listener == ListenerKind::Smtps {
            // Implicit TLS: the handshake comes before the greeting.
            self.handshake().await?;
        }
        self.shared.metrics.accepted();
        let _ = self.reply(Reply::Greeting);
        loop {
            match self.process().await? {
                Step::Again | Step::NeedMore => self.fill().await?,
                Step::Close => return self.flush().await,
                Step::StartTls => {
                    self.flush().await?;
                    self.start_tls().await?;
                }
            }
        }
    }

    /// Handle everything buffered, as far as the state allows.
    async fn process(&mut self) -> Result<Step, SessionEnd> {
        loop {
            let step = match self.state {
                State::Command => self.command_step().await?,
                State::Auth(_) => self.auth_step().await?,
                State::Data(_) => self.data_step().await?,
                State::Bdat { .. } => self.bdat_step().await?,
                State::Discard(_) => self.discard_step(),
            };
            match step {
                Step::Again => {
                    if self.out.len() >= OUT_FLUSH_AT {
                        self.flush().await?;
                    }
                }
                other => return Ok(other),
            }
        }
    }

    // ---- framing --------------------------------------------------------

    fn unread(&self) -> &[u8] {
        self.rbuf.get(self.pos..).unwrap_or_default()
    }

    /// The next complete line, or that it was too long (its bytes are
    /// skipped up to the next LF, and the session goes on).
    fn frame_line(&mut self) -> Framed {
        let max = self.settings.config.max_line_length;
        let window = self.unread();
        let lf = memchr::memchr(b'\n', window);
        let len = window.len();
        if self.skipping_line {
            return match lf {
                Some(i) => {
                    self.pos += i + 1;
                    self.skipping_line = false;
                    Framed::TooLong
                }
                None => {
                    self.pos += len;
                    Framed::NeedMore
                }
            };
        }
        match lf {
            Some(i) => {
                let r = self.pos..self.pos + i + 1;
                self.pos = r.end;
                if i + 1 > max {
                    Framed::TooLong
                } else {
                    Framed::Line(r)
                }
            }
            None => {
                if len >= max {
                    self.skipping_line = true;
                    self.pos += len;
                }
                Framed::NeedMore
            }
        }
    }

    async fn command_step(&mut self) -> Result<Step, SessionEnd> {
        match self.frame_line() {
            Framed::NeedMore => Ok(Step::NeedMore),
            Framed::TooLong => Ok(self.reply(Reply::LineTooLong)),
            Framed::Line(r) => {
                // The line is read in place: the buffer is lent out while the
                // command runs (commands never read more input themselves).
                let buf = std::mem::take(&mut self.rbuf);
                let step = self.command(buf.get(r).unwrap_or_default()).await;
                self.rbuf = buf;
                step
            }
        }
    }

    async fn command(&mut self, line: &[u8]) -> Result<Step, SessionEnd> {
        self.summary.begin(Verb::of(line));
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(self.reply(Reply::EmptyLine));
        }
        // `MAIL FROM:addr` without angle brackets (old printers): from
        // allow_networks and after AUTH it reads as `MAIL FROM:<addr>`,
        // as Postfix reads it; strangers must send the brackets.
        let bracketed;
        let line = match crate::path::bracket_bare(line) {
            Some(l) if !self.untrusted() => {
                bracketed = l;
                bracketed.as_slice()
            }
            Some(_) => {
                let ip = self.ip;
                info!(client = %self.peer, "address without angle brackets refused from unknown[{ip}]: accepted only from allow_networks or after AUTH");
                line
            }
            None => line,
        };
        let placeholder;
        let parsed = match Request::parse(&mut line.iter()) {
            // smtp-proto refuses address literals (`user@[192.0.2.1]`): if
            // the path is valid, it reads the rest of the line with the path
            // replaced, and MAIL/RCPT read the path from `line` themselves.
            Err(ParseError::InvalidSenderAddress | ParseError::InvalidRecipientAddress)
                if let Some(l) = crate::path::with_placeholder(line) =>
            {
                placeholder = l;
                Request::parse(&mut placeholder.iter())
            }
            other => other,
        };
        let req = match parsed {
            Ok(req) => req,
            // smtp-proto refuses some numbers too big for it as invalid:
            // they are sizes over the limit.
            Err(ParseError::InvalidParameter { param: "SIZE" }) if self.size_too_big(line) => {
                self.shared.metrics.rejected(Rejection::Size);
                return Ok(self.reply(Reply::SizeExceeded));
            }
            Err(e) => return Ok(self.parse_error(&e)),
        };
        // Commands that take no argument refuse one (RFC 5321 4.1.1).
        let bare = match req {
            Request::Data => Some("DATA"),
            Request::Rset => Some("RSET"),
            Request::Quit => Some("QUIT"),
            Request::StartTls => Some("STARTTLS"),
            _ => None,
        };
        if let Some(verb) = bare
            && params::has_argument(line, verb.len())
        {
            return Ok(self.reply(Reply::Syntax(verb)));
        }
        let junk = match req {
            Request::Noop { .. }
            | Request::Rset
            | Request::Vrfy { .. }
            | Request::Expn { .. }
            | Request::Help { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. }
            | Request::Lhlo { .. } => true,
            Request::Ehlo { .. } | Request::Helo { .. } => self.helo.is_some(),
            _ => false,
        };
        if junk && let Some(step) = self.junk_command() {
            return Ok(step);
        }
        Ok(match req {
            Request::Ehlo { host } => self.ehlo(&host, true),
            Request::Helo { host } => self.ehlo(&host, false),
            Request::Mail { from } => self.mail(from, line),
            Request::Rcpt { .. } => {
                let params = crate::path::params(line).unwrap_or_default();
                match params::unadvertised_rcpt(params) {
                    Some(p) => self.reply(Reply::UnsupportedParameter(p)),
                    None => self.rcpt(line),
                }
            }
            Request::Data => self.data().await?,
            // smtp-proto's `chunk_size` wraps an overlong number around.
            Request::Bdat { is_last, .. } => match params::bdat_size(line) {
                Ok(size) => self.bdat(size, is_last).await,
                Err(params::TooBig) => self.bdat_too_big(),
            },
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, &initial_response).await,
            Request::StartTls => self.starttls(),
            Request::Rset => {
                self.reset_transaction();
                self.reply(Reply::Ok)
            }
            Request::Noop { .. } => self.reply(Reply::Ok),
            Request::Vrfy { .. } => self.reply(Reply::Vrfy),
            Request::Help { .. } => self.reply(Reply::Help),
            Request::Quit => {
                let _ = self.reply(Reply::Bye);
                Step::Close
            }
            Request::Expn { .. } => self.reply(Reply::NotImplemented("EXPN")),
            Request::Etrn { .. } => self.reply(Reply::NotImplemented("ETRN")),
            Request::Atrn { .. } => self.reply(Reply::NotImplemented("ATRN")),
            Request::Burl { .. } => self.reply(Reply::NotImplemented("BURL")),
            Request::Lhlo { .. } => self.reply(Reply::Unknown),
        })
    }

    /// Whether a MAIL line declares a SIZE (a number, however long) over
    /// the limit.
    fn size_too_big(&self, line: &[u8]) -> bool {
        let params = crate::path::params(line).unwrap_or_default();
        match params::declared_size(params) {
            Ok(size) => size.is_some_and(|n| n > self.settings.config.max_message_size.0),
            Err(params::TooBig) => true,
        }
    }

    fn parse_error(&mut self, e: &ParseError) -> Step {
        let r = match e {
            ParseError::UnknownCommand => Reply::Unknown,
            ParseError::InvalidSenderAddress => Reply::BadSender,
            ParseError::InvalidRecipientAddress => Reply::BadRecipient,
            ParseError::SyntaxError { syntax } => Reply::Syntax(syntax),
            ParseError::InvalidParameter { param } => Reply::InvalidParameter(param),
            ParseError::UnsupportedParameter { param } => {
                return self.reply(Reply::UnsupportedParameter(param));
            }
            ParseError::NeedsMoreData { .. }
            | ParseError::ResponseTooLong
            | ParseError::InvalidResponse { .. } => Reply::EmptyLine,
        };
        self.reply(r)
    }

    // ---- replies ----------------------------------------------------------

    /// Whether the session is held to the limits for strangers: outside
    /// `allow_networks` and not authenticated.
    fn untrusted(&self) -> bool {
        !self.trusted && self.auth_user.is_none()
    }

    /// Count a command that did nothing (NOOP, RSET, a repeated EHLO...,
    /// an AUTH refused with `454`) from an untrusted session. Past
    /// `untrusted_junk_command_limit`, the step that closes the session
    /// after a `421`.
    fn junk_command(&mut self) -> Option<Step> {
        if !self.untrusted() {
            return None;
        }
        self.junk += 1;
        if self.junk <= self.settings.config.untrusted_junk_command_limit {
            return None;
        }
        let ip = self.ip;
        info!(client = %self.peer, commands = self.junk, "too many commands without authentication from unknown[{ip}]; connection closed");
        Some(self.reply(Reply::TooManyJunkCommands))
    }

    /// The deadline for the client's next command, counted from our reply:
    /// `command_timeout`, or the shorter `untrusted_command_timeout` for a
    /// client outside `allow_networks` that has not authenticated.
    fn command_timeout(&self) -> Duration {
        let cfg = &self.settings.config;
        if self.untrusted() {
            cfg.command_timeout.min(cfg.untrusted_command_timeout)
        } else {
            cfg.command_timeout
        }
    }

    /// Queue a reply. Client errors are counted; at `max_errors` the
    /// session says so and closes. A 421 closes too.
    fn reply(&mut self, r: Reply<'_>) -> Step {
        r.write(
            &mut self.out,
            &ReplyCtx {
                host: &self.settings.hostname,
            },
        );
        self.touch();
        self.summary.reply(r.code());
        if r.code() == 421 {
            // Every 421 closes the connection (RFC 5321 3.8).
            return Step::Close;
        }
        if matches!(r, Reply::AuthRateLimited | Reply::AuthBusy)
            && let Some(step) = self.junk_command()
        {
            return step;
        }
        if r.is_client_error() && !matches!(r, Reply::AuthCancelled) {
            self.errors += 1;
            if self.errors >= self.settings.config.max_errors.max(1) {
                Reply::TooManyErrors.write(
                    &mut self.out,
                    &ReplyCtx {
                        host: &self.settings.hostname,
                    },
                );
                info!(client = %self.peer, errors = self.errors, "too many errors; connection closed");
                return Step::Close;
            }
        }
        Step::Again
    }

    /// A reply was queued: the client's next command is due within the
    /// command timeout from now.
    fn touch(&mut self) {
        self.cmd_deadline = later(Instant::now(), self.command_timeout());
    }

    /// Write the queued replies.
    async fn flush(&mut self) -> Result<(), SessionEnd> {
        if self.out.is_empty() {
            return Ok(());
        }
        let mut limit = self.settings.config.command_timeout;
        if self.shutdown.is_cancelled() {
            limit = limit.min(
                self.settings
                    .config
                    .shutdown_grace
                    .max(Duration::from_secs(1)),
            );
        }
        let r = tokio::time::timeout(limit, async {
            self.conn.write_all(&self.out).await?;
            self.conn.flush().await
        })
        .await;
        self.out.clear();
        if self.out.capacity() > OUT_KEEP * 4 {
            self.out.shrink_to(OUT_KEEP);
        }
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SessionEnd::Io(e)),
            Err(_) => Err(SessionEnd::Timeout),
        }
    }

    /// Queue `r`, write everything, and end the session with `end`.
    async fn close_with(&mut self, r: Reply<'_>, end: SessionEnd) -> Result<(), SessionEnd> {
        r.write(
            &mut self.out,
            &ReplyCtx {
                host: &self.settings.hostname,
            },
        );
        let _ = self.flush().await;
        Err(end)
    }

    // ---- reading ----------------------------------------------------------

    fn in_body(&self) -> bool {
        matches!(
            self.state,
            State::Data(_) | State::Bdat { .. } | State::Discard(_)
        )
    }

    /// When the current wait ends, and why.
    fn deadline(&self) -> (Instant, Expiry) {
        let base = if self.in_body() {
            let cfg = &self.settings.config;
            let extra = match cfg.min_data_rate {
                0 => Duration::ZERO,
                rate => Duration::from_millis(self.body_bytes.saturating_mul(1000) / rate),
            };
            later(
                later(self.body_start, cfg.data_timeout),
                extra.min(MAX_DATA_EXTENSION),
            )
        } else {
            self.cmd_deadline
        };
        match self.grace_end {
            Some(g) if g <= base => (g, Expiry::Shutdown),
            _ => (base, Expiry::Timeout),
        }
    }

    /// Make room in the read buffer: compact, grow while a body streams,
    /// shrink back when idle.
    fn prepare_read(&mut self) {
        if self.pos > 0 {
            let len = self.rbuf.len();
            if self.pos < len {
                self.rbuf.copy_within(self.pos..len, 0);
            }
            self.rbuf.truncate(len.saturating_sub(self.pos));
            self.pos = 0;
        }
        let line_need = self.settings.config.max_line_length.saturating_add(1);
        let base = COMMAND_BUF.max(line_need);
        let cap = self.rbuf.capacity();
        let len = self.rbuf.len();
        if self.in_body() {
            let target = cap.saturating_mul(2).clamp(base, BODY_BUF.max(base));
            if self.read_full && cap < BODY_BUF && target > len {
                self.rbuf.reserve_exact(target - len);
            }
        } else if cap > base * 2 && len <= base {
            self.rbuf.shrink_to(base);
        }
        if self.rbuf.capacity() < base {
            self.rbuf.reserve_exact(base - len);
        }
        if self.rbuf.len() == self.rbuf.capacity() {
            self.rbuf.reserve(1024);
        }
    }

    /// Write queued replies, then wait for more input (or a deadline, or
    /// shutdown).
    async fn fill(&mut self) -> Result<(), SessionEnd> {
        self.flush().await?;
        self.prepare_read();
        loop {
            if self.shutdown.is_cancelled() {
                if !self.in_body() {
                    return self
                        .close_with(Reply::ShuttingDown, SessionEnd::Shutdown)
                        .await;
                }
                if self.grace_end.is_none() {
                    self.grace_end =
                        Some(later(Instant::now(), self.settings.config.shutdown_grace));
                }
            }
            let (deadline, expiry) = self.deadline();
            let watch_shutdown = !self.shutdown.is_cancelled();
            let spare = self.rbuf.capacity() - self.rbuf.len();
            tokio::select! {
                r = self.conn.read_buf(&mut self.rbuf) => {
                    return match r {
                        Ok(0) => Err(SessionEnd::Eof),
                        Ok(n) => {
                            self.read_full = n >= spare;
                            Ok(())
                        }
                        Err(e) => Err(SessionEnd::Io(e)),
                    };
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return match expiry {
                        Expiry::Timeout => self.close_with(Reply::Timeout, SessionEnd::Timeout).await,
                        Expiry::Shutdown => {
                            self.close_with(Reply::ShuttingDown, SessionEnd::Shutdown).await
                        }
                    };
                }
                _ = self.shutdown.cancelled(), if watch_shutdown => {}
            }
        }
    }

    // ---- transactions -------------------------------------------------------

    /// The local names of clients that may relay (allow_networks, or
    /// authenticated); others get bare names refused.
    fn local_names(&self) -> Option<Arc<dyn crate::settings::LocalNames>> {
        if self.trusted || self.auth_user.is_some() {
            self.settings.local.clone()
        } else {
            None
        }
    }

    /// A session for a local submitter (`sendmail -bs`, the maildrop): trusted
    /// whatever its address, like Postfix's local submission.
    pub(crate) fn local_client(mut self) -> Session<S> {
        self.trusted = true;
        self.refused = false;
        self
    }

    /// End any mail transaction (RSET, EHLO, a new TLS session).
    fn reset_transaction(&mut self) {
        self.txn = None;
        self.bdat_failed = None;
    }

    /// The `with` protocol of the `Received:` header (RFC 3848).
    fn protocol(&self) -> &'static str {
        let esmtp = self.helo.as_ref().is_some_and(|h| h.esmtp);
        match (esmtp, self.conn.is_tls(), self.auth_user.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        }
    }

    /// Open the spool message of the current transaction.
    async fn begin_message(&mut self) -> Result<(), spool::SpoolError> {
        let protocol = self.protocol();
        let helo = self
            .helo
            .as_ref()
            .map(|h| h.name.as_str())
            .unwrap_or("unknown");
        let host = self.settings.hostname.clone();
        let limit = self.settings.config.max_message_size.0;
        let ip = self.ip;
        let Some(txn) = self.txn.as_mut() else {
            return Ok(());
        };
        let rcpt = match txn.rcpts.as_slice() {
            [one] => Some(one.as_str()),
            _ => None,
        };
        let message = Message::begin(&self.shared.spool, limit, host.clone(), |id, time| {
            crate::received::Trace {
                helo,
                ip,
                host: &host,
                protocol,
                id,
                rcpt,
                time,
            }
            .header()
        })
        .await?;
        txn.message = Some(message);
        Ok(())
    }

    /// The body could not be taken: drop the message (nothing of it stays
    /// in the spool) and end the transaction.
    fn abort_message(&mut self, e: &BodyError) {
        let id = self
            .txn
            .as_ref()
            .and_then(|t| t.message.as_ref())
            .map(|m| m.id());
        self.txn = None;
        match e {
            BodyError::TooBig => {
                self.shared.metrics.rejected(Rejection::Size);
                info!(client = %self.peer, limit = self.settings.config.max_message_size.0, "message refused: over the size limit; reading and discarding the rest");
            }
            BodyError::Spool(err) => {
                self.shared.metrics.rejected(Rejection::Storage);
                warn!(client = %self.peer, id = ?id, error = %err, "message refused: the spool cannot store it");
            }
        }
    }

    /// The body is complete: store it durably and say so.
    async fn finish_message(&mut self) -> Reply<'static> {
        if self.scratch.capacity() > BODY_BUF {
            self.scratch = Vec::new();
        }
        let Some(mut txn) = self.txn.take() else {
            return Reply::Sequence("need MAIL command");
        };
        let Some(message) = txn.message.take() else {
            return Reply::Sequence("need DATA or BDAT");
        };
        let sender = txn.sender;
        let nrcpt = txn.rcpts.len();
        let mut env = Envelope::new(sender.clone(), txn.rcpts);
        env.client = Some(self.peer.to_string());
        env.helo = self
            .helo
            .as_ref()
            .map(|h| h.name.clone())
            .unwrap_or_default();
        env.auth_user = self.auth_user.clone();
        env.received = SystemTime::now();
        env.smtputf8 = txn.smtputf8;
        env.eight_bit = txn.eight_bit;
        let id = message.id();
        match message.finish(env).await {
            Ok((id, size)) => {
                self.shared.metrics.message_received(size);
                info!(
                    queue_id = %id,
                    client = %self.peer,
                    "{id}: client={}, helo=<{}>, sasl_username={}, from=<{}>, size={size}, nrcpt={nrcpt} (queued)",
                    self.peer,
                    Clean(self.helo.as_ref().map(|h| h.name.as_str()).unwrap_or("")),
                    Clean(self.auth_user.as_deref().unwrap_or("")),
                    Clean(&sender),
                );
                Reply::Queued(id)
            }
            Err(e) => {
                self.shared.metrics.rejected(Rejection::Storage);
                warn!(client = %self.peer, id = %id, error = %e, "message refused: the spool cannot store it");
                Reply::Storage(e)
            }
        }
    }

    /// The state's body part is over: read the rest of it, then answer.
    fn discard_step(&mut self) -> Step {
        let avail = self.unread().len();
        match &mut self.state {
            State::Discard(Discard::Data { dot, .. }) => {
                let input = self.rbuf.get(self.pos..).unwrap_or_default();
                let (used, done) = dot.decode(input, &mut crate::dot::Discard);
                self.pos += used;
                self.body_bytes += used as u64;
                if !done {
                    return Step::NeedMore;
                }
            }
            State::Discard(Discard::Bdat { remaining, .. }) => {
                let take = (*remaining).min(avail as u64);
                *remaining -= take;
                self.pos += take as usize;
                self.body_bytes += take;
                if *remaining > 0 {
                    return Step::NeedMore;
                }
            }
            _ => return Step::Again,
        }
        let then = match std::mem::replace(&mut self.state, State::Command) {
            State::Discard(Discard::Data { then, .. } | Discard::Bdat { then, .. }) => then,
            _ => Reply::Ok,
        };
        self.reply(then)
    }
}

/// What a sysadmin should know about a failed handshake: an old client
/// (TLS 1.0/1.1, which rustls does not speak) is the usual cause.
fn tls_hint(e: &io::Error) -> &'static str {
    let text = e.to_string().to_ascii_lowercase();
    if text.contains("version") || text.contains("incompatible") || text.contains("tls12") {
        " (the client may only speak TLS 1.0 or 1.1; oauthrelay requires TLS 1.2 or later: \
         update the client's firmware, or let it send without STARTTLS from [server] allow_networks)"
    } else {
        ""
    }
}

/// Decode a SASL response line (base64; padding optional).
pub(crate) fn decode_base64(line: &[u8]) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(line)
}

/// Strip the line ending (and stray trailing white space).
pub(crate) fn trim_line(line: &[u8]) -> &[u8] {
    let end = line
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n' | b' ' | b'\t'))
        .map_or(0, |p| p + 1);
    let start = line
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(end)
        .min(end);
    line.get(start..end).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;

    /// Idle sessions must stay small: 1,000 of them in well under 64 MB.
    #[tokio::test]
    async fn an_idle_session_is_small() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let settings = Arc::new(
            Settings::new(
                ServerConfig::default(),
                "h",
                crate::settings::accept_all_senders(),
            )
            .unwrap(),
        );
        let shared = Arc::new(Shared {
            spool,
            metrics: Metrics::default(),
            limiter: AuthLimiter::default(),
            verifier: Verifier::default(),
            refusals: Default::default(),
        });
        let (_ours, theirs) = tokio::io::duplex(64);
        let session = Session::new(
            theirs,
            "127.0.0.1:1".parse().unwrap(),
            ListenerKind::Smtp,
            settings,
            shared,
            CancellationToken::new(),
        );
        let fut = session.run();
        let size = std::mem::size_of_val(&fut);
        eprintln!("session future: {size} bytes");
        // The task's future plus the read buffer (4 KiB) and a small reply
        // buffer: far below 64 KiB per session.
        assert!(size < 16 << 10, "session future is {size} bytes");
        drop(fut);
    }
}
