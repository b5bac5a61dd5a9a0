//! The DATA decoder on arbitrary bytes, cut into arbitrary reads.
//!
//! Input: byte 0 bit 0 = trusted client; byte 1 = how the rest is cut
//! (0: one read; otherwise pseudo-random pieces of 1..=2*byte bytes); the
//! rest is what follows `354`.
//!
//! What must hold:
//!
//! - no panic; each call takes all it is given until the end is found, and
//!   never more than it is given;
//! - the result does not depend on how the input is cut;
//! - from an untrusted client the data ends exactly after the first
//!   `CRLF.CRLF` (counting the CRLF before the data), and from a trusted one
//!   no later than that;
//! - what is stored has no bare LF;
//! - stuffing the stored message again and decoding it gives it back.

#![no_main]

use inbound::dot::{DotDecoder, EndOfData, stuff};
use libfuzzer_sys::fuzz_target;

fn decode(trusted: bool, pieces: &[&[u8]]) -> (Vec<u8>, usize, bool) {
    let mut d = DotDecoder::new(if trusted {
        EndOfData::AnyLineEnding
    } else {
        EndOfData::CrlfDotCrlf
    });
    let mut out = Vec::new();
    let mut used = 0;
    for p in pieces {
        let (n, done) = d.decode(p, &mut out);
        assert!(n <= p.len(), "took more than it was given");
        used += n;
        assert_eq!(done, d.is_done());
        if done {
            return (out, used, true);
        }
        assert_eq!(n, p.len(), "left input behind before the end");
    }
    (out, used, false)
}

fn cut(stream: &[u8], seed: u8) -> Vec<&[u8]> {
    if seed == 0 {
        return vec![stream];
    }
    let max = usize::from(seed) * 2;
    let mut state = u32::from(seed).wrapping_mul(0x9E37_79B9) | 1;
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (1 + state as usize % max).min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let [flags, seed, stream @ ..] = data else {
        return;
    };
    let trusted = flags & 1 != 0;
    let whole = decode(trusted, &[stream]);
    let split = decode(trusted, &cut(stream, *seed));
    assert_eq!(whole, split, "the result depends on how the input is cut");
    let (out, used, done) = whole;

    let mut prefixed = b"\r\n".to_vec();
    prefixed.extend_from_slice(stream);
    let crlf_end = find(&prefixed, b"\r\n.\r\n").map(|p| p + 3);
    if trusted {
        if let Some(end) = crlf_end {
            assert!(
                done && used <= end,
                "trusted: CRLF.CRLF at {end} did not end the data"
            );
        }
    } else {
        match crlf_end {
            Some(end) => assert!(done && used == end, "untrusted: ended at {used}, not {end}"),
            None => assert!(!done, "untrusted: ended without CRLF.CRLF"),
        }
    }

    for (i, b) in out.iter().enumerate() {
        if *b == b'\n' {
            assert!(i > 0 && out[i - 1] == b'\r', "bare LF stored at {i}");
        }
    }

    if done {
        assert!(
            out.is_empty() || out.ends_with(b"\r\n"),
            "a finished message ends with CRLF"
        );
        let mut wire = Vec::new();
        stuff(&out, &mut wire);
        for t in [false, true] {
            let (again, n, d) = decode(t, &[&wire]);
            assert!(
                d && n == wire.len(),
                "restuffed data did not end where it should"
            );
            assert_eq!(
                again, out,
                "stuff then decode is not the identity (trusted: {t})"
            );
        }
    }
});
