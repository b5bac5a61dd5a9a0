//! The housekeeper thread: the slow file-system work the writer hands off,
//! so that appends never wait for it: deleting the segment files the
//! writer is done with, starting the writeback of what it appended, and
//! making the next segment file before the writer needs it.
//!
//! Deleting a 64 MiB segment took 30-45 ms on ext4 (its page cache is
//! dropped and its extents freed through the journal), and the writer did
//! it between two batches: every append, and through the in-flight budget
//! every client sending a body, waited for it. Under a 1 MB load that was
//! several times a second, and it made the slowest 1% of transactions
//! (docs/benchmarks.md, "What the 1 MB p99 waited for").
//!
//! Starting writeback (`sync_file_range`) usually takes tens of
//! microseconds, but now and then waits for the disk's queue or the
//! journal (20 ms seen); it is only a hint, so it waits here, not in the
//! writer.
//!
//! A new segment's file, header and directory entry must be durable before
//! anything in it is acknowledged: two syncs, 1-18 ms. So when the writer
//! starts a segment, the next one is made here at once, and the writer
//! takes it when it switches (or makes one itself if that failed). One
//! made but never used (the writer stopped first) is deleted when this
//! thread stops; after a crash it is an empty segment, which recovery
//! accepts and a later start deletes once the segments before it are gone.
//!
//! The writer drops a dead segment from the index and hands its number
//! here; this thread deletes the files in the order they were handed over,
//! syncing the directory after each one, so a deletion never overtakes the
//! deletion of an older segment (a `Remove` in a newer segment must never
//! outlive the `Commit` it cancels). A crash before a deletion leaves a
//! segment with no live mail, which the next start deletes. The writer
//! stops this thread, and it finishes its queue, before the spool's lock
//! is released.

use std::fs::File;
use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tracing::{debug, warn};

use crate::{Shared, fileio, segment};

/// What the writer hands over.
enum Task {
    /// Delete this segment.
    Delete(u64),
    /// Start writing `len` bytes of the file at `off` to the disk.
    Writeback { file: Arc<File>, off: u64, len: u64 },
    /// Make this segment (`segment::create`).
    Create(u64),
}

/// A segment made ahead: its number, and its file and CRC seed.
type Made = (u64, io::Result<(File, u32)>);

pub(crate) struct Housekeeper {
    tx: mpsc::Sender<Task>,
    /// Joined when dropped.
    thread: Option<JoinHandle<()>>,
    progress: Arc<Progress>,
    /// A segment is being made ahead (its number and result come on `made`).
    preparing: bool,
    made: mpsc::Receiver<Made>,
    shared: Arc<Shared>,
}

/// Segments handed over and segments dealt with (deleted or not), for
/// [`Housekeeper::wait`].
#[derive(Default)]
struct Progress {
    counts: Mutex<(u64, u64)>,
    done: Condvar,
}

impl Progress {
    fn counts(&self) -> std::sync::MutexGuard<'_, (u64, u64)> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Housekeeper {
    pub(crate) fn start(shared: Arc<Shared>) -> io::Result<Housekeeper> {
        let (tx, rx) = mpsc::channel::<Task>();
        let (made_tx, made) = mpsc::channel::<Made>();
        let progress = Arc::new(Progress::default());
        let p = progress.clone();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("spool-keeper".into())
            .spawn(move || {
                while let Ok(task) = rx.recv() {
                    match task {
                        Task::Delete(seg) => {
                            delete(&s, seg);
                            p.counts().1 += 1;
                            p.done.notify_all();
                        }
                        Task::Writeback { file, off, len } => {
                            fileio::start_writeback(&file, off, len);
                        }
                        Task::Create(no) => {
                            let _ = made_tx.send((no, segment::create(&s.dir, no)));
                        }
                    }
                }
            })?;
        Ok(Housekeeper {
            tx,
            thread: Some(thread),
            progress,
            preparing: false,
            made,
            shared,
        })
    }

    /// Hand a task to the thread; if it is gone (it never panics, so only
    /// while dropping), do it here.
    fn send(&self, task: Task) {
        if let Err(mpsc::SendError(task)) = self.tx.send(task) {
            match task {
                Task::Delete(seg) => delete(&self.shared, seg),
                Task::Writeback { .. } | Task::Create(_) => {}
            }
        }
    }

    /// Delete segment `seg`, after every segment handed over before it.
    pub(crate) fn delete(&self, seg: u64) {
        self.progress.counts().0 += 1;
        self.send(Task::Delete(seg));
    }

    /// Start writing `len` bytes of `file` at `off` out to the disk, soon.
    pub(crate) fn writeback(&self, file: &Arc<File>, off: u64, len: u64) {
        self.send(Task::Writeback {
            file: file.clone(),
            off,
            len,
        });
    }

    /// Have segment `no` made ahead of need, for [`Self::take_segment`].
    pub(crate) fn prepare_segment(&mut self, no: u64) {
        if !self.preparing {
            self.preparing = self.tx.send(Task::Create(no)).is_ok();
        }
    }

    /// Segment `no`, its file, header and directory entry durable: the one
    /// made ahead (waiting for it if it is not ready yet), or, if none was
    /// or making it failed, one made now.
    pub(crate) fn take_segment(&mut self, no: u64) -> io::Result<(File, u32)> {
        if std::mem::take(&mut self.preparing) {
            match self.made.recv() {
                Ok((made, Ok(file))) if made == no => return Ok(file),
                Ok((made, Ok(_))) => delete(&self.shared, made),
                // Made again below (the failed attempt left no file): the
                // file system may have room again by now.
                Ok((made, Err(e))) => {
                    debug!(segment = made, error = %e, "making a spool segment ahead failed");
                }
                Err(_) => {}
            }
        }
        segment::create(&self.shared.dir, no)
    }

    /// Wait until every segment handed over so far has been dealt with.
    pub(crate) fn wait(&self) {
        let mut c = self.progress.counts();
        while c.1 < c.0 {
            c = self
                .progress
                .done
                .wait(c)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for Housekeeper {
    fn drop(&mut self) {
        // Closing the channel ends the thread once its queue is done.
        drop(std::mem::replace(&mut self.tx, mpsc::channel().0));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // A segment made ahead and never used: empty, and not ours to
        // leave behind.
        if self.preparing
            && let Ok((no, Ok(_))) = self.made.try_recv()
        {
            delete(&self.shared, no);
        }
    }
}

fn delete(shared: &Shared, seg: u64) {
    match segment::remove(&shared.dir, seg) {
        Ok(()) => {
            debug!(segment = seg, "spool segment deleted");
            // Refused mail may be taken again (the writer also checks at
            // its next batch, and health() on every question).
            if shared.is_below_reserve()
                && let Some(room) = shared.room_for_mail()
            {
                shared.room_again(room);
            }
        }
        Err(e) => {
            warn!(file = %segment::path(&shared.dir, seg).display(), error = %e, "cannot delete spool segment");
        }
    }
}
