//! A delivery worker: takes one message at a time for its account, keeps
//! one authenticated connection warm between messages, records every
//! outcome durably, bounces permanent failures, and logs one Postfix-style
//! line per attempt.

use std::collections::VecDeque;
use std::future::pending;
use std::sync::Arc;
use std::time::SystemTime;

use oauth::TokenManager;
use spool::{Envelope, MessageId, RcptState, Recipient, Spool, SpoolError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::DeliveryConfig;
use crate::account::{AccountCell, Effect, backoff};
use crate::body::{self, Body};
use crate::classify::{AccountSignal, RcptOutcome, classify};
use crate::conn::Connection;
use crate::dsn::{self, DsnInput};
use crate::metrics::{AttemptResult, Metrics};
use crate::session::{self, AccountCtx, OpenParams};
use crate::transaction::{self, TxError, TxRequest};

/// Gmail takes at most 100 recipients per message over SMTP.
pub(crate) const MAX_RCPTS_PER_TRANSACTION: usize = 100;
/// How much of the original header section a bounce quotes.
const BOUNCE_HEADER_LIMIT: usize = 64 * 1024;

/// What a worker needs from the rest of the daemon.
pub(crate) struct Shared {
    pub spool: Spool,
    pub tokens: TokenManager,
    pub hostname: String,
    pub metrics: Metrics,
}

/// One message to attempt now.
pub(crate) struct Job {
    pub id: MessageId,
    pub ctx: Arc<AccountCtx>,
    pub cell: Arc<AccountCell>,
    pub cfg: Arc<DeliveryConfig>,
    /// What an earlier attempt learnt but could not record.
    pub unrecorded: Option<Unrecorded>,
}

/// Recipient outcomes Gmail gave that the spool could not record (the
/// envelope update or the removal failed, e.g. on a full disk). The
/// scheduler keeps them with the message and the next attempt applies them
/// to the spool copy first, so a recipient Gmail accepted is not sent the
/// message again while only the spool write is retried. They live in memory
/// only: after a crash the message is sent again (at-least-once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unrecorded(Vec<(usize, Recipient)>);

impl Unrecorded {
    /// The decided recipients of `env` (`None` if there are none).
    fn of(env: &Envelope) -> Option<Unrecorded> {
        let done: Vec<_> = env
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state != RcptState::Pending)
            .map(|(i, r)| (i, r.clone()))
            .collect();
        (!done.is_empty()).then_some(Unrecorded(done))
    }

    /// Put the remembered outcomes into `env`; whether any recipient still
    /// pending there got one.
    fn apply(&self, env: &mut Envelope) -> bool {
        let mut changed = false;
        for (i, decided) in &self.0 {
            if let Some(r) = env.recipients.get_mut(*i)
                && r.state == RcptState::Pending
            {
                r.clone_from(decided);
                changed = true;
            }
        }
        changed
    }
}

/// What became of the message (for the scheduler).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Not in the spool any more (deleted by someone else).
    Gone,
    /// Every recipient delivered or failed (bounce queued); removed.
    Done,
    /// Some recipients remain: try again at `next`.
    Deferred { next: SystemTime },
    /// The account cannot authenticate: the message waits for it; `held`
    /// in the spool copy says `reason`.
    Held { reason: String },
    /// Not attempted, or cut short by shutdown: still queued as it was.
    Interrupted,
}

pub(crate) struct Report {
    pub worker: u64,
    pub account: String,
    pub id: MessageId,
    pub outcome: Outcome,
    /// The account's pause/hold/probing state changed.
    pub account_changed: bool,
    /// What the scheduler keeps for the next attempt.
    pub unrecorded: Option<Unrecorded>,
}

/// The status word of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Sent,
    Deferred,
    Bounced,
    Held,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Sent => "sent",
            Status::Deferred => "deferred",
            Status::Bounced => "bounced",
            Status::Held => "held",
        }
    }
}

struct Pooled {
    conn: Connection,
    ctx: Arc<AccountCtx>,
    /// A transaction ran on it: start the next with RSET.
    used: bool,
}

#[derive(Default)]
struct Delivery {
    outcomes: Vec<(usize, RcptOutcome)>,
    signal: Option<AccountSignal>,
    relay: Option<String>,
    connected: bool,
    /// At least one transaction got Gmail's replies.
    transacted: bool,
    /// Recipients deferred by a local problem (reading the spool copy),
    /// not by anything upstream: they do not expire on it.
    local: Vec<usize>,
    gone: bool,
}

enum Wake {
    Job(Job),
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

async fn server_closed(pool: &mut Option<Pooled>) {
    match pool {
        Some(p) => p.conn.closed_by_server().await,
        None => pending().await,
    }
}

async fn grace_expired(shutdown: &CancellationToken, grace: std::time::Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(grace).await;
}

impl Worker {
    pub(crate) async fn run(mut self, mut cfg: Arc<DeliveryConfig>) {
        let mut pool: Option<Pooled> = None;
        let mut idle_since = Instant::now();
        loop {
            let idle_at = idle_since + cfg.idle_timeout;
            let wake = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Wake::Stop,
                j = self.rx.recv() => j.map(Wake::Job).unwrap_or(Wake::Stop),
                _ = server_closed(&mut pool) => Wake::Closed,
                _ = tokio::time::sleep_until(idle_at), if pool.is_some() => Wake::Idle,
            };
            match wake {
                Wake::Stop => break,
                Wake::Closed => {
                    tracing::debug!(account = %self.account, "pooled connection closed by the server");
                    pool = None;
                }
                Wake::Idle => {
                    if let Some(p) = pool.take() {
                        tracing::debug!(account = %self.account, relay = %p.conn.relay, "closing idle connection");
                        p.conn.quit().await;
                    }
                }
                Wake::Job(job) => {
                    cfg = job.cfg.clone();
                    let id = job.id;
                    let mut unrecorded = job.unrecorded.clone();
                    let (outcome, account_changed) = if self.shutdown.is_cancelled() {
                        (Outcome::Interrupted, false)
                    } else {
                        let grace = cfg.shutdown_grace;
                        let attempt = self.attempt(&job, &mut pool, &mut unrecorded);
                        tokio::pin!(attempt);
                        let r = tokio::select! {
                            r = &mut attempt => Some(r),
                            _ = grace_expired(&self.shutdown, grace) => None,
                        };
                        match r {
                            Some(r) => r,
                            None => {
                                tracing::warn!(queue_id = %id, account = %self.account, "shutdown grace over: delivery attempt abandoned, the message stays queued");
                                (Outcome::Interrupted, false)
                            }
                        }
                    };
                    if outcome == Outcome::Interrupted {
                        pool = None;
                    }
                    idle_since = Instant::now();
                    let _ = self.reports.send(Report {
                        worker: self.id,
                        account: self.account.clone(),
                        id,
                        outcome,
                        account_changed,
                        unrecorded,
                    });
                }
            }
        }
        if let Some(p) = pool.take() {
            p.conn.quit().await;
        }
    }

    /// One delivery attempt of one message. `unrecorded` comes in as the
    /// job's and goes out as what the scheduler should remember.
    async fn attempt(
        &self,
        job: &Job,
        pool: &mut Option<Pooled>,
        unrecorded: &mut Option<Unrecorded>,
    ) -> (Outcome, bool) {
        let sh = &self.shared;
        let id = job.id;
        let Some(mut env) = sh.spool.envelope(id) else {
            tracing::info!(queue_id = %id, "message no longer queued (deleted); skipped");
            return (Outcome::Gone, false);
        };
        let acct = &job.ctx.config;
        let cfg = &job.cfg;

        let remembered = unrecorded.as_ref().is_some_and(|u| u.apply(&mut env));
        if remembered {
            tracing::info!(
                queue_id = %id,
                "{id}: recipients already answered by Gmail (their record failed) are not sent again; recording them now"
            );
        }

        if env.is_done() {
            // Finished before a crash (queue the bounce unless it is
            // queued), or before a failed spool write: record, then remove.
            // (The scan for the bounce only when one may be due: this runs
            // again and again while the disk is full.)
            let may_bounce = !env.sender.is_empty()
                && env.bounce_of.is_none()
                && env.recipients.iter().any(|r| r.state == RcptState::Failed);
            let queued = may_bounce && sh.spool.list().iter().any(|(_, e)| e.bounce_of == Some(id));
            let outcome = self
                .finish(id, &mut env, job, !queued, remembered, unrecorded)
                .await;
            return (outcome, false);
        }

        let pending: Vec<usize> = env
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == RcptState::Pending)
            .map(|(i, _)| i)
            .collect();
        let d = self.deliver(job, &env, &pending, pool).await;
        if d.gone {
            return (Outcome::Gone, false);
        }
        // Timings (delivery duration, next attempt, age) count from the end
        // of the attempt: a slow upload must not retry at once.
        let done = SystemTime::now();
        env.attempts = env.attempts.saturating_add(1);
        env.set_held(None, done);

        let mut sent = Vec::new();
        let mut deferred = Vec::new();
        let mut failed = Vec::new();
        let mut sent_text = String::new();
        let mut first_deferred: Option<String> = None;
        // Deferred without a reply of their own in this attempt.
        let mut unanswered = Vec::new();
        for (i, o) in d.outcomes {
            let Some(r) = env.recipients.get_mut(i) else {
                continue;
            };
            match o {
                RcptOutcome::Delivered(reply) => {
                    r.state = RcptState::Delivered;
                    sent_text = reply.to_string();
                    r.reply = Some(sent_text.clone());
                    sent.push(i);
                }
                RcptOutcome::Failed(t) => {
                    r.state = RcptState::Failed;
                    r.reply = Some(t);
                    failed.push(i);
                }
                RcptOutcome::Deferred(t) => {
                    first_deferred.get_or_insert_with(|| t.clone());
                    r.reply = Some(t);
                    deferred.push(i);
                }
                RcptOutcome::Again => {
                    unanswered.push(i);
                    deferred.push(i);
                }
            }
        }

        // Too old: recipients this real attempt left deferred for a
        // temporary reason of the message or the connection fail for good,
        // with this attempt's reply. Not when the account is held (waiting
        // for `authorize`) or paused by the daily limit: that mail waits,
        // however long.
        let expirable = match &d.signal {
            None | Some(AccountSignal::Unreachable(_) | AccountSignal::LoginThrottled(_)) => true,
            Some(AccountSignal::DailyLimit(_) | AccountSignal::Held(_)) => false,
        };
        // Time spent held does not count: after `authorize` the mail gets
        // its chance.
        let age = env.queue_age(done);
        let mut expired = Vec::new();
        if expirable && age >= cfg.max_age {
            let fallback = first_deferred
                .clone()
                .or_else(|| d.signal.as_ref().map(|s| s.text().to_string()))
                .unwrap_or_else(|| "not attempted".into());
            for &i in &deferred {
                if d.local.contains(&i) {
                    continue;
                }
                let r = &mut env.recipients[i];
                r.state = RcptState::Failed;
                r.expired = true;
                if unanswered.contains(&i) || r.reply.as_deref().is_none_or(str::is_empty) {
                    r.reply = Some(fallback.clone());
                }
                expired.push(i);
            }
            deferred.retain(|i| !expired.contains(i));
        }

        let mut changed = false;
        let effect = {
            let mut rt = job.cell.lock();
            let was_probing = rt.probing;
            if d.connected {
                rt.connected();
            }
            if !sent.is_empty() {
                rt.delivered();
            }
            let effect = match &d.signal {
                Some(s) => Some(rt.apply(s, cfg)),
                None => {
                    if d.connected || d.transacted {
                        rt.recovered();
                    }
                    None
                }
            };
            changed |= effect.is_some() || was_probing != rt.probing;
            effect
        };
        if !sent.is_empty() {
            let secs = done
                .duration_since(env.received)
                .unwrap_or_default()
                .as_secs_f64();
            sh.metrics.observe_delivery(secs);
        }

        let relay = d.relay.as_deref();
        let name = acct.name.as_str();
        if !sent.is_empty() {
            self.log(id, &env, name, relay, Status::Sent, &sent, &sent_text);
        }
        for &i in &failed {
            let text = env.recipients[i].reply.clone().unwrap_or_default();
            self.log(id, &env, name, relay, Status::Bounced, &[i], &text);
        }
        for &i in &expired {
            let text = format!(
                "message expired after {} in the queue; last reply: {}",
                humantime::format_duration(cfg.max_age),
                env.recipients[i].reply.as_deref().unwrap_or("none")
            );
            self.log(id, &env, name, relay, Status::Bounced, &[i], &text);
        }
        let held_reason = match &effect {
            Some(Effect::Held { reason }) => Some(reason.clone()),
            _ => None,
        };
        if !deferred.is_empty() {
            let text = first_deferred
                .clone()
                .or_else(|| d.signal.as_ref().map(|s| s.text().to_string()))
                .unwrap_or_else(|| "not attempted".into());
            let status = if held_reason.is_some() {
                Status::Held
            } else {
                Status::Deferred
            };
            self.log(id, &env, name, relay, status, &deferred, &text);
        }
        sh.metrics.attempt(if !deferred.is_empty() {
            AttemptResult::Deferred
        } else if !failed.is_empty() || !expired.is_empty() {
            AttemptResult::Failed
        } else {
            AttemptResult::Sent
        });

        if env.is_done() {
            let any_failed = !failed.is_empty()
                || !expired.is_empty()
                || env.recipients.iter().any(|r| r.state == RcptState::Failed);
            return (
                self.finish(id, &mut env, job, true, any_failed, unrecorded)
                    .await,
                changed,
            );
        }

        // Some recipients remain: record and schedule.
        let next = match &effect {
            Some(Effect::Held { .. }) => None,
            other => {
                let mut next = done + backoff(cfg.retry_initial, cfg.retry_max, env.attempts);
                if let Some(Effect::Paused { until }) = other
                    && *until > next
                {
                    next = *until;
                }
                Some(next)
            }
        };
        env.next_attempt = next;
        env.set_held(held_reason.clone(), done);
        env.last_error = first_deferred.or_else(|| d.signal.as_ref().map(|s| s.text().to_string()));
        let decided = Unrecorded::of(&env);
        match sh.spool.update(id, env).await {
            Ok(()) => *unrecorded = None,
            Err(SpoolError::NotFound(_)) => return (Outcome::Gone, changed),
            Err(e) => {
                // The old envelope stays on disk: the recipients still
                // pending are tried again later, and the ones Gmail
                // answered are remembered so they are not (unless we crash
                // first: at-least-once).
                tracing::error!(queue_id = %id, "cannot record the delivery attempt: {e}");
                *unrecorded = decided;
            }
        }
        match (next, held_reason) {
            (Some(next), _) => (Outcome::Deferred { next }, changed),
            (None, reason) => (
                Outcome::Held {
                    reason: reason.unwrap_or_default(),
                },
                changed,
            ),
        }
    }

    /// Send to `pending` recipients, in transactions of at most 100.
    async fn deliver(
        &self,
        job: &Job,
        env: &Envelope,
        pending: &[usize],
        pool: &mut Option<Pooled>,
    ) -> Delivery {
        let sh = &self.shared;
        let acct = &job.ctx.config;
        let cfg = &job.cfg;
        let mut d = Delivery::default();
        let mut todo: VecDeque<usize> = pending.iter().copied().collect();
        let mut stale_retried = false;
        let rewrite = acct.rewrite_from && env.bounce_of.is_none();
        let sender = if rewrite && !env.sender.is_empty() {
            acct.email.as_str()
        } else {
            env.sender.as_str()
        };
        let params = OpenParams {
            hostname: &sh.hostname,
            connect_timeout: cfg.connect_timeout,
            command_timeout: cfg.command_timeout,
        };

        while !todo.is_empty() {
            if pool
                .as_ref()
                .is_some_and(|p| !Arc::ptr_eq(&p.ctx, &job.ctx))
                && let Some(p) = pool.take()
            {
                p.conn.quit().await;
            }
            if pool.is_none() {
                match session::open(&job.ctx, &sh.tokens, &params, &mut |_| {}).await {
                    Ok(conn) => {
                        d.connected = true;
                        *pool = Some(Pooled {
                            conn,
                            ctx: job.ctx.clone(),
                            used: false,
                        });
                    }
                    Err(e) => {
                        let text = e.to_string();
                        // One line per failed connection attempt: the e2e test
                        // `upstream_down_then_up_...` counts them.
                        tracing::debug!(account = %acct.name, "cannot open a session: {text}");
                        d.outcomes.extend(
                            todo.drain(..)
                                .map(|i| (i, RcptOutcome::Deferred(text.clone()))),
                        );
                        d.signal = Some(e.signal());
                        break;
                    }
                }
            }
            let Some(p) = pool.as_mut() else { break };
            d.relay = Some(p.conn.relay.clone());
            let n = todo.len().min(MAX_RCPTS_PER_TRANSACTION);
            let batch: Vec<usize> = todo.drain(..n).collect();
            let rcpts: Vec<String> = batch
                .iter()
                .map(|&i| env.recipients[i].address.clone())
                .collect();
            let body =
                match Body::open(&sh.spool, job.id, rewrite.then_some(acct.email.as_str())).await {
                    Ok(b) => b,
                    Err(SpoolError::NotFound(_)) => {
                        d.gone = true;
                        return d;
                    }
                    Err(e) => {
                        let text = format!("local error reading the queued message: {e}");
                        let rest: Vec<usize> = batch.into_iter().chain(todo.drain(..)).collect();
                        d.local.extend(&rest);
                        d.outcomes.extend(
                            rest.into_iter()
                                .map(|i| (i, RcptOutcome::Deferred(text.clone()))),
                        );
                        break;
                    }
                };
            let req = TxRequest {
                sender,
                recipients: &rcpts,
                eight_bit: env.eight_bit,
                smtputf8: env.smtputf8,
                reset_first: p.used,
                data_timeout: cfg.data_timeout,
            };
            p.used = true;
            match transaction::run(&mut p.conn, &req, body).await {
                Ok(replies) => {
                    p.conn.transactions += 1;
                    d.transacted = true;
                    let c = classify(&replies, batch.len());
                    if c.closed {
                        *pool = None;
                    }
                    let mut again = Vec::new();
                    for (&i, o) in batch.iter().zip(c.rcpts) {
                        match o {
                            RcptOutcome::Again => again.push(i),
                            o => d.outcomes.push((i, o)),
                        }
                    }
                    for i in again.into_iter().rev() {
                        todo.push_front(i);
                    }
                    if let Some(sig) = c.signal {
                        let text = sig.text().to_string();
                        d.outcomes.extend(
                            todo.drain(..)
                                .map(|i| (i, RcptOutcome::Deferred(text.clone()))),
                        );
                        d.signal = Some(sig);
                        break;
                    }
                }
                Err(TxError::Stale(why)) if !stale_retried => {
                    tracing::debug!(account = %acct.name, "pooled connection was dead ({why}); retrying on a fresh one");
                    stale_retried = true;
                    *pool = None;
                    for i in batch.into_iter().rev() {
                        todo.push_front(i);
                    }
                }
                Err(e @ TxError::Stale(_)) => {
                    *pool = None;
                    let text = e.to_string();
                    d.outcomes.extend(
                        batch
                            .into_iter()
                            .chain(todo.drain(..))
                            .map(|i| (i, RcptOutcome::Deferred(text.clone()))),
                    );
                    d.signal = Some(AccountSignal::Unreachable(text));
                    break;
                }
                Err(TxError::Conn { error, replies }) => {
                    *pool = None;
                    let text = error.to_string();
                    // Definitive refusals before the failure still count.
                    let c = classify(&replies, batch.len());
                    for (&i, o) in batch.iter().zip(c.rcpts) {
                        let o = match o {
                            RcptOutcome::Failed(t) => RcptOutcome::Failed(t),
                            _ => RcptOutcome::Deferred(text.clone()),
                        };
                        d.outcomes.push((i, o));
                    }
                    d.outcomes.extend(
                        todo.drain(..)
                            .map(|i| (i, RcptOutcome::Deferred(text.clone()))),
                    );
                    d.signal = Some(AccountSignal::Unreachable(text));
                    break;
                }
                Err(TxError::Spool(e)) => {
                    *pool = None;
                    let text = format!("local error reading the queued message: {e}");
                    let rest: Vec<usize> = batch.into_iter().chain(todo.drain(..)).collect();
                    d.local.extend(&rest);
                    d.outcomes.extend(
                        rest.into_iter()
                            .map(|i| (i, RcptOutcome::Deferred(text.clone()))),
                    );
                    break;
                }
            }
        }
        // Anything not decided (should not happen) is tried again later.
        d.outcomes.extend(
            todo.drain(..)
                .map(|i| (i, RcptOutcome::Deferred("not attempted".into()))),
        );
        d
    }

    /// Every recipient has its outcome: queue the bounce (if any recipient
    /// failed and the sender is not null), then remove the message. If a
    /// spool write fails, the outcomes go to `unrecorded` and only the
    /// writes are tried again later.
    async fn finish(
        &self,
        id: MessageId,
        env: &mut Envelope,
        job: &Job,
        bounce: bool,
        record_first: bool,
        unrecorded: &mut Option<Unrecorded>,
    ) -> Outcome {
        let sh = &self.shared;
        let failed = env.recipients.iter().any(|r| r.state == RcptState::Failed);
        let delivered = env
            .recipients
            .iter()
            .any(|r| r.state == RcptState::Delivered);
        if failed && bounce && !env.sender.is_empty() && env.bounce_of.is_none() {
            if record_first {
                // So that a crash after the bounce is queued does not bounce
                // again (the next run sees the message done).
                env.set_held(None, SystemTime::now());
                match sh.spool.update(id, env.clone()).await {
                    Ok(()) => {}
                    Err(SpoolError::NotFound(_)) => return Outcome::Gone,
                    Err(e) => {
                        tracing::error!(queue_id = %id, "cannot record the failure: {e}");
                        return self.retry_later(job, env, unrecorded);
                    }
                }
            }
            match self.queue_bounce(id, env, job).await {
                Ok(bid) => tracing::info!(
                    queue_id = %id,
                    "{id}: sender non-delivery notification: {bid}"
                ),
                Err(SpoolError::NotFound(_)) => return Outcome::Gone,
                Err(e) => {
                    tracing::error!(queue_id = %id, "cannot queue the bounce, keeping the message: {e}");
                    return self.retry_later(job, env, unrecorded);
                }
            }
        } else if failed && bounce {
            tracing::info!(queue_id = %id, "{id}: no bounce for a message from the null sender or a bounce");
        }
        match sh.spool.remove(id).await {
            Ok(()) | Err(SpoolError::NotFound(_)) => {}
            Err(e) => {
                tracing::error!(queue_id = %id, "cannot remove the finished message: {e}");
                return self.retry_later(job, env, unrecorded);
            }
        }
        tracing::info!(queue_id = %id, "{id}: removed");
        if failed {
            sh.metrics.bounced();
        }
        if delivered {
            sh.metrics.delivered();
        }
        Outcome::Done
    }

    /// A spool write failed after every recipient got its outcome: keep
    /// the outcomes in memory and try the writes (not the sending) again.
    fn retry_later(
        &self,
        job: &Job,
        env: &Envelope,
        unrecorded: &mut Option<Unrecorded>,
    ) -> Outcome {
        *unrecorded = Unrecorded::of(env);
        Outcome::Deferred {
            next: SystemTime::now() + job.cfg.retry_initial,
        }
    }

    async fn queue_bounce(
        &self,
        id: MessageId,
        env: &Envelope,
        job: &Job,
    ) -> Result<MessageId, SpoolError> {
        let sh = &self.shared;
        let acct = &job.ctx.config;
        let headers = body::read_headers(&sh.spool, id, BOUNCE_HEADER_LIMIT).await?;
        let dsn = dsn::build(&DsnInput {
            hostname: &sh.hostname,
            from: &acct.email,
            queue_id: id,
            envelope: env,
            remote_mta: &acct.smtp_host,
            headers: &headers,
            max_age: job.cfg.max_age,
            now: SystemTime::now(),
        });
        let mut benv = Envelope::new("", [env.sender.clone()]);
        benv.account = Some(acct.name.clone());
        benv.bounce_of = Some(id);
        benv.eight_bit = !dsn.is_ascii();
        benv.smtputf8 = env.smtputf8 && !env.sender.is_ascii();
        benv.helo = sh.hostname.clone();
        let mut w = sh.spool.begin();
        w.write(&dsn).await?;
        w.commit(benv).await
    }

    /// One Postfix-style line:
    /// `ID: to=<a>,<b>, account=NAME, relay=HOST[IP]:PORT, delay=1.2, attempt=N, dsn=X.Y.Z, status=sent (REPLY)`.
    #[allow(clippy::too_many_arguments)]
    fn log(
        &self,
        id: MessageId,
        env: &Envelope,
        account: &str,
        relay: Option<&str>,
        status: Status,
        rcpts: &[usize],
        text: &str,
    ) {
        let to = rcpts
            .iter()
            .filter_map(|&i| env.recipients.get(i))
            .map(|r| format!("<{}>", r.address))
            .collect::<Vec<_>>()
            .join(",");
        let delay = SystemTime::now()
            .duration_since(env.received)
            .unwrap_or_default()
            .as_secs_f64();
        let dsn = match status {
            Status::Sent => reply_status(text).unwrap_or_else(|| "2.0.0".into()),
            Status::Bounced => dsn::status_of(text),
            Status::Deferred | Status::Held => reply_status(text)
                .filter(|s| s.starts_with('4'))
                .unwrap_or_else(|| "4.0.0".into()),
        };
        let attempt = env.attempts.max(1);
        let line = format!(
            "{id}: to={to}, account={account}, relay={}, delay={delay:.2}, attempt={attempt}, dsn={dsn}, status={} ({text})",
            relay.unwrap_or("none"),
            status.as_str(),
        );
        match status {
            Status::Sent => tracing::info!(target: "oauthrelay::delivery", "{line}"),
            _ => tracing::warn!(target: "oauthrelay::delivery", "{line}"),
        }
    }
}

/// `x.y.z` from a reply text like `250 2.0.0 OK`.
fn reply_status(text: &str) -> Option<String> {
    let mut w = text.split_whitespace();
    let code = w.next()?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let esc = w.next()?;
    let parts: Vec<&str> = esc.split('.').collect();
    (parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
    .then(|| esc.to_string())
}
