//! Segment files: naming, creation (with a directory fsync), deletion, and
//! the file header that carries the segment's random salt.
//!
//! ```text
//! "ORSEG002" | salt (16 random bytes) | 8 reserved bytes | records...
//! ```
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

/// Segment number from a file name, if it is one of ours.
pub(crate) fn parse_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
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
    f.write_all_at(&header, 0)?;
    f.sync_data()?;
    sync_dir(dir)?;
    Ok((f, seed(&salt)))
}

/// The seed and record format from a segment's header; `None` if the file
/// does not start with a complete header of ours.
pub(crate) fn read_header(data: &[u8]) -> Option<(u32, Format)> {
    let h = data.get(..FILE_HEADER_LEN as usize)?;
    let format = match &h[..8] {
        m if m == FILE_MAGIC => Format::V2,
        m if m == FILE_MAGIC_V1 => Format::V1,
        _ => return None,
    };
    Some((seed(&h[8..24]), format))
}

pub(crate) fn remove(dir: &Path, no: u64) -> io::Result<()> {
    std::fs::remove_file(path(dir, no))?;
    sync_dir(dir)
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
