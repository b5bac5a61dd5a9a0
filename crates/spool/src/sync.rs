//! The sync thread: makes what the writer appended durable and only then
//! answers the callers.
//!
//! The writer thread appends each batch of records (one vectored write) and
//! hands this thread a [`Job`]: the segment, the length the segment has
//! after the batch, and the operations waiting for it. This thread takes
//! every job queued so far, runs one `fdatasync` per segment they touch
//! (covering every byte written before the call), seals a segment the
//! writer has finished with, and then publishes and answers the jobs'
//! operations, in order. Meanwhile the writer goes on appending: a commit
//! never waits for a sync that started before its bytes were written, and
//! appends never wait for a sync.
//!
//! After a failed sync the state of the file's unsynced tail is unknown
//! (the kernel may have dropped the dirty pages, and a later `fdatasync`
//! can succeed without writing them), so every job waiting then, and every
//! job queued until the writer has given the segment up
//! ([`Syncer::clear_failure`]), fails.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tracing::{error, warn};

use crate::envelope::DeliveryRecord;
use crate::envelope::Reserve;
use crate::error::SpoolError;
use crate::index::Entry;
use crate::{MessageId, Shared, segment};

pub(crate) type Reply = tokio::sync::oneshot::Sender<Result<(), SpoolError>>;

/// What to do once a batch is durable.
pub(crate) enum Done {
    Commit {
        id: MessageId,
        entry: Box<Entry>,
        reserve: Reserve,
        reply: Reply,
    },
    Update {
        id: MessageId,
        delivery: DeliveryRecord,
        reply: Reply,
    },
    Remove {
        id: MessageId,
        reply: Reply,
    },
    Sync {
        reply: Reply,
    },
}

impl Done {
    pub(crate) fn fail(self, e: &SpoolError) {
        let reply = match self {
            Done::Commit { reply, .. }
            | Done::Update { reply, .. }
            | Done::Remove { reply, .. }
            | Done::Sync { reply } => reply,
        };
        let _ = reply.send(Err(e.clone()));
    }
}

/// One written batch (or a finished segment) waiting for its sync.
pub(crate) struct Job {
    pub file: Arc<File>,
    pub seg: u64,
    /// The segment's length once this batch was written.
    pub end: u64,
    /// `Commit` records in the segment up to `end`.
    pub commits: u32,
    /// Seal the segment at `end` with `commits` once it is synced: the
    /// writer has moved on to the next one.
    pub seal: bool,
    /// Lowest segment this job's messages have pieces in: it may not be
    /// deleted before the job is published.
    pub pins: u64,
    /// [`Shared::write_failures`] when the batch was written: a sync
    /// reports the spool healthy only if no write failed since.
    pub failures: u64,
    pub done: Vec<Done>,
}

/// What [`Syncer::drain`] found.
pub(crate) struct Drained {
    /// `(segment, length, commits)` covered by the last successful sync
    /// since the previous drain.
    pub synced: Option<(u64, u64, u32)>,
    /// A sync failed: every job waiting then or since failed.
    pub failed: Option<SpoolError>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Lowest segment pinned by the jobs being synced right now.
    busy: Option<u64>,
    synced: Option<(u64, u64, u32)>,
    failed: Option<SpoolError>,
    stop: bool,
}

struct Inner {
    state: Mutex<State>,
    /// Signalled when a job is queued or the thread should stop.
    work: Condvar,
    /// Signalled when a round of jobs is done.
    idle: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The writer's handle on the sync thread. Dropping it lets the thread
/// finish the jobs it has and waits for it.
pub(crate) struct Syncer {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

/// Tells the writer that a published round may have left a segment with
/// nothing in it (removals, a sealed segment).
pub(crate) type Nudge = Box<dyn Fn() + Send>;

impl Syncer {
    pub(crate) fn start(shared: Arc<Shared>, nudge: Nudge) -> std::io::Result<Syncer> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
        });
        let thread = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("spool-sync".into())
                .spawn(move || run(&inner, &shared, &nudge))?
        };
        Ok(Syncer {
            inner,
            thread: Some(thread),
        })
    }

    /// Queue a job; it fails at once while a sync failure is unresolved.
    pub(crate) fn push(&self, job: Job) {
        let mut st = self.inner.lock();
        if let Some(e) = &st.failed {
            let e = e.clone();
            drop(st);
            for d in job.done {
                d.fail(&e);
            }
            return;
        }
        st.queue.push_back(job);
        drop(st);
        self.inner.work.notify_one();
    }

    /// Whether a sync failed and the writer has not dealt with it yet.
    pub(crate) fn has_failed(&self) -> bool {
        self.inner.lock().failed.is_some()
    }

    /// The lowest segment a job not yet published has pieces in: neither
    /// it nor a later one may be deleted yet.
    pub(crate) fn pinned_from(&self) -> Option<u64> {
        let st = self.inner.lock();
        st.queue.iter().map(|j| j.pins).chain(st.busy).min()
    }

    /// Wait until every queued job is synced and answered (or failed).
    pub(crate) fn drain(&self) -> Drained {
        let mut st = self.inner.lock();
        while !st.queue.is_empty() || st.busy.is_some() {
            st = self.inner.idle.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        Drained {
            synced: st.synced.take(),
            failed: st.failed.clone(),
        }
    }

    /// The writer has given up the segment a sync failed on: jobs are
    /// synced again.
    pub(crate) fn clear_failure(&self) {
        self.inner.lock().failed = None;
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.inner.lock().stop = true;
        self.inner.work.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(inner: &Inner, shared: &Shared, nudge: &Nudge) {
    loop {
        let (jobs, failed) = {
            let mut st = inner.lock();
            while st.queue.is_empty() && !st.stop {
                st = inner.work.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.queue.is_empty() {
                return;
            }
            let jobs: Vec<Job> = st.queue.drain(..).collect();
            st.busy = jobs.iter().map(|j| j.pins).min();
            (jobs, st.failed.clone())
        };
        let result = match failed {
            Some(e) => Err(e),
            None => sync_all(shared, &jobs),
        };
        let last = jobs.last().map(|j| (j.seg, j.end, j.commits, j.failures));
        let mut freed = false;
        match &result {
            Ok(()) => {
                let ops = jobs
                    .iter()
                    .flat_map(|j| &j.done)
                    .filter(|d| !matches!(d, Done::Sync { .. }))
                    .count();
                if let Some((.., failures)) = last {
                    shared.set_healthy_unless_failed_since(failures);
                }
                if jobs.iter().any(|j| !j.done.is_empty()) {
                    shared.counted_sync(ops);
                }
                let sealed = jobs.iter().any(|j| j.seal);
                let removed = jobs
                    .iter()
                    .any(|j| j.done.iter().any(|d| matches!(d, Done::Remove { .. })));
                apply(shared, jobs.into_iter().flat_map(|j| j.done).collect());
                freed = sealed
                    || (removed && worth_reclaiming(shared, last.map_or(0, |(_, end, ..)| end)));
            }
            Err(e) => {
                for d in jobs.into_iter().flat_map(|j| j.done) {
                    d.fail(e);
                }
            }
        }
        let mut st = inner.lock();
        st.busy = None;
        match result {
            Ok(()) => {
                if let Some((seg, end, commits, _)) = last {
                    st.synced = Some((seg, end, commits));
                }
            }
            Err(e) => {
                st.failed.get_or_insert(e);
            }
        }
        drop(st);
        inner.idle.notify_all();
        if freed {
            nudge();
        }
    }
}

/// Whether removals just published may let the writer give space back:
/// the oldest segment is left without a live message, or space is short
/// (the writer then also gives back an emptied active segment of
/// `active_len` bytes). Otherwise the writer is not woken for nothing.
fn worth_reclaiming(shared: &Shared, active_len: u64) -> bool {
    {
        let index = shared.lock_index();
        let mut files = index.files.iter();
        if let (Some(oldest), Some(_)) = (files.next(), files.next())
            && index.segments.get(oldest).copied().unwrap_or(0) == 0
        {
            return true;
        }
    }
    shared.short_of_space(active_len)
}

/// One `fdatasync` per segment the jobs wrote to (in order), and the seal
/// of every segment the writer finished.
fn sync_all(shared: &Shared, jobs: &[Job]) -> Result<(), SpoolError> {
    for (i, job) in jobs.iter().enumerate() {
        let last_of_segment = jobs.get(i + 1).is_none_or(|next| next.seg != job.seg);
        if !last_of_segment && !job.seal {
            continue;
        }
        let file = segment::path(&shared.dir, job.seg);
        if let Err(e) = job.file.sync_data() {
            let err = SpoolError::io(e);
            error!(error = %err, file = %file.display(), "spool sync failed; clients get a temporary error until it works again");
            shared.set_unhealthy(&err);
            return Err(err);
        }
        // Only a segment written to its end and synced is sealed.
        if job.seal
            && let Err(e) = segment::seal(&job.file, job.end, job.commits)
        {
            warn!(file = %file.display(), error = %e, "cannot record a spool segment's final length");
        }
    }
    Ok(())
}

/// Publish durable changes and answer the callers.
fn apply(shared: &Shared, done: Vec<Done>) {
    if done.is_empty() {
        return;
    }
    let mut committed = Vec::new();
    if done.iter().any(|d| {
        matches!(
            d,
            Done::Commit {
                reserve: Reserve::Respect,
                ..
            }
        )
    }) {
        // New mail fits again: the refusal is over (it may come back
        // with the next message that does not). Said before anyone is
        // answered.
        shared.took_mail();
    }
    {
        let mut index = shared.lock_index();
        for d in &done {
            if let Done::Remove { id, .. } = d {
                index.remove(*id);
            }
        }
        for d in done {
            match d {
                Done::Commit {
                    id, entry, reply, ..
                } => {
                    index.insert(id, *entry);
                    committed.push(id);
                    let _ = reply.send(Ok(()));
                }
                Done::Update {
                    id,
                    delivery,
                    reply,
                } => {
                    if let Some(e) = index.messages.get_mut(&id) {
                        e.delivery = delivery;
                    }
                    let _ = reply.send(Ok(()));
                }
                Done::Remove { reply, .. } | Done::Sync { reply } => {
                    let _ = reply.send(Ok(()));
                }
            }
        }
    }
    if !committed.is_empty() {
        shared.notify(&committed);
    }
}
