//! The scheduler: one task that owns where every queued message waits.
//!
//! - Per account: a ready queue (FIFO) and `[delivery] concurrency` workers;
//!   idle workers are reused most-recently-idle first, so a lone message
//!   goes to the worker whose connection is still warm.
//! - One timer set for deferred messages (woken exactly at the earliest
//!   `next_attempt`), plus account pauses and hold probes.
//! - New commits arrive from `spool.subscribe()` and are dispatched at once.
//! - Messages of a held account (or with no account) are marked held in the
//!   spool (durably) and released when the account is authorized again.
//! - A held account that a probe may lift (see [`Lifter`]) is probed: a
//!   fresh token and AUTH through its transport, nothing sent, 5 minutes
//!   after the hold, then doubling to an hour, and at once on `queue
//!   retry`; the hold lifts when the upstream takes them. A hold only a
//!   person can lift (a dead refresh token) waits for `authorize`.
//!   The mark is written once per reason: a release (authorization, hold
//!   probe, `queue retry`, reload) does not clear it; the worker does, when
//!   it really attempts the message. So a probe that fails again rewrites
//!   only the message it tried.
//!
//! Only this task changes a message's place; a worker owns a message while
//! it is in flight, and a marking task while it writes `held`. So no two
//! writers ever race on one envelope.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use oauth::AccountEvent;
use oauth::config::AccountConfig;
use spool::{MessageId, Queued};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::account::{Pause, PauseKind, Runtime};
use crate::hold::{HoldReason, Lifter, probe_wait};
use crate::smtp::session::AccountCtx;
use crate::state::DeliveryState;
use crate::transport::{ProbeReport, Transport};
use crate::worker::{Done, Job, Outcome, Report, Shared, Worker};
use crate::{AccountState, DeliveryConfig};

pub(crate) enum Command {
    /// Make one message (or, with `None`, every deferred message) due now;
    /// lifts its account's pause or hold for one probing attempt. Replies
    /// with how many messages were made due.
    Retry {
        id: Option<MessageId>,
        reply: oneshot::Sender<usize>,
    },
    Reload {
        accounts: Vec<AccountConfig>,
        config: Box<DeliveryConfig>,
    },
    /// The token manager reloaded after a `Reload`: release the held
    /// accounts it has a usable token for (those it did not know yet when
    /// the `Reload` came).
    TokensReloaded,
    /// Liveness: answered when the loop gets to it.
    Ping { reply: oneshot::Sender<()> },
}

/// What `account_states()` reads without asking the scheduler: a view the
/// scheduler publishes after every change.
pub(crate) type PublicAccounts = Arc<Mutex<Vec<AccountState>>>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Account(String),
    /// No account takes it.
    None(HoldReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    Ready,
    Waiting(Instant),
    InFlight,
    /// A task is writing its `held` field.
    Busy,
    Held,
}

struct Msg {
    sender: String,
    account: Option<String>,
    route: Route,
    next: Option<SystemTime>,
    /// The hold recorded in the spool copy, if any.
    held_marked: Option<HoldReason>,
    at: Where,
    /// A decided state the spool could not record yet (see
    /// [`Job::unrecorded`]): given to the next attempt.
    unrecorded: Option<DeliveryState>,
}

struct WorkerHandle {
    id: u64,
    tx: mpsc::Sender<Job>,
    busy: bool,
    /// Over the configured concurrency (it shrank while this worker was
    /// busy): it ends when its job is done.
    retiring: bool,
}

struct Slot {
    name: String,
    /// The current config (routing); `ctx` keeps the delivery settings and
    /// is replaced only when they change, so warm connections survive a
    /// reload that did not touch them.
    config: AccountConfig,
    ctx: Arc<AccountCtx>,
    /// The account's pauses and holds: written here only.
    rt: Runtime,
    workers: Vec<WorkerHandle>,
    /// Indices of idle workers; the last one idled is used first.
    idle: Vec<usize>,
    ready: VecDeque<MessageId>,
    queued: usize,
    /// The hold we acted on (to notice changes).
    known_held: bool,
    /// Probing the hold.
    probe: HoldProbe,
}

/// A held account's probes.
#[derive(Debug, Default)]
struct HoldProbe {
    /// When the next one is due (none while one runs, or when only a
    /// person can lift the hold).
    at: Option<Instant>,
    /// Probes so far during this hold (the wait doubles with each).
    n: u32,
    /// One is running.
    running: bool,
}

impl Slot {
    fn busy(&self) -> usize {
        self.workers.iter().filter(|w| w.busy).count()
    }

    /// Drop worker `wi`'s handle: the worker ends once it is idle (an idle
    /// one at once, closing its connection with QUIT).
    fn drop_worker(&mut self, wi: usize) {
        self.workers.remove(wi);
        self.idle.retain(|&i| i != wi);
        for i in &mut self.idle {
            if *i > wi {
                *i -= 1;
            }
        }
    }
}

struct Marked {
    id: MessageId,
    present: bool,
    /// The reason written (or, if the write failed, meant: the spool copy
    /// is informational, and retrying at once would spin while the disk is
    /// full).
    held: HoldReason,
}

/// What a hold probe found, for the scheduler.
struct Probed {
    account: String,
    report: ProbeReport,
}

enum Wake {
    Stop,
    Report(Report),
    Probed(Probed),
    Marked(Marked),
    Committed(MessageId),
    Command(Command),
    Token(Result<AccountEvent, broadcast::error::RecvError>),
    Timer,
}

pub(crate) struct Scheduler {
    shared: Arc<Shared>,
    cfg: Arc<DeliveryConfig>,
    slots: Vec<Slot>,
    /// Account runtimes of accounts a reload removed and may bring back.
    public: PublicAccounts,
    msgs: BTreeMap<MessageId, Msg>,
    timers: BTreeSet<(Instant, MessageId)>,
    reports_tx: mpsc::UnboundedSender<Report>,
    reports_rx: mpsc::UnboundedReceiver<Report>,
    marks_tx: mpsc::UnboundedSender<Marked>,
    marks_rx: mpsc::UnboundedReceiver<Marked>,
    probes_tx: mpsc::UnboundedSender<Probed>,
    probes_rx: mpsc::UnboundedReceiver<Probed>,
    committed: mpsc::UnboundedReceiver<MessageId>,
    commands: mpsc::UnboundedReceiver<Command>,
    token_events: Option<broadcast::Receiver<AccountEvent>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    next_worker: u64,
}

async fn token_event(
    rx: &mut Option<broadcast::Receiver<AccountEvent>>,
) -> Result<AccountEvent, broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `account NAME paused until TIME (for 1h): REPLY; ...`: why the
/// account's mail waits, until when, and what (if anything) to do.
fn log_pause(name: &str, p: &Pause, at: Instant, failures: u32) {
    let until = humantime::format_rfc3339_seconds(p.until_wall);
    // Whole seconds (milliseconds for the short pauses of a fast retry
    // schedule).
    let left = p.until.saturating_duration_since(at);
    let left = if left < Duration::from_secs(10) {
        Duration::from_millis(left.as_millis() as u64)
    } else {
        Duration::from_secs(left.as_secs())
    };
    let left = humantime::format_duration(left);
    let reason = p.kind.as_str();
    match p.kind {
        PauseKind::DailyLimit => tracing::warn!(
            account = %name, reason, paused_until = %until,
            "account {name} paused until {until} (for {left}): daily sending limit reached ({}); its mail waits and goes out then, nothing is bounced (`oauthrelay queue retry --all` tries earlier)",
            p.reason
        ),
        PauseKind::LoginThrottled => tracing::warn!(
            account = %name, reason, paused_until = %until,
            "account {name} paused until {until} (for {left}): the provider throttles logins ({}); its mail waits",
            p.reason
        ),
        PauseKind::RateLimited => tracing::warn!(
            account = %name, reason, paused_until = %until,
            "account {name} paused until {until} (for {left}): the provider asks to slow down ({}); its mail waits",
            p.reason
        ),
        PauseKind::Unreachable => tracing::warn!(
            account = %name, reason, paused_until = %until,
            "account {name} paused until {until} (for {left}, failure {failures} in a row): upstream unreachable ({}); its mail is retried then",
            p.reason
        ),
    }
}

/// The first account whose `senders` take `sender`.
pub fn route<'a>(accounts: &'a [AccountConfig], sender: &str) -> Option<&'a AccountConfig> {
    accounts.iter().find(|a| a.matches_sender(sender))
}

/// `[delivery] postmaster`, defaulting to the first account's email.
fn with_postmaster(mut cfg: DeliveryConfig, accounts: &[AccountConfig]) -> DeliveryConfig {
    if cfg
        .postmaster
        .as_deref()
        .is_none_or(|p| p.trim().is_empty())
    {
        cfg.postmaster = accounts.first().map(|a| a.email.clone());
    }
    cfg
}

fn same_delivery_settings(a: &AccountConfig, b: &AccountConfig) -> bool {
    a.email == b.email
        && a.provider == b.provider
        && a.transport == b.transport
        && a.api_url == b.api_url
        && a.effective_max_rate() == b.effective_max_rate()
        && a.smtp_host == b.smtp_host
        && a.smtp_port == b.smtp_port
        && a.smtp_tls == b.smtp_tls
        && a.ca_file == b.ca_file
        && a.rewrite_from == b.rewrite_from
        && a.envelope_from == b.envelope_from
}

impl Scheduler {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        shared: Arc<Shared>,
        accounts: Vec<AccountConfig>,
        cfg: DeliveryConfig,
        commands: mpsc::UnboundedReceiver<Command>,
        public: PublicAccounts,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Scheduler {
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let (marks_tx, marks_rx) = mpsc::unbounded_channel();
        let (probes_tx, probes_rx) = mpsc::unbounded_channel();
        // Subscribe before listing, so no commit falls in between.
        let committed = shared.spool.subscribe();
        let token_events = Some(shared.tokens.subscribe());
        let mut s = Scheduler {
            shared,
            cfg: Arc::new(with_postmaster(cfg, &accounts)),
            slots: Vec::new(),
            public,
            msgs: BTreeMap::new(),
            timers: BTreeSet::new(),
            reports_tx,
            reports_rx,
            marks_tx,
            marks_rx,
            probes_tx,
            probes_rx,
            committed,
            commands,
            token_events,
            shutdown,
            tracker,
            next_worker: 0,
        };
        s.set_accounts(accounts);
        s
    }

    pub(crate) async fn run(mut self) {
        let started = std::time::Instant::now();
        for (id, q) in self.shared.spool.list() {
            self.insert(id, &q);
        }
        let names: Vec<String> = self.slots.iter().map(|s| s.name.clone()).collect();
        for name in names {
            self.refresh_account(&name);
        }
        tracing::info!(
            messages = self.msgs.len(),
            accounts = self.slots.len(),
            "delivery started in {:.1} ms",
            started.elapsed().as_secs_f64() * 1000.0
        );
        loop {
            self.dispatch();
            self.publish();
            let wake_at = self.next_wake();
            let wake = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Wake::Stop,
                Some(r) = self.reports_rx.recv() => Wake::Report(r),
                Some(m) = self.marks_rx.recv() => Wake::Marked(m),
                Some(p) = self.probes_rx.recv() => Wake::Probed(p),
                Some(id) = self.committed.recv() => Wake::Committed(id),
                Some(c) = self.commands.recv() => Wake::Command(c),
                ev = token_event(&mut self.token_events) => Wake::Token(ev),
                _ = sleep_until(wake_at) => Wake::Timer,
            };
            match wake {
                Wake::Stop => break,
                Wake::Report(r) => self.on_report(r),
                Wake::Marked(m) => self.on_marked(m),
                Wake::Probed(p) => self.on_probed(p),
                Wake::Committed(id) => {
                    if let Some(q) = self.shared.spool.message(id) {
                        self.insert(id, &q);
                    }
                }
                Wake::Command(c) => self.on_command(c),
                Wake::Token(ev) => self.on_token_event(ev),
                Wake::Timer => self.on_timer(),
            }
        }
        // Workers see the cancellation themselves; dropping their senders
        // lets idle ones end too.
        self.slots.clear();
        tracing::info!("delivery scheduler stopped");
    }

    // ---- accounts -------------------------------------------------------

    fn set_accounts(&mut self, accounts: Vec<AccountConfig>) {
        // Every account's delivery series, at 0 from the start.
        self.shared
            .metrics
            .accounts(accounts.iter().map(|a| a.name.as_str()));
        let mut old: Vec<Slot> = std::mem::take(&mut self.slots);
        for a in accounts {
            if self.slots.iter().any(|s| s.name == a.name) {
                tracing::warn!(account = %a.name, "two [[accounts]] entries share this name; using the first");
                continue;
            }
            let mut slot = match old.iter().position(|s| s.name == a.name) {
                Some(i) => {
                    let mut s = old.swap_remove(i);
                    if !same_delivery_settings(&s.ctx.config, &a) {
                        // Workers see a new context and reconnect.
                        s.ctx = Arc::new(AccountCtx::new(a.clone()));
                    }
                    s.config = a;
                    s
                }
                None => Slot {
                    name: a.name.clone(),
                    ctx: Arc::new(AccountCtx::new(a.clone())),
                    config: a,
                    rt: Runtime::default(),
                    workers: Vec::new(),
                    idle: Vec::new(),
                    ready: VecDeque::new(),
                    queued: 0,
                    known_held: false,
                    probe: HoldProbe::default(),
                },
            };
            if let Err(e) = &slot.ctx.tls {
                tracing::error!(account = %slot.name, "{e}");
            }
            self.resize_workers(&mut slot);
            self.slots.push(slot);
        }
        // Accounts that went away: their workers end after the current job.
        drop(old);
        // What the token manager already knows.
        for i in 0..self.slots.len() {
            let name = self.slots[i].name.clone();
            let hold = self.token_hold(&name);
            let rt = &mut self.slots[i].rt;
            match hold {
                Some(h) => rt.hold = Some(h),
                None => {
                    // A reload is the operator's "try again": lift holds
                    // that came from the upstream refusing the account.
                    if rt.hold.take().is_some() {
                        rt.probing = true;
                    }
                }
            }
        }
    }

    /// The hold the token manager's state of `name` means, if any: the one
    /// source of "needs authorization".
    fn token_hold(&self, name: &str) -> Option<HoldReason> {
        match self.shared.tokens.account_status(name) {
            Some(st) => st.auth.refusal().map(|r| HoldReason::from_refusal(name, r)),
            None => Some(HoldReason::UnknownToTokenManager {
                account: name.to_string(),
            }),
        }
    }

    fn resize_workers(&mut self, slot: &mut Slot) {
        let want = slot.config.effective_concurrency(self.cfg.concurrency);
        // Growing again: workers still finishing a job stay.
        let mut active = slot.workers.iter().filter(|w| !w.retiring).count();
        for w in &mut slot.workers {
            if active >= want {
                break;
            }
            if w.retiring {
                w.retiring = false;
                active += 1;
            }
        }
        while active < want {
            let (tx, rx) = mpsc::channel(1);
            self.next_worker += 1;
            let id = self.next_worker;
            let w = Worker {
                id,
                account: slot.name.clone(),
                shared: self.shared.clone(),
                rx,
                reports: self.reports_tx.clone(),
                shutdown: self.shutdown.clone(),
            };
            self.tracker.spawn(w.run(self.cfg.clone()));
            slot.workers.push(WorkerHandle {
                id,
                tx,
                busy: false,
                retiring: false,
            });
            slot.idle.insert(0, slot.workers.len() - 1);
            active += 1;
        }
        // Shrinking: idle workers go first, the longest idle first (the
        // most recently used keep their warm connections).
        while active > want && !slot.idle.is_empty() {
            let wi = slot.idle[0];
            slot.drop_worker(wi);
            active -= 1;
        }
        // Then busy ones, after their current job (see `on_report`). Until
        // then they count against the new concurrency in `dispatch`.
        for w in slot.workers.iter_mut().rev() {
            if active <= want {
                break;
            }
            if !w.retiring {
                w.retiring = true;
                active -= 1;
            }
        }
    }

    fn slot_index(&self, name: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.name == name)
    }

    /// Release an account's hold (after authorization, a probe, retry or
    /// reload): one attempt at a time until one succeeds.
    fn release(&mut self, name: &str) {
        if let Some(i) = self.slot_index(name) {
            let rt = &mut self.slots[i].rt;
            if rt.hold.take().is_some() {
                tracing::info!(account = %name, "account released; its held mail goes out again");
            }
            rt.probing = true;
        }
        self.refresh_account(name);
    }

    /// React to a change of the account's hold.
    fn refresh_account(&mut self, name: &str) {
        let Some(i) = self.slot_index(name) else {
            return;
        };
        let held = self.slots[i].rt.hold.is_some();
        let slot = &mut self.slots[i];
        if held == slot.known_held {
            return;
        }
        slot.known_held = held;
        let running = slot.probe.running;
        slot.probe = HoldProbe {
            running,
            ..HoldProbe::default()
        };
        if held {
            self.schedule_probe(i);
        }
        let route = Route::Account(name.to_string());
        let ids: Vec<MessageId> = self
            .msgs
            .iter()
            .filter(|(_, m)| {
                m.route == route
                    && if held {
                        matches!(m.at, Where::Ready | Where::Waiting(_))
                    } else {
                        m.at == Where::Held
                    }
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.unplace(id);
            self.place(id);
        }
    }

    // ---- messages -------------------------------------------------------

    fn route_of(&self, sender: &str, account: Option<&str>) -> Route {
        match account {
            Some(a) if self.slot_index(a).is_some() => Route::Account(a.to_string()),
            Some(a) => Route::None(HoldReason::AccountNotConfigured {
                account: a.to_string(),
            }),
            None => match self.slots.iter().find(|s| s.config.matches_sender(sender)) {
                Some(s) => Route::Account(s.name.clone()),
                None => Route::None(HoldReason::NoRoute {
                    sender: sender.to_string(),
                }),
            },
        }
    }

    fn insert(&mut self, id: MessageId, q: &Queued) {
        if self.msgs.contains_key(&id) {
            return;
        }
        let state = DeliveryState::of(id, q);
        let env = &q.envelope;
        let route = self.route_of(&env.sender, state.account.as_deref());
        if let Route::Account(a) = &route
            && let Some(i) = self.slot_index(a)
        {
            self.slots[i].queued += 1;
        }
        self.msgs.insert(
            id,
            Msg {
                sender: env.sender.clone(),
                account: state.account.clone(),
                route,
                next: state.next_attempt,
                held_marked: state.hold.map(|h| h.reason),
                at: Where::Held,
                unrecorded: None,
            },
        );
        self.place(id);
    }

    fn remove(&mut self, id: MessageId) {
        self.unplace(id);
        if let Some(m) = self.msgs.remove(&id)
            && let Route::Account(a) = &m.route
            && let Some(i) = self.slot_index(a)
        {
            self.slots[i].queued = self.slots[i].queued.saturating_sub(1);
        }
    }

    /// Take the message out of its waiting place (ready entries go stale
    /// and are skipped at dispatch).
    fn unplace(&mut self, id: MessageId) {
        if let Some(m) = self.msgs.get_mut(&id) {
            if let Where::Waiting(at) = m.at {
                self.timers.remove(&(at, id));
            }
            m.at = Where::Held;
        }
    }

    /// Decide where the message waits now.
    fn place(&mut self, id: MessageId) {
        let Some(m) = self.msgs.get(&id) else {
            return;
        };
        let (want_held, slot) = match &m.route {
            Route::None(reason) => (Some(reason.clone()), None),
            Route::Account(a) => match self.slot_index(a) {
                Some(i) => (self.slots[i].rt.hold.clone(), Some(i)),
                None => (
                    Some(HoldReason::AccountNotConfigured { account: a.clone() }),
                    None,
                ),
            },
        };
        match want_held {
            Some(reason) if m.held_marked.as_ref() != Some(&reason) => self.mark(id, reason),
            Some(_) => {
                if let Some(m) = self.msgs.get_mut(&id) {
                    m.at = Where::Held;
                }
            }
            // Not held (any more): a mark in the spool copy stays until the
            // worker attempts the message, so that releasing an account
            // for a probe that fails again costs no write per message.
            None => {
                let now = self.shared.clock.now();
                let due = m.next.is_none_or(|t| t <= now);
                let Some(i) = slot else { return };
                let Some(m) = self.msgs.get_mut(&id) else {
                    return;
                };
                if due {
                    m.at = Where::Ready;
                    self.slots[i].ready.push_back(id);
                } else {
                    let at = self.shared.clock.instant_at(m.next.unwrap_or(now));
                    m.at = Where::Waiting(at);
                    self.timers.insert((at, id));
                }
            }
        }
    }

    /// Write `held` in the spool copy, in a task; the message is `Busy`
    /// meanwhile. (Clearing it is the worker's job, at the next attempt.)
    fn mark(&mut self, id: MessageId, reason: HoldReason) {
        if let Some(m) = self.msgs.get_mut(&id) {
            m.at = Where::Busy;
        }
        let spool = self.shared.spool.clone();
        let tx = self.marks_tx.clone();
        let held = reason.clone();
        let now = self.shared.clock.now();
        self.tracker.spawn(async move {
            let present = match spool.message(id) {
                None => false,
                Some(q) => {
                    let mut state = DeliveryState::of(id, &q);
                    if state.hold.as_ref().map(|h| &h.reason) == Some(&reason) {
                        let _ = tx.send(Marked {
                            id,
                            present: true,
                            held,
                        });
                        return;
                    }
                    state.hold(reason, now);
                    match spool.update(id, state.to_record()).await {
                        Ok(()) => true,
                        Err(spool::SpoolError::NotFound(_)) => false,
                        Err(e) => {
                            tracing::warn!(queue_id = %id, "cannot record the hold state: {e}");
                            true
                        }
                    }
                }
            };
            let _ = tx.send(Marked { id, present, held });
        });
    }

    fn on_marked(&mut self, m: Marked) {
        if !m.present {
            self.remove(m.id);
            return;
        }
        let Some(msg) = self.msgs.get_mut(&m.id) else {
            return;
        };
        if msg.at != Where::Busy {
            return;
        }
        msg.held_marked = Some(m.held);
        msg.at = Where::Held;
        self.place(m.id);
    }

    fn on_report(&mut self, r: Report) {
        let r = match r {
            Report::Facts { account, facts } => {
                self.account_facts(&account, &facts);
                self.refresh_account(&account);
                return;
            }
            Report::Done(done) => done,
        };
        self.on_done(r);
    }

    fn on_done(&mut self, r: Done) {
        if let Some(i) = self.slot_index(&r.account) {
            let slot = &mut self.slots[i];
            if let Some(wi) = slot.workers.iter().position(|w| w.id == r.worker) {
                slot.workers[wi].busy = false;
                if slot.workers[wi].retiring {
                    slot.drop_worker(wi);
                } else {
                    slot.idle.push(wi);
                }
            }
        }
        if let Some(m) = self.msgs.get_mut(&r.id) {
            m.unrecorded = r.unrecorded.map(|b| *b);
        }
        match r.outcome {
            Outcome::Gone | Outcome::Done => self.remove(r.id),
            Outcome::Deferred { next } => {
                if let Some(m) = self.msgs.get_mut(&r.id) {
                    m.next = Some(next);
                    m.held_marked = None;
                    m.at = Where::Held;
                }
                self.place(r.id);
            }
            Outcome::Held { reason } => {
                if let Some(m) = self.msgs.get_mut(&r.id) {
                    m.held_marked = Some(reason);
                    m.next = None;
                    m.at = Where::Held;
                }
                self.place(r.id);
            }
            Outcome::Interrupted => {
                if let Some(m) = self.msgs.get_mut(&r.id) {
                    m.at = Where::Held;
                }
                self.place(r.id);
            }
        }
        self.refresh_account(&r.account);
    }

    /// What a worker's attempt says about its account: the scheduler alone
    /// turns it into pauses and holds.
    fn account_facts(&mut self, name: &str, f: &crate::worker::Facts) {
        let Some(i) = self.slot_index(name) else {
            return;
        };
        let cfg = self.cfg.clone();
        let rt = &mut self.slots[i].rt;
        if f.connected {
            rt.connected();
        }
        if f.delivered {
            rt.delivered();
        }
        match &f.signal {
            // At the attempt's moment, with its jitter: the pause the
            // worker already counted on for the message's next attempt.
            Some(sig) => {
                let before = rt.pause.as_ref().filter(|p| p.until > f.at).map(|p| p.kind);
                rt.apply(sig, f.hold.clone(), &cfg, f.at, f.wall, f.jitter);
                // One line when the account starts a pause (several
                // workers failing together make one pause, one line).
                if let Some(p) = &rt.pause
                    && before != Some(p.kind)
                {
                    log_pause(name, p, f.at, rt.failures);
                }
            }
            None if f.connected || f.transacted => rt.recovered(),
            None => {}
        }
    }

    fn dispatch(&mut self) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let now = Instant::now();
        for slot in &mut self.slots {
            let (blocked, probing) = (slot.rt.blocked(now), slot.rt.probing);
            if blocked || slot.ready.is_empty() {
                continue;
            }
            // Busy workers that are retiring (the concurrency shrank) count
            // too: never more jobs at once than configured.
            let limit = if probing {
                1
            } else {
                slot.config.effective_concurrency(self.cfg.concurrency)
            };
            while slot.busy() < limit {
                let Some(wi) = slot.idle.pop() else { break };
                let mut picked = None;
                while let Some(id) = slot.ready.pop_front() {
                    if let Some(m) = self.msgs.get_mut(&id)
                        && m.at == Where::Ready
                        && matches!(&m.route, Route::Account(a) if *a == slot.name)
                    {
                        m.at = Where::InFlight;
                        picked = Some((id, m.unrecorded.clone()));
                        break;
                    }
                }
                let Some((id, unrecorded)) = picked else {
                    slot.idle.push(wi);
                    break;
                };
                let job = Job {
                    id,
                    ctx: slot.ctx.clone(),
                    cfg: self.cfg.clone(),
                    account: slot.rt.clone(),
                    unrecorded,
                };
                match slot.workers[wi].tx.try_send(job) {
                    Ok(()) => slot.workers[wi].busy = true,
                    Err(_) => {
                        // The worker is gone (it cannot be busy: it was idle).
                        tracing::error!(account = %slot.name, "a delivery worker stopped unexpectedly");
                        if let Some(m) = self.msgs.get_mut(&id) {
                            m.at = Where::Ready;
                        }
                        slot.ready.push_front(id);
                        break;
                    }
                }
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut at = self.timers.first().map(|(t, _)| *t);
        for slot in &self.slots {
            for t in [slot.rt.pause.as_ref().map(|p| p.until), slot.probe.at]
                .into_iter()
                .flatten()
            {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        }
        at
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        while let Some(&(at, id)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            let Some(m) = self.msgs.get_mut(&id) else {
                continue;
            };
            if m.at != Where::Waiting(at) {
                continue;
            }
            m.at = Where::Ready;
            if let Route::Account(a) = &m.route
                && let Some(i) = self.slots.iter().position(|s| &s.name == a)
            {
                self.slots[i].ready.push_back(id);
            }
        }
        let mut probes = Vec::new();
        for slot in &mut self.slots {
            let rt = &mut slot.rt;
            if let Some(p) = rt.pause.take_if(|p| p.until <= now) {
                tracing::info!(account = %slot.name, reason = p.kind.as_str(), "account {}: pause over ({}); trying one message", slot.name, p.kind.as_str());
                rt.probing = true;
            }
            if slot.probe.at.is_some_and(|t| t <= now) {
                slot.probe.at = None;
                probes.push(slot.name.clone());
            }
        }
        for name in probes {
            self.probe(&name);
        }
    }

    // ---- hold probes ----------------------------------------------------

    /// The token manager's refusal of `name`, if any.
    fn refusal(&self, name: &str) -> Option<oauth::Refusal> {
        self.shared
            .tokens
            .account_status(name)
            .and_then(|s| s.auth.refusal().cloned())
    }

    /// Plan slot `i`'s next hold probe (if a probe may lift its hold): at
    /// the token manager's own retry time for an OAuth refusal it re-asks
    /// by itself, else on the probe schedule.
    fn schedule_probe(&mut self, i: usize) {
        let name = self.slots[i].name.clone();
        let refusal = self.refusal(&name);
        let slot = &mut self.slots[i];
        let Some(hold) = &slot.rt.hold else {
            return;
        };
        if slot.probe.running || hold.lifter(refusal.as_ref()) == Lifter::Person {
            slot.probe.at = None;
            return;
        }
        let now = Instant::now();
        let at = match refusal.and_then(|r| r.retry_at) {
            Some(t) => self.shared.clock.instant_at(t),
            None => now + probe_wait(slot.probe.n + 1),
        };
        slot.probe.at = Some(at);
        let wait = Duration::from_secs(at.saturating_duration_since(now).as_secs());
        tracing::info!(
            account = %name,
            "account {name} held: probing its login in {} ({hold})",
            humantime::format_duration(wait)
        );
    }

    /// Probe a held account now (its schedule, or `queue retry`): a fresh
    /// token and AUTH through a transport of its own; the answer comes back
    /// as [`Wake::Probed`]. A hold only a person can lift is not probed:
    /// the log says what lifts it.
    fn probe(&mut self, name: &str) {
        let Some(i) = self.slot_index(name) else {
            return;
        };
        let refusal = self.refusal(name);
        let slot = &mut self.slots[i];
        let Some(hold) = slot.rt.hold.clone() else {
            return;
        };
        if slot.probe.running {
            return;
        }
        if hold.lifter(refusal.as_ref()) == Lifter::Person {
            tracing::warn!(
                account = %name,
                "account {name} held: not probing, only a person can fix this: {hold}"
            );
            return;
        }
        slot.probe.at = None;
        slot.probe.n = slot.probe.n.saturating_add(1);
        slot.probe.running = true;
        tracing::info!(
            account = %name,
            probe = slot.probe.n,
            "account {name} held: probing its login (fresh access token, AUTH; nothing is sent)"
        );
        let ctx = slot.ctx.clone();
        let mut transport = self.shared.transport(&ctx, &self.cfg);
        let tx = self.probes_tx.clone();
        let shutdown = self.shutdown.clone();
        let account = name.to_string();
        self.tracker.spawn(async move {
            let report = tokio::select! {
                r = transport.probe() => r,
                _ = shutdown.cancelled() => return,
            };
            // The channel the probe opened is not kept: the released mail
            // goes through the workers' own.
            transport.close().await;
            let _ = tx.send(Probed { account, report });
        });
    }

    fn on_probed(&mut self, p: Probed) {
        let name = p.account;
        let Some(i) = self.slot_index(&name) else {
            return;
        };
        self.slots[i].probe.running = false;
        let steps = p.report.steps.join("; ");
        match p.report.failed {
            None => {
                tracing::info!(
                    account = %name,
                    "account {name}: hold probe worked ({steps}); releasing its mail"
                );
                self.release(&name);
            }
            Some(signal) => {
                if signal.holds() {
                    let hold = HoldReason::after(&self.shared.tokens, &name, &signal);
                    if self.slots[i].rt.hold.is_some() {
                        self.slots[i].rt.hold = Some(hold);
                    }
                }
                let held = self.slots[i].rt.hold.is_some();
                tracing::warn!(
                    account = %name,
                    "account {name}: hold probe failed: {signal} (tried: {steps}); {}",
                    if held {
                        "its mail stays held"
                    } else {
                        "the hold was lifted meanwhile"
                    }
                );
                if held {
                    self.schedule_probe(i);
                }
            }
        }
    }

    fn make_due(&mut self, id: MessageId) -> bool {
        let Some(m) = self.msgs.get_mut(&id) else {
            return false;
        };
        m.next = None;
        if let Where::Waiting(at) = m.at {
            self.timers.remove(&(at, id));
            m.at = Where::Ready;
            if let Route::Account(a) = &m.route
                && let Some(i) = self.slots.iter().position(|s| &s.name == a)
            {
                self.slots[i].ready.push_back(id);
            }
        }
        true
    }

    /// An operator asked to try now: lift the account's pause; probe its
    /// hold at once.
    fn lift(&mut self, name: &str) {
        let Some(i) = self.slot_index(name) else {
            return;
        };
        let rt = &mut self.slots[i].rt;
        if rt.pause.take().is_some() {
            rt.probing = true;
        }
        if rt.hold.is_some() {
            self.probe(name);
        }
    }

    fn on_command(&mut self, c: Command) {
        match c {
            Command::Ping { reply } => {
                let _ = reply.send(());
            }
            Command::TokensReloaded => {
                let held: Vec<String> = self
                    .slots
                    .iter()
                    .filter(|s| s.rt.hold.is_some())
                    .map(|s| s.name.clone())
                    .collect();
                for name in held {
                    if self.token_hold(&name).is_some() {
                        continue;
                    }
                    // Held only because the token manager had not loaded
                    // the account yet: nothing for the log.
                    if let Some(i) = self.slot_index(&name)
                        && matches!(
                            self.slots[i].rt.hold,
                            Some(HoldReason::UnknownToTokenManager { .. })
                        )
                    {
                        self.slots[i].rt.hold = None;
                    }
                    self.release(&name);
                }
            }
            Command::Retry {
                id: Some(id),
                reply,
            } => {
                let route = self.msgs.get(&id).map(|m| m.route.clone());
                let n = usize::from(self.make_due(id));
                if let Some(Route::Account(a)) = route {
                    self.lift(&a);
                }
                let _ = reply.send(n);
            }
            Command::Retry { id: None, reply } => {
                let ids: Vec<MessageId> = self
                    .msgs
                    .iter()
                    .filter(|(_, m)| matches!(m.at, Where::Waiting(_) | Where::Held))
                    .map(|(id, _)| *id)
                    .collect();
                let mut n = 0;
                for id in ids {
                    n += usize::from(self.make_due(id));
                }
                let names: Vec<String> = self.slots.iter().map(|s| s.name.clone()).collect();
                for name in names {
                    self.lift(&name);
                }
                let _ = reply.send(n);
            }
            Command::Reload { accounts, config } => {
                self.cfg = Arc::new(with_postmaster(*config, &accounts));
                self.set_accounts(accounts);
                for s in &mut self.slots {
                    s.ready.clear();
                    s.queued = 0;
                    s.known_held = false;
                    s.probe.at = None;
                }
                self.timers.clear();
                let ids: Vec<MessageId> = self.msgs.keys().copied().collect();
                for id in ids {
                    let Some(m) = self.msgs.get(&id) else {
                        continue;
                    };
                    let route = self.route_of(&m.sender, m.account.as_deref());
                    if let Route::Account(a) = &route
                        && let Some(i) = self.slot_index(a)
                    {
                        self.slots[i].queued += 1;
                    }
                    let in_use = matches!(m.at, Where::InFlight | Where::Busy);
                    if let Some(m) = self.msgs.get_mut(&id) {
                        m.route = route;
                        if !in_use {
                            m.at = Where::Held;
                        }
                    }
                    if !in_use {
                        self.place(id);
                    }
                }
                let names: Vec<String> = self.slots.iter().map(|s| s.name.clone()).collect();
                for name in names {
                    self.refresh_account(&name);
                }
                tracing::info!(accounts = self.slots.len(), "delivery settings reloaded");
            }
        }
    }

    fn on_token_event(&mut self, ev: Result<AccountEvent, broadcast::error::RecvError>) {
        match ev {
            Ok(AccountEvent::Authorized(name)) => self.release(&name),
            Ok(AccountEvent::NeedsAuthorization(name)) => {
                // The token manager's words, the same a worker records for
                // a held attempt.
                if let Some(hold) = self.token_hold(&name)
                    && let Some(i) = self.slot_index(&name)
                {
                    self.slots[i].rt.hold = Some(hold);
                }
                self.refresh_account(&name);
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Missed events: ask for the current state.
                let names: Vec<String> = self.slots.iter().map(|s| s.name.clone()).collect();
                for name in names {
                    let authorized = self
                        .shared
                        .tokens
                        .account_status(&name)
                        .is_some_and(|s| s.auth.is_authorized());
                    if authorized {
                        self.release(&name);
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => self.token_events = None,
        }
    }

    /// The view `account_states()` reads.
    fn publish(&self) {
        let now = Instant::now();
        let view: Vec<AccountState> = self
            .slots
            .iter()
            .map(|slot| {
                let pause = slot.rt.pause.as_ref().filter(|p| p.until > now);
                AccountState {
                    name: slot.name.clone(),
                    email: slot.config.email.clone(),
                    paused_until: pause.map(|p| p.until_wall),
                    pause_kind: pause.map(|p| p.kind),
                    pause_reason: pause.map(|p| p.reason.clone()),
                    held: slot.rt.hold.clone(),
                    queued: slot.queued,
                    in_flight: slot.busy(),
                }
            })
            .collect();
        *self.public.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }
}
