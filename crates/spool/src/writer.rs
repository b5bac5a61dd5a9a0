//! The group-commit writer: one thread owns the active segment and appends
//! every record that was queued while it was busy with one vectored write;
//! the sync thread (`sync.rs`) makes the batches durable with one
//! `fdatasync` per round and only then answers the callers. The writer
//! never waits for a sync, except to switch to a new file layout it must
//! be sure of (compaction, giving an emptied segment back, a failure, the
//! stop).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::{debug, error, info, warn};

use crate::batch::{Batch, Mark};
use crate::envelope::{DeliveryRecord, Envelope, Reserve};
use crate::error::SpoolError;
use crate::housekeeper::Housekeeper;
use crate::index::Entry;
use crate::record::{self, Extent, Kind};
use crate::segment;
use crate::space::Room;
pub(crate) use crate::sync::Reply;
use crate::sync::{Done, Job, Syncer};
use crate::{MessageId, Shared};

/// Largest batch the writer takes before writing (bytes of payload).
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Once this many segment files exist, the oldest one's survivors are copied
/// forward so the file can be deleted.
const COMPACT_AT_SEGMENTS: usize = 4;

/// Once this much has been appended to the active segment since the last
/// time, the kernel is asked to start writing it to the disk
/// ([`Writer::start_writeback`]).
const WRITEBACK_STEP: u64 = 256 << 10;

/// While space is short, an emptied active segment at least this large is
/// sealed so it can be deleted when older segments still exist (when it is
/// the only one it is cut back at any size).
const SEAL_EMPTIED_AT: u64 = 256 << 10;

pub(crate) enum Op {
    /// A piece of a body still being received. Not acknowledged.
    Chunk {
        id: u64,
        data: Vec<u8>,
        reserve: Reserve,
        /// The message's and the shared in-flight budget, released once
        /// the bytes are written.
        permits: [OwnedSemaphorePermit; 2],
    },
    /// The last piece plus the envelope: make the message exist.
    Commit {
        id: u64,
        envelope: Arc<Envelope>,
        delivery: DeliveryRecord,
        tail: Vec<u8>,
        reserve: Reserve,
        reply: Reply,
    },
    /// Forget an unfinished message.
    Abort {
        id: u64,
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
    /// Durability barrier.
    Sync {
        reply: Reply,
    },
    /// Sync and stop.
    Stop {
        reply: Reply,
    },
    /// Answered as soon as the writer takes it (liveness).
    Ping {
        reply: Reply,
    },
    /// From the sync thread: removals were published or a segment sealed,
    /// so a segment may have nothing left in it.
    Reclaim,
}

impl Op {
    /// New mail: the records of a message being received that may not use
    /// the reserve. Everything else (updates, removals, bounces) is the
    /// spool's own bookkeeping and goes first in a batch, so that a batch
    /// that does not fit can still write it.
    fn is_inbound(&self) -> bool {
        matches!(
            self,
            Op::Chunk {
                reserve: Reserve::Respect,
                ..
            } | Op::Commit {
                reserve: Reserve::Respect,
                ..
            } | Op::Abort { .. }
        )
    }

    fn bytes(&self) -> usize {
        match self {
            Op::Chunk { data, .. } => data.len(),
            Op::Commit { tail, delivery, .. } => tail.len() + delivery.data.len() + 512,
            Op::Update { delivery, .. } => delivery.data.len() + 64,
            _ => 256,
        }
    }
}

/// A message being received.
#[derive(Default)]
struct Open {
    extents: Vec<Extent>,
    size: u64,
    failed: Option<SpoolError>,
}

pub(crate) struct Active {
    pub no: u64,
    pub file: Arc<File>,
    pub len: u64,
    /// CRC seed from the segment's salt.
    pub seed: u32,
    /// Length covered by the last successful `fdatasync` the writer knows
    /// of (brought up to date by [`Writer::drain`]).
    pub synced: u64,
    /// `Commit` records written to this segment (for its seal).
    pub commits: u32,
    /// Of those, the ones up to `synced`.
    pub synced_commits: u32,
    /// Where the writeback the writer asked for ends
    /// ([`Writer::start_writeback`]).
    pub written_back: u64,
}

impl Active {
    pub(crate) fn new(no: u64, file: File, seed: u32) -> Active {
        Active {
            no,
            file: Arc::new(file),
            len: segment::FILE_HEADER_LEN,
            seed,
            synced: segment::FILE_HEADER_LEN,
            commits: 0,
            synced_commits: 0,
            written_back: segment::FILE_HEADER_LEN,
        }
    }
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    active: Active,
    segment_size: u64,
    open: HashMap<u64, Open>,
    batch: Batch,
    /// Sizes of the segment files other than the active one.
    sealed: BTreeMap<u64, u64>,
    /// Stopped (and waited for) when the writer ends, before the lock is
    /// released.
    syncer: Syncer,
    /// Deletes dead segments and starts writeback; stopped (its queue
    /// finished) when the writer ends, before the lock is released.
    keeper: Housekeeper,
    /// The spool's lock file, held while this thread runs.
    _lock: File,
}

impl Writer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        active: Active,
        segment_size: u64,
        lock: File,
        syncer: Syncer,
        keeper: Housekeeper,
    ) -> Writer {
        Writer {
            shared,
            active,
            segment_size,
            open: HashMap::new(),
            batch: Batch::default(),
            sealed: BTreeMap::new(),
            syncer,
            keeper,
            _lock: lock,
        }
    }

    pub(crate) fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let files: Vec<u64> = self.shared.lock_index().files.iter().copied().collect();
        for no in files.into_iter().filter(|&no| no != self.active.no) {
            let size = std::fs::metadata(segment::path(&self.shared.dir, no))
                .map(|m| m.len())
                .unwrap_or(0);
            self.sealed.insert(no, size);
        }
        self.reclaim();
        self.keeper.prepare_segment(self.active.no + 1);
        let mut batch = Vec::new();
        while let Some(op) = rx.blocking_recv() {
            let mut bytes = op.bytes();
            batch.push(op);
            while bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(op) => {
                        bytes += op.bytes();
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            if let Some(reply) = self.process(&mut batch) {
                let r = match self.drain() {
                    Some(e) => Err(e),
                    None => self.active.file.sync_data().map_err(SpoolError::io),
                };
                // A clean stop: the segment's length and commits are final.
                let r = r.and_then(|()| {
                    segment::seal(&self.active.file, self.active.len, self.active.commits)
                        .map_err(SpoolError::io)
                });
                // Stop the sync thread and release the lock before
                // answering, so whoever waited for the close can open the
                // spool at once.
                drop(self);
                let _ = reply.send(r);
                debug!("spool writer stopped");
                return;
            }
            if self.syncer.has_failed() {
                self.abandon_segment();
            }
            if self.active.len >= self.segment_size {
                self.rotate(true);
            }
            self.reclaim();
            self.give_back_active();
        }
        debug!("spool writer stopped");
    }

    /// Write one batch and hand what waits for it to the sync thread.
    /// Returns the reply of a `Stop` if one came.
    fn process(&mut self, ops: &mut Vec<Op>) -> Option<Reply> {
        let base = self.active.len;
        let seg = self.active.no;
        self.batch.clear();
        let mut done: Vec<Done> = Vec::new();
        let mut touched: BTreeSet<u64> = BTreeSet::new();
        let mut stop = None;
        // Bookkeeping first (stable: each message's records keep their
        // order), new mail after it, so a batch that does not fit can be
        // cut back to the bookkeeping.
        ops.sort_by_key(Op::is_inbound);
        let mut split: Option<(Mark, usize)> = None;
        let mut inbound_touched: BTreeSet<u64> = BTreeSet::new();
        // Lowest segment the batch's commits have pieces in.
        let mut pins = seg;
        // New mail may not use the reserve; the file system is asked once,
        // at the batch's first inbound record.
        let mut room = Room::Unchecked;
        let check = |shared: &Shared| match shared.room_for_mail() {
            Some(left) => {
                shared.room_again(left);
                Room::Left(left)
            }
            None => Room::Unlimited,
        };

        for op in ops.drain(..) {
            if split.is_none() && op.is_inbound() {
                split = Some((self.batch.mark(), done.len()));
            }
            let inbound = split.is_some();
            match op {
                Op::Chunk {
                    id,
                    data,
                    reserve,
                    permits,
                } => {
                    let open = self.open.entry(id).or_default();
                    if open.failed.is_some() {
                        continue;
                    }
                    let id_bytes = record::id_bytes(id);
                    let n = Batch::record_len(&[&id_bytes], &data);
                    if reserve == Reserve::Respect && !room.take(n, || check(&self.shared)) {
                        open.failed = Some(SpoolError::DiskFull);
                        self.shared.hit_reserve();
                        continue;
                    }
                    let len = data.len() as u32;
                    let p = self
                        .batch
                        .record(self.active.seed, Kind::Data, &[&id_bytes], data);
                    self.batch.hold_permits(permits);
                    open.extents.push(Extent {
                        seg,
                        off: base + p as u64 + 8,
                        len,
                    });
                    open.size += u64::from(len);
                    if inbound {
                        inbound_touched.insert(id);
                    } else {
                        touched.insert(id);
                    }
                }
                Op::Abort { id } => {
                    self.open.remove(&id);
                }
                Op::Commit {
                    id,
                    envelope,
                    delivery,
                    tail,
                    reserve,
                    reply,
                } => {
                    let open = self.open.remove(&id).unwrap_or_default();
                    if let Some(e) = open.failed {
                        let _ = reply.send(Err(e));
                        continue;
                    }
                    let mut extents = open.extents;
                    let env = record::encode_envelope(&envelope);
                    let head = record::commit_head(id, &env, &delivery, &extents);
                    if head.len() + tail.len() > record::MAX_PAYLOAD {
                        // Recovery would refuse a record this large: refuse
                        // it now, while the client can still be told.
                        let _ = reply.send(Err(SpoolError::EnvelopeTooLarge));
                        continue;
                    }
                    // The caller says whether the message may use the
                    // reserve (a bounce: the message it reports on can only
                    // be removed once the bounce is queued).
                    let n = Batch::record_len(&[&head], &tail);
                    if reserve == Reserve::Respect && !room.take(n, || check(&self.shared)) {
                        // Health says so before the caller hears of it.
                        self.shared.hit_reserve();
                        let _ = reply.send(Err(SpoolError::DiskFull));
                        continue;
                    }
                    let tail_len = tail.len() as u32;
                    let p = self
                        .batch
                        .record(self.active.seed, Kind::Commit, &[&head], tail);
                    if tail_len > 0 {
                        extents.push(Extent {
                            seg,
                            off: base + (p + head.len()) as u64,
                            len: tail_len,
                        });
                    }
                    pins = extents.iter().map(|e| e.seg).fold(pins, u64::min);
                    done.push(Done::Commit {
                        id: MessageId::from_u64(id),
                        entry: Box::new(Entry {
                            envelope,
                            delivery,
                            extents,
                            commit_seg: seg,
                        }),
                        reserve,
                        reply,
                    });
                }
                Op::Update {
                    id,
                    delivery,
                    reply,
                } => {
                    if !self.shared.contains(id) {
                        let _ = reply.send(Err(SpoolError::NotFound(id)));
                        continue;
                    }
                    let payload = record::update_payload(id.as_u64(), &delivery);
                    if payload.len() > record::MAX_PAYLOAD {
                        let _ = reply.send(Err(SpoolError::EnvelopeTooLarge));
                        continue;
                    }
                    self.batch
                        .record(self.active.seed, Kind::Update, &[], payload);
                    done.push(Done::Update {
                        id,
                        delivery,
                        reply,
                    });
                }
                Op::Remove { id, reply } => {
                    if !self.shared.contains(id) {
                        let _ = reply.send(Err(SpoolError::NotFound(id)));
                        continue;
                    }
                    self.batch.record(
                        self.active.seed,
                        Kind::Remove,
                        &[&record::id_bytes(id.as_u64())],
                        Vec::new(),
                    );
                    done.push(Done::Remove { id, reply });
                }
                Op::Sync { reply } => {
                    // Everything before it is done when it is answered,
                    // deletions of dead segments included.
                    self.keeper.wait();
                    done.push(Done::Sync { reply });
                }
                Op::Stop { reply } => stop = Some(reply),
                Op::Ping { reply } => {
                    let _ = reply.send(Ok(()));
                }
                Op::Reclaim => {}
            }
        }

        if !self.batch.is_empty() {
            let mut written = self.batch.len();
            if let Err(e) = self.batch.write_at(&self.active.file, base, None) {
                let err = SpoolError::io(e);
                self.report(&err);
                // Leave no partial record behind: cut the file back.
                if let Err(t) = self.active.file.set_len(base) {
                    warn!(error = %t, file = %segment::path(&self.shared.dir, seg).display(), "cannot truncate spool segment after a failed write; continuing in a new segment");
                    touched.extend(inbound_touched);
                    self.fail_batch(&err, touched, done);
                    self.batch.clear();
                    self.abandon_segment();
                    return stop;
                }
                // New mail did not fit: the bookkeeping before it (removals
                // that free space, delivery results, bounces) may still.
                let (at, n) = split.unwrap_or((self.batch.mark(), done.len()));
                let retried = err.is_disk_full()
                    && at.len() > 0
                    && at.len() < self.batch.len()
                    && self
                        .batch
                        .write_at(&self.active.file, base, Some(at))
                        .is_ok();
                if !retried {
                    self.batch.clear();
                    self.cut_back(base);
                    touched.extend(inbound_touched);
                    self.fail_batch(&err, touched, done);
                    return stop;
                }
                self.fail_open_past(base + at.len() as u64);
                let refused = done.split_off(n);
                self.fail_batch(&err, inbound_touched, refused);
                written = at.len();
            }
            self.active.len = base + written as u64;
            self.start_writeback();
        }
        // Written: the chunks and their share of the in-flight budget go
        // back before the sync.
        self.batch.clear();

        if !done.is_empty() {
            let commits = done
                .iter()
                .filter(|d| matches!(d, Done::Commit { .. }))
                .count();
            self.active.commits = self.active.commits.saturating_add(commits as u32);
            self.syncer.push(Job {
                file: self.active.file.clone(),
                seg,
                end: self.active.len,
                commits: self.active.commits,
                seal: false,
                pins,
                failures: self.shared.write_failures(),
                done,
            });
        }
        stop
    }

    /// Start writing what was appended since the last call out to the disk
    /// once there is [`WRITEBACK_STEP`] of it (whole pages only: the last
    /// one is still being appended to). A big message's bytes are then
    /// mostly on their way by the time it commits, and the `fdatasync` that
    /// acknowledges it has only the rest to wait for; without this it would
    /// write everything since the previous sync itself, and the commits
    /// behind it would wait for all of that (Linux writes dirty pages back
    /// on its own only after 30 s). Costs no extra disk writes: every byte
    /// is synced when its message commits. The housekeeper thread makes the
    /// call: it can wait for the disk's queue.
    fn start_writeback(&mut self) {
        const PAGE: u64 = 4096;
        let from = self.active.written_back;
        let to = self.active.len & !(PAGE - 1);
        if to >= from.saturating_add(WRITEBACK_STEP) {
            self.keeper.writeback(&self.active.file, from, to - from);
            self.active.written_back = to;
        }
    }

    /// Wait until the sync thread has made everything written so far
    /// durable and answered it, and learn how far the active segment is
    /// synced. A failed sync is returned (and cleared once the caller has
    /// abandoned the segment): every unfinished message fails with it, as
    /// its pieces may be in the tail that was lost.
    fn drain(&mut self) -> Option<SpoolError> {
        let d = self.syncer.drain();
        if let Some((seg, len, commits)) = d.synced
            && seg == self.active.no
        {
            self.active.synced = len;
            self.active.synced_commits = commits;
        }
        if let Some(e) = &d.failed {
            for o in self.open.values_mut() {
                o.failed.get_or_insert_with(|| e.clone());
            }
        }
        d.failed
    }

    /// Fail a batch's waiting callers and the unfinished messages it
    /// carried pieces of.
    fn fail_batch(&mut self, err: &SpoolError, touched: BTreeSet<u64>, done: Vec<Done>) {
        for id in touched {
            if let Some(o) = self.open.get_mut(&id) {
                o.failed = Some(err.clone());
            }
        }
        for d in done {
            d.fail(err);
        }
    }

    /// Cut the active segment back to `len` after a failed append, so no
    /// partial record stays behind, and fail the unfinished messages with
    /// pieces past it. If even that fails the segment is given up.
    /// Returns whether writing goes on in the same segment.
    fn cut_back(&mut self, len: u64) -> bool {
        match self.active.file.set_len(len) {
            Ok(()) => {
                self.active.len = len;
                self.active.written_back = self.active.written_back.min(len);
                self.fail_open_past(len);
                true
            }
            Err(t) => {
                warn!(error = %t, file = %segment::path(&self.shared.dir, self.active.no).display(), "cannot truncate spool segment after a failed write; continuing in a new segment");
                self.abandon_segment();
                false
            }
        }
    }

    /// Unfinished messages with a piece in the active segment at or past
    /// `len` fail (their pieces are gone or cannot be trusted).
    fn fail_open_past(&mut self, len: u64) {
        let seg = self.active.no;
        let err = SpoolError::Io(Arc::new(io::Error::other(
            "spool segment cut back after a write or sync failure",
        )));
        for o in self.open.values_mut() {
            if o.extents.iter().any(|e| e.seg == seg && e.off >= len) {
                o.failed.get_or_insert_with(|| err.clone());
            }
        }
    }

    /// Whether the active segment holds nothing anyone needs: no live
    /// message and no piece of a message still arriving.
    fn active_is_dead(&self) -> bool {
        let no = self.active.no;
        let live = self
            .shared
            .lock_index()
            .segments
            .get(&no)
            .copied()
            .unwrap_or(0);
        live == 0
            && !self
                .open
                .values()
                .any(|o| o.extents.iter().any(|e| e.seg == no))
    }

    /// While space is short, an active segment whose messages are all gone
    /// is given back at once instead of waiting to fill up to
    /// `segment_size` (which it cannot: the file system is full). On a
    /// small file system the whole queue may live in the active segment.
    /// When it is the only segment left, it is cut back to its header in
    /// place (no new file needed, so this works on a file system with not a
    /// byte free); otherwise it is sealed so it can be deleted after the
    /// older ones, whose removals it may record.
    fn give_back_active(&mut self) {
        if self.active.len <= segment::FILE_HEADER_LEN
            || !self.active_is_dead()
            || !self.shared.short_of_space(self.active.len)
        {
            return;
        }
        let only = {
            let index = self.shared.lock_index();
            index.files.len() == 1 && index.files.contains(&self.active.no)
        };
        if !only && self.active.len < SEAL_EMPTIED_AT {
            // Little to give back: not worth a new file per batch while
            // an old segment is pinned by long-deferred mail.
            return;
        }
        // Commits still waiting for their sync are not in the index yet:
        // wait for them before judging the segment dead.
        if self.drain().is_some() {
            self.abandon_segment();
            return;
        }
        if self.active.len <= segment::FILE_HEADER_LEN || !self.active_is_dead() {
            return;
        }
        if !only {
            self.rotate(true);
            // The finished segment can be deleted once it is sealed.
            if self.drain().is_some() {
                self.abandon_segment();
                return;
            }
            self.reclaim();
            if self.active.len <= segment::FILE_HEADER_LEN || !self.active_is_dead() {
                return;
            }
            let index = self.shared.lock_index();
            if index.files.len() != 1 {
                return;
            }
        }
        let freed = self.active.len - segment::FILE_HEADER_LEN;
        let file = segment::path(&self.shared.dir, self.active.no);
        let r = segment::unseal(&self.active.file)
            .and_then(|()| self.active.file.set_len(segment::FILE_HEADER_LEN))
            .and_then(|()| self.active.file.sync_data());
        match r {
            Ok(()) => {
                self.active.len = segment::FILE_HEADER_LEN;
                self.active.written_back = segment::FILE_HEADER_LEN;
                self.active.synced = segment::FILE_HEADER_LEN;
                self.active.commits = 0;
                self.active.synced_commits = 0;
                info!(file = %file.display(), bytes = freed, "spool segment held only delivered mail: cut back to give the space back");
                if let Some(room) = self.shared.room_for_mail() {
                    self.shared.room_again(room);
                }
                if self.shared.write_failed_full() {
                    self.shared.set_healthy();
                }
            }
            Err(e) => {
                warn!(file = %file.display(), error = %e, "cannot cut back an emptied spool segment");
            }
        }
    }

    fn report(&self, err: &SpoolError) {
        error!(error = %err, file = %segment::path(&self.shared.dir, self.active.no).display(), "spool write failed; clients get a temporary error until it works again");
        self.shared.set_unhealthy(err);
    }

    /// Continue in a new segment. With `seal`, the finished one is handed
    /// to the sync thread, which syncs and seals it before it answers
    /// anything written after it (so the writer does not wait); without,
    /// it is abandoned (its tail is unknown) and never sealed.
    fn rotate(&mut self, seal: bool) {
        match self.keeper.take_segment(self.active.no + 1) {
            Ok((file, seed)) => {
                debug!(segment = self.active.no + 1, "spool segment started");
                if seal {
                    self.syncer.push(Job {
                        file: self.active.file.clone(),
                        seg: self.active.no,
                        end: self.active.len,
                        commits: self.active.commits,
                        seal: true,
                        pins: self.active.no,
                        failures: self.shared.write_failures(),
                        done: Vec::new(),
                    });
                }
                self.sealed.insert(self.active.no, self.active.len);
                self.shared.lock_index().files.insert(self.active.no + 1);
                self.active = Active::new(self.active.no + 1, file, seed);
                self.keeper.prepare_segment(self.active.no + 1);
            }
            Err(e) => {
                let err = SpoolError::io(e);
                self.report(&err);
            }
        }
    }

    /// Give up on the active segment after a failure that leaves its tail
    /// unknown (a failed write that cannot be cut back, a failed sync):
    /// unfinished messages with pieces in it fail, and writing goes on in
    /// a fresh segment. Waits for the sync thread first: whatever it was
    /// still syncing is answered (or failed) before the tail is dropped.
    fn abandon_segment(&mut self) {
        let seg = self.active.no;
        let failed = self.drain();
        let err = SpoolError::Io(Arc::new(io::Error::other(
            "spool segment abandoned after a write or sync failure",
        )));
        for o in self.open.values_mut() {
            if o.extents.iter().any(|e| e.seg == seg) {
                o.failed.get_or_insert_with(|| err.clone());
            }
        }
        self.rotate(false);
        if self.active.no == seg {
            // No new segment (the file system is full): go on in this one
            // from the last length a sync covered, dropping the unknown
            // tail, so bookkeeping can go on and space come back.
            let synced = self.active.synced;
            match self.active.file.set_len(synced) {
                Ok(()) => {
                    self.active.len = synced;
                    self.active.written_back = self.active.written_back.min(synced);
                    self.active.commits = self.active.synced_commits;
                }
                Err(e) => {
                    warn!(file = %segment::path(&self.shared.dir, seg).display(), error = %e, "cannot cut back a spool segment after a failure");
                }
            }
        }
        if failed.is_some() {
            // What failed is behind us: later batches are synced again.
            self.syncer.clear_failure();
        }
    }

    /// Delete segments nobody needs, oldest first; once enough segments
    /// have piled up, copy the few survivors out of the oldest one so it can
    /// go too (at most one segment's worth of copying per call).
    fn reclaim(&mut self) {
        let mut compacted = false;
        loop {
            let (oldest, count) = {
                let index = self.shared.lock_index();
                let oldest = match index.files.first().copied() {
                    Some(s) if s != self.active.no => {
                        let pinned_by_open = self
                            .open
                            .values()
                            .any(|o| o.extents.iter().any(|e| e.seg == s));
                        let live = index.segments.get(&s).copied().unwrap_or(0);
                        Some((s, live, pinned_by_open))
                    }
                    _ => None,
                };
                (oldest, index.files.len())
            };
            let Some((seg, live, pinned_by_open)) = oldest else {
                return;
            };
            // Commits still waiting for their sync are not in the index
            // yet: the segments they point into stay.
            if pinned_by_open || self.syncer.pinned_from().is_some_and(|p| p <= seg) {
                return;
            }
            if live > 0 {
                if compacted || count < COMPACT_AT_SEGMENTS || !self.worth_compacting() {
                    return;
                }
                compacted = true;
                if !self.compact(seg) {
                    return;
                }
                continue;
            }
            {
                let mut index = self.shared.lock_index();
                index.segments.remove(&seg);
                index.files.remove(&seg);
                self.shared.forget_segment(seg);
            }
            self.sealed.remove(&seg);
            // Off this thread, in order (housekeeper.rs).
            self.keeper.delete(seg);
        }
    }

    /// Copying pays off when most of the disk the spool uses is garbage
    /// kept only because an older segment still holds a few long-deferred
    /// messages. When most of it is live (a long outage), copying would gain
    /// nothing, and it is not done. Both sides are kept up to date, so the
    /// check costs nothing per batch.
    fn worth_compacting(&self) -> bool {
        let on_disk: u64 = self.sealed.values().sum::<u64>() + self.active.len;
        let live = self.shared.lock_index().live_bytes;
        on_disk > live.saturating_mul(2) + self.segment_size.saturating_mul(2)
    }

    /// Copy the live messages of `seg` into the active segment: all of them
    /// written, then one `fdatasync`, then the index points at the copies.
    /// On any failure the copies are abandoned with the segment they were
    /// written to (the originals stay valid). Returns whether `seg` is free.
    fn compact(&mut self, seg: u64) -> bool {
        // The index must be final: a removal written but not yet synced
        // would otherwise be followed by a copy of the message it removes.
        if self.drain().is_some() {
            self.abandon_segment();
            return false;
        }
        let ids = self.shared.lock_index().pinning(seg);
        info!(
            segment = seg,
            messages = ids.len(),
            "copying long-queued messages out of an old spool segment"
        );
        if self.active.len >= self.segment_size / 2 {
            self.rotate(true);
        }
        let no = self.active.no;
        let start = self.active.len;
        let mut moved = Vec::with_capacity(ids.len());
        let mut buf = Vec::new();
        for id in ids {
            let (envelope, delivery, extents) = {
                let index = self.shared.lock_index();
                match index.messages.get(&id) {
                    Some(e) => (e.envelope.clone(), e.delivery.clone(), e.extents.clone()),
                    None => continue,
                }
            };
            let mut new_extents = Vec::new();
            for x in &extents {
                let piece = match self.shared.read_extents(std::slice::from_ref(x)) {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(id = %id, error = %e, "cannot read a message to copy it forward; keeping the old segment");
                        return false;
                    }
                };
                buf.clear();
                let base = self.active.len;
                let p = record::encode(
                    &mut buf,
                    self.active.seed,
                    Kind::Data,
                    &[&record::id_bytes(id.as_u64()), &piece],
                );
                new_extents.push(Extent {
                    seg: no,
                    off: base + p as u64 + 8,
                    len: piece.len() as u32,
                });
                if !self.append_unsynced(&buf, start) {
                    return false;
                }
            }
            let env = record::encode_envelope(&envelope);
            let head = record::commit_head(id.as_u64(), &env, &delivery, &new_extents);
            buf.clear();
            record::encode(&mut buf, self.active.seed, Kind::Commit, &[&head]);
            if !self.append_unsynced(&buf, start) {
                return false;
            }
            moved.push((id, new_extents));
        }
        if let Err(e) = self.active.file.sync_data() {
            let err = SpoolError::io(e);
            self.report(&err);
            self.abandon_segment();
            return false;
        }
        self.active.synced = self.active.len;
        self.active.commits = self.active.commits.saturating_add(moved.len() as u32);
        self.active.synced_commits = self.active.commits;
        let mut index = self.shared.lock_index();
        for (id, extents) in moved {
            // Nothing was queued for the sync thread since the drain, so
            // the message is still there, with the record just copied.
            if let Some(old) = index.messages.get(&id) {
                let (envelope, delivery) = (old.envelope.clone(), old.delivery.clone());
                index.insert(
                    id,
                    Entry {
                        envelope,
                        delivery,
                        extents,
                        commit_seg: no,
                    },
                );
            }
        }
        index.segments.get(&seg).copied().unwrap_or(0) == 0
    }

    /// Append `buf` to the active segment without syncing (copies made
    /// by compaction); on failure the copies are cut off back to `start`
    /// (the originals stay valid).
    fn append_unsynced(&mut self, buf: &[u8], start: u64) -> bool {
        match self.active.file.write_all_at(buf, self.active.len) {
            Ok(()) => {
                self.active.len += buf.len() as u64;
                true
            }
            Err(e) => {
                let err = SpoolError::io(e);
                warn!(file = %segment::path(&self.shared.dir, self.active.no).display(), error = %err, "cannot copy long-queued messages forward; keeping the old segment");
                self.cut_back(start);
                false
            }
        }
    }
}
