//! oauthrelay's delivery side: every queued message goes upstream through
//! its account's transport (SMTP with XOAUTH2 to Gmail or Exchange Online,
//! or the Gmail API), and is retried until it is delivered or fails for
//! good.
//!
//! ```text
//! spool.subscribe() ──ids──▶ scheduler ──jobs──▶ workers (concurrency per account)
//!                            ready queues         │ one transport each (warm channel)
//!                            timers               │ typed replies -> RcptOutcome + AccountSignal
//!                            pauses / holds ◀─────┘ facts          decide() -> record / bounce / remove
//! ```
//!
//! - [`Outbound::start`] schedules every queued message and every new commit
//!   at once (no polling).
//! - A [`Transport`] delivers one message over one authenticated channel
//!   and reports typed facts: per recipient [`RcptOutcome`]s and an
//!   account-wide [`AccountSignal`]. Replies are [`Reply`]s from the wire
//!   to the queue (`docs/gmail-replies.md` and `docs/microsoft-replies.md`
//!   say what each means).
//! - What an attempt means for the message is a pure function
//!   (`decide.rs`); what it means for the account, the scheduler decides
//!   alone (pauses on the retry schedule, login throttling, the daily
//!   limit; holds with a [`HoldReason`]). The token manager is the one
//!   source of "needs authorization".
//! - A message's delivery state ([`DeliveryState`]) is this crate's; the
//!   spool stores it as an opaque record.
//! - Permanent failures are bounced at the end of the attempt that failed
//!   them, with an RFC 3464 report through the same account, from the null
//!   sender; never to the null sender: the failures of a bounce, or of mail
//!   from the null sender, go to the postmaster (`[delivery] postmaster`),
//!   and a failing postmaster copy is dropped loudly (ERROR line,
//!   `oauthrelay_messages_dropped_total`).
//! - Senders in the local domain, or unqualified, go upstream as the
//!   account's address (`sender.rs`); routing and the queue keep them.
//!
//! Why not `mail-send`: its 0.7 client reads replies into a local 1 KiB
//! buffer and drops whatever follows the first reply (unsafe with
//! PIPELINING), reports no per-recipient outcome, and answers Gmail's XOAUTH2
//! `334` challenge wrongly. The client here is small: tokio + tokio-rustls
//! (ring), `smtp-proto`'s reply parser over a persistent buffer.

pub mod config;

mod account;
mod body;
mod classify;
mod clock;
mod decide;
mod dsn;
mod exchange;
mod gmail_api;
mod history;
mod hold;
mod metrics;
mod pace;
mod reply;
mod scheduler;
mod send_test;
mod sender;
mod smtp;
mod state;
mod transport;
mod transports;
mod worker;

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use oauth::TokenManager;
use oauth::config::AccountConfig;
use spool::{MessageId, Spool};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use account::PauseKind;
pub use classify::{AccountSignal, RcptOutcome};
pub use config::DeliveryConfig;
pub use decide::LogStatus;
pub use history::{AttemptRecord, HISTORY_LEN};
pub use hold::HoldReason;
pub use metrics::{AttemptResult, DropReason, Metrics};
pub use reply::{Answer, AuthDisabled, Reply, Status, escape_controls};
pub use scheduler::route;
pub use send_test::{SendTestError, SendTestReport, send_test};
pub use smtp::conn::{Capabilities, ConnError};
pub use smtp::session::OpenError;
pub use state::{DeliveryState, FORMAT, Hold, QueueState, RcptState, RcptStatus};
pub use transport::{Attempt, Outgoing, ProbeReport, Transport};
pub use worker::due_now;

use scheduler::{Command, PublicAccounts, Scheduler};

/// An account's delivery state, for `/readyz`, metrics and `queue list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountState {
    pub name: String,
    pub email: String,
    /// Delivery is paused until then.
    pub paused_until: Option<SystemTime>,
    pub pause_kind: Option<PauseKind>,
    /// The reply or error that caused the pause.
    pub pause_reason: Option<String>,
    /// The account's mail is held, and why (with what fixes it).
    pub held: Option<HoldReason>,
    /// Messages routed to this account and not yet done.
    pub queued: usize,
    /// Messages being attempted right now.
    pub in_flight: usize,
}

impl AccountState {
    /// Can this account send now (not held)? A pause is routine and does
    /// not make the account unready.
    pub fn is_ready(&self) -> bool {
        self.held.is_none()
    }
}

/// The running delivery side. Clones are handles to the same scheduler.
#[derive(Clone)]
pub struct Outbound {
    commands: mpsc::UnboundedSender<Command>,
    public: PublicAccounts,
    history: history::History,
    metrics: Metrics,
    tracker: TaskTracker,
}

impl Outbound {
    /// Start delivering: every message already in `spool` is scheduled, and
    /// every message committed later is picked up at once. Must be called
    /// inside a Tokio runtime. `hostname` is used in EHLO and in bounces.
    /// `shutdown` stops new attempts; running transactions get
    /// `config.shutdown_grace` to finish, the rest stays queued.
    ///
    /// Relative `ca_file` paths in `accounts` are taken relative to the
    /// current directory: pass them resolved.
    pub fn start(
        spool: Spool,
        tokens: TokenManager,
        accounts: Vec<AccountConfig>,
        config: DeliveryConfig,
        hostname: String,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Outbound {
        let history = history::History::default();
        let shared = Arc::new(worker::Shared {
            spool,
            tokens,
            hostname: hostname.into(),
            metrics: metrics.clone(),
            clock: clock::Clock::new(),
            history: history.clone(),
        });
        let (commands, rx) = mpsc::unbounded_channel();
        let public = Arc::new(Mutex::new(Vec::new()));
        let tracker = TaskTracker::new();
        let scheduler = Scheduler::new(
            shared,
            accounts,
            config,
            rx,
            public.clone(),
            shutdown,
            tracker.clone(),
        );
        tracker.spawn(scheduler.run());
        Outbound {
            commands,
            public,
            history,
            metrics,
            tracker,
        }
    }

    /// New accounts and `[delivery]` settings (SIGHUP). Messages are routed
    /// again; connections whose account settings changed are replaced;
    /// holds are lifted for one more try.
    ///
    /// Call it before the token manager's reload, then
    /// [`tokens_reloaded`](Self::tokens_reloaded) after it: a hold the
    /// token manager lifts (a token whose scope fits the account's new
    /// `transport`) then releases the mail into the new settings, and an
    /// account the token manager learns of is not left held as unknown.
    pub fn reload(&self, accounts: Vec<AccountConfig>, config: DeliveryConfig) {
        let _ = self.commands.send(Command::Reload {
            accounts,
            config: Box::new(config),
        });
    }

    /// The token manager has reloaded: every held account it now holds a
    /// usable token for is released.
    pub fn tokens_reloaded(&self) {
        let _ = self.commands.send(Command::TokensReloaded);
    }

    /// `queue retry ID`: make the message due now (and give its account,
    /// if paused or held, one attempt). `false` if it is not queued here.
    pub async fn retry(&self, id: MessageId) -> bool {
        let (reply, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Retry {
                id: Some(id),
                reply,
            })
            .is_err()
        {
            return false;
        }
        rx.await.map(|n| n > 0).unwrap_or(false)
    }

    /// `queue retry --all`: every deferred or held message due now, every
    /// account's pause and hold lifted for one attempt. Returns how many
    /// messages were made due.
    pub async fn retry_all(&self) -> usize {
        let (reply, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Retry { id: None, reply })
            .is_err()
        {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Liveness (the daemon's systemd watchdog): `true` once the
    /// scheduler's loop has answered, `false` if it has stopped. A loop
    /// that is stuck never answers.
    pub async fn ping(&self) -> bool {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Ping { reply }).is_ok() && rx.await.is_ok()
    }

    /// Each configured account's state.
    pub fn account_states(&self) -> Vec<AccountState> {
        self.public
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The last [`HISTORY_LEN`] delivery attempts (one entry per outcome,
    /// as logged), newest first.
    pub fn recent_attempts(&self) -> Vec<AttemptRecord> {
        self.history.recent()
    }

    /// Failure reports dropped since start because even the postmaster's
    /// copy failed (`oauthrelay_messages_dropped_total`, all reasons).
    pub fn dropped(&self) -> u64 {
        self.metrics.dropped_count()
    }

    /// Wait until the scheduler and every worker have stopped (after
    /// `shutdown` was cancelled). Pooled connections are closed with QUIT.
    pub async fn join(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}
