//! The paths of `MAIL FROM:<...>` and `RCPT TO:<...>` (RFC 5321 4.1.2), as
//! the queue stores them.
//!
//! smtp-proto's parser hands back the address with its quotes and escapes
//! removed (`<"john doe"@example.com>` becomes `john doe@example.com`,
//! which is no address at all), so the session reads the path from the
//! command line itself, and smtp-proto only for the verb and parameters.
//!
//! What is stored is a path that can be sent on as it is and means the
//! same address:
//! - a source route (`@a,@b:`) is dropped (RFC 5321 4.1.1.3, C);
//! - a local part is stored bare when its value is a Dot-string, and as a
//!   Quoted-string otherwise, with `\` before `"` and `\` only
//!   (`"john doe"`, `"a\"b"`); a quoted Dot-string (`"john"`) is stored
//!   bare, which means the same mailbox;
//! - the domain as written: labels of letters, digits, `-` and `_`, or
//!   UTF-8 (SMTPUTF8; whether it is allowed is decided by the caller), or
//!   an address literal (RFC 5321 4.1.3: `[192.0.2.1]`,
//!   `[IPv6:2001:db8::1]`; general literals with other tags are refused,
//!   none are standardised). smtp-proto refuses address literals, so for
//!   those the session asks it about the line with the path replaced
//!   ([`with_placeholder`]).
//!
//! `<Postmaster>` (any letter case, no domain) is a path of its own
//! (RFC 5321 4.1.1.3, 4.5.1): the session stores it as
//! `postmaster@<our host name>` ([`postmaster`]), as a recipient and as a
//! sender (like Postfix, which qualifies it with `$myorigin`); it is never
//! the null sender.

/// A parsed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Path {
    /// `<>`: the null reverse-path.
    Null,
    /// `<Postmaster>`, without a domain.
    Postmaster,
    /// A mailbox, ready to be stored and sent on.
    Mailbox(String),
    /// A local name without a domain (`<root>`, a Dot-string): only
    /// trusted clients get it qualified (see [`crate::LocalNames`]).
    Unqualified(String),
}

/// The most octets a stored address may have (smtp-proto's limit).
const MAX_ADDRESS: usize = 256;

/// Parse the path of a MAIL or RCPT command line: from its first `<` to
/// the matching `>`. `None` if it is not a valid path.
pub(crate) fn parse(line: &[u8]) -> Option<Path> {
    parse_span(line).map(|(path, _)| path)
}

/// `line` with a valid path replaced by `<x@x>`, for smtp-proto to read
/// the verb and parameters of a path it cannot parse itself (address
/// literals). `None` if the path is not valid.
pub(crate) fn with_placeholder(line: &[u8]) -> Option<Vec<u8>> {
    let (_, span) = parse_span(line)?;
    let mut out = Vec::with_capacity(line.len());
    out.extend_from_slice(line.get(..span.start)?);
    out.extend_from_slice(b"<x@x>");
    out.extend_from_slice(line.get(span.end..)?);
    Some(out)
}

/// `MAIL FROM:addr` or `RCPT TO:addr`, without angle brackets as old
/// printers and scanners send them, with the address put in brackets
/// (`MAIL FROM:<addr>`, parameters kept). Spaces after the colon are
/// allowed. `None` if the line is not such a command, or its path is
/// already in brackets, or the address holds a bracket.
pub(crate) fn bracket_bare(line: &[u8]) -> Option<Vec<u8>> {
    let prefix = [&b"MAIL FROM:"[..], b"RCPT TO:"]
        .into_iter()
        .find(|p| {
            line.get(..p.len())
                .is_some_and(|l| l.eq_ignore_ascii_case(p))
        })?
        .len();
    let rest = line.get(prefix..)?;
    let start = prefix + rest.iter().position(|&b| b != b' ' && b != b'\t')?;
    let arg = line.get(start..)?;
    let len = arg
        .iter()
        .position(|&b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .unwrap_or(arg.len());
    let addr = arg.get(..len)?;
    if addr.is_empty() || addr.contains(&b'<') || addr.contains(&b'>') {
        return None;
    }
    let mut out = Vec::with_capacity(line.len() + 2);
    out.extend_from_slice(line.get(..start)?);
    out.push(b'<');
    out.extend_from_slice(addr);
    out.push(b'>');
    out.extend_from_slice(arg.get(len..)?);
    Some(out)
}

/// The ESMTP parameters of a MAIL or RCPT line: what follows its path.
/// `None` if the path is not valid.
pub(crate) fn params(line: &[u8]) -> Option<&[u8]> {
    let (_, span) = parse_span(line)?;
    line.get(span.end..)
}

/// The path and where it is in `line` (`<` to `>`, both included).
fn parse_span(line: &[u8]) -> Option<(Path, std::ops::Range<usize>)> {
    let start = memchr::memchr(b'<', line)?;
    let mut p = Cursor {
        s: line.get(start + 1..)?,
        i: 0,
    };
    let path = path(&mut p)?;
    Some((path, start..start + 1 + p.i))
}

/// A path after its `<`, up to and including its `>`.
fn path(p: &mut Cursor<'_>) -> Option<Path> {
    if p.eat(b'>') {
        return Some(Path::Null);
    }
    if p.s
        .get(..11)
        .is_some_and(|s| s.eq_ignore_ascii_case(b"postmaster>"))
    {
        p.i += 11;
        return Some(Path::Postmaster);
    }
    let routed = p.peek() == Some(b'@');
    if routed {
        // A source route: `@one,@two:`; it is ignored.
        loop {
            if !p.eat(b'@') || domain(p).is_none() {
                return None;
            }
            if p.eat(b':') {
                break;
            }
            if !p.eat(b',') {
                return None;
            }
        }
    }
    let quoted = p.peek() == Some(b'"');
    let local = local_part(p)?;
    if !p.eat(b'@') {
        // `<root>`: a bare Dot-string (never a quoted one, never routed).
        if !routed && !quoted && p.eat(b'>') && local.len() <= MAX_ADDRESS {
            return String::from_utf8(local).ok().map(Path::Unqualified);
        }
        return None;
    }
    let domain = match p.peek() {
        Some(b'[') => address_literal(p)?,
        _ => domain(p)?,
    };
    if !p.eat(b'>') {
        return None;
    }
    let mut out = Vec::with_capacity(local.len() + domain.len() + 3);
    if is_dot_string(&local) {
        out.extend_from_slice(&local);
    } else {
        out.push(b'"');
        for &b in &local {
            if matches!(b, b'"' | b'\\') {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    }
    out.push(b'@');
    out.extend_from_slice(domain);
    if out.len() > MAX_ADDRESS {
        return None;
    }
    String::from_utf8(out).ok().map(Path::Mailbox)
}

/// What `<Postmaster>` is stored as: `postmaster@<host>`.
pub(crate) fn postmaster(host: &str) -> String {
    format!("postmaster@{host}")
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// The bytes from `from` up to here.
    fn since(&self, from: usize) -> &'a [u8] {
        self.s.get(from..self.i).unwrap_or_default()
    }
}

/// RFC 5321 `atext`, with UTF-8 (RFC 6531 `UTF8-non-ascii`).
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

/// Whether `s` is a `Dot-string`: atoms joined by single dots.
fn is_dot_string(s: &[u8]) -> bool {
    !s.is_empty()
        && s.split(|&b| b == b'.')
            .all(|atom| !atom.is_empty() && atom.iter().all(|&b| is_atext(b)))
}

/// A `Local-part`: `Dot-string` or `Quoted-string`; returns its value (the
/// quoted string without quotes and escapes). Never empty.
fn local_part(p: &mut Cursor<'_>) -> Option<Vec<u8>> {
    if !p.eat(b'"') {
        let from = p.i;
        while p.peek().is_some_and(|b| is_atext(b) || b == b'.') {
            p.i += 1;
        }
        let s = p.since(from);
        return is_dot_string(s).then(|| s.to_vec());
    }
    let mut value = Vec::new();
    loop {
        match p.peek()? {
            b'"' => {
                p.i += 1;
                break;
            }
            b'\\' => {
                p.i += 1;
                // quoted-pairSMTP: a backslash and any printable ASCII.
                match p.peek()? {
                    b @ 32..=126 => value.push(b),
                    _ => return None,
                }
            }
            // qtextSMTP, and UTF-8.
            b @ (32..=126 | 0x80..) => value.push(b),
            _ => return None,
        }
        p.i += 1;
    }
    (!value.is_empty()).then_some(value)
}

/// A domain: labels of letters, digits, `-`, `_` or UTF-8, joined by
/// single dots.
fn domain<'a>(p: &mut Cursor<'a>) -> Option<&'a [u8]> {
    let from = p.i;
    loop {
        let label = p.i;
        while p
            .peek()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80)
        {
            p.i += 1;
        }
        if p.i == label {
            return None;
        }
        if !p.eat(b'.') {
            return Some(p.since(from));
        }
    }
}

/// An address literal, brackets included: `[` IPv4 `]` or `[IPv6:` IPv6
/// `]`.
fn address_literal<'a>(p: &mut Cursor<'a>) -> Option<&'a [u8]> {
    let from = p.i;
    if !p.eat(b'[') {
        return None;
    }
    let inner = p.i;
    while p.peek().is_some_and(|b| b != b']') {
        p.i += 1;
    }
    let text = std::str::from_utf8(p.since(inner)).ok()?;
    if !p.eat(b']') {
        return None;
    }
    let valid = match text.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
            text.get(5..)?.parse::<std::net::Ipv6Addr>().is_ok()
        }
        _ => text.parse::<std::net::Ipv4Addr>().is_ok(),
    };
    valid.then(|| p.since(from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(line: &str) -> Option<String> {
        match parse(line.as_bytes())? {
            Path::Null => Some(String::new()),
            Path::Postmaster => Some(postmaster("relay.test")),
            Path::Mailbox(a) => Some(a),
            Path::Unqualified(_) => None,
        }
    }

    #[test]
    fn local_names_without_a_domain() {
        for (line, want) in [
            ("MAIL FROM:<scanner>\r\n", "scanner"),
            ("RCPT TO:<root> NOTIFY=NEVER\r\n", "root"),
            ("RCPT TO:<first.last>\r\n", "first.last"),
            ("RCPT TO:<postmasters>\r\n", "postmasters"),
        ] {
            assert_eq!(
                parse(line.as_bytes()),
                Some(Path::Unqualified(want.into())),
                "{line}"
            );
        }
        for line in [
            "RCPT TO:<\"root\">\r\n",
            "RCPT TO:<@r:root>\r\n",
            "RCPT TO:<ro ot>\r\n",
            "RCPT TO:<root\r>\r\n",
            "RCPT TO:<.root>\r\n",
        ] {
            assert_eq!(parse(line.as_bytes()), None, "{line:?}");
        }
    }

    #[test]
    fn plain_and_null_paths() {
        assert_eq!(stored("MAIL FROM:<>\r\n").as_deref(), Some(""));
        assert_eq!(
            stored("MAIL FROM:<a.b+c@example.com> SIZE=5\r\n").as_deref(),
            Some("a.b+c@example.com")
        );
        assert_eq!(
            stored("RCPT TO:<@r1.example,@r2.example:x@example.net>\r\n").as_deref(),
            Some("x@example.net")
        );
        assert_eq!(
            stored("RCPT TO:<é@例え.jp>\r\n").as_deref(),
            Some("é@例え.jp")
        );
    }

    #[test]
    fn postmaster_without_a_domain() {
        for line in [
            "RCPT TO:<Postmaster>\r\n",
            "MAIL FROM:<pOSTMASTER> SIZE=1\r\n",
        ] {
            assert_eq!(parse(line.as_bytes()), Some(Path::Postmaster), "{line}");
        }
        assert_eq!(
            stored("RCPT TO:<postmaster@example.com>\r\n").as_deref(),
            Some("postmaster@example.com")
        );
        for line in [
            "RCPT TO:<\"postmaster\">\r\n",
            "RCPT TO:<@r:postmaster>\r\n",
        ] {
            assert_eq!(parse(line.as_bytes()), None, "{line}");
        }
    }

    #[test]
    fn quoted_local_parts_keep_their_quotes_when_they_need_them() {
        let cases = [
            (r#"<"john doe"@example.com>"#, r#""john doe"@example.com"#),
            (r#"<"a\"b"@example.com>"#, r#""a\"b"@example.com"#),
            (r#"<"a\\b"@example.com>"#, r#""a\\b"@example.com"#),
            (r#"<"a@b"@example.com>"#, r#""a@b"@example.com"#),
            (r#"<"a>b"@example.com>"#, r#""a>b"@example.com"#),
            (r#"<".a"@example.com>"#, r#"".a"@example.com"#),
            (r#"<"a..b"@example.com>"#, r#""a..b"@example.com"#),
            // Needless quotes and escapes go: the same mailbox.
            (r#"<"john"@example.com>"#, "john@example.com"),
            (r#"<"j\ohn.doe"@example.com>"#, "john.doe@example.com"),
        ];
        for (path, want) in cases {
            let line = format!("MAIL FROM:{path}\r\n");
            assert_eq!(stored(&line).as_deref(), Some(want), "{path}");
            // What is stored reads back as itself.
            let again = format!("MAIL FROM:<{want}>\r\n");
            assert_eq!(stored(&again).as_deref(), Some(want), "{want}");
        }
    }

    #[test]
    fn address_literals() {
        for addr in [
            "scanner@[192.0.2.1]",
            "a@[IPv6:2001:db8::1]",
            "a@[ipv6:::ffff:192.0.2.1]",
            r#""john doe"@[10.0.0.5]"#,
        ] {
            let line = format!("MAIL FROM:<{addr}> SIZE=10\r\n");
            assert_eq!(stored(&line).as_deref(), Some(addr), "{addr}");
            assert_eq!(
                with_placeholder(line.as_bytes()).as_deref(),
                Some(&b"MAIL FROM:<x@x> SIZE=10\r\n"[..])
            );
        }
        for addr in [
            "a@[192.0.2.256]",
            "a@[192.0.2]",
            "a@[IPv6:2001:db8::g]",
            "a@[2001:db8::1]",
            "a@[IPv6:fe80::1%eth0]",
            "a@[tag:content]",
            "a@[192.0.2.1",
            "a@[192.0.2.1].example",
            "a@[]",
            "a@[ 192.0.2.1]",
        ] {
            let line = format!("MAIL FROM:<{addr}>\r\n");
            assert_eq!(stored(&line), None, "{addr}");
            assert_eq!(with_placeholder(line.as_bytes()), None, "{addr}");
        }
    }

    #[test]
    fn bare_paths_get_brackets() {
        let cases = [
            (
                "MAIL FROM:scanner@example.com\r\n",
                "MAIL FROM:<scanner@example.com>\r\n",
            ),
            (
                "mail from: scanner@example.com SIZE=10\r\n",
                "mail from: <scanner@example.com> SIZE=10\r\n",
            ),
            (
                "RCPT TO:office@example.net\n",
                "RCPT TO:<office@example.net>\n",
            ),
            ("RCPT TO:scanner\r\n", "RCPT TO:<scanner>\r\n"),
        ];
        for (line, want) in cases {
            let got = bracket_bare(line.as_bytes()).map(|v| String::from_utf8(v).unwrap());
            assert_eq!(got.as_deref(), Some(want), "{line:?}");
        }
        for line in [
            "MAIL FROM:<a@b>\r\n",
            "MAIL FROM: <a@b>\r\n",
            "MAIL FROM:\r\n",
            "MAIL FROM:a<b@c>\r\n",
            "RCPT TO:a@b>\r\n",
            "EHLO a@b\r\n",
            "MAIL TO:a@b\r\n",
        ] {
            assert_eq!(bracket_bare(line.as_bytes()), None, "{line:?}");
        }
        assert_eq!(
            stored("MAIL FROM:<scanner@example.com>\r\n").as_deref(),
            Some("scanner@example.com")
        );
    }

    #[test]
    fn invalid_paths() {
        for path in [
            "<a@b",
            "<a>",
            "<@example.com>",
            "<a..b@example.com>",
            "<.a@example.com>",
            "<a.@example.com>",
            "<a b@example.com>",
            r#"<""@example.com>"#,
            "<\"a\x01b\"@example.com>",
            "<\"a\tb\"@example.com>",
            "<\"ab@example.com>",
            "<\"a\\\x01\"@example.com>",
            "<a@b@example.com>",
            "<a@example..com>",
            "<a@example.com.>",
            "<a@.example.com>",
            "<a@exa mple.com>",
            "<a@\"example.com\">",
            "<\"a\".b@example.com>",
            "<a\x7f@example.com>",
            "<@r:>",
            "<@r,x:a@b>",
        ] {
            let line = format!("MAIL FROM:{path}\r\n");
            assert_eq!(stored(&line), None, "{path:?}");
        }
        let long = format!("MAIL FROM:<{}@example.com>\r\n", "x".repeat(250));
        assert_eq!(stored(&long), None);
    }
}
