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

use memchr::memchr2;

/// Where decoded bytes go.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
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
    /// Inside a line.
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
                St::Mid => {
                    let rest = input.get(i..).unwrap_or_default();
                    match memchr2(b'\r', b'\n', rest) {
                        None => {
                            out.put(rest);
                            return (input.len(), false);
                        }
                        Some(k) => {
                            out.put(rest.get(..k).unwrap_or_default());
                            i += k + 1;
                            if rest.get(k) == Some(&b'\r') {
                                self.st = St::Cr;
                            } else {
                                self.bare_lf(out);
                            }
                        }
                    }
                }
                St::LineStart { bare } => {
                    i += 1;
                    match b {
                        b'.' => self.st = St::Dot { bare },
                        b'\r' => self.st = St::Cr,
                        b'\n' => self.bare_lf(out),
                        _ => {
                            out.put(&[b]);
                            self.st = St::Mid;
                        }
                    }
                }
                St::Cr => match b {
                    b'\n' => {
                        i += 1;
                        out.put(b"\r\n");
                        self.st = St::LineStart { bare: false };
                    }
                    b'\r' => {
                        i += 1;
                        out.put(b"\r");
                    }
                    _ => {
                        // A bare CR: keep it; the byte after it is ordinary.
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

    /// A bare LF: written as CRLF; it ends the line.
    fn bare_lf(&mut self, out: &mut impl Sink) {
        out.put(b"\r\n");
        self.st = St::LineStart { bare: true };
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
mod tests {
    use super::*;

    fn run(trusted: bool, input: &[u8]) -> (Vec<u8>, usize, bool) {
        let mut d = DotDecoder::new(if trusted {
            EndOfData::AnyLineEnding
        } else {
            EndOfData::CrlfDotCrlf
        });
        let mut out = Vec::new();
        let (n, done) = d.decode(input, &mut out);
        (out, n, done)
    }

    #[test]
    fn standard_end_and_unstuffing() {
        let (out, n, done) = run(false, b"a\r\n..b\r\n.c\r\n.\r\nQUIT\r\n");
        assert!(done);
        assert_eq!(n, 15);
        assert_eq!(out, b"a\r\n.b\r\nc\r\n");
    }

    #[test]
    fn empty_message() {
        let (out, n, done) = run(false, b".\r\n");
        assert!(done);
        assert_eq!(n, 3);
        assert!(out.is_empty());
    }

    #[test]
    fn bare_lf_ends_data_only_for_trusted() {
        for end in [&b"\n.\n"[..], b"\r\n.\n", b"\n.\r\n"] {
            let mut input = b"hello".to_vec();
            input.extend_from_slice(end);
            input.extend_from_slice(b"MAIL FROM:<x@y>\r\n");
            let (out, n, done) = run(true, &input);
            assert!(done, "{end:?}");
            assert_eq!(n, 5 + end.len());
            assert_eq!(out, b"hello\r\n");
            let (_, n, done) = run(false, &input);
            assert!(!done, "{end:?} must not end DATA from an untrusted client");
            assert_eq!(n, input.len());
        }
    }

    #[test]
    fn cr_dot_cr_never_ends() {
        for trusted in [true, false] {
            let (out, _, done) = run(trusted, b"a\r.\rb\r\n.\rc\r.\r\n");
            assert!(!done);
            assert_eq!(out, b"a\r.\rb\r\n\rc\r.\r\n");
        }
    }

    #[test]
    fn bare_lf_is_normalised() {
        let (out, _, done) = run(false, b"a\nb\r\n.\r\n");
        assert!(done);
        assert_eq!(out, b"a\r\nb\r\n");
        let (out, _, done) = run(true, b"a\n..b\n.\n");
        assert!(done);
        assert_eq!(out, b"a\r\n.b\r\n");
    }

    #[test]
    fn bare_lf_ends_content_lines_from_everyone() {
        // smtplib given bytes with LF endings: its stuffed dots go.
        for trusted in [true, false] {
            let (out, _, done) = run(trusted, b"a\n...two\n..one\n\r\n.\r\n");
            assert!(done);
            assert_eq!(out, b"a\r\n..two\r\n.one\r\n\r\n", "trusted: {trusted}");
        }
        // A lone dot next to a bare LF is an empty line for the others.
        let (out, _, done) = run(false, b"a\n.\nb\r\n.\nc\n.\r\nd\r\n.\r\n");
        assert!(done);
        assert_eq!(out, b"a\r\n\r\nb\r\n\r\nc\r\n\r\nd\r\n");
    }

    #[test]
    fn split_anywhere() {
        let input = b"x\r\n..y\r\n\r\n.\r\n";
        for cut in 0..input.len() {
            let mut d = DotDecoder::new(EndOfData::CrlfDotCrlf);
            let mut out = Vec::new();
            let (a, done) = d.decode(&input[..cut], &mut out);
            assert_eq!(a, cut);
            assert!(!done);
            let (b, done) = d.decode(&input[cut..], &mut out);
            assert!(done);
            assert_eq!(a + b, input.len());
            assert_eq!(out, b"x\r\n.y\r\n\r\n");
        }
    }

    #[test]
    fn stuffing() {
        let mut out = Vec::new();
        stuff(b".a\r\nb\r\n.\r\n", &mut out);
        assert_eq!(out, b"..a\r\nb\r\n..\r\n.\r\n");
        out.clear();
        stuff(b"no newline", &mut out);
        assert_eq!(out, b"no newline\r\n.\r\n");
        out.clear();
        stuff(b"", &mut out);
        assert_eq!(out, b".\r\n");
    }
}
