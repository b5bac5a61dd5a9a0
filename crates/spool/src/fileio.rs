//! Positional file I/O the spool's threads share: reading a stored piece
//! back without zeroing a buffer first, and from the page cache without
//! leaving the async thread when it is there; starting the writeback of
//! what the writer appended; retrying the calls a signal interrupts.
//!
//! Every message body goes out through these reads, 64 KiB at a time;
//! `vec![0; len]` followed by `FileExt::read_exact_at` spent about 3% of
//! the relay's CPU under a 1 MB load just clearing memory the kernel then
//! overwrote (docs/benchmarks.md, "Code layout"). `preadv2` here writes
//! straight into the vector's spare capacity.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// As much of the `len` bytes at `off` as the page cache holds, read
/// without waiting for the disk (`preadv2` with `RWF_NOWAIT`): all of them
/// (a piece the writer stored moments ago), a prefix, or none. Never
/// blocks on the disk; whatever stopped it (not cached, a kernel or file
/// system that cannot read without waiting, an error, the end of the file)
/// is for [`finish_read_at`] to meet and report.
pub(crate) fn read_cached_at(file: &File, len: usize, off: u64) -> Vec<u8> {
    let mut buf = Vec::with_capacity(len);
    let _ = fill(file, &mut buf, len, off, Read::Cached);
    buf
}

/// `buf`, a prefix of the `len` bytes at `off`, completed from the file
/// (waiting for the disk if it must); `UnexpectedEof` if the file ends
/// first.
pub(crate) fn finish_read_at(
    file: &File,
    mut buf: Vec<u8>,
    len: usize,
    off: u64,
) -> io::Result<Vec<u8>> {
    fill(file, &mut buf, len, off, Read::Wait)?;
    Ok(buf)
}

#[derive(Clone, Copy)]
enum Read {
    /// From the page cache only (`RWF_NOWAIT`).
    Cached,
    /// Whatever it takes.
    Wait,
}

/// Append to `buf` the bytes after its prefix of the piece of `len` bytes
/// at `off`, until it holds them all.
fn fill(file: &File, buf: &mut Vec<u8>, len: usize, off: u64, how: Read) -> io::Result<()> {
    buf.reserve_exact(len.saturating_sub(buf.len()));
    while buf.len() < len {
        let at = off
            .checked_add(buf.len() as u64)
            .and_then(|at| libc::off_t::try_from(at).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let want = len - buf.len();
        let spare = &mut buf.spare_capacity_mut()[..want];
        let iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast::<libc::c_void>(),
            iov_len: spare.len(),
        };
        let flags = match how {
            Read::Cached => libc::RWF_NOWAIT,
            Read::Wait => 0,
        };
        // SAFETY: `preadv2` writes at most `iov.iov_len` bytes at
        // `iov.iov_base`, the spare capacity this vector owns; the
        // descriptor is open while `file` is borrowed.
        let r = uninterrupted(|| unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, flags) })?;
        if r == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        // SAFETY: `preadv2` initialised the next `r` bytes (r <= want).
        unsafe { buf.set_len(buf.len() + r.min(want)) };
    }
    Ok(())
}

/// Ask the kernel to start writing `len` bytes of `file` at `off` to the
/// disk now (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`), without
/// waiting for it. A hint: the `fdatasync` that acknowledges them still
/// decides, so a failure here is left for it to report.
pub(crate) fn start_writeback(file: &File, off: u64, len: u64) {
    let (Ok(off), Ok(len)) = (libc::off64_t::try_from(off), libc::off64_t::try_from(len)) else {
        return;
    };
    // SAFETY: a plain system call on a descriptor that is open while
    // `file` is borrowed; it touches no memory of ours.
    let _ = uninterrupted(|| unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE) as isize
    });
}

/// Run a system call (`preadv2`, `pwritev`, `sync_file_range`) again while it is
/// interrupted by a signal; the byte count it returned, or its error.
pub(crate) fn uninterrupted(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        if let Ok(n) = usize::try_from(call()) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_the_bytes_at_an_offset_and_refuses_a_short_file() {
        let mut f = tempfile::tempfile().expect("tempfile");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).expect("write");
        assert_eq!(
            finish_read_at(&f, Vec::new(), 65_536, 1_000).expect("read"),
            &data[1_000..66_536]
        );
        assert_eq!(
            finish_read_at(&f, Vec::new(), 0, 5).expect("empty read"),
            Vec::<u8>::new()
        );
        assert_eq!(
            finish_read_at(&f, Vec::new(), 10, 199_990).expect("tail"),
            &data[199_990..]
        );
        let err = finish_read_at(&f, Vec::new(), 11, 199_990).expect_err("past the end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_cached_read_never_waits_and_the_rest_is_finished_from_the_disk() {
        let mut f = tempfile::tempfile().expect("tempfile");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        f.write_all(&data).expect("write");
        // Just written: in the page cache.
        let cached = read_cached_at(&f, 65_536, 70_000);
        assert_eq!(cached, &data[70_000..135_536]);
        // Pushed out of the page cache (where the file system allows it):
        // what comes back is a prefix, possibly empty, and the blocking
        // read completes it.
        f.sync_all().expect("sync");
        // SAFETY: advice about an open descriptor; no memory is touched.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let part = read_cached_at(&f, 100_000, 150_000);
        assert!(part.len() <= 100_000);
        assert_eq!(part, &data[150_000..150_000 + part.len()]);
        let whole = finish_read_at(&f, part, 100_000, 150_000).expect("finish");
        assert_eq!(whole, &data[150_000..250_000]);
        // Past the end: the cached read stops, the blocking one says why.
        let tail = read_cached_at(&f, 20, 299_990);
        assert_eq!(tail, &data[299_990..][..tail.len()]);
        let err = finish_read_at(&f, tail, 20, 299_990).expect_err("past the end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // Writeback is only a hint: any range is accepted.
        start_writeback(&f, 0, 300_000);
        start_writeback(&f, u64::MAX, 1);
    }
}
