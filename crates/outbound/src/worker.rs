//! A delivery worker: takes one message at a time for its account, hands
//! it to its transport (which keeps a warm channel between messages),
//! applies the pure decision (`decide.rs`) to the spool (record, bounce,
//! remove), logs one Postfix-style line per outcome, and reports typed
//! facts to the scheduler, which alone changes account state.

use std::sync::Arc;
use std::time::SystemTime;

use oauth::TokenManager;
use spool::{DeliveryRecord, Envelope, MessageId, Reserve, Spool, SpoolError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::DeliveryConfig;
use crate::account::Runtime;
use crate::body;
use crate::classify::AccountSignal;
use crate::clock::Clock;
use crate::decide::{self, AccountEffect, Decision, Line, Notice};
use crate::dsn::{self, DsnInput, Original, To};
use crate::history::{AttemptRecord, History};
use crate::hold::HoldReason;
use crate::metrics::{DropReason, Metrics};
use crate::sender;
use crate::smtp::session::AccountCtx;
use crate::state::{DeliveryState, RcptState};
use crate::transport::{Attempt, Outgoing, Transport};
use crate::transports::AnyTransport;

/// How much of the original header section a bounce quotes.
const BOUNCE_HEADER_LIMIT: usize = 64 * 1024;

/// A failed message up to this size is attached whole to the postmaster's
/// copy (`message/rfc822`); a larger one by its header section.
const POSTMASTER_ATTACH_LIMIT: u64 = 1 << 20;

/// What a worker needs from the rest of the daemon.
pub(crate) struct Shared {
    pub spool: Spool,
    pub tokens: TokenManager,
    pub hostname: Arc<str>,
    pub metrics: Metrics,
    pub clock: Clock,
    /// The last attempts, for the status page.
    pub history: History,
}

/// One message to attempt now.
pub(crate) struct Job {
    pub id: MessageId,
    pub ctx: Arc<AccountCtx>,
    pub cfg: Arc<DeliveryConfig>,
    /// The account's state when the job was handed out: the pause a signal
    /// of this attempt causes is worked out from it, exactly as the
    /// scheduler will apply it (same moment, same jitter).
    pub account: Runtime,
    /// A decided state an earlier attempt could not record (the spool write
    /// failed, e.g. on a full disk): the next attempt starts from it, so a
    /// recipient the upstream accepted is not sent the message again while
    /// only the write is retried. Memory only: after a crash the message is
    /// sent again (at-least-once).
    pub unrecorded: Option<DeliveryState>,
}

/// What became of the message (for the scheduler).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Not in the spool any more (deleted by someone else).
    Gone,
    /// Every recipient delivered or failed (bounces queued); removed.
    Done,
    /// Some recipients remain: try again at `next`.
    Deferred { next: SystemTime },
    /// The account's mail is held; the spool copy says why.
    Held { reason: HoldReason },
    /// Not attempted, or cut short by shutdown: still queued as it was.
    Interrupted,
}

/// Typed facts about the account from one attempt.
#[derive(Debug, Clone)]
pub(crate) struct Facts {
    /// When the attempt ended (both clocks), and the jitter it used.
    pub at: Instant,
    pub wall: SystemTime,
    pub jitter: f64,
    pub signal: Option<AccountSignal>,
    /// Why the signal holds the account (the token manager's words).
    pub hold: Option<HoldReason>,
    /// An authenticated channel was opened.
    pub connected: bool,
    /// The upstream answered a transaction.
    pub transacted: bool,
    /// The upstream accepted the message for some recipient.
    pub delivered: bool,
}

/// What a worker tells the scheduler, in order.
pub(crate) enum Report {
    /// What an attempt found out about the account, as soon as it is known
    /// (before the spool writes), so the account pauses or holds at once.
    Facts { account: String, facts: Facts },
    /// The job is over.
    Done(Done),
}

pub(crate) struct Done {
    pub worker: u64,
    pub account: String,
    pub id: MessageId,
    pub outcome: Outcome,
    /// What the scheduler keeps for the next attempt (boxed: rare, and
    /// reports stay small).
    pub unrecorded: Option<Box<DeliveryState>>,
}

enum Wake {
    Job(Box<Job>),
    Closed,
    Idle,
    Stop,
}

pub(crate) struct Worker {
    pub id: u64,
    pub account: String,
    pub shared: Arc<Shared>,
    pub rx: mpsc::Receiver<Job>,
    pub reports: mpsc::UnboundedSender<Report>,
    pub shutdown: CancellationToken,
}

async fn grace_expired(shutdown: &CancellationToken, grace: std::time::Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(grace).await;
}

impl Shared {
    /// A transport for an account (a worker's, or a hold probe's).
    pub(crate) fn transport(&self, ctx: &Arc<AccountCtx>, cfg: &DeliveryConfig) -> AnyTransport {
        AnyTransport::new(
            ctx.clone(),
            self.tokens.clone(),
            self.hostname.clone(),
            cfg.connect_timeout,
            cfg.command_timeout,
            self.clock,
        )
    }
}

impl Worker {
    fn transport(&self, job: &Job) -> AnyTransport {
        self.shared.transport(&job.ctx, &job.cfg)
    }

    pub(crate) async fn run(mut self, mut cfg: Arc<DeliveryConfig>) {
        let mut transport: Option<AnyTransport> = None;
        let mut idle_since = Instant::now();
        loop {
            let idle_at = idle_since + cfg.idle_timeout;
            let open = transport.as_ref().is_some_and(Transport::is_open);
            let wake = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Wake::Stop,
                j = self.rx.recv() => j.map(|j| Wake::Job(Box::new(j))).unwrap_or(Wake::Stop),
                _ = idle_closed(&mut transport) => Wake::Closed,
                _ = tokio::time::sleep_until(idle_at), if open => Wake::Idle,
            };
            match wake {
                Wake::Stop => break,
                Wake::Closed => {
                    tracing::debug!(account = %self.account, "pooled connection closed by the server");
                    if let Some(t) = transport.as_mut() {
                        t.drop_channel();
                    }
                }
                Wake::Idle => {
                    if let Some(t) = transport.as_mut() {
                        t.close().await;
                    }
                }
                Wake::Job(job) => {
                    cfg = job.cfg.clone();
                    // Settings changed (reload): a new transport, the old
                    // connection closed politely.
                    if let Some(mut t) = transport.take_if(|t| !t.serves(&job.ctx)) {
                        t.close().await;
                    }
                    let t = transport.get_or_insert_with(|| self.transport(&job));
                    let id = job.id;
                    let mut unrecorded = job.unrecorded.clone();
                    let outcome = if self.shutdown.is_cancelled() {
                        Outcome::Interrupted
                    } else {
                        let grace = cfg.shutdown_grace;
                        let attempt = self.attempt(&job, t, &mut unrecorded);
                        tokio::pin!(attempt);
                        tokio::select! {
                            r = &mut attempt => r,
                            _ = grace_expired(&self.shutdown, grace) => {
                                tracing::warn!(queue_id = %id, account = %self.account, "shutdown grace over: delivery attempt abandoned, the message stays queued");
                                Outcome::Interrupted
                            }
                        }
                    };
                    if outcome == Outcome::Interrupted {
                        t.drop_channel();
                    }
                    idle_since = Instant::now();
                    let _ = self.reports.send(Report::Done(Done {
                        worker: self.id,
                        account: self.account.clone(),
                        id,
                        outcome,
                        unrecorded: unrecorded.map(Box::new),
                    }));
                }
            }
        }
        if let Some(mut t) = transport {
            t.close().await;
        }
    }

    /// One delivery attempt of one message. `unrecorded` comes in as the
    /// job's and goes out as what the scheduler should remember.
    async fn attempt(
        &self,
        job: &Job,
        transport: &mut impl Transport,
        unrecorded: &mut Option<DeliveryState>,
    ) -> Outcome {
        let sh = &self.shared;
        let id = job.id;
        let Some(queued) = sh.spool.message(id) else {
            tracing::info!(queue_id = %id, "message no longer queued (deleted); skipped");
            return Outcome::Gone;
        };
        let env = queued.envelope.clone();
        let mut state = match unrecorded.take() {
            Some(s) => {
                tracing::info!(
                    queue_id = %id,
                    "{id}: recipients already answered upstream (their record failed) are not sent again; recording them now"
                );
                s
            }
            None => DeliveryState::of(id, &queued),
        };

        // Failures whose bounce is not known to be queued (a crash or a
        // failed write after the upstream answered): find it, or queue it.
        let unreported = state.unreported();
        if !unreported.is_empty() {
            let rest: Vec<usize> = match self.bounces_queued(id) {
                None => unreported.clone(),
                // A bounce of an earlier release reported every failure.
                Some(c) if c.is_empty() => Vec::new(),
                Some(c) => unreported
                    .iter()
                    .copied()
                    .filter(|i| !c.contains(i))
                    .collect(),
            };
            for i in unreported.iter().filter(|i| !rest.contains(i)) {
                state.recipients[*i].reported = true;
            }
            if !rest.is_empty()
                && let Err(outcome) = self.bounce(id, &env, &mut state, &rest, job).await
            {
                *unrecorded = Some(state);
                return outcome;
            }
            if !state.is_done()
                && let Err(outcome) = self.record(id, &state, job, unrecorded).await
            {
                return outcome;
            }
        }
        if state.is_done() {
            // Finished before a crash or a failed spool write.
            return self.remove(id, &state, job, unrecorded).await;
        }

        let pending: Vec<usize> = state.pending().collect();
        let acct = &job.ctx.config;
        let rewrite = acct.rewrite_from && state.bounce_of.is_none();
        let (sender, why) = sender::upstream(&env.sender, acct, job.cfg.local_domain.as_deref());
        if let Some(why) = why {
            tracing::info!(
                queue_id = %id, account = %self.account,
                "{id}: from=<{}> goes upstream as <{}> ({})",
                crate::reply::escape_controls(&env.sender),
                crate::reply::escape_controls(sender),
                why.as_str()
            );
        }
        let out = Outgoing {
            id,
            envelope: &env,
            sender,
            recipients: &pending,
            rewrite_from: rewrite.then_some(acct.email.as_str()),
            spool: &sh.spool,
            data_timeout: job.cfg.data_timeout,
        };
        if let Some(p) = &job.ctx.pace {
            let waited = p.acquire().await;
            if !waited.is_zero() {
                tracing::debug!(queue_id = %id, account = %acct.name, waited = ?waited, "paced (max_rate {}/s, burst {})", p.rate(), p.burst());
            }
        }
        let attempt = transport.deliver(&out).await;
        if attempt.gone {
            return Outcome::Gone;
        }
        // Timings (delivery duration, next attempt, age) count from the end
        // of the attempt: a slow upload must not retry at once.
        let now = sh.clock.now();
        let at = Instant::now();
        let jitter = fastrand::f64();
        let hold = attempt
            .signal
            .as_ref()
            .filter(|s| s.holds())
            .map(|s| self.hold_reason(s));
        let mut rt = job.account.clone();
        if let Some(sig) = &attempt.signal {
            rt.apply(sig, hold.clone(), &job.cfg, at, now, jitter);
        }
        let effect = AccountEffect {
            hold: hold.clone(),
            paused_until: rt
                .pause
                .as_ref()
                .filter(|p| p.until > at)
                .map(|p| p.until_wall),
        };
        let d = decide::decide(&env, &state, &attempt, &effect, &job.cfg, now, jitter);
        let facts = Facts {
            at,
            wall: now,
            jitter,
            signal: attempt.signal.clone(),
            hold,
            connected: attempt.connected,
            transacted: attempt.transacted,
            delivered: d.delivered > 0,
        };
        self.log_all(id, &env, &d, &attempt, now);
        sh.metrics.attempt(&self.account, d.result);
        if d.delivered > 0 {
            let secs = now
                .duration_since(env.received)
                .unwrap_or_default()
                .as_secs_f64();
            sh.metrics.observe_delivery(secs);
        }
        let _ = self.reports.send(Report::Facts {
            account: self.account.clone(),
            facts,
        });
        self.apply(id, &env, d, job, unrecorded).await
    }

    fn hold_reason(&self, signal: &AccountSignal) -> HoldReason {
        HoldReason::after(&self.shared.tokens, &self.account, signal)
    }

    /// Record the decision: bounce what this attempt failed (one DSN),
    /// then remove the message if it is done, else update its record.
    async fn apply(
        &self,
        id: MessageId,
        env: &Envelope,
        d: Decision,
        job: &Job,
        unrecorded: &mut Option<DeliveryState>,
    ) -> Outcome {
        let mut state = d.state;
        if d.notice == Notice::Drop && !d.bounce.is_empty() {
            self.dropped(id, env, &state, &d.bounce);
        } else if !d.bounce.is_empty() {
            // Failures first, so that a crash after the bounce is queued
            // finds it (the bounce scan) instead of bouncing again.
            if let Err(o) = self.record(id, &state, job, unrecorded).await {
                return o;
            }
            if let Err(o) = self.bounce(id, env, &mut state, &d.bounce, job).await {
                *unrecorded = Some(state);
                return o;
            }
        }
        if d.done {
            return self.remove(id, &state, job, unrecorded).await;
        }
        if let Err(o) = self.record(id, &state, job, unrecorded).await {
            return o;
        }
        match (state.next_attempt, state.hold) {
            (Some(next), _) => Outcome::Deferred { next },
            (None, Some(h)) => Outcome::Held { reason: h.reason },
            (None, None) => Outcome::Deferred {
                next: self.shared.clock.now(),
            },
        }
    }

    /// Write `state`; on failure keep it for the next attempt.
    async fn record(
        &self,
        id: MessageId,
        state: &DeliveryState,
        job: &Job,
        unrecorded: &mut Option<DeliveryState>,
    ) -> Result<(), Outcome> {
        match self.shared.spool.update(id, state.to_record()).await {
            Ok(()) => {
                *unrecorded = None;
                Ok(())
            }
            Err(SpoolError::NotFound(_)) => Err(Outcome::Gone),
            Err(e) => {
                // The old record stays on disk: the recipients still
                // pending are tried again later, and the ones the upstream
                // answered are remembered so they are not (unless we crash
                // first: at-least-once).
                tracing::error!(queue_id = %id, "cannot record the delivery attempt: {e}");
                *unrecorded = Some(state.clone());
                Err(self.retry_writes(job))
            }
        }
    }

    fn retry_writes(&self, job: &Job) -> Outcome {
        Outcome::Deferred {
            next: self.shared.clock.now() + job.cfg.retry_initial,
        }
    }

    /// Every recipient has its outcome and every bounce is queued: remove.
    async fn remove(
        &self,
        id: MessageId,
        state: &DeliveryState,
        job: &Job,
        unrecorded: &mut Option<DeliveryState>,
    ) -> Outcome {
        match self.shared.spool.remove(id).await {
            Ok(()) | Err(SpoolError::NotFound(_)) => {}
            Err(e) => {
                tracing::error!(queue_id = %id, "cannot remove the finished message: {e}");
                *unrecorded = Some(state.clone());
                return self.retry_writes(job);
            }
        }
        tracing::info!(queue_id = %id, "{id}: removed");
        let m = &self.shared.metrics;
        if state
            .recipients
            .iter()
            .any(|r| r.state == RcptState::Failed)
        {
            m.failed(&self.account);
        }
        if state
            .recipients
            .iter()
            .any(|r| r.state == RcptState::Delivered)
        {
            m.delivered(&self.account);
        }
        *unrecorded = None;
        Outcome::Done
    }

    /// The recipients of `id` that queued bounces report: `None` when there
    /// is none; an empty set for a bounce of an earlier release (it
    /// reported every failed recipient).
    fn bounces_queued(&self, id: MessageId) -> Option<Vec<usize>> {
        let mut found: Option<Vec<usize>> = None;
        for (bid, q) in self.shared.spool.list() {
            if q.delivery.is_none() {
                continue;
            }
            let s = DeliveryState::of(bid, &q);
            if s.bounce_of == Some(id) {
                let v = found.get_or_insert_with(Vec::new);
                if s.reports.is_empty() {
                    return Some(Vec::new());
                }
                v.extend(&s.reports);
            }
        }
        found
    }

    /// The postmaster's copy of a report failed for good: nobody is left
    /// to tell. Dropped, loudly.
    fn dropped(&self, id: MessageId, env: &Envelope, state: &DeliveryState, rcpts: &[usize]) {
        let reason = if rcpts.iter().any(|&i| state.recipients[i].expired) {
            DropReason::PostmasterExpired
        } else {
            DropReason::PostmasterRefused
        };
        let to = rcpts
            .iter()
            .filter_map(|&i| env.recipients.get(i))
            .map(|r| format!("<{r}>"))
            .collect::<Vec<_>>()
            .join(",");
        let of = state
            .bounce_of
            .map(|b| b.to_string())
            .unwrap_or_else(|| "?".into());
        tracing::error!(
            queue_id = %id, account = %self.account, reason = reason.as_str(),
            "{id}: postmaster notification to={to} failed for good ({}): the failure report about message {of} is dropped, nobody received it; check [delivery] postmaster and the log lines of {of}",
            reason.as_str()
        );
        self.shared.metrics.dropped(reason);
    }

    /// Queue one report of `rcpts` (to the sender, or to the postmaster:
    /// see [`decide::notice_for`]), then mark them reported.
    async fn bounce(
        &self,
        id: MessageId,
        env: &Envelope,
        state: &mut DeliveryState,
        rcpts: &[usize],
        job: &Job,
    ) -> Result<(), Outcome> {
        let notice = decide::notice_for(&env.sender, state);
        if notice == Notice::Drop {
            self.dropped(id, env, state, rcpts);
            for &i in rcpts {
                state.recipients[i].reported = true;
            }
            return Ok(());
        }
        match self.queue_bounce(id, env, state, rcpts, notice, job).await {
            Ok(bid) => {
                match notice {
                    Notice::Postmaster => {
                        tracing::info!(queue_id = %id, "{id}: postmaster non-delivery notification: {bid}")
                    }
                    _ => {
                        tracing::info!(queue_id = %id, "{id}: sender non-delivery notification: {bid}")
                    }
                }
                self.shared.metrics.bounced(&self.account);
                for &i in rcpts {
                    state.recipients[i].reported = true;
                }
                Ok(())
            }
            Err(SpoolError::NotFound(_)) => Err(Outcome::Gone),
            Err(e) => {
                tracing::error!(queue_id = %id, "cannot queue the bounce, keeping the message: {e}");
                Err(self.retry_writes(job))
            }
        }
    }

    async fn queue_bounce(
        &self,
        id: MessageId,
        env: &Envelope,
        state: &DeliveryState,
        rcpts: &[usize],
        notice: Notice,
        job: &Job,
    ) -> Result<MessageId, SpoolError> {
        let sh = &self.shared;
        let acct = &job.ctx.config;
        let postmaster = job.cfg.postmaster.as_deref().unwrap_or(&acct.email);
        let (to, rcpt) = match notice {
            Notice::Postmaster => (To::Postmaster(postmaster), postmaster),
            _ => (To::Sender, env.sender.as_str()),
        };
        let whole = to != To::Sender && sh.spool.read_body(id)?.len() <= POSTMASTER_ATTACH_LIMIT;
        let original = if whole {
            body::Body::open(&sh.spool, id, None)
                .await?
                .read_all()
                .await?
        } else {
            body::read_headers(&sh.spool, id, BOUNCE_HEADER_LIMIT).await?
        };
        let dsn = dsn::build(&DsnInput {
            hostname: &sh.hostname,
            from: &acct.email,
            to,
            queue_id: id,
            envelope: env,
            state,
            report: rcpts,
            remote_mta: match acct.transport {
                oauth::TransportKind::Smtp => acct.smtp_host.as_str(),
                oauth::TransportKind::GmailApi => acct
                    .api_url
                    .url()
                    .host_str()
                    .unwrap_or("gmail.googleapis.com"),
            },
            original: if whole {
                Original::Message(&original)
            } else {
                Original::Headers(&original)
            },
            max_age: job.cfg.max_age,
            now: sh.clock.now(),
        });
        let mut benv = Envelope::new("", [rcpt.to_string()]);
        benv.received = sh.clock.now();
        benv.eight_bit = !dsn.is_ascii();
        benv.smtputf8 = env.smtputf8 && !rcpt.is_ascii();
        benv.helo = sh.hostname.to_string();
        let mut bstate = DeliveryState::new(1);
        bstate.account = Some(acct.name.clone());
        bstate.bounce_of = Some(id);
        bstate.reports = rcpts.to_vec();
        bstate.postmaster_copy = notice == Notice::Postmaster;
        // A bounce lets the message it reports on go: it may use the
        // spool's reserve.
        let mut w = sh.spool.begin(Reserve::MayUse);
        w.write(&dsn).await?;
        w.commit(benv, bstate.to_record()).await
    }

    fn log_all(&self, id: MessageId, env: &Envelope, d: &Decision, a: &Attempt, now: SystemTime) {
        for line in &d.lines {
            self.log(id, env, d.state.attempts, a, line, now);
        }
    }

    /// One Postfix-style line:
    /// `ID: to=<a>,<b>, account=NAME, relay=HOST[IP]:PORT, delay=1.2, attempt=N, dsn=X.Y.Z, status=sent (REPLY)`,
    /// with `queue_id`, `account`, `status` and `dsn` as fields too (the
    /// JSON log carries them; the text form does not repeat them). The
    /// status page's history gets the same facts.
    fn log(
        &self,
        id: MessageId,
        env: &Envelope,
        attempts: u32,
        a: &Attempt,
        line: &Line,
        now: SystemTime,
    ) {
        let rcpts: Vec<String> = line
            .rcpts
            .iter()
            .filter_map(|&i| env.recipients.get(i))
            .cloned()
            .collect();
        let to = rcpts
            .iter()
            .map(|r| format!("<{r}>"))
            .collect::<Vec<_>>()
            .join(",");
        let delay = now.duration_since(env.received).unwrap_or_default();
        let attempt = attempts.max(1);
        let mut text = format!(
            "{id}: to={to}, account={}, relay={}, delay={:.2}, attempt={attempt}, dsn={}, status={} ({})",
            self.account,
            a.relay.as_deref().unwrap_or("none"),
            delay.as_secs_f64(),
            line.dsn,
            line.status.as_str(),
            line.text,
        );
        if let Some(rid) = &a.remote_id {
            text.push_str(&format!(", remote_id={rid}"));
        }
        if let Some(note) = &a.note {
            text.push_str(&format!(", note=({note})"));
        }
        let status = line.status.as_str();
        match line.status {
            decide::LogStatus::Sent => tracing::info!(
                target: "oauthrelay::delivery",
                queue_id = %id, account = %self.account, status, dsn = %line.dsn,
                "{text}"
            ),
            _ => tracing::warn!(
                target: "oauthrelay::delivery",
                queue_id = %id, account = %self.account, status, dsn = %line.dsn,
                "{text}"
            ),
        }
        self.shared.history.push(AttemptRecord {
            at: now,
            queue_id: id,
            account: self.account.clone(),
            recipients: rcpts,
            status: line.status,
            dsn: line.dsn,
            delay,
            attempt,
            relay: a.relay.clone(),
            reply: line.text.clone(),
        });
    }
}

async fn idle_closed(t: &mut Option<AnyTransport>) {
    match t {
        Some(t) => t.idle_closed().await,
        None => std::future::pending().await,
    }
}

/// The record a message gets when it is made due now without the daemon
/// (`queue retry` on a stopped relay).
pub fn due_now(id: MessageId, q: &spool::Queued) -> DeliveryRecord {
    let mut s = DeliveryState::of(id, q);
    s.next_attempt = None;
    s.to_record()
}
