//! One batch of records on its way to a segment file, written with one
//! vectored write: record headers and small payloads are framed into a
//! small buffer, body chunks are handed to the kernel as they came from the
//! sessions, never copied on the way.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;

use tokio::sync::OwnedSemaphorePermit;

use crate::record::{self, Kind};

/// Payload pieces shorter than this are copied into the batch's buffer
/// (cheaper than one more entry in the vectored write).
const COPY_BELOW: usize = 4 << 10;

/// Most entries one `pwritev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

enum Piece {
    /// `buf[start..end]`.
    Buf(usize, usize),
    /// `held[i]`.
    Held(usize),
}

/// A position in a batch, to cut it back to.
#[derive(Clone, Copy)]
pub(crate) struct Mark {
    buf: usize,
    pieces: usize,
    held: usize,
    len: usize,
}

impl Mark {
    /// Bytes before the mark.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[derive(Default)]
pub(crate) struct Batch {
    buf: Vec<u8>,
    pieces: Vec<Piece>,
    held: Vec<Vec<u8>>,
    /// The in-flight budget of the held chunks: given back once they are
    /// written.
    permits: Vec<[OwnedSemaphorePermit; 2]>,
    len: usize,
}

impl Batch {
    /// Bytes in the batch.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn mark(&self) -> Mark {
        Mark {
            buf: self.buf.len(),
            pieces: self.pieces.len(),
            held: self.held.len(),
            len: self.len,
        }
    }

    /// Forget everything past `m`.
    pub(crate) fn truncate(&mut self, m: Mark) {
        self.buf.truncate(m.buf);
        self.pieces.truncate(m.pieces);
        self.held.truncate(m.held);
        self.len = m.len;
    }

    /// Empty the batch, giving back the held chunks and their budget. The
    /// small buffer keeps a modest capacity, not the peak of a burst.
    pub(crate) fn clear(&mut self) {
        self.truncate(Mark {
            buf: 0,
            pieces: 0,
            held: 0,
            len: 0,
        });
        self.permits.clear();
        if self.buf.capacity() > 256 << 10 {
            self.buf = Vec::new();
        }
        self.pieces.shrink_to(1024);
        self.held.shrink_to(256);
    }

    /// Keep a chunk's share of the in-flight budget until the batch is
    /// written.
    pub(crate) fn hold_permits(&mut self, p: [OwnedSemaphorePermit; 2]) {
        self.permits.push(p);
    }

    fn push_buf(&mut self, bytes: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(bytes);
        match self.pieces.last_mut() {
            Some(Piece::Buf(_, end)) if *end == start => *end = self.buf.len(),
            _ => self.pieces.push(Piece::Buf(start, self.buf.len())),
        }
        self.len += bytes.len();
    }

    /// Append one record whose payload is `small` followed by `big`;
    /// returns the offset of its payload within the batch.
    pub(crate) fn record(&mut self, seed: u32, kind: Kind, small: &[&[u8]], big: Vec<u8>) -> usize {
        let mut parts: Vec<&[u8]> = Vec::with_capacity(small.len() + 1);
        parts.extend_from_slice(small);
        parts.push(&big);
        let header = record::frame(seed, kind, &parts);
        self.push_buf(&header);
        let payload = self.len;
        for p in small {
            self.push_buf(p);
        }
        if big.len() < COPY_BELOW {
            self.push_buf(&big);
        } else {
            self.len += big.len();
            self.pieces.push(Piece::Held(self.held.len()));
            self.held.push(big);
        }
        payload
    }

    /// Bytes a record of this payload takes.
    pub(crate) fn record_len(small: &[&[u8]], big: &[u8]) -> u64 {
        (record::HEADER_LEN + small.iter().map(|p| p.len()).sum::<usize>() + big.len()) as u64
    }

    /// Write the batch up to `upto` (all of it when `None`) at `off`.
    pub(crate) fn write_at(&self, file: &File, off: u64, upto: Option<Mark>) -> io::Result<()> {
        let n = upto.map_or(self.pieces.len(), |m| m.pieces);
        let mut slices: Vec<IoSlice<'_>> = self.pieces[..n]
            .iter()
            .map(|p| match *p {
                Piece::Buf(s, e) => IoSlice::new(&self.buf[s..e]),
                Piece::Held(i) => IoSlice::new(&self.held[i]),
            })
            .collect();
        pwritev_all(file, &mut slices, off)
    }
}

/// `pwritev` until every byte is written.
fn pwritev_all(file: &File, mut bufs: &mut [IoSlice<'_>], mut off: u64) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let count = bufs.len().min(IOV_MAX);
        let at =
            libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix; the
        // slices borrow live buffers for the duration of the call, and the
        // descriptor is open while `file` is borrowed.
        let r = crate::fileio::uninterrupted(|| unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                bufs.as_ptr().cast::<libc::iovec>(),
                count as libc::c_int,
                at,
            )
        })?;
        if r == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        off += r as u64;
        IoSlice::advance_slices(&mut bufs, r);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_batch_writes_what_encode_would_have() {
        let f = tempfile::tempfile().unwrap();
        let seed = 0x1234_5678;
        let mut b = Batch::default();
        let mut expect = Vec::new();
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let p1 = b.record(seed, Kind::Data, &[b"idididid"], big.clone());
        let q1 = record::encode(&mut expect, seed, Kind::Data, &[b"idididid", &big]);
        assert_eq!(p1, q1);
        let m = b.mark();
        let p2 = b.record(seed, Kind::Remove, &[b"12345678"], Vec::new());
        let q2 = record::encode(&mut expect, seed, Kind::Remove, &[b"12345678", b""]);
        assert_eq!(p2, q2);
        b.record(seed, Kind::Commit, &[b"head"], b"small tail".to_vec());
        record::encode(&mut expect, seed, Kind::Commit, &[b"head", b"small tail"]);
        assert_eq!(b.len(), expect.len());
        b.write_at(&f, 100, None).unwrap();
        let mut got = vec![0u8; expect.len()];
        f.read_exact_at(&mut got, 100).unwrap();
        assert_eq!(got, expect);
        // Up to a mark only.
        let g = tempfile::tempfile().unwrap();
        b.write_at(&g, 0, Some(m)).unwrap();
        assert_eq!(g.metadata().unwrap().len(), m.len() as u64);
        b.truncate(m);
        assert_eq!(b.len(), m.len());
    }
}
