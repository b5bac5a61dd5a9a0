//! Segment files: naming, creation (with a directory fsync), deletion.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub(crate) fn path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("seg-{no:016x}.log"))
}

/// Segment number from a file name, if it is one of ours.
pub(crate) fn parse_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Create segment `no` and make its directory entry durable before any
/// record in it can be acknowledged.
pub(crate) fn create(dir: &Path, no: u64) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path(dir, no))?;
    sync_dir(dir)?;
    Ok(f)
}

pub(crate) fn remove(dir: &Path, no: u64) -> io::Result<()> {
    std::fs::remove_file(path(dir, no))?;
    sync_dir(dir)
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
