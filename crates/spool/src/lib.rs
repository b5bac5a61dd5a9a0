//! oauthrelay's durable mail queue.
//!
//! Messages live in append-only segment files with group commit: a
//! [`MessageWriter::commit`] returns only once the message's bytes and
//! envelope are on stable storage, and one `fdatasync` covers every message
//! that finished meanwhile. See `docs/design.md` for the layout and why.
//!
//! ```no_run
//! # async fn demo() -> Result<(), spool::SpoolError> {
//! use spool::{DeliveryRecord, Envelope, Reserve, Spool};
//! let (spool, _recovery) = Spool::open(std::path::Path::new("/var/spool/oauthrelay"))?;
//! let mut w = spool.begin(Reserve::Respect); // new mail stops at the reserve
//! w.write(b"Subject: hi\r\n\r\nhello\r\n").await?;
//! let envelope = Envelope::new("a@example.com", ["b@example.com".to_string()]);
//! let id = w.commit(envelope, DeliveryRecord::default()).await?;
//! // The delivery side keeps its own state in the record; the spool never
//! // looks inside.
//! spool.update(id, DeliveryRecord::new(2, b"{...}".to_vec())).await?;
//! let queued = spool.message(id).expect("queued");
//! let body = spool.read_body(id)?.read_to_end().await?;
//! spool.remove(id).await?;
//! # let _ = (body, queued); Ok(()) }
//! ```
//!
//! The spool stores and never decides: it maps no error to SMTP (the
//! listener does), reads nothing of the delivery record, and is told by the
//! caller whether a message may use the free-space reserve ([`Reserve`]).

mod batch;
mod envelope;
mod error;
mod fileio;
mod housekeeper;
mod id;
mod index;
mod record;
mod recover;
mod segment;
mod space;
mod sync;
mod writer;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::warn;

pub use envelope::{DeliveryRecord, Envelope, Reserve, opt_unix_millis, unix_millis};
pub use error::SpoolError;
pub use id::MessageId;
pub use recover::Recovery;

use id::IdGen;
use index::Index;
use record::Extent;
use writer::{Op, Writer};

/// Bodies are stored in pieces of this size while they arrive.
pub const CHUNK_SIZE: usize = 64 << 10;
/// Body bytes in flight between sessions and the writer thread.
const IN_FLIGHT_BYTES: usize = 4 << 20;
/// Of those, at most this many from one message: a single large message
/// streams with a small, fixed footprint (its chunks plus the writer's copy
/// of them) instead of filling the whole budget, while concurrent messages
/// still share [`IN_FLIGHT_BYTES`].
const MESSAGE_IN_FLIGHT_BYTES: usize = 1 << 20;

/// Tuning knobs.
#[derive(Debug, Clone)]
pub struct Options {
    /// A new segment file is started when the active one reaches this size.
    pub segment_size: u64,
    /// Free space (bytes) on the spool's file system that new mail may not
    /// use: data of messages being received is refused with
    /// [`SpoolError::DiskFull`] when it would leave less than this, while
    /// envelope updates, removals, bounces and compaction may still use
    /// it, so delivered mail can always be removed and space reclaimed.
    /// Default 0 (no reserve; the daemon sets `[spool] min_free_space`).
    pub min_free_space: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_size: 64 << 20,
            min_free_space: 0,
        }
    }
}

/// A queued message as the spool holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// As received; never changes.
    pub envelope: Arc<Envelope>,
    /// Stored body size in bytes.
    pub size: u64,
    /// The delivery side's latest record.
    pub delivery: DeliveryRecord,
}

impl Queued {
    fn of(e: &index::Entry) -> Queued {
        Queued {
            envelope: e.envelope.clone(),
            size: e.bytes(),
            delivery: e.delivery.clone(),
        }
    }
}

/// See [`Spool::sync_counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncCounts {
    pub syncs: u64,
    pub operations: u64,
}

/// The queue. Cheap to clone; all clones share one writer thread.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Op>,
    budget: Arc<Semaphore>,
}

pub(crate) struct Shared {
    dir: PathBuf,
    index: Mutex<Index>,
    ids: IdGen,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<MessageId>>>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    health: Mutex<Option<SpoolError>>,
    /// Writes and syncs that failed so far (changed under `health`'s lock).
    write_failures: AtomicU64,
    /// The spool directory, for `statvfs` from the async side.
    dir_file: File,
    /// [`Options::min_free_space`], changeable while running.
    reserve: AtomicU64,
    /// New mail was refused because free space reached the reserve.
    below_reserve: AtomicBool,
    /// Group commits: `fdatasync`s that made waiting operations durable.
    syncs: AtomicU64,
    /// Commits, updates and removals those syncs made durable.
    synced_ops: AtomicU64,
}

impl Shared {
    pub(crate) fn lock_index(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock cannot leave the index half-updated
        // in a way that matters more than stopping would; keep serving.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn contains(&self, id: MessageId) -> bool {
        self.lock_index().messages.contains_key(&id)
    }

    pub(crate) fn notify(&self, ids: &[MessageId]) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|tx| ids.iter().all(|id| tx.send(*id).is_ok()));
    }

    pub(crate) fn counted_sync(&self, operations: usize) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.synced_ops
            .fetch_add(operations as u64, Ordering::Relaxed);
    }

    pub(crate) fn set_healthy(&self) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.is_some() {
            tracing::info!("spool writes work again");
            *h = None;
        }
    }

    /// Whether the last write failed because the file system was full.
    pub(crate) fn write_failed_full(&self) -> bool {
        matches!(
            &*self.health.lock().unwrap_or_else(|p| p.into_inner()),
            Some(SpoolError::DiskFull)
        )
    }

    pub(crate) fn set_unhealthy(&self, e: &SpoolError) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        self.write_failures.fetch_add(1, Ordering::Relaxed);
        *h = Some(e.clone());
    }

    /// How many writes and syncs failed so far (see
    /// [`set_healthy_unless_failed_since`](Self::set_healthy_unless_failed_since)).
    pub(crate) fn write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::Relaxed)
    }

    /// A sync made a batch durable that was written when `failures` writes
    /// had failed: the spool works again, unless a write failed since (the
    /// writer appends while the sync thread syncs).
    pub(crate) fn set_healthy_unless_failed_since(&self, failures: u64) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.is_some() && self.write_failures.load(Ordering::Relaxed) == failures {
            tracing::info!("spool writes work again");
            *h = None;
        }
    }

    pub(crate) fn reserve(&self) -> u64 {
        self.reserve.load(Ordering::Relaxed)
    }

    /// Record that new mail was refused for want of space (logged once).
    pub(crate) fn hit_reserve(&self) {
        if !self.below_reserve.swap(true, Ordering::Relaxed) {
            warn!(
                free_bytes = space::available(&self.dir_file).ok(),
                min_free_space = self.reserve(),
                dir = %self.dir.display(),
                "the spool's file system is down to its reserve ([spool] min_free_space): new mail gets 452 4.3.1 until space is freed; deliveries and removals go on"
            );
        }
    }

    /// Whether new mail was refused for want of space (and has not been
    /// taken again since).
    pub(crate) fn is_below_reserve(&self) -> bool {
        self.below_reserve.load(Ordering::Relaxed)
    }

    /// New mail fits again with `room` bytes above the reserve.
    pub(crate) fn room_again(&self, room: u64) {
        if room >= space::RESUME_ROOM && self.below_reserve.swap(false, Ordering::Relaxed) {
            tracing::info!(
                room_bytes = room,
                "free space on the spool's file system is above the reserve again: new mail is accepted"
            );
        }
    }

    /// New mail was stored: if it had been refused, it is taken again.
    pub(crate) fn took_mail(&self) {
        if self.below_reserve.swap(false, Ordering::Relaxed) {
            tracing::info!("the spool takes new mail again");
        }
    }

    /// Bytes new mail may still use (`None`: the file system cannot tell).
    pub(crate) fn room_for_mail(&self) -> Option<u64> {
        let free = match space::available(&self.dir_file) {
            Ok(free) => free,
            Err(e) => {
                tracing::debug!(error = %e, "cannot ask the spool's file system for its free space");
                return None;
            }
        };
        Some(free.saturating_sub(self.reserve().max(space::BOOKKEEPING_FLOOR)))
    }

    /// Whether space is short: new mail was refused (the reserve, or the
    /// file system really full), or the free room above the reserve is
    /// smaller than what an emptied active segment of `active_len` bytes
    /// would give back.
    pub(crate) fn short_of_space(&self, active_len: u64) -> bool {
        self.is_below_reserve()
            || self.write_failed_full()
            || self
                .room_for_mail()
                .is_some_and(|room| room < active_len.saturating_add(space::RESUME_ROOM))
    }

    pub(crate) fn forget_segment(&self, seg: u64) {
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&seg);
    }

    fn segment_file(&self, seg: u64) -> Result<Arc<File>, SpoolError> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = files.get(&seg) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(segment::path(&self.dir, seg)).map_err(SpoolError::io)?);
        files.insert(seg, f.clone());
        Ok(f)
    }

    /// Read whole extents (used when copying messages forward).
    pub(crate) fn read_extents(&self, extents: &[Extent]) -> Result<Vec<u8>, SpoolError> {
        let total: usize = extents.iter().map(|e| e.len as usize).sum();
        let mut out = vec![0u8; total];
        let mut at = 0;
        for e in extents {
            let f = self.segment_file(e.seg)?;
            f.read_exact_at(&mut out[at..at + e.len as usize], e.off)
                .map_err(SpoolError::io)?;
            at += e.len as usize;
        }
        Ok(out)
    }
}

impl Spool {
    /// Open (creating if needed) the spool in `dir`, take its lock, and
    /// recover every committed message. Blocking: call it before serving or
    /// from `spawn_blocking`. Needs a Tokio runtime only later, for the async
    /// methods.
    pub fn open(dir: &Path) -> Result<(Spool, Recovery), SpoolError> {
        Spool::open_with(dir, Options::default())
    }

    pub fn open_with(dir: &Path, options: Options) -> Result<(Spool, Recovery), SpoolError> {
        let open_err = |e: std::io::Error| SpoolError::Open {
            path: dir.to_path_buf(),
            source: Arc::new(e),
        };
        // Mail is private: the spool is readable by its owner only.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(open_err)?;
        let lock = take_lock(dir)?;
        let recovered = recover::recover(dir)?;
        let active_no = recovered.last_segment + 1;
        let mut index = recovered.index;
        let created = match segment::create(dir, active_no) {
            Err(e) if error::is_disk_full(&e) => {
                // A full spool: delete the segments that hold only
                // delivered mail (oldest first, as the writer would), then
                // try again.
                let _ = std::fs::remove_file(segment::path(dir, active_no));
                reclaim_dead(dir, &mut index);
                segment::create(dir, active_no)
            }
            r => r,
        };
        let (file, seed) = created.map_err(|e| SpoolError::Open {
            path: segment::path(dir, active_no),
            source: Arc::new(e),
        })?;
        index.files.insert(active_no);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            index: Mutex::new(index),
            ids: IdGen::new(recovered.last_id),
            subscribers: Mutex::new(Vec::new()),
            files: Mutex::new(HashMap::new()),
            health: Mutex::new(None),
            write_failures: AtomicU64::new(0),
            dir_file: File::open(dir).map_err(open_err)?,
            reserve: AtomicU64::new(options.min_free_space),
            below_reserve: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            synced_ops: AtomicU64::new(0),
        });
        // Opened on a full file system (a restart while mail is refused):
        // say so from the start, not only once a message is refused.
        if shared
            .room_for_mail()
            .is_some_and(|room| room < space::RESUME_ROOM)
        {
            shared.hit_reserve();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let weak = tx.downgrade();
        let syncer = sync::Syncer::start(
            shared.clone(),
            Box::new(move || {
                if let Some(tx) = weak.upgrade() {
                    let _ = tx.send(Op::Reclaim);
                }
            }),
        )
        .map_err(open_err)?;
        let writer = Writer::new(
            shared.clone(),
            writer::Active::new(active_no, file, seed),
            // The seal records lengths in 32 bits.
            options.segment_size.clamp(1, MAX_SEGMENT_SIZE),
            lock,
            syncer,
            housekeeper::Housekeeper::start(shared.clone()).map_err(open_err)?,
        );
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(open_err)?;
        Ok((
            Spool {
                shared,
                tx,
                budget: Arc::new(Semaphore::new(IN_FLIGHT_BYTES / 1024)),
            },
            recovered.report,
        ))
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Start a new message. Its id is allocated now, so ids sort by the time
    /// a message started arriving. Dropping the writer without `commit`
    /// abandons the message. `reserve` says whether its bytes may use the
    /// free space kept back from new mail ([`Options::min_free_space`]).
    pub fn begin(&self, reserve: Reserve) -> MessageWriter {
        MessageWriter {
            id: self.shared.ids.next(),
            reserve,
            spool: self.clone(),
            buf: Vec::new(),
            own_budget: None,
            written: 0,
            sent_chunks: false,
            done: false,
        }
    }

    /// Ids of messages as they are committed (after they are durable).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<MessageId> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    /// A queued message's envelope, size and delivery record.
    pub fn message(&self, id: MessageId) -> Option<Queued> {
        self.shared.lock_index().messages.get(&id).map(Queued::of)
    }

    /// Every queued message, oldest first.
    pub fn list(&self) -> Vec<(MessageId, Queued)> {
        self.shared
            .lock_index()
            .messages
            .iter()
            .map(|(id, e)| (*id, Queued::of(e)))
            .collect()
    }

    /// Number of queued messages and when the oldest was received.
    pub fn stats(&self) -> (usize, Option<SystemTime>) {
        let index = self.shared.lock_index();
        let oldest = index.messages.values().map(|e| e.envelope.received).min();
        (index.messages.len(), oldest)
    }

    /// Group commits so far: how many `fdatasync`s acknowledged waiting
    /// operations, and how many operations (commits, updates, removals)
    /// they acknowledged. Their ratio is the group commit's batch size.
    pub fn sync_counts(&self) -> SyncCounts {
        SyncCounts {
            syncs: self.shared.syncs.load(Ordering::Relaxed),
            operations: self.shared.synced_ops.load(Ordering::Relaxed),
        }
    }

    /// Bytes a new message may still use: the file system's free space
    /// minus [`Options::min_free_space`]; `None` when the file system cannot
    /// tell. One `statvfs`; for the check at `MAIL FROM ... SIZE=`.
    pub fn room_for_mail(&self) -> Option<u64> {
        self.shared.room_for_mail()
    }

    /// Free bytes on the spool's file system (what an unprivileged writer
    /// may use, reserve included); `None` when it cannot tell.
    pub fn free_space(&self) -> Option<u64> {
        space::available(&self.shared.dir_file).ok()
    }

    /// The caller refused a message for want of room (a client's `SIZE=`
    /// at `MAIL`, checked against [`room_for_mail`](Self::room_for_mail)):
    /// when the room left is below what counts as accepting again (1 MiB),
    /// the spool reports itself full ([`health`](Self::health)) as if the
    /// writer had refused it. A single huge message refused while there is
    /// room for others changes nothing.
    pub fn refused_for_space(&self) {
        if self
            .shared
            .room_for_mail()
            .is_some_and(|room| room < space::RESUME_ROOM)
        {
            self.shared.hit_reserve();
        }
    }

    /// Change the reserve new mail may not use (a reloaded configuration).
    pub fn set_min_free_space(&self, bytes: u64) {
        self.shared.reserve.store(bytes, Ordering::Relaxed);
    }

    /// The current reserve ([`Options::min_free_space`]).
    pub fn min_free_space(&self) -> u64 {
        self.shared.reserve()
    }

    /// `Err` with the last write error while the spool cannot write (disk
    /// full, I/O errors), or [`SpoolError::DiskFull`] while new mail is
    /// refused because free space is down to the reserve; `Ok` once a
    /// write has succeeded again and there is room.
    pub fn health(&self) -> Result<(), SpoolError> {
        if self.shared.below_reserve.load(Ordering::Relaxed) {
            match self.shared.room_for_mail() {
                Some(room) if room >= space::RESUME_ROOM => {}
                _ => return Err(SpoolError::DiskFull),
            }
        }
        match &*self.shared.health.lock().unwrap_or_else(|p| p.into_inner()) {
            // The file system was full at the last write; space may have come
            // back since (another program's files deleted) without a write
            // to show it.
            Some(SpoolError::DiskFull) => match self.shared.room_for_mail() {
                Some(room) if room >= space::RESUME_ROOM => Ok(()),
                _ => Err(SpoolError::DiskFull),
            },
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// A reader over a queued message's bytes.
    pub fn read_body(&self, id: MessageId) -> Result<BodyReader, SpoolError> {
        let index = self.shared.lock_index();
        let entry = index.messages.get(&id).ok_or(SpoolError::NotFound(id))?;
        let mut pieces = Vec::with_capacity(entry.extents.len());
        for e in &entry.extents {
            pieces.push((self.shared.segment_file(e.seg)?, e.off, e.len));
        }
        let len = pieces.iter().map(|p| u64::from(p.2)).sum();
        Ok(BodyReader {
            pieces,
            next: 0,
            len,
        })
    }

    /// Replace a message's envelope (delivery state); durable on return.
    pub async fn update(&self, id: MessageId, delivery: DeliveryRecord) -> Result<(), SpoolError> {
        self.call(|reply| Op::Update {
            id,
            delivery,
            reply,
        })
        .await
    }

    /// Remove a message; durable on return.
    pub async fn remove(&self, id: MessageId) -> Result<(), SpoolError> {
        self.call(|reply| Op::Remove { id, reply }).await
    }

    /// Wait until everything sent so far is durable.
    pub async fn sync(&self) -> Result<(), SpoolError> {
        self.call(|reply| Op::Sync { reply }).await
    }

    /// Liveness (the daemon's systemd watchdog): resolves once the writer
    /// thread has taken every operation queued before this one. It does no
    /// I/O; a writer stuck in a write or `fdatasync` never answers.
    pub async fn ping(&self) -> Result<(), SpoolError> {
        self.call(|reply| Op::Ping { reply }).await
    }

    /// Make everything durable, stop the writer thread and release the
    /// spool's lock (once this returns another process may open it). Later
    /// writes fail with [`SpoolError::Closed`].
    pub async fn close(&self) -> Result<(), SpoolError> {
        self.call(|reply| Op::Stop { reply }).await
    }

    async fn call(&self, op: impl FnOnce(writer::Reply) -> Op) -> Result<(), SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(op(reply)).map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }
}

/// One message being received. Bytes are streamed to the spool in pieces of
/// [`CHUNK_SIZE`], so memory does not grow with the message.
pub struct MessageWriter {
    id: MessageId,
    reserve: Reserve,
    spool: Spool,
    buf: Vec<u8>,
    /// This message's share of the in-flight budget (made at its first chunk).
    own_budget: Option<Arc<Semaphore>>,
    written: u64,
    sent_chunks: bool,
    done: bool,
}

impl MessageWriter {
    /// The id the message will have.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Append body bytes. Errors (disk full) may also surface only at
    /// [`commit`](Self::commit).
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), SpoolError> {
        self.written += data.len() as u64;
        while !data.is_empty() {
            let room = CHUNK_SIZE - self.buf.len();
            let (now, rest) = data.split_at(room.min(data.len()));
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(CHUNK_SIZE.min(now.len().max(4096)));
            }
            self.buf.extend_from_slice(now);
            data = rest;
            if self.buf.len() == CHUNK_SIZE {
                self.flush_chunk().await?;
            }
        }
        Ok(())
    }

    async fn flush_chunk(&mut self) -> Result<(), SpoolError> {
        let permits = (self.buf.len() / 1024).max(1) as u32;
        // This message's share first, so a message waiting for its own
        // chunks to drain holds nothing of the shared budget.
        let own = self
            .own_budget
            .get_or_insert_with(|| Arc::new(Semaphore::new(MESSAGE_IN_FLIGHT_BYTES / 1024)))
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| SpoolError::Closed)?;
        let shared = self
            .spool
            .budget
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| SpoolError::Closed)?;
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_SIZE));
        self.sent_chunks = true;
        self.spool
            .tx
            .send(Op::Chunk {
                id: self.id.as_u64(),
                data,
                reserve: self.reserve,
                permits: [own, shared],
            })
            .map_err(|_| SpoolError::Closed)
    }

    /// Store the envelope (and a first delivery record, usually none) and
    /// make the message durable. On `Ok` the message is on stable storage
    /// and subscribers are told its id.
    pub async fn commit(
        mut self,
        envelope: Envelope,
        delivery: DeliveryRecord,
    ) -> Result<MessageId, SpoolError> {
        self.done = true;
        let id = self.id;
        let tail = std::mem::take(&mut self.buf);
        let reserve = self.reserve;
        self.spool
            .call(|reply| Op::Commit {
                id: id.as_u64(),
                envelope: Arc::new(envelope),
                delivery,
                tail,
                reserve,
                reply,
            })
            .await?;
        Ok(id)
    }
}

impl Drop for MessageWriter {
    fn drop(&mut self) {
        if !self.done && self.sent_chunks {
            let _ = self.spool.tx.send(Op::Abort {
                id: self.id.as_u64(),
            });
        }
    }
}

/// Reads a queued message's bytes in pieces.
pub struct BodyReader {
    pieces: Vec<(Arc<File>, u64, u32)>,
    next: usize,
    len: u64,
}

impl BodyReader {
    /// Total size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next piece (at most [`CHUNK_SIZE`] bytes, usually exactly one
    /// stored piece), or `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, SpoolError> {
        let Some((file, off, len)) = self.pieces.get(self.next).cloned() else {
            return Ok(None);
        };
        self.next += 1;
        let len = len as usize;
        // A piece delivered soon after it was stored is in the page cache:
        // read it here, without a trip through the blocking pool (a thread
        // wake-up and a switch each way, per 64 KiB). Only what is not
        // cached is read there, where waiting for the disk blocks no task.
        let cached = fileio::read_cached_at(&file, len, off);
        if cached.len() == len {
            return Ok(Some(cached));
        }
        tokio::task::spawn_blocking(move || fileio::finish_read_at(&file, cached, len, off))
            .await
            .map_err(|e| SpoolError::Io(Arc::new(std::io::Error::other(e))))?
            .map(Some)
            .map_err(SpoolError::io)
    }

    /// The whole body in memory.
    pub async fn read_to_end(mut self) -> Result<Vec<u8>, SpoolError> {
        let mut out = Vec::with_capacity(self.len as usize);
        while let Some(piece) = self.next_chunk().await? {
            out.extend_from_slice(&piece);
        }
        Ok(out)
    }
}

/// Largest `segment_size` honoured.
const MAX_SEGMENT_SIZE: u64 = 1 << 30;

/// Delete segments that hold no live message, oldest first, stopping at the
/// first one that does (a `Remove` in a newer segment must never outlive
/// the `Commit` it cancels).
fn reclaim_dead(dir: &Path, index: &mut Index) {
    while let Some(&no) = index.files.first() {
        if index.segments.get(&no).copied().unwrap_or(0) > 0 {
            return;
        }
        if let Err(e) = segment::remove(dir, no) {
            warn!(file = %segment::path(dir, no).display(), error = %e, "cannot delete spool segment");
            return;
        }
        index.files.remove(&no);
        index.segments.remove(&no);
    }
}

/// Take the spool's lock file, recording our pid in it.
fn take_lock(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join("lock");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| SpoolError::Open {
            path: path.clone(),
            source: Arc::new(e),
        })?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            return Err(SpoolError::Locked {
                path: dir.to_path_buf(),
                pid: s.trim().parse().ok(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(SpoolError::Open {
                path,
                source: Arc::new(e),
            });
        }
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = writeln!(f, "{}", std::process::id());
    Ok(f)
}
