//! The housekeeper thread: the slow file-system work the writer hands off,
//! so that appends never wait for it: deleting the segment files the
//! writer is done with, and starting the writeback of what it appended.
//!
//! Deleting a 64 MiB segment took 30-45 ms on ext4 (its page cache is
//! dropped and its extents freed through the journal), and the writer did
//! it between two batches: every append, and through the in-flight budget
//! every client sending a body, waited for it. Under a 1 MB load that was
//! several times a second, and it made the slowest 1% of transactions
//! (docs/benchmarks.md, "Deleting segments off the writer").
//!
//! Starting writeback (`sync_file_range`) usually takes tens of
//! microseconds, but now and then waits for the disk's queue or the
//! journal (20 ms seen); it is only a hint, so it waits here, not in the
//! writer.
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
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tracing::{debug, warn};

use crate::{Shared, fileio, segment};

/// What the writer hands over.
enum Task {
    /// Delete segment `0`.
    Delete(u64),
    /// Start writing `len` bytes of the file at `off` to the disk.
    Writeback { file: Arc<File>, off: u64, len: u64 },
}

pub(crate) struct Housekeeper {
    tx: Option<mpsc::Sender<Task>>,
    thread: Option<JoinHandle<()>>,
    progress: Arc<Progress>,
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
    /// Start the thread. If it cannot be started, segments are deleted by
    /// the caller's thread, as before there was one.
    pub(crate) fn start(shared: Arc<Shared>) -> Housekeeper {
        let (tx, rx) = mpsc::channel::<Task>();
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
                    }
                }
            });
        match thread {
            Ok(t) => Housekeeper {
                tx: Some(tx),
                thread: Some(t),
                progress,
            },
            Err(e) => {
                warn!(error = %e, "cannot start the spool's housekeeping thread; the writer deletes segments itself");
                Housekeeper {
                    tx: None,
                    thread: None,
                    progress,
                }
            }
        }
    }

    /// Delete segment `seg`, after every segment handed over before it.
    pub(crate) fn delete(&self, shared: &Shared, seg: u64) {
        self.progress.counts().0 += 1;
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(Task::Delete(seg)).is_ok());
        if !sent {
            delete(shared, seg);
            self.progress.counts().1 += 1;
        }
    }

    /// Start writing `len` bytes of `file` at `off` out to the disk, soon.
    pub(crate) fn writeback(&self, file: &Arc<File>, off: u64, len: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Task::Writeback {
                file: file.clone(),
                off,
                len,
            });
        }
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
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
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
