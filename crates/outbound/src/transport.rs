//! Delivering one message over one authenticated channel: the interface
//! every transport implements (SMTP with XOAUTH2 now; the Gmail API and
//! Microsoft 365 next). A transport maps what its upstream says to typed
//! [`RcptOutcome`]s and [`AccountSignal`]s; what they mean for the message
//! (defer, fail, bounce, expire) and for the account (pause, hold) is
//! decided once, elsewhere (`decide.rs`, the scheduler).
//!
//! A worker owns one transport value for its whole life and hands it one
//! message at a time, so a transport may keep a warm channel (a pooled SMTP
//! connection, an HTTP/2 client) between messages.

use std::future::Future;
use std::time::Duration;

use spool::{Envelope, MessageId, Spool};

use crate::classify::{AccountSignal, RcptOutcome};

/// One message to deliver now.
pub struct Outgoing<'a> {
    pub id: MessageId,
    pub envelope: &'a Envelope,
    /// The envelope sender to use (the account's address with
    /// `rewrite_from`).
    pub sender: &'a str,
    /// Indices (into `envelope.recipients`) of the recipients to try.
    pub recipients: &'a [usize],
    /// Rewrite `From:` to this address (`rewrite_from`), else send as is.
    pub rewrite_from: Option<&'a str>,
    /// Where the body is (streamed, never read whole).
    pub spool: &'a Spool,
    /// Deadline for the upstream's verdict on the message.
    pub data_timeout: Duration,
}

/// What one delivery attempt over a transport found out: typed facts, no
/// decisions.
#[derive(Debug, Default)]
pub struct Attempt {
    /// One outcome per recipient tried (index into the envelope's
    /// recipients).
    pub outcomes: Vec<(usize, RcptOutcome)>,
    /// Something that concerns the whole account.
    pub signal: Option<AccountSignal>,
    /// Where it went, for the log (`host[ip]:port`, an API host).
    pub relay: Option<String>,
    /// The provider's id of the delivered message (Gmail API), for the log.
    pub remote_id: Option<String>,
    /// An authenticated channel was opened during this attempt.
    pub connected: bool,
    /// The upstream answered at least one transaction.
    pub transacted: bool,
    /// Recipients deferred by a local problem (reading the spool copy), not
    /// by anything upstream: they never expire on it.
    pub local: Vec<usize>,
    /// The message left the spool meanwhile (deleted).
    pub gone: bool,
    /// What the transport changed to deliver it (the Gmail API's recipient
    /// headers), for the log and `queue show`.
    pub note: Option<String>,
}

/// What a hold probe found: whether the account can authenticate again,
/// and, for the log, each step it took and what the upstream answered.
#[derive(Debug)]
pub struct ProbeReport {
    /// `None`: an authenticated channel opened (the hold may lift); else
    /// what stopped it, as a delivery would report it.
    pub failed: Option<AccountSignal>,
    /// The steps, in order (`access token for NAME: refreshed (...)`,
    /// `connected to HOST[IP]:PORT`, `AUTH XOAUTH2 as ADDR: 235 accepted`,
    /// `AUTH XOAUTH2: token refused: 535 5.7.8 ...`). Never a secret.
    pub steps: Vec<String>,
}

/// A way to deliver mail for one account.
pub trait Transport: Send + 'static {
    /// Deliver `msg` to its recipients, opening (or reusing) an
    /// authenticated channel. Never panics, never hangs: every step has a
    /// deadline, and every failure is an outcome or a signal.
    fn deliver(&mut self, msg: &Outgoing<'_>) -> impl Future<Output = Attempt> + Send;

    /// A held account's probe: get a fresh token and authenticate to the
    /// upstream without sending anything (any warm channel is replaced).
    /// A working channel may stay open for the mail the probe releases.
    /// Same guarantees as [`deliver`](Transport::deliver).
    fn probe(&mut self) -> impl Future<Output = ProbeReport> + Send;

    /// Resolves when a warm channel becomes unusable while idle (the server
    /// closed it); never, when there is none. Cancel-safe.
    fn idle_closed(&mut self) -> impl Future<Output = ()> + Send;

    /// Whether a warm channel is open.
    fn is_open(&self) -> bool;

    /// Close the warm channel politely (idle timeout, shutdown), if any.
    fn close(&mut self) -> impl Future<Output = ()> + Send;

    /// Forget the warm channel without a goodbye (after an interrupted
    /// attempt its state is unknown).
    fn drop_channel(&mut self);
}
