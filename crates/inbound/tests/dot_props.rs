//! Property tests of the DATA decoder: stuffing and unstuffing round trip
//! however the input is split, bare LF ends content lines from everyone, and
//! the end of data is found exactly where the rules put it (trusted, i.e.
//! `bare_lf_end_networks`: a lone dot between any line endings; untrusted:
//! only CRLF.CRLF).

use inbound::dot::{DotDecoder, EndOfData, stuff};
use proptest::prelude::*;

/// Decode `input` split at `cuts`; returns (output, consumed, done).
fn decode_split(trusted: bool, input: &[u8], cuts: &[usize]) -> (Vec<u8>, usize, bool) {
    let mut d = DotDecoder::new(if trusted {
        EndOfData::AnyLineEnding
    } else {
        EndOfData::CrlfDotCrlf
    });
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort_unstable();
    let mut at = 0;
    for p in points {
        if p < at {
            continue;
        }
        let (n, done) = d.decode(&input[at..p], &mut out);
        consumed += n;
        if done {
            return (out, consumed, true);
        }
        assert_eq!(n, p - at, "all input taken while not done");
        at = p;
    }
    (out, consumed, false)
}

/// Lines of arbitrary bytes (no CR or LF inside), each ended by CRLF.
fn crlf_content() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        Just(b'.'),
        Just(b' '),
        any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n')
    ];
    prop::collection::vec(prop::collection::vec(byte, 0..12), 0..12).prop_map(|lines| {
        let mut v = Vec::new();
        for l in lines {
            v.extend_from_slice(&l);
            v.extend_from_slice(b"\r\n");
        }
        v
    })
}

/// Bytes rich in the characters that matter.
fn tricky() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a')],
        0..40,
    )
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn stuff_then_decode_round_trips(
        content in crlf_content(),
        trusted in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..5),
        after in tricky(),
    ) {
        let mut wire = Vec::new();
        stuff(&content, &mut wire);
        let end = wire.len();
        wire.extend_from_slice(&after);
        let (out, consumed, done) = decode_split(trusted, &wire, &cuts);
        prop_assert!(done);
        prop_assert_eq!(consumed, end, "stops right after the end-of-data line");
        prop_assert_eq!(out, content);
    }

    #[test]
    fn trusted_bare_lf_content_round_trips_normalised(
        lines in prop::collection::vec((prop::collection::vec(prop_oneof![Just(b'.'), Just(b'x'), Just(b' ')], 0..6), any::<bool>()), 0..10),
        cuts in prop::collection::vec(any::<usize>(), 0..5),
    ) {
        let mut content = Vec::new();
        let mut normalised = Vec::new();
        for (line, crlf) in lines {
            content.extend_from_slice(&line);
            content.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
            normalised.extend_from_slice(&line);
            normalised.extend_from_slice(b"\r\n");
        }
        let mut wire = Vec::new();
        stuff(&content, &mut wire);
        let (out, consumed, done) = decode_split(true, &wire, &cuts);
        prop_assert!(done);
        prop_assert_eq!(consumed, wire.len());
        prop_assert_eq!(out, normalised);
    }

    /// Bare LF ends content lines from untrusted clients too: their dot
    /// stuffing is removed and the lines stored with CRLF, provided the
    /// data ends with CRLF.CRLF (the last line before the dot ends in CRLF,
    /// as smtplib makes it).
    #[test]
    fn untrusted_bare_lf_content_round_trips_normalised(
        lines in prop::collection::vec((prop::collection::vec(prop_oneof![Just(b'.'), Just(b'x'), Just(b' ')], 0..6), any::<bool>()), 0..10),
        last in prop::collection::vec(prop_oneof![Just(b'.'), Just(b'x')], 0..4),
        cuts in prop::collection::vec(any::<usize>(), 0..5),
    ) {
        let mut content = Vec::new();
        let mut normalised = Vec::new();
        for (line, crlf) in lines {
            content.extend_from_slice(&line);
            content.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
            normalised.extend_from_slice(&line);
            normalised.extend_from_slice(b"\r\n");
        }
        content.extend_from_slice(&last);
        content.extend_from_slice(b"\r\n");
        normalised.extend_from_slice(&last);
        normalised.extend_from_slice(b"\r\n");
        let mut wire = Vec::new();
        stuff(&content, &mut wire);
        let (out, consumed, done) = decode_split(false, &wire, &cuts);
        prop_assert!(done);
        prop_assert_eq!(consumed, wire.len());
        prop_assert_eq!(out, normalised);
    }

    #[test]
    fn untrusted_data_ends_only_at_crlf_dot_crlf(
        input in tricky(),
        cuts in prop::collection::vec(any::<usize>(), 0..5),
    ) {
        let (out, consumed, done) = decode_split(false, &input, &cuts);
        let mut prefixed = b"\r\n".to_vec();
        prefixed.extend_from_slice(&input);
        match find(&prefixed, b"\r\n.\r\n") {
            Some(p) => {
                prop_assert!(done);
                prop_assert_eq!(consumed, p + 5 - 2);
            }
            None => {
                prop_assert!(!done);
                prop_assert_eq!(consumed, input.len());
            }
        }
        // What is stored never has a bare LF.
        for (i, b) in out.iter().enumerate() {
            if *b == b'\n' {
                prop_assert!(i > 0 && out[i - 1] == b'\r', "bare LF in output {:?}", out);
            }
        }
    }

    #[test]
    fn trusted_data_ends_at_a_lone_dot_after_any_line_ending(
        input in tricky(),
        cuts in prop::collection::vec(any::<usize>(), 0..5),
    ) {
        let (_, consumed, done) = decode_split(true, &input, &cuts);
        let mut prefixed = b"\n".to_vec();
        prefixed.extend_from_slice(&input);
        let expected = (0..prefixed.len()).find_map(|i| {
            let rest = &prefixed[i..];
            if rest.starts_with(b"\n.\n") {
                Some(i + 3 - 1)
            } else if rest.starts_with(b"\n.\r\n") {
                Some(i + 4 - 1)
            } else {
                None
            }
        });
        match expected {
            Some(end) => {
                prop_assert!(done);
                prop_assert_eq!(consumed, end);
            }
            None => prop_assert!(!done),
        }
    }
}
