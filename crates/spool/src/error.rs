//! The spool's errors. What they mean to an SMTP client is the listener's
//! business, not the spool's.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::MessageId;

#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    /// No space left on the spool's file system (or quota exceeded).
    #[error("the spool's file system is full")]
    DiskFull,
    /// Any other I/O failure while writing or reading the spool.
    #[error("spool I/O error: {0}")]
    Io(#[source] Arc<io::Error>),
    /// Another process holds the spool's lock.
    #[error("spool {path} is in use by another oauthrelay process{}; stop it first or use another [spool] dir", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked { path: PathBuf, pid: Option<u32> },
    /// The spool directory cannot be created or opened.
    #[error("cannot use spool directory {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// The envelope or delivery record is too large to store.
    #[error("the message envelope is too large to store")]
    EnvelopeTooLarge,
    #[error("no message {0} in the queue")]
    NotFound(MessageId),
    /// The spool's writer has stopped (shutdown).
    #[error("the spool is shutting down")]
    Closed,
}

impl SpoolError {
    pub(crate) fn io(e: io::Error) -> SpoolError {
        if is_disk_full(&e) {
            SpoolError::DiskFull
        } else {
            SpoolError::Io(Arc::new(e))
        }
    }

    pub fn is_disk_full(&self) -> bool {
        matches!(self, SpoolError::DiskFull)
    }
}

pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(28) | Some(122))
}
