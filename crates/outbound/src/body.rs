//! The message bytes as they go upstream: streamed from the spool, with the
//! optional `rewrite_from` header change, and dot-stuffed for `DATA`.

use spool::{BodyReader, MessageId, Spool, SpoolError};

/// The header section is read into memory (for `rewrite_from` and bounces)
/// up to this size; beyond it the message is sent unchanged.
pub(crate) const MAX_HEADER: usize = 1 << 20;

/// A change to a message's header section (input: the header section with
/// its blank line; output: the same shape).
pub(crate) type HeaderTransform<'a> = dyn Fn(&[u8]) -> Vec<u8> + Send + Sync + 'a;

/// The bytes of one message, ready to stream: `head` (in memory) then the
/// rest of the spool copy.
pub(crate) struct Body {
    head: Vec<u8>,
    reader: BodyReader,
    /// Total bytes that will be produced.
    pub size: u64,
}

impl Body {
    /// Open message `id`. With `rewrite_from = Some(email)`, `From:` becomes
    /// `email` and the original goes to `Reply-To:` (when there is none).
    pub(crate) async fn open(
        spool: &Spool,
        id: MessageId,
        rewrite_from: Option<&str>,
    ) -> Result<Body, SpoolError> {
        match rewrite_from {
            Some(email) => {
                Body::open_with(spool, id, Some(&|h: &[u8]| rewrite_headers(h, email))).await
            }
            None => Body::open_with(spool, id, None).await,
        }
    }

    /// Open message `id` with its header section (up to [`MAX_HEADER`],
    /// with its blank line) replaced by `transform`'s output. A message
    /// with a bigger header section is sent unchanged.
    pub(crate) async fn open_with(
        spool: &Spool,
        id: MessageId,
        transform: Option<&HeaderTransform<'_>>,
    ) -> Result<Body, SpoolError> {
        let mut reader = spool.read_body(id)?;
        let total = reader.len();
        let Some(transform) = transform else {
            return Ok(Body {
                head: Vec::new(),
                reader,
                size: total,
            });
        };
        let mut buf = Vec::new();
        let end = loop {
            if let Some(end) = header_end(&buf) {
                break Some(end);
            }
            if buf.len() > MAX_HEADER {
                break None;
            }
            match reader.next_chunk().await? {
                Some(c) => buf.extend_from_slice(&c),
                None => break None,
            }
        };
        let consumed = buf.len() as u64;
        let head = match end {
            Some(end) => {
                let mut head = transform(&buf[..end]);
                head.extend_from_slice(&buf[end..]);
                head
            }
            // A message that is all headers (no blank line) is rewritten
            // whole; one with a gigantic header section is sent as is.
            None if buf.len() <= MAX_HEADER => transform(&buf),
            None => buf,
        };
        let size = head.len() as u64 + (total - consumed);
        Ok(Body { head, reader, size })
    }

    /// Drop the first `n` bytes (resuming an upload).
    pub(crate) async fn skip(&mut self, mut n: u64) -> Result<(), SpoolError> {
        while n > 0 {
            let Some(mut c) = self.next().await? else {
                return Ok(());
            };
            if (c.len() as u64) <= n {
                n -= c.len() as u64;
                continue;
            }
            self.head = c.split_off(n as usize);
            return Ok(());
        }
        Ok(())
    }

    /// The next piece, or `None` at the end.
    pub(crate) async fn next(&mut self) -> Result<Option<Vec<u8>>, SpoolError> {
        if !self.head.is_empty() {
            return Ok(Some(std::mem::take(&mut self.head)));
        }
        self.reader.next_chunk().await
    }

    /// Everything in memory (small messages, sent in the same write as the
    /// commands).
    pub(crate) async fn read_all(mut self) -> Result<Vec<u8>, SpoolError> {
        let mut out = Vec::with_capacity(self.size as usize);
        while let Some(c) = self.next().await? {
            out.extend_from_slice(&c);
        }
        Ok(out)
    }
}

/// The header section of message `id` (up to [`MAX_HEADER`] bytes, ending
/// at the last complete line), without the blank line.
pub(crate) async fn read_headers(
    spool: &Spool,
    id: MessageId,
    limit: usize,
) -> Result<Vec<u8>, SpoolError> {
    let mut reader = spool.read_body(id)?;
    let mut buf = Vec::new();
    loop {
        if let Some(end) = header_end(&buf) {
            // Keep the last field's line end, drop the blank line.
            let blank = if buf[..end].ends_with(b"\r\n") { 2 } else { 1 };
            buf.truncate(end - blank);
            return Ok(buf);
        }
        if buf.len() > limit {
            break;
        }
        match reader.next_chunk().await? {
            Some(c) => buf.extend_from_slice(&c),
            None => break,
        }
    }
    // No blank line within the limit: whole lines only.
    buf.truncate(limit);
    match memchr::memrchr(b'\n', &buf) {
        Some(i) => buf.truncate(i + 1),
        None if !buf.is_empty() => buf.extend_from_slice(b"\r\n"),
        None => {}
    }
    Ok(buf)
}

/// Where the body starts: just after the blank line ending the header
/// section (`\r\n\r\n` or bare `\n\n`); `Some(0..2)` for no headers at all.
pub(crate) fn header_end(buf: &[u8]) -> Option<usize> {
    if buf.starts_with(b"\r\n") {
        return Some(2);
    }
    if buf.starts_with(b"\n") {
        return Some(1);
    }
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let at = from + i + 1;
        match &buf[at..] {
            [b'\r', b'\n', ..] => return Some(at + 2),
            [b'\n', ..] => return Some(at + 1),
            _ => from = at,
        }
    }
    None
}

/// Rewrite `From:` to `email` (keeping the display name) and add
/// `Reply-To:` with the original `From:` value when there is none. Input:
/// the header section, optionally with its blank line; other fields are
/// copied byte for byte.
pub(crate) fn rewrite_headers(header: &[u8], email: &str) -> Vec<u8> {
    // Split into fields (a line plus its continuation lines).
    let mut fields: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    let mut tail: &[u8] = &[];
    while i < header.len() {
        let end = memchr::memchr(b'\n', &header[i..])
            .map(|p| i + p + 1)
            .unwrap_or(header.len());
        let line = &header[i..end];
        if line == b"\r\n" || line == b"\n" {
            if start < i {
                fields.push(&header[start..i]);
            }
            tail = &header[i..];
            start = header.len();
            break;
        }
        if i > start && !matches!(line.first(), Some(b' ' | b'\t')) {
            fields.push(&header[start..i]);
            start = i;
        }
        i = end;
    }
    if start < header.len() {
        fields.push(&header[start..]);
    }

    let has_reply_to = fields.iter().any(|f| field_name_is(f, "reply-to"));
    let mut out = Vec::with_capacity(header.len() + 64 + email.len());
    let mut saw_from = false;
    for f in &fields {
        if !field_name_is(f, "from") {
            out.extend_from_slice(f);
            if !f.ends_with(b"\n") {
                out.extend_from_slice(b"\r\n");
            }
            continue;
        }
        let colon = f.iter().position(|&b| b == b':').unwrap_or(f.len());
        let raw = &f[(colon + 1).min(f.len())..];
        let raw = trim_line_end(raw);
        out.extend_from_slice(b"From: ");
        out.extend_from_slice(new_from(raw, email).as_bytes());
        out.extend_from_slice(b"\r\n");
        if !saw_from && !has_reply_to {
            out.extend_from_slice(b"Reply-To:");
            if !raw.starts_with(b" ") && !raw.starts_with(b"\t") {
                out.push(b' ');
            }
            out.extend_from_slice(raw);
            out.extend_from_slice(b"\r\n");
        }
        saw_from = true;
    }
    if !saw_from {
        out.extend_from_slice(format!("From: {email}\r\n").as_bytes());
    }
    out.extend_from_slice(tail);
    out
}

fn trim_line_end(b: &[u8]) -> &[u8] {
    let b = b.strip_suffix(b"\n").unwrap_or(b);
    b.strip_suffix(b"\r").unwrap_or(b)
}

fn field_name_is(field: &[u8], name: &str) -> bool {
    let Some(colon) = field.iter().position(|&b| b == b':') else {
        return false;
    };
    std::str::from_utf8(&field[..colon])
        .map(|n| n.trim().eq_ignore_ascii_case(name))
        .unwrap_or(false)
}

/// `"Scanner" <scan@local>` -> `"Scanner" <email>`; no display name ->
/// `email`.
fn new_from(raw: &[u8], email: &str) -> String {
    let unfolded: String = String::from_utf8_lossy(raw)
        .split(['\r', '\n'])
        .collect::<Vec<_>>()
        .join("");
    let value = unfolded.trim();
    if let Some(lt) = value.rfind('<') {
        let display = value[..lt].trim();
        if !display.is_empty() {
            return format!("{display} <{email}>");
        }
    }
    email.to_string()
}

/// Dot-stuffing for `DATA` (RFC 5321 4.5.2), across chunk boundaries. A bare
/// LF or a bare CR is sent as CRLF so no server can see a line end we did
/// not mean (SMTP smuggling: some servers take `\r.\r` or `\n.\n` as the
/// end of data); CRLF messages (everything the inbound side stores from
/// trusted clients) go out byte for byte apart from the stuffed dots. `BDAT`
/// does not come through here: it sends the bytes exactly.
pub(crate) struct DotStuffer {
    at_line_start: bool,
    /// The last byte was a CR whose LF has not been seen yet.
    prev_cr: bool,
}

impl DotStuffer {
    pub(crate) fn new() -> DotStuffer {
        DotStuffer {
            at_line_start: true,
            prev_cr: false,
        }
    }

    pub(crate) fn stuff(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + input.len() / 64 + 8);
        for &b in input {
            if self.prev_cr && b != b'\n' {
                // A bare CR: end the line it started.
                out.push(b'\n');
                self.at_line_start = true;
            }
            if self.at_line_start && b == b'.' {
                out.push(b'.');
            }
            if b == b'\n' && !self.prev_cr {
                out.push(b'\r');
            }
            out.push(b);
            self.at_line_start = b == b'\n';
            self.prev_cr = b == b'\r';
        }
    }

    /// The end-of-data marker (with a line end first if the message lacked
    /// one).
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.at_line_start {
            if self.prev_cr {
                out.push(b'\n');
            } else {
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_header_end() {
        assert_eq!(header_end(b"A: b\r\n\r\nbody"), Some(8));
        assert_eq!(header_end(b"A: b\n\nbody"), Some(6));
        assert_eq!(header_end(b"\r\nbody"), Some(2));
        assert_eq!(header_end(b"A: b\r\nC: d\r\n"), None);
    }

    #[test]
    fn rewrites_from_and_adds_reply_to() {
        let h = b"Subject: scan\r\nFrom: \"HP Scanner\" <scan@office.lan>\r\nTo: a@b.c\r\n\r\n";
        let out = rewrite_headers(h, "me@gmail.com");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Subject: scan\r\nFrom: \"HP Scanner\" <me@gmail.com>\r\nReply-To: \"HP Scanner\" <scan@office.lan>\r\nTo: a@b.c\r\n\r\n"
        );
    }

    #[test]
    fn keeps_existing_reply_to_and_folded_fields() {
        let h = b"X-Long: a\r\n\tb\r\nfrom: cron@host\r\nReply-To: admin@x.y\r\n\r\n";
        let out = String::from_utf8(rewrite_headers(h, "me@gmail.com")).unwrap();
        assert_eq!(
            out,
            "X-Long: a\r\n\tb\r\nFrom: me@gmail.com\r\nReply-To: admin@x.y\r\n\r\n"
        );
    }

    #[test]
    fn adds_from_when_missing() {
        let out =
            String::from_utf8(rewrite_headers(b"Subject: x\r\n\r\n", "me@gmail.com")).unwrap();
        assert_eq!(out, "Subject: x\r\nFrom: me@gmail.com\r\n\r\n");
    }

    #[test]
    fn folded_from_keeps_display_name() {
        let h = b"From: Very Long Name\r\n <x@y.z>\r\n\r\n";
        let out = String::from_utf8(rewrite_headers(h, "me@gmail.com")).unwrap();
        assert_eq!(
            out,
            "From: Very Long Name <me@gmail.com>\r\nReply-To: Very Long Name\r\n <x@y.z>\r\n\r\n"
        );
    }

    fn stuff_all(pieces: &[&[u8]]) -> Vec<u8> {
        let mut s = DotStuffer::new();
        let mut out = Vec::new();
        for p in pieces {
            s.stuff(p, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn dot_stuffing_across_chunks() {
        assert_eq!(
            stuff_all(&[b".a\r\n", b".", b"b\r\nc"]),
            b"..a\r\n..b\r\nc\r\n.\r\n"
        );
        assert_eq!(stuff_all(&[b"a\r", b"\n.\r\n"]), b"a\r\n..\r\n.\r\n");
        assert_eq!(stuff_all(&[b"x\n.\n"]), b"x\r\n..\r\n.\r\n");
        assert_eq!(stuff_all(&[b""]), b".\r\n");
        assert_eq!(stuff_all(&[b"a\r"]), b"a\r\n.\r\n");
    }

    #[test]
    fn bare_cr_is_sent_as_crlf() {
        assert_eq!(stuff_all(&[b"a\rb\r\n"]), b"a\r\nb\r\n.\r\n");
        // `\r.\r` must not reach a server that ends DATA on it: the dot
        // starts a line and is stuffed.
        assert_eq!(stuff_all(&[b"x\r.\ry"]), b"x\r\n..\r\ny\r\n.\r\n");
        // Across chunk boundaries.
        assert_eq!(
            stuff_all(&[b"x\r", b".y\r", b"\r\n"]),
            b"x\r\n..y\r\n\r\n.\r\n"
        );
        assert_eq!(stuff_all(&[b"\r\r\n"]), b"\r\n\r\n.\r\n");
        // A message ending in a bare CR.
        assert_eq!(stuff_all(&[b"a\rb\r"]), b"a\r\nb\r\n.\r\n");
        // CRLF text is unchanged apart from stuffing.
        assert_eq!(stuff_all(&[b"a\r\n.b\r\n"]), b"a\r\n..b\r\n.\r\n");
    }

    /// What an RFC 5321 server makes of the bytes after `354`: lines end
    /// at CRLF, the line `.` ends the data, a leading dot is dropped. An
    /// error for a bare CR or LF, a missing end, or bytes after the end.
    fn unstuff(wire: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let mut rest = wire;
        loop {
            let Some(p) = rest.windows(2).position(|w| w == b"\r\n") else {
                return Err(format!("no end of data; left: {rest:?}"));
            };
            let line = &rest[..p];
            if line.iter().any(|&b| b == b'\r' || b == b'\n') {
                return Err(format!("bare CR or LF in {line:?}"));
            }
            rest = &rest[p + 2..];
            if line == b"." {
                return if rest.is_empty() {
                    Ok(out)
                } else {
                    Err(format!("bytes after the end of data: {rest:?}"))
                };
            }
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The message as the stuffer documents it goes out: CRLF kept, a bare
    /// CR or LF becomes CRLF, and a last line without an end gets one.
    fn normalised(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() + 8);
        let mut i = 0;
        while i < input.len() {
            match input[i] {
                b'\r' if input.get(i + 1) == Some(&b'\n') => {
                    out.extend_from_slice(b"\r\n");
                    i += 2;
                }
                b'\r' | b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        if !out.is_empty() && !out.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    #[test]
    fn the_reference_decoder_and_normaliser_are_sane() {
        assert_eq!(unstuff(b"..a\r\nb\r\n.\r\n").unwrap(), b".a\r\nb\r\n");
        assert!(unstuff(b"a\r\n.\r\nb\r\n.\r\n").is_err());
        assert!(unstuff(b"a\nb\r\n.\r\n").is_err());
        assert!(unstuff(b"a\r\n").is_err());
        assert_eq!(normalised(b"a\rb\nc\r\nd"), b"a\r\nb\r\nc\r\nd\r\n");
    }

    use proptest::prelude::*;

    /// Bytes with many dots and line-end pieces, and now and then anything.
    fn tricky_body() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                3 => Just(b'.'),
                3 => Just(b'\r'),
                3 => Just(b'\n'),
                2 => Just(b'a'),
                1 => any::<u8>(),
            ],
            0..200,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn dot_stuffing_round_trips_in_any_chunking(
            input in tricky_body(),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..8),
        ) {
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
            points.push(input.len());
            points.sort_unstable();
            let mut s = DotStuffer::new();
            let mut wire = Vec::new();
            let mut from = 0;
            for p in points {
                s.stuff(&input[from..p], &mut wire);
                from = p;
            }
            s.finish(&mut wire);

            // The only CRLF.CRLF (counting the CRLF before the first line)
            // is the end of data.
            let framed = [b"\r\n".as_slice(), &wire].concat();
            let first_end = framed.windows(5).position(|w| w == b"\r\n.\r\n");
            prop_assert_eq!(first_end, Some(wire.len() - 3), "premature end of data in {:?}", wire);
            let decoded = unstuff(&wire).map_err(TestCaseError::fail)?;
            prop_assert_eq!(decoded, normalised(&input));
        }
    }
}
