//! The decoder's tests, and the state machine it had before its fast path,
//! kept as the reference it is checked against.

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

/// The decoder as it was before [`DotDecoder::text`] (one state change
/// per line ending, CR and line-start byte), kept as the reference the
/// decoder must agree with byte for byte, call for call.
struct Reference {
    st: St,
    end: EndOfData,
}

impl Reference {
    fn new(end: EndOfData) -> Reference {
        Reference {
            st: St::LineStart { bare: false },
            end,
        }
    }

    fn ends(&self, bare: bool, lf_end: bool) -> bool {
        !(bare || lf_end) || self.end == EndOfData::AnyLineEnding
    }

    fn decode(&mut self, input: &[u8], out: &mut impl Sink) -> (usize, bool) {
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            match self.st {
                St::Done => return (i, true),
                St::Mid => {
                    let rest = input.get(i..).unwrap_or_default();
                    match memchr::memchr2(b'\r', b'\n', rest) {
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
                        i += 1;
                        self.bare_lf(out);
                    }
                    _ => self.st = St::Mid,
                },
                St::DotCr { bare } => match b {
                    b'\n' if self.ends(bare, false) => {
                        self.st = St::Done;
                        return (i + 1, true);
                    }
                    b'\n' => {
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

    fn bare_lf(&mut self, out: &mut impl Sink) {
        out.put(b"\r\n");
        self.st = St::LineStart { bare: true };
    }
}

/// xorshift64*: deterministic test inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() >> 32) as usize % n.max(1)
    }
}

/// Input rich in what matters: either every byte from `\r \n . a`
/// (with an occasional other byte), or text lines ending in CRLF with
/// the odd dot, bare LF, bare CR and lone-dot line mixed in.
fn generate(rng: &mut Rng) -> Vec<u8> {
    let mut v = Vec::new();
    if rng.below(2) == 0 {
        let len = rng.below(48);
        for _ in 0..len {
            v.push(match rng.below(13) {
                0..=2 => b'\r',
                3..=5 => b'\n',
                6..=8 => b'.',
                9..=11 => b'a',
                _ => b' ',
            });
        }
    } else {
        let pieces = rng.below(24);
        for _ in 0..pieces {
            match rng.below(16) {
                0..=5 => v.extend_from_slice(b"\r\n"),
                6..=9 => v.extend(std::iter::repeat_n(b'a', 1 + rng.below(20))),
                10 | 11 => v.push(b'.'),
                12 => v.push(b'\n'),
                13 => v.push(b'\r'),
                14 => v.extend_from_slice(b"\r\n.\r\n"),
                _ => v.extend_from_slice(b"\n.\n"),
            }
        }
    }
    v
}

#[test]
fn agrees_with_the_reference_decoder_however_split() {
    let mut rng = Rng(0x00DD_B1A5_E5ED);
    for case in 0..20_000 {
        let input = generate(&mut rng);
        let mut cuts: Vec<usize> = (0..rng.below(4))
            .map(|_| rng.below(input.len() + 1))
            .collect();
        cuts.push(input.len());
        cuts.sort_unstable();
        for end in [EndOfData::CrlfDotCrlf, EndOfData::AnyLineEnding] {
            let mut new = DotDecoder::new(end);
            let mut borrowing = DotDecoder::new(end);
            let mut old = Reference::new(end);
            let mut buf = Vec::new();
            let mut at = 0;
            for &cut in &cuts {
                let piece = &input[at..cut];
                at = cut;
                let mut want = Vec::new();
                let want_r = old.decode(piece, &mut want);
                let mut got = Vec::new();
                let got_r = new.decode(piece, &mut got);
                let ctx = || format!("case {case}, {end:?}, {input:?} cut at {cuts:?}");
                assert_eq!(got_r, want_r, "(used, done): {}", ctx());
                assert_eq!(got, want, "output: {}", ctx());
                assert_eq!(new.st, old.st, "state after the call: {}", ctx());
                assert_eq!(new.is_done(), want_r.1, "{}", ctx());
                // What data_step hands the spool.
                let mut sink = Borrowing::new(piece, &mut buf);
                assert_eq!(borrowing.decode(piece, &mut sink), want_r, "{}", ctx());
                assert_eq!(sink.into_bytes(), want, "borrowed output: {}", ctx());
            }
        }
    }
}

/// A sink that counts the calls.
#[derive(Default)]
struct Counting {
    bytes: Vec<u8>,
    puts: usize,
}

impl Sink for Counting {
    fn put(&mut self, bytes: &[u8]) {
        self.puts += 1;
        self.bytes.extend_from_slice(bytes);
    }
}

/// `n` bytes of 78-byte lines (76 bytes of text and CRLF).
fn text_lines(n: usize) -> Vec<u8> {
    let line: Vec<u8> = (0..76u8).map(|i| b'A' + i % 26).chain(*b"\r\n").collect();
    line.iter().copied().cycle().take(n).collect()
}

#[test]
fn ordinary_text_goes_out_in_one_piece() {
    let data = text_lines(64 << 10);
    let mut d = DotDecoder::new(EndOfData::CrlfDotCrlf);
    let mut out = Counting::default();
    assert_eq!(d.decode(&data, &mut out), (data.len(), false));
    assert_eq!(out.bytes, data);
    assert!(out.puts <= 2, "{} puts for 64 KiB of text", out.puts);
}

#[test]
fn a_large_message_is_borrowed_not_copied() {
    // 1 MB of text and the end of data, read 64 KiB at a time, as
    // data_step sees it: every piece is a slice of its input.
    let mut wire = text_lines(1 << 20);
    let content_len = wire.len() / 78 * 78;
    wire.truncate(content_len);
    assert!(wire.ends_with(b"\r\n"));
    wire.extend_from_slice(b".\r\nQUIT\r\n");
    let mut d = DotDecoder::new(EndOfData::CrlfDotCrlf);
    let mut buf = Vec::new();
    let mut stored = Vec::new();
    let mut pos = 0;
    while !d.is_done() {
        assert!(pos < wire.len(), "the end of data was not found");
        let input = &wire[pos..wire.len().min(pos + (64 << 10))];
        let mut sink = Borrowing::new(input, &mut buf);
        let (used, _) = d.decode(input, &mut sink);
        assert!(sink.is_borrowed(), "piece at {pos} was copied");
        stored.extend_from_slice(sink.into_bytes());
        pos += used;
    }
    assert_eq!(pos, content_len + 3);
    assert_eq!(stored, wire[..content_len]);
    // And the puts stay few.
    let mut d = DotDecoder::new(EndOfData::CrlfDotCrlf);
    let mut out = Counting::default();
    for piece in wire.chunks(64 << 10) {
        d.decode(piece, &mut out);
    }
    assert_eq!(out.bytes, wire[..content_len]);
    assert!(out.puts <= 2 * 17, "{} puts", out.puts);
}

#[test]
fn stuffed_dots_and_bare_lf_are_copied() {
    for (input, want) in [
        (&b"a\r\n..b\r\n"[..], &b"a\r\n.b\r\n"[..]),
        (b"a\nb\r\n", b"a\r\nb\r\n"),
        (b"a\r\nb\r\n.\r\n", b"a\r\nb\r\n"),
    ] {
        let mut d = DotDecoder::new(EndOfData::CrlfDotCrlf);
        let mut buf = b"old".to_vec();
        let mut sink = Borrowing::new(input, &mut buf);
        d.decode(input, &mut sink);
        let borrowed = sink.is_borrowed();
        assert_eq!(sink.into_bytes(), want);
        assert_eq!(borrowed, input.starts_with(want), "{input:?}");
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
