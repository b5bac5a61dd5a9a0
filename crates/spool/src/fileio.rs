//! Positional file I/O the spool's threads share: reading a stored piece
//! back without zeroing a buffer first, and retrying `pread`/`pwritev`
//! when a signal interrupts them.
//!
//! Every message body goes out through [`read_exact_at`], 64 KiB at a
//! time; `vec![0; len]` followed by `FileExt::read_exact_at` spent about 3%
//! of the relay's CPU under a 1 MB load just clearing memory the kernel
//! then overwrote (docs/benchmarks.md, "Code layout"). `pread` here writes
//! straight into the vector's spare capacity.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Exactly `len` bytes of `file` at `off`; `UnexpectedEof` if the file
/// ends first.
pub(crate) fn read_exact_at(file: &File, len: usize, off: u64) -> io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let at = off
            .checked_add(buf.len() as u64)
            .and_then(|at| libc::off_t::try_from(at).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let want = len - buf.len();
        let spare = &mut buf.spare_capacity_mut()[..want];
        // SAFETY: `pread` writes at most `spare.len()` bytes into `spare`,
        // memory this vector owns; the descriptor is open while `file` is
        // borrowed.
        let r = uninterrupted(|| unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast::<libc::c_void>(),
                spare.len(),
                at,
            )
        })?;
        if r == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        // SAFETY: `pread` initialised the next `r` bytes (r <= spare.len()).
        unsafe { buf.set_len(buf.len() + r) };
    }
    Ok(buf)
}

/// Run a read or write system call (`pread`, `pwritev`) again while it is
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
            read_exact_at(&f, 65_536, 1_000).expect("read"),
            &data[1_000..66_536]
        );
        assert_eq!(
            read_exact_at(&f, 0, 5).expect("empty read"),
            Vec::<u8>::new()
        );
        assert_eq!(
            read_exact_at(&f, 10, 199_990).expect("tail"),
            &data[199_990..]
        );
        let err = read_exact_at(&f, 11, 199_990).expect_err("past the end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
