//! The headers we add: `Received:` on top, `Date:` and `Message-ID:` at the
//! end of the header section when the client left them out (as Postfix's
//! cleanup does), and the scanner that finds that end while the message
//! streams past.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use spool::MessageId;

/// The most header bytes held back while looking for the end of the header
/// section. A header block larger than this is passed on as it is, with any
/// missing `Date:`/`Message-ID:` put at its top instead of its end.
pub(crate) const HEADER_HOLD_LIMIT: usize = 64 << 10;

/// What the `Received:` line says.
pub(crate) struct Trace<'a> {
    pub helo: &'a str,
    pub ip: IpAddr,
    pub host: &'a str,
    /// `ESMTP`, `ESMTPS`, `ESMTPA`, `ESMTPSA`, or `SMTP` after HELO (RFC 3848).
    pub protocol: &'a str,
    pub id: MessageId,
    /// The recipient, when there is exactly one.
    pub rcpt: Option<&'a str>,
    pub time: SystemTime,
}

impl Trace<'_> {
    /// `Received: from HELO ([IP]) by HOST (oauthrelay) with PROTO id ID
    /// [for <rcpt>]; DATE` and CRLF, on one line.
    pub(crate) fn header(&self) -> String {
        let mut s = String::with_capacity(160);
        s.push_str("Received: from ");
        push_clean(&mut s, self.helo);
        s.push_str(" (");
        match self.ip {
            IpAddr::V4(ip) => {
                let _ = write!(s, "[{ip}]");
            }
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(v4) => {
                    let _ = write!(s, "[{v4}]");
                }
                None => {
                    let _ = write!(s, "[IPv6:{ip}]");
                }
            },
        }
        let _ = write!(
            s,
            ") by {} (oauthrelay) with {} id {}",
            self.host, self.protocol, self.id
        );
        if let Some(rcpt) = self.rcpt {
            s.push_str(" for <");
            push_clean(&mut s, rcpt);
            s.push('>');
        }
        s.push_str("; ");
        rfc5322_date(self.time, &mut s);
        s.push_str("\r\n");
        s
    }
}

/// Header-safe copy of client text: no control characters, no line breaks.
fn push_clean(s: &mut String, text: &str) {
    for c in text.chars().take(255) {
        s.push(if c.is_control() { '?' } else { c });
    }
}

/// `Tue, 01 Jul 2003 10:52:37 +0000` (RFC 5322 3.3), in UTC, by the `time`
/// crate.
pub(crate) fn rfc5322_date(t: SystemTime, out: &mut String) {
    match time::OffsetDateTime::from(t).format(&time::format_description::well_known::Rfc2822) {
        Ok(d) => out.push_str(&d),
        Err(_) => out.push_str("Thu, 01 Jan 1970 00:00:00 +0000"),
    }
}

/// A `Message-ID:` value: `<ID.RANDOM@HOST>`.
pub(crate) fn message_id(id: MessageId, host: &str) -> String {
    format!("<{id}.{:08X}@{host}>", fastrand::u32(..))
}

/// What the scanner decided about the bytes given to [`HeaderScan::feed`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Feed {
    /// Past the header section: write the bytes as they are.
    Pass,
    /// Held back (still inside the header section).
    Held,
    /// The header section ended: write the held bytes up to `at`, then the
    /// missing headers, then the rest of the held bytes.
    End { at: usize },
    /// Too much header: write the missing headers, then all held bytes.
    Overflow,
}

/// Finds the end of the header section of a message that arrives in pieces,
/// noting whether `Date:` and `Message-ID:` are present.
#[derive(Debug, Default)]
pub(crate) struct HeaderScan {
    held: Vec<u8>,
    /// Offset in `held` of the first line not yet examined.
    scanned: usize,
    seen_field: bool,
    pub has_date: bool,
    pub has_message_id: bool,
    done: bool,
}

impl HeaderScan {
    #[cfg(test)]
    pub(crate) fn held(&self) -> &[u8] {
        &self.held
    }

    /// Hand over the held bytes (to be written), leaving nothing held.
    pub(crate) fn take_held(&mut self) -> Vec<u8> {
        self.scanned = 0;
        std::mem::take(&mut self.held)
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    pub(crate) fn feed(&mut self, data: &[u8]) -> Feed {
        if self.done {
            return Feed::Pass;
        }
        if self.held.capacity() == 0 {
            self.held.reserve(data.len().clamp(1024, HEADER_HOLD_LIMIT));
        }
        self.held.extend_from_slice(data);
        while let Some(k) = memchr::memchr(b'\n', self.held.get(self.scanned..).unwrap_or_default())
        {
            let start = self.scanned;
            let line = self.held.get(start..start + k + 1).unwrap_or_default();
            match classify(line) {
                Line::Field(name) => {
                    self.seen_field = true;
                    if name.eq_ignore_ascii_case(b"date") {
                        self.has_date = true;
                    } else if name.eq_ignore_ascii_case(b"message-id") {
                        self.has_message_id = true;
                    }
                }
                Line::Continuation if self.seen_field => {}
                Line::Continuation | Line::Other => {
                    self.done = true;
                    return Feed::End { at: start };
                }
            }
            self.scanned = start + k + 1;
        }
        if self.held.len() > HEADER_HOLD_LIMIT {
            self.done = true;
            return Feed::Overflow;
        }
        Feed::Held
    }

    /// The message ended while still in the header section: all held bytes
    /// are header, and needs a line ending before anything is added
    /// after it when it lacks one.
    pub(crate) fn needs_line_ending(&self) -> bool {
        !self.held.is_empty() && self.held.last() != Some(&b'\n')
    }
}

enum Line<'a> {
    Field(&'a [u8]),
    Continuation,
    Other,
}

fn classify(line: &[u8]) -> Line<'_> {
    match line.first() {
        Some(b' ' | b'\t') => return Line::Continuation,
        None | Some(b'\r' | b'\n') => return Line::Other,
        _ => {}
    }
    let name_len = line
        .iter()
        .position(|&b| !(33..=126).contains(&b) || b == b':')
        .unwrap_or(line.len());
    if name_len == 0 {
        return Line::Other;
    }
    let (name, rest) = line.split_at(name_len);
    // Obsolete syntax allows white space before the colon.
    let rest = rest
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .and_then(|p| rest.get(p..))
        .unwrap_or_default();
    if rest.first() == Some(&b':') {
        Line::Field(name)
    } else {
        Line::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn dates_are_rfc5322() {
        let mut s = String::new();
        rfc5322_date(UNIX_EPOCH + Duration::from_secs(1_057_056_757), &mut s);
        assert_eq!(s, "Tue, 01 Jul 2003 10:52:37 +0000");
        s.clear();
        rfc5322_date(UNIX_EPOCH + Duration::from_secs(951_782_400), &mut s);
        assert_eq!(s, "Tue, 29 Feb 2000 00:00:00 +0000");
        s.clear();
        rfc5322_date(UNIX_EPOCH, &mut s);
        assert_eq!(s, "Thu, 01 Jan 1970 00:00:00 +0000");
    }

    #[test]
    fn received_line() {
        let t = Trace {
            helo: "printer.lan",
            ip: "192.0.2.7".parse().unwrap(),
            host: "relay.test",
            protocol: "ESMTPSA",
            id: MessageId::from_u64(0x1234),
            rcpt: Some("bob@example.com"),
            time: UNIX_EPOCH + Duration::from_secs(1_057_056_757),
        };
        assert_eq!(
            t.header(),
            "Received: from printer.lan ([192.0.2.7]) by relay.test (oauthrelay) with ESMTPSA \
             id 00000000001234 for <bob@example.com>; Tue, 01 Jul 2003 10:52:37 +0000\r\n"
        );
    }

    #[test]
    fn scan_finds_the_blank_line_across_pieces() {
        let mut h = HeaderScan::default();
        assert_eq!(h.feed(b"Subject: x\r\nDa"), Feed::Held);
        assert_eq!(h.feed(b"te: today\r\n folded\r\n"), Feed::Held);
        assert_eq!(h.feed(b"\r\nbody\r\n"), Feed::End { at: 34 });
        assert!(h.has_date && !h.has_message_id);
        assert_eq!(&h.held()[34..], b"\r\nbody\r\n");
        assert_eq!(h.feed(b"more"), Feed::Pass);
    }

    #[test]
    fn scan_stops_at_a_non_header_line() {
        let mut h = HeaderScan::default();
        assert_eq!(
            h.feed(b"Message-ID: <a@b>\r\nhello world\r\n"),
            Feed::End { at: 19 }
        );
        assert!(h.has_message_id);
        let mut h = HeaderScan::default();
        assert_eq!(h.feed(b" leading space\r\n"), Feed::End { at: 0 });
    }

    #[test]
    fn scan_overflows_safely() {
        let mut h = HeaderScan::default();
        let line = b"X-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        let mut r = Feed::Held;
        for _ in 0..(HEADER_HOLD_LIMIT / line.len() + 2) {
            r = h.feed(line);
            if r != Feed::Held {
                break;
            }
        }
        assert_eq!(r, Feed::Overflow);
    }
}
