//! Free space on the spool's file system, and the reserve kept back from
//! new mail.
//!
//! Removing a delivered message, recording a delivery attempt and copying
//! long-queued messages forward all append to the spool, so they need disk
//! space too. If new mail could fill the file system to the last byte,
//! delivered mail could no longer be removed and no segment would ever be
//! freed: the spool would be wedged until someone deleted files by hand.
//! So new mail (the `Data` and `Commit` records of messages being
//! received) stops at `min_free_space`; the spool's own bookkeeping may use
//! the rest.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// New mail never takes the last bytes either, whatever the reserve: even
/// with `min_free_space = 0` a full file system must leave room for the
/// removals of delivered mail that give whole segments back.
pub(crate) const BOOKKEEPING_FLOOR: u64 = 64 << 10;

/// Once new mail was refused for want of space, it counts as accepted
/// again (for [`Spool::health`](crate::Spool::health) and the log) only with
/// at least this much room above the reserve, so the state does not flap
/// with every message that just fits.
pub(crate) const RESUME_ROOM: u64 = 1 << 20;

/// Bytes an unprivileged process may still write on `f`'s file system
/// (`statvfs` `f_bavail`, as Postfix's `queue_minfree` check uses: blocks
/// kept for root are not counted, even when we run as root).
pub(crate) fn available(f: &File) -> io::Result<u64> {
    // SAFETY: an all-zero statvfs is a valid value for fstatvfs to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the duration of the call and `st`
    // is a valid, writable statvfs.
    let r = unsafe { libc::fstatvfs(f.as_raw_fd(), &mut st) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // The field types differ between platforms (u32 or u64).
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let bytes = u64::from(st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    Ok(bytes)
}

/// How much inbound data one writer batch may still append: the file
/// system is asked once per batch, at its first inbound record.
pub(crate) enum Room {
    Unchecked,
    /// No reserve configured (or the file system cannot tell).
    Unlimited,
    /// Bytes left above the reserve.
    Left(u64),
}

impl Room {
    /// Take `n` bytes of room; `false` if they would cut into the reserve.
    pub(crate) fn take(&mut self, n: u64, check: impl FnOnce() -> Room) -> bool {
        if let Room::Unchecked = self {
            *self = check();
        }
        match self {
            Room::Unchecked | Room::Unlimited => true,
            Room::Left(left) if *left >= n => {
                *left -= n;
                true
            }
            Room::Left(_) => false,
        }
    }
}
