//! The DATA decoder: finds the end of the message and removes dot-stuffing
//! (RFC 5321 4.5.2), and its inverse for senders.
//!
//! The rules, exactly (Postfix's `smtpd_forbid_bare_newline = normalize`):
//!
//! - A line starts at the beginning of the data, after a CRLF, and after a
//!   bare LF: from every client a bare LF ends a content line, and is
//!   written out as CRLF. A bare CR is kept as it is and ends nothing.
//! - A line that starts with a dot loses that dot (so the dot-stuffing of
//!   a client that ends its lines with bare LF, such as Python's `smtplib`
//!   given bytes, is removed too).
//! - The data ends with a line that is a lone dot. With
//!   [`EndOfData::CrlfDotCrlf`] (clients outside `[server]
//!   bare_lf_end_networks`) only `CRLF . CRLF` ends it: the dot's line must
//!   have started after a CRLF (or at the beginning) and end with CRLF. A
//!   lone dot next to a bare LF (`LF . LF`, `CRLF . LF`, `LF . CRLF`) is an
//!   empty content line. This is what stops SMTP smuggling
//!   (CVE-2023-51764), where a message hides a second SMTP transaction
//!   behind an end-of-data sequence that this server and the previous one
//!   read differently. With [`EndOfData::AnyLineEnding`] those three end
//!   the data too. `CR . CR` never ends anything.
//!
//! The decoder keeps its state between calls, so input may be split anywhere.
//!
//! So the output differs from the input only at a bare LF, at a dot that
//! starts a line, and at the end-of-data line. In ordinary text the decoder
//! therefore looks only at the LFs: a run of lines that each end with CRLF
//! and do not start with a dot goes to the [`Sink`] unchanged, in one
//! [`Sink::put_input`] call. A byte-at-a-time state machine handles the
//! rest: a bare LF, a line that starts with a dot, and a CR at the end of
//! the input (written only once the next byte shows what it is). With
//! [`Borrowing`] a caller gets the decoded bytes as a slice of its own
//! input when they are one unchanged piece of it, without a copy.

use std::ops::Range;

use memchr::memchr_iter;

/// Where decoded bytes go.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);

    /// Bytes copied unchanged from the input of the [`DotDecoder::decode`]
    /// call in progress: `bytes` is `input[at..at + bytes.len()]`. The
    /// default forgets where they came from.
    fn put_input(&mut self, at: usize, bytes: &[u8]) {
        let _ = at;
        self.put(bytes);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A sink that throws everything away (an oversized body being skipped).
pub struct Discard;

impl Sink for Discard {
    fn put(&mut self, _: &[u8]) {}
}

/// A sink for one [`DotDecoder::decode`] call that copies only when it
/// must: while everything decoded is one contiguous, unchanged piece of the
/// input (no dot removed, no bare LF rewritten, no CR carried over from
/// the call before), it only notes where that piece is; otherwise it
/// copies what was decoded into its buffer. [`Borrowing::into_bytes`]
/// gives the decoded bytes either way. (The end-of-data line is not
/// decoded output: a message's last piece is usually borrowed too.)
pub struct Borrowing<'a> {
    input: &'a [u8],
    buf: &'a mut Vec<u8>,
    /// While nothing is copied: where in `input` the decoded bytes are.
    span: Range<usize>,
    /// The decoded bytes are in `buf`.
    copied: bool,
}

impl<'a> Borrowing<'a> {
    /// A sink for decoding `input`, copying into `buf` (cleared) if it must.
    pub fn new(input: &'a [u8], buf: &'a mut Vec<u8>) -> Borrowing<'a> {
        buf.clear();
        Borrowing {
            input,
            buf,
            span: 0..0,
            copied: false,
        }
    }

    /// What was decoded: a slice of the input, or of the buffer.
    pub fn into_bytes(self) -> &'a [u8] {
        if self.copied {
            self.buf
        } else {
            self.input.get(self.span).unwrap_or_default()
        }
    }

    /// Whether the decoded bytes are a slice of the input (nothing copied).
    pub fn is_borrowed(&self) -> bool {
        !self.copied
    }

    /// From now on the decoded bytes are copied: copy what was noted.
    #[cold]
    fn spill(&mut self) {
        self.copied = true;
        let kept = self.input.get(self.span.clone()).unwrap_or_default();
        self.buf.reserve(self.input.len());
        self.buf.extend_from_slice(kept);
    }
}

impl Sink for Borrowing<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if !self.copied {
            self.spill();
        }
        self.buf.extend_from_slice(bytes);
    }

    fn put_input(&mut self, at: usize, bytes: &[u8]) {
        debug_assert_eq!(
            self.input.get(at..at.saturating_add(bytes.len())),
            Some(bytes),
            "put_input: not the input's bytes at {at}"
        );
        if self.copied {
            self.buf.extend_from_slice(bytes);
        } else if self.span.is_empty() {
            self.span = at..at.saturating_add(bytes.len());
        } else if self.span.end == at {
            self.span.end = at.saturating_add(bytes.len());
        } else {
            self.put(bytes);
        }
    }
}

/// Which lone-dot lines end the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndOfData {
    /// Only `CRLF . CRLF` (clients outside `bare_lf_end_networks`).
    CrlfDotCrlf,
    /// A lone dot between any two line endings, CRLF or bare LF
    /// (`bare_lf_end_networks`).
    AnyLineEnding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// At the start of a line; `bare`: the line before it ended with a
    /// bare LF.
    LineStart { bare: bool },
    /// Inside a line (or at the start of one that does not start with a
    /// dot): ordinary text, copied through by [`DotDecoder::text`].
    Mid,
    /// Inside a line, just after a CR that is not yet written out.
    Cr,
    /// A dot at the start of a line (not written out: removed or the end).
    Dot { bare: bool },
    /// A dot at the start of a line, then a CR.
    DotCr { bare: bool },
    /// The end of the data was found.
    Done,
}

/// A streaming DATA decoder; see the module documentation.
#[derive(Debug, Clone)]
pub struct DotDecoder {
    st: St,
    end: EndOfData,
}

impl DotDecoder {
    /// A decoder for one message, ending it as `end` says.
    pub fn new(end: EndOfData) -> DotDecoder {
        DotDecoder {
            st: St::LineStart { bare: false },
            end,
        }
    }

    /// Whether the end of the data has been seen.
    pub fn is_done(&self) -> bool {
        self.st == St::Done
    }

    /// Whether a lone dot whose line started after a bare LF (`bare`), or
    /// ends with one (`lf_end`), ends the data.
    fn ends(&self, bare: bool, lf_end: bool) -> bool {
        !(bare || lf_end) || self.end == EndOfData::AnyLineEnding
    }

    /// Decode `input`, writing message bytes to `out`. Returns how many
    /// bytes of `input` belong to the data (the end-of-data line included)
    /// and whether the end was found; bytes after it are the client's next
    /// commands.
    pub fn decode(&mut self, input: &[u8], out: &mut impl Sink) -> (usize, bool) {
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            match self.st {
                St::Done => return (i, true),
                St::Mid => i = self.text(input, i, out),
                St::LineStart { bare } => match b {
                    b'.' => {
                        i += 1;
                        self.st = St::Dot { bare };
                    }
                    // Any other line is text from its first byte (a CR,
                    // or a bare LF, which `text` writes as CRLF).
                    _ => self.st = St::Mid,
                },
                St::Cr => match b {
                    b'\n' => {
                        i += 1;
                        out.put(b"\r\n");
                        self.st = St::LineStart { bare: false };
                    }
                    _ => {
                        // A bare CR: keep it; `text` goes on from the byte
                        // after it (another CR included).
                        out.put(b"\r");
                        self.st = St::Mid;
                    }
                },
                St::Dot { bare } => match b {
                    b'\r' => {
                        i += 1;
                        self.st = St::DotCr { bare };
                    }
                    b'\n' if self.ends(bare, true) => {
                        self.st = St::Done;
                        return (i + 1, true);
                    }
                    b'\n' => {
                        // A lone dot ended by a bare LF, from a client that
                        // must send CRLF.CRLF: not the end but an empty
                        // line (the stuffed dot goes).
                        i += 1;
                        self.bare_lf(out);
                    }
                    // The stuffed dot goes; the byte after it is ordinary.
                    _ => self.st = St::Mid,
                },
                St::DotCr { bare } => match b {
                    b'\n' if self.ends(bare, false) => {
                        self.st = St::Done;
                        return (i + 1, true);
                    }
                    b'\n' => {
                        // `LF . CRLF` from a client that must send
                        // CRLF.CRLF: an empty line.
                        i += 1;
                        out.put(b"\r\n");
                        self.st = St::LineStart { bare: false };
                    }
                    b'\r' => {
                        i += 1;
                        out.put(b"\r");
                        self.st = St::Cr;
                    }
                    _ => {
                        out.put(b"\r");
                        self.st = St::Mid;
                    }
                },
            }
        }
        (input.len(), self.st == St::Done)
    }

    /// Ordinary text from `input[start]` on, in state `Mid` (no CR waiting
    /// before it, and `input[start]` is not a dot that starts a line):
    /// written out unchanged and in one piece, across CRLF line endings, up
    /// to the first bare LF (written as CRLF), line that starts with a dot,
    /// or the end of the input. Returns where decoding goes on.
    fn text(&mut self, input: &[u8], start: usize, out: &mut impl Sink) -> usize {
        let rest = input.get(start..).unwrap_or_default();
        for lf in memchr_iter(b'\n', rest) {
            let crlf = lf
                .checked_sub(1)
                .and_then(|p| rest.get(p))
                .is_some_and(|&b| b == b'\r');
            if !crlf {
                put_text(out, start, rest.get(..lf).unwrap_or_default());
                self.bare_lf(out);
                return start + lf + 1;
            }
            // A CRLF: the next line is text too unless it starts with a
            // dot, or starts in the next call.
            let next = lf + 1;
            if matches!(rest.get(next), Some(b'.') | None) {
                put_text(out, start, rest.get(..next).unwrap_or_default());
                self.st = St::LineStart { bare: false };
                return start + next;
            }
        }
        // No line ending left: all text, but a CR at the very end waits for
        // the next call to show what follows it.
        let (len, st) = match rest.split_last() {
            Some((b'\r', head)) => (head.len(), St::Cr),
            _ => (rest.len(), St::Mid),
        };
        put_text(out, start, rest.get(..len).unwrap_or_default());
        self.st = st;
        input.len()
    }

    /// A bare LF: written as CRLF; it ends the line.
    fn bare_lf(&mut self, out: &mut impl Sink) {
        out.put(b"\r\n");
        self.st = St::LineStart { bare: true };
    }
}

/// Write `text`, `input[at..]`, unless it is empty.
fn put_text(out: &mut impl Sink, at: usize, text: &[u8]) {
    if !text.is_empty() {
        out.put_input(at, text);
    }
}

/// Dot-stuff `content` for sending after DATA: a dot is added to every line
/// that starts with one (a line starts at the beginning and after any LF),
/// a CRLF is added if the content does not end with a line ending, and the
/// end-of-data line `.CRLF` is appended.
pub fn stuff(content: &[u8], out: &mut Vec<u8>) {
    out.reserve(content.len() + content.len() / 64 + 5);
    let mut at_line_start = true;
    let mut rest = content;
    while !rest.is_empty() {
        if at_line_start && rest.first() == Some(&b'.') {
            out.push(b'.');
        }
        match memchr::memchr(b'\n', rest) {
            Some(k) => {
                let (line, tail) = rest.split_at(k + 1);
                out.extend_from_slice(line);
                rest = tail;
                at_line_start = true;
            }
            None => {
                out.extend_from_slice(rest);
                rest = &[];
                at_line_start = false;
            }
        }
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests;
