//! The SMTP transport: TLS, XOAUTH2, PIPELINING + BDAT, one warm
//! connection kept between messages.

pub(crate) mod conn;
pub(crate) mod session;
pub(crate) mod tls;
pub(crate) mod transaction;
pub(crate) mod xoauth2;

use std::collections::VecDeque;
use std::future::pending;
use std::sync::Arc;
use std::time::Duration;

use oauth::{AccessToken, TokenManager};
use spool::SpoolError;

use self::conn::Connection;
use self::session::{AccountCtx, OpenParams};
use self::transaction::{TxError, TxRequest};
use crate::body::Body;
use crate::classify::{AccountSignal, RcptOutcome, classify};
use crate::reply::Answer;
use crate::transport::{Attempt, Outgoing, ProbeReport, Transport};

/// Gmail takes at most 100 recipients per message over SMTP.
pub(crate) const MAX_RCPTS_PER_TRANSACTION: usize = 100;

struct Pooled {
    conn: Connection,
    /// The token the session authenticated with.
    token: AccessToken,
    /// A transaction ran on it: start the next with RSET.
    used: bool,
}

/// SMTP with XOAUTH2 for one account.
pub(crate) struct SmtpTransport {
    ctx: Arc<AccountCtx>,
    tokens: TokenManager,
    hostname: Arc<str>,
    connect_timeout: Duration,
    command_timeout: Duration,
    pool: Option<Pooled>,
}

impl SmtpTransport {
    pub(crate) fn new(
        ctx: Arc<AccountCtx>,
        tokens: TokenManager,
        hostname: Arc<str>,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> SmtpTransport {
        SmtpTransport {
            ctx,
            tokens,
            hostname,
            connect_timeout,
            command_timeout,
            pool: None,
        }
    }

    /// Whether this transport was made for `ctx` (a reload replaces it).
    pub(crate) fn serves(&self, ctx: &Arc<AccountCtx>) -> bool {
        Arc::ptr_eq(&self.ctx, ctx)
    }
}

/// What one transaction on the pool came to.
enum Step {
    /// Replies classified; the batch is settled.
    Done,
    /// A pooled connection was dead before anything happened: again on a
    /// fresh one.
    Stale,
    /// The session lost its authentication (`530`/`535`): again on a fresh
    /// connection with a fresh token, once.
    AuthLost(crate::reply::Reply),
    /// The attempt ends here.
    Stop,
}

impl Transport for SmtpTransport {
    async fn deliver(&mut self, msg: &Outgoing<'_>) -> Attempt {
        let mut a = Attempt::default();
        let mut todo: VecDeque<usize> = msg.recipients.iter().copied().collect();
        let mut stale_retried = false;
        let mut auth_retried = false;
        let ctx = self.ctx.clone();
        let acct = &ctx.config;
        while !todo.is_empty() {
            if self.pool.is_none() {
                let params = OpenParams {
                    hostname: &self.hostname,
                    connect_timeout: self.connect_timeout,
                    command_timeout: self.command_timeout,
                };
                match session::open(&self.ctx, &self.tokens, &params, &mut |_| {}).await {
                    Ok((conn, token)) => {
                        a.connected = true;
                        self.pool = Some(Pooled {
                            conn,
                            token,
                            used: false,
                        });
                    }
                    Err(e) => {
                        // One line per failed connection attempt: the e2e
                        // test `upstream_down_then_up_...` counts them.
                        tracing::debug!(account = %acct.name, "cannot open a session: {e}");
                        let signal = e.signal(&self.ctx.config.email);
                        let answer = signal.answer().clone();
                        a.outcomes.extend(
                            todo.drain(..)
                                .map(|i| (i, RcptOutcome::Deferred(answer.clone()))),
                        );
                        a.signal = Some(signal);
                        break;
                    }
                }
            }
            let n = todo.len().min(MAX_RCPTS_PER_TRANSACTION);
            let batch: Vec<usize> = todo.drain(..n).collect();
            match self.transact(msg, &batch, &mut todo, &mut a).await {
                Step::Done => {}
                Step::Stale if !stale_retried => {
                    stale_retried = true;
                    for i in batch.into_iter().rev() {
                        todo.push_front(i);
                    }
                }
                Step::Stale => {
                    let answer = Answer::error("the upstream closed pooled connections twice");
                    a.outcomes.extend(
                        batch
                            .into_iter()
                            .chain(todo.drain(..))
                            .map(|i| (i, RcptOutcome::Deferred(answer.clone()))),
                    );
                    a.signal = Some(AccountSignal::Unreachable(answer));
                    break;
                }
                Step::AuthLost(reply) => {
                    // Like a refused token: a fresh one on a fresh
                    // connection, once; then the token manager holds the
                    // account. Never a bounce.
                    let again = match self.pool.take() {
                        Some(p) => {
                            let again = session::token_refused(
                                &self.tokens,
                                &self.ctx,
                                &p.token,
                                &reply,
                                auth_retried,
                            )
                            .await;
                            p.conn.quit().await;
                            again
                        }
                        None => None,
                    };
                    if again.is_some() {
                        auth_retried = true;
                        tracing::info!(account = %acct.name, "{reply} after a successful AUTH: trying once more with a fresh token");
                        for i in batch.into_iter().rev() {
                            todo.push_front(i);
                        }
                        continue;
                    }
                    let answer = Answer::Reply(reply);
                    a.outcomes.extend(
                        batch
                            .into_iter()
                            .chain(todo.drain(..))
                            .map(|i| (i, RcptOutcome::Deferred(answer.clone()))),
                    );
                    a.signal = Some(AccountSignal::AuthFailed(answer));
                    break;
                }
                Step::Stop => break,
            }
        }
        a
    }

    async fn probe(&mut self) -> ProbeReport {
        self.close().await;
        let params = OpenParams {
            hostname: &self.hostname,
            connect_timeout: self.connect_timeout,
            command_timeout: self.command_timeout,
        };
        let mut steps = Vec::new();
        let opened = session::open_for(
            session::Purpose::Probe,
            &self.ctx,
            &self.tokens,
            &params,
            &mut |s| steps.push(s.to_string()),
        )
        .await;
        match opened {
            Ok((conn, token)) => {
                self.pool = Some(Pooled {
                    conn,
                    token,
                    used: false,
                });
                ProbeReport {
                    failed: None,
                    steps,
                }
            }
            Err(e) => ProbeReport {
                failed: Some(e.signal(&self.ctx.config.email)),
                steps,
            },
        }
    }

    async fn idle_closed(&mut self) {
        match &mut self.pool {
            Some(p) => p.conn.closed_by_server().await,
            None => pending().await,
        }
    }

    fn is_open(&self) -> bool {
        self.pool.is_some()
    }

    async fn close(&mut self) {
        if let Some(p) = self.pool.take() {
            tracing::debug!(account = %self.ctx.config.name, relay = %p.conn.relay, "closing the connection");
            p.conn.quit().await;
        }
    }

    fn drop_channel(&mut self) {
        self.pool = None;
    }
}

impl SmtpTransport {
    /// One transaction for `batch` on the pooled connection; recipients
    /// the server wants in a later transaction go back to `todo`.
    async fn transact(
        &mut self,
        msg: &Outgoing<'_>,
        batch: &[usize],
        todo: &mut VecDeque<usize>,
        a: &mut Attempt,
    ) -> Step {
        let Some(p) = self.pool.as_mut() else {
            return Step::Stale;
        };
        a.relay = Some(p.conn.relay.clone());
        let rcpts: Vec<String> = batch
            .iter()
            .map(|&i| msg.envelope.recipients[i].clone())
            .collect();
        let local = |e: SpoolError, rest: Vec<usize>, a: &mut Attempt| {
            let answer = Answer::error(format!("local error reading the queued message: {e}"));
            a.local.extend(&rest);
            a.outcomes.extend(
                rest.into_iter()
                    .map(|i| (i, RcptOutcome::Deferred(answer.clone()))),
            );
        };
        let body = match Body::open(msg.spool, msg.id, msg.rewrite_from).await {
            Ok(b) => b,
            Err(SpoolError::NotFound(_)) => {
                a.gone = true;
                todo.clear();
                return Step::Stop;
            }
            Err(e) => {
                local(e, batch.iter().copied().chain(todo.drain(..)).collect(), a);
                return Step::Stop;
            }
        };
        let req = TxRequest {
            sender: msg.sender,
            recipients: &rcpts,
            eight_bit: msg.envelope.eight_bit,
            smtputf8: msg.envelope.smtputf8,
            reset_first: p.used,
            data_timeout: msg.data_timeout,
        };
        p.used = true;
        match transaction::run(&mut p.conn, &req, body).await {
            Ok(replies) => {
                p.conn.transactions += 1;
                a.transacted = true;
                if let Some(r) = replies.auth_failure() {
                    // The caller ends this session (and its token).
                    return Step::AuthLost(r.clone());
                }
                if !transaction::reusable(&p.conn, &replies) {
                    tracing::debug!(relay = %p.conn.relay, "a reply the connection did not expect: not reusing it");
                    self.pool = None;
                }
                let c = classify(&replies, batch.len(), &self.ctx.config.email);
                let mut again = Vec::new();
                for (&i, o) in batch.iter().zip(c.rcpts) {
                    match o {
                        RcptOutcome::Again => again.push(i),
                        o => a.outcomes.push((i, o)),
                    }
                }
                for i in again.into_iter().rev() {
                    todo.push_front(i);
                }
                if let Some(sig) = c.signal {
                    let answer = sig.answer().clone();
                    a.outcomes.extend(
                        todo.drain(..)
                            .map(|i| (i, RcptOutcome::Deferred(answer.clone()))),
                    );
                    a.signal = Some(sig);
                    return Step::Stop;
                }
                Step::Done
            }
            Err(TxError::Stale(why)) => {
                // A 421 (or a close) on a connection kept from an earlier
                // message: nothing was attempted, so it is tried again at
                // once on a new connection. Worth a line: an upstream that
                // does this often is closing idle connections early.
                let id = msg.id;
                tracing::info!(
                    queue_id = %id, account = %self.ctx.config.name, relay = %p.conn.relay,
                    "{id}: pooled connection to {} closed by the server ({why}); retrying on a new connection",
                    p.conn.relay
                );
                self.pool = None;
                Step::Stale
            }
            Err(TxError::Conn { error, replies }) => {
                self.pool = None;
                let answer = Answer::error(&error);
                // Definitive refusals before the failure still count.
                let c = classify(&replies, batch.len(), &self.ctx.config.email);
                for (&i, o) in batch.iter().zip(c.rcpts) {
                    let o = match o {
                        RcptOutcome::Failed(t) => RcptOutcome::Failed(t),
                        _ => RcptOutcome::Deferred(answer.clone()),
                    };
                    a.outcomes.push((i, o));
                }
                a.outcomes.extend(
                    todo.drain(..)
                        .map(|i| (i, RcptOutcome::Deferred(answer.clone()))),
                );
                a.signal = Some(AccountSignal::Unreachable(answer));
                Step::Stop
            }
            Err(TxError::Spool(e)) => {
                self.pool = None;
                local(e, batch.iter().copied().chain(todo.drain(..)).collect(), a);
                Step::Stop
            }
        }
    }
}
