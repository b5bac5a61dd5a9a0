//! Addresses and names a sendmail caller gives: checked before any of them
//! becomes part of an SMTP command or a header, so none can carry a command
//! or a header of its own (CR, LF, NUL and other controls are refused).
//!
//! `std` only: `fuzz/` and the aliases file parser use it too.

/// Why an address or a name cannot be used (exit 65).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadAddress(pub String);

impl std::fmt::Display for BadAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The most octets an address may have (as the SMTP listener stores it).
pub const MAX_ADDRESS: usize = 256;

/// `s` for a message: quoted, controls escaped, at most 80 characters.
pub fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(char::escape_debug).collect();
    if s.chars().count() > 80 {
        out.push_str("...");
    }
    format!("\"{out}\"")
}

fn control(s: &str) -> Option<char> {
    s.chars().find(|c| c.is_control())
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|a| !a.is_empty() && a.chars().all(is_atext))
}

fn is_domain(d: &str) -> bool {
    if let Some(lit) = d.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        return match lit.get(..5) {
            Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
                lit[5..].parse::<std::net::Ipv6Addr>().is_ok()
            }
            _ => lit.parse::<std::net::Ipv4Addr>().is_ok(),
        };
    }
    !d.is_empty()
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || !c.is_ascii())
        })
}

/// Check one address (`local@domain`, or a bare local name such as `root`)
/// and give it back in the form an SMTP path carries: the local part bare
/// when it is a Dot-string, else quoted with `"` and `\` escaped. Quoted
/// local parts holding `<`, `>` or controls are refused: the upstream
/// would read them differently.
pub fn check(addr: &str) -> Result<String, BadAddress> {
    let bad = |why: &str| Err(BadAddress(format!("bad address {}: {why}", shown(addr))));
    if let Some(c) = control(addr) {
        return Err(BadAddress(format!(
            "bad address {}: control character {:?} (U+{:04X})",
            shown(addr),
            c,
            c as u32
        )));
    }
    if addr.is_empty() {
        return bad("empty");
    }
    let (local, domain) = if let Some(rest) = addr.strip_prefix('"') {
        // A quoted local part: up to the closing quote.
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                '\\' => match chars.next() {
                    Some((_, e)) => value.push(e),
                    None => return bad("unterminated quoted local part"),
                },
                _ => value.push(c),
            }
        }
        let Some(end) = end else {
            return bad("unterminated quoted local part");
        };
        let after = &rest[end..];
        let domain = match after.strip_prefix('@') {
            Some(d) => Some(d),
            None if after.is_empty() => None,
            None => return bad("text after the quoted local part"),
        };
        if value.is_empty() {
            return bad("empty local part");
        }
        if value.contains(['<', '>']) {
            return bad("'<' or '>' in a quoted local part (the upstream would misread it)");
        }
        (value, domain)
    } else {
        match addr.rsplit_once('@') {
            Some((l, d)) => (l.to_string(), Some(d)),
            None => (addr.to_string(), None),
        }
    };
    let local_ok = is_dot_string(&local);
    if !addr.starts_with('"') && !local_ok {
        return bad("not a valid local part (quote it, or remove spaces and special characters)");
    }
    let mut out = String::with_capacity(addr.len() + 2);
    if local_ok {
        out.push_str(&local);
    } else {
        out.push('"');
        for c in local.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    if let Some(d) = domain {
        if !is_domain(d) {
            return bad("not a valid domain");
        }
        out.push('@');
        out.push_str(d);
    } else if !local_ok {
        return bad("a quoted local name needs a domain");
    }
    if out.len() > MAX_ADDRESS {
        return bad("longer than 256 octets");
    }
    Ok(out)
}

/// The addresses in an address list (a header's value, or a command-line
/// argument): `A <a@x>, b@y (B), "C, D" <c@z>`, groups such as `team:
/// a@x, b@y;` and `undisclosed-recipients:;`, bare names such as `root`.
/// Each is checked with [`check`]; one that cannot be used fails the whole
/// list, so nothing is dropped silently.
pub fn list(value: &str) -> Result<Vec<String>, BadAddress> {
    if let Some(c) = value.chars().find(|&c| c.is_control() && c != '\t') {
        return Err(BadAddress(format!(
            "bad address list {}: control character {:?} (U+{:04X})",
            shown(value),
            c,
            c as u32
        )));
    }
    // Split on commas and semicolons outside quotes, comments and angle
    // brackets; drop comments and group names as we go.
    let mut parts: Vec<String> = vec![String::new()];
    let (mut quoted, mut comment, mut angle, mut escaped) = (false, 0u32, false, false);
    let mut literal = false;
    for c in value.chars() {
        if escaped {
            escaped = false;
            if comment == 0
                && let Some(p) = parts.last_mut()
            {
                p.push(c);
            }
            continue;
        }
        match c {
            '\\' if quoted || comment > 0 => {
                escaped = true;
                if comment == 0
                    && let Some(p) = parts.last_mut()
                {
                    p.push(c);
                }
                continue;
            }
            '"' if comment == 0 => quoted = !quoted,
            '(' if !quoted => {
                comment += 1;
                continue;
            }
            ')' if !quoted && comment > 0 => {
                comment -= 1;
                continue;
            }
            _ if comment > 0 => continue,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            '[' if !quoted => literal = true,
            ']' if !quoted => literal = false,
            ',' | ';' if !quoted && !angle && !literal => {
                parts.push(String::new());
                continue;
            }
            // A group's name ends at its colon: forget it.
            ':' if !quoted && !angle && !literal => {
                if let Some(p) = parts.last_mut() {
                    p.clear();
                }
                continue;
            }
            _ => {}
        }
        if let Some(p) = parts.last_mut() {
            p.push(c);
        }
    }
    if quoted || comment > 0 || angle {
        return Err(BadAddress(format!(
            "bad address list {}: an unterminated quote, comment or <",
            shown(value)
        )));
    }
    let mut out = Vec::new();
    for part in &parts {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let addr = match angle_addr(part) {
            Some(inner) => inner,
            None => part,
        };
        let addr = addr.trim();
        if addr.is_empty() {
            return Err(BadAddress(format!(
                "bad address {}: nothing between < and >",
                shown(part)
            )));
        }
        out.push(check(addr)?);
    }
    Ok(out)
}

/// The address inside `<...>` of `Name <addr>` (the last `<` outside quotes).
fn angle_addr(part: &str) -> Option<&str> {
    let mut quoted = false;
    let mut start = None;
    for (i, c) in part.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => start = Some(i),
            _ => {}
        }
    }
    let start = start?;
    let end = part[start..].find('>')? + start;
    let inner = &part[start + 1..end];
    // A source route (`<@a,@b:x@y>`) is dropped (RFC 5321 4.1.1.3, C).
    match inner.strip_prefix('@').and_then(|r| r.split_once(':')) {
        Some((_, addr)) => Some(addr),
        None => Some(inner),
    }
}

/// The `-f` sender: one address, a bare name, or the null sender (`""` or
/// `<>`). Returned as it goes into `MAIL FROM:<...>`.
pub fn sender(value: &str) -> Result<String, BadAddress> {
    let trimmed = value.trim();
    if trimmed.is_empty() || trimmed == "<>" {
        return Ok(String::new());
    }
    let mut all = list(value)?;
    match (all.pop(), all.is_empty()) {
        (Some(one), true) => Ok(one),
        _ => Err(BadAddress(format!(
            "bad sender {}: exactly one address is needed",
            shown(value)
        ))),
    }
}

/// The `-F` full name as a From: header's display name: as it is when it
/// is plain words, a quoted string when it has special characters, RFC 2047
/// encoded-words when it is not ASCII. Control characters (CR, LF, NUL...)
/// are refused: they could end the header.
pub fn display_name(name: &str) -> Result<String, BadAddress> {
    if let Some(c) = control(name) {
        return Err(BadAddress(format!(
            "bad full name (-F) {}: control character {:?} (U+{:04X})",
            shown(name),
            c,
            c as u32
        )));
    }
    let name = name.trim();
    if name.len() > 512 {
        return Err(BadAddress(format!(
            "bad full name (-F) {}: longer than 512 octets",
            shown(name)
        )));
    }
    if !name.is_ascii() {
        return Ok(encoded_words(name));
    }
    if name
        .chars()
        .all(|c| c == ' ' || (is_atext(c) && c.is_ascii()))
    {
        return Ok(name.to_string());
    }
    Ok(format!(
        "\"{}\"",
        name.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// RFC 2047 `=?UTF-8?B?...?=` words, each at most 75 characters, split on
/// character boundaries, separated by a space (which decoders drop).
fn encoded_words(s: &str) -> String {
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in s.chars() {
        if chunk.len() + c.len_utf8() > 45 {
            words.push(format!("=?UTF-8?B?{}?=", base64(chunk.as_bytes())));
            chunk.clear();
        }
        chunk.push(c);
    }
    if !chunk.is_empty() {
        words.push(format!("=?UTF-8?B?{}?=", base64(chunk.as_bytes())));
    }
    words.join(" ")
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(T[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_and_normalised() {
        assert_eq!(check("a@example.com").unwrap(), "a@example.com");
        assert_eq!(check("root").unwrap(), "root");
        assert_eq!(check("\"john doe\"@x.org").unwrap(), "\"john doe\"@x.org");
        assert_eq!(check("\"john\"@x.org").unwrap(), "john@x.org");
        assert_eq!(check("\"a\\\"b\"@x.org").unwrap(), "\"a\\\"b\"@x.org");
        assert_eq!(check("u@[192.0.2.1]").unwrap(), "u@[192.0.2.1]");
        assert_eq!(check("jörg@bücher.de").unwrap(), "jörg@bücher.de");
        for bad in [
            "a@example.com>\r\nRCPT TO:<victim@evil.test>",
            "a@example.com\n",
            "a\0@example.com",
            "a\x1b@example.com",
            "a b@example.com",
            "a@exa mple.com",
            "<a@example.com>",
            "\"x>y\"@example.com",
            "\"x<y\"@example.com",
            "\"unterminated@example.com",
            "a@",
            "@example.com",
            "a..b@example.com",
            "",
            "\"quoted name\"",
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
        let e = check("a@x\r\nDATA").unwrap_err().to_string();
        assert!(e.contains("control character") && !e.contains('\r'), "{e}");
    }

    #[test]
    fn address_lists() {
        assert_eq!(
            list("\"Doe, J\" <j@x.org>, k@y.org (K, Q)").unwrap(),
            ["j@x.org", "k@y.org"]
        );
        assert_eq!(list("team: a@x, b@y;").unwrap(), ["a@x", "b@y"]);
        assert_eq!(
            list("undisclosed-recipients:;").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            list("root, ops@example.org").unwrap(),
            ["root", "ops@example.org"]
        );
        assert_eq!(list("Root <root>").unwrap(), ["root"]);
        assert_eq!(list("<@relay.example:a@x.org>").unwrap(), ["a@x.org"]);
        assert_eq!(list("\"a>b\" <c@x.org>").unwrap(), ["c@x.org"]);
        assert_eq!(
            list("u@[IPv6:2001:db8::1]").unwrap(),
            ["u@[IPv6:2001:db8::1]"]
        );
        assert!(list("root, not an address").is_err());
        assert!(list("a@x.org, <b@y.org").is_err());
        assert!(list("a@x.org\r\nBcc: v@evil.test").is_err());
        assert!(list("<>").is_err());
    }

    #[test]
    fn senders() {
        assert_eq!(sender("").unwrap(), "");
        assert_eq!(sender("<>").unwrap(), "");
        assert_eq!(sender("root").unwrap(), "root");
        assert_eq!(sender("Cron <cron@x.org>").unwrap(), "cron@x.org");
        assert!(sender("a@x.org, b@x.org").is_err());
        assert!(sender("a@example.com>\r\nRCPT TO:<victim@evil.test>\r\nDATA").is_err());
    }

    #[test]
    fn full_names() {
        assert_eq!(display_name("CronDaemon").unwrap(), "CronDaemon");
        assert_eq!(display_name("Cron Daemon").unwrap(), "Cron Daemon");
        assert_eq!(display_name("Doe, J.").unwrap(), "\"Doe, J.\"");
        assert_eq!(display_name("Jo \"X\"").unwrap(), "\"Jo \\\"X\\\"\"");
        assert_eq!(display_name("Jörg").unwrap(), "=?UTF-8?B?SsO2cmc=?=");
        let long = display_name(&"é".repeat(40)).unwrap();
        assert!(long.split(' ').all(|w| w.len() <= 75), "{long}");
        assert!(display_name("x\r\nBcc: victim@evil.test").is_err());
        assert!(display_name("x\0").is_err());
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
