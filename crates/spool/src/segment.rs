//! Segment files: naming, creation (with a directory fsync), deletion, and
//! the file header that carries the segment's random salt.
//!
//! ```text
//! "ORSEG002" | salt (16 random bytes) | sealed length u32 LE | sealed commits u32 LE | records...
//! ```
//!
//! The last 8 header bytes are zero while the segment is written. When the
//! writer is done with it (a switch to the next segment, or a clean stop)
//! they are set to the segment's length and the number of `Commit` records
//! in it, and synced: everything up to that length was acknowledged, so a
//! file found shorter, or with fewer commits, lost acknowledged mail. The
//! 8 bytes sit in one sector: a crash cannot tear them. Segments of older
//! releases have zeros there (unknown).
//!
//! The magic carries the format of the segment's records: new segments are
//! written as `ORSEG002`; `ORSEG001` segments (releases before the
//! envelope/delivery split) are still read, and their live messages move
//! into new segments as compaction copies them forward.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::record::Format;

pub(crate) const FILE_MAGIC: &[u8; 8] = b"ORSEG002";
const FILE_MAGIC_V1: &[u8; 8] = b"ORSEG001";
/// Records start here.
pub(crate) const FILE_HEADER_LEN: u64 = 32;

pub(crate) fn path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("seg-{no:016x}.log"))
}

/// Highest segment number the writer ever uses: at one new segment a
/// millisecond it lasts nine thousand years, and a number beyond it (a
/// stray or forged file) can never wrap the counter.
pub(crate) const MAX_NO: u64 = (1 << 48) - 1;

/// What a directory entry's name says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Name {
    /// One of our segments.
    Segment(u64),
    /// Looks like a segment (`seg-...`) but is not one we would write:
    /// set aside, never read, never counted.
    Stray,
    /// Anything else (the lock, `corrupt/`, a temporary).
    Other,
}

/// Classify a directory entry's name.
pub(crate) fn parse_name(name: &str) -> Name {
    if !name.starts_with("seg-") {
        return Name::Other;
    }
    let Some(hex) = name
        .strip_prefix("seg-")
        .and_then(|n| n.strip_suffix(".log"))
    else {
        return Name::Stray;
    };
    if hex.len() != 16 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Name::Stray;
    }
    match u64::from_str_radix(hex, 16) {
        Ok(no) if (1..=MAX_NO).contains(&no) => Name::Segment(no),
        _ => Name::Stray,
    }
}

/// The CRC seed of a salt: what every record checksum in the segment starts from.
pub(crate) fn seed(salt: &[u8]) -> u32 {
    crc32c::crc32c(salt)
}

/// Create segment `no` with a fresh salt, and make the file, its header and
/// its directory entry durable before any record in it can be acknowledged.
/// Returns the file and its CRC seed.
pub(crate) fn create(dir: &Path, no: u64) -> io::Result<(File, u32)> {
    let mut salt = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut salt)?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path(dir, no))?;
    let mut header = [0u8; FILE_HEADER_LEN as usize];
    header[..8].copy_from_slice(FILE_MAGIC);
    header[8..24].copy_from_slice(&salt);
    let r = f
        .write_all_at(&header, 0)
        .and_then(|()| f.sync_data())
        .and_then(|()| sync_dir(dir));
    if let Err(e) = r {
        // Nothing in it was acknowledged: leave no half-made file to trip
        // the next attempt (the file system may be full).
        let _ = std::fs::remove_file(path(dir, no));
        return Err(e);
    }
    Ok((f, seed(&salt)))
}

/// Where the sealed length and commit count live in the header.
const SEALED_AT: u64 = 24;

/// What a segment's header says.
pub(crate) struct Header {
    pub seed: u32,
    pub format: Format,
    /// `(length, commits)` once sealed; `None` while written, after a
    /// crash, or from an older release.
    pub sealed: Option<(u64, u32)>,
}

/// A segment's header; `None` if the file does not start with a complete
/// header of ours.
pub(crate) fn read_header(data: &[u8]) -> Option<Header> {
    let h = data.get(..FILE_HEADER_LEN as usize)?;
    let format = match &h[..8] {
        m if m == FILE_MAGIC => Format::V2,
        m if m == FILE_MAGIC_V1 => Format::V1,
        _ => return None,
    };
    let len = u32::from_le_bytes([h[24], h[25], h[26], h[27]]);
    let commits = u32::from_le_bytes([h[28], h[29], h[30], h[31]]);
    Some(Header {
        seed: seed(&h[8..24]),
        format,
        sealed: (len != 0).then_some((u64::from(len), commits)),
    })
}

/// Record that the segment is complete at `len` bytes with `commits`
/// commit records, and make it durable. Lengths past 4 GiB (never written:
/// segments are capped well below) are not recorded.
pub(crate) fn seal(f: &File, len: u64, commits: u32) -> io::Result<()> {
    let Ok(len) = u32::try_from(len) else {
        return Ok(());
    };
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&len.to_le_bytes());
    v[4..].copy_from_slice(&commits.to_le_bytes());
    f.write_all_at(&v, SEALED_AT)?;
    f.sync_data()
}

/// Forget a seal (a segment written to again: the active one emptied and
/// cut back to its header).
pub(crate) fn unseal(f: &File) -> io::Result<()> {
    f.write_all_at(&[0u8; 8], SEALED_AT)
}

pub(crate) fn remove(dir: &Path, no: u64) -> io::Result<()> {
    std::fs::remove_file(path(dir, no))?;
    sync_dir(dir)
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
