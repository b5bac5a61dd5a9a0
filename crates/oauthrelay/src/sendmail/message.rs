//! The message on sendmail's stdin, made ready to submit: CRLF line ends,
//! a From: header when it has none (with `-F`'s name encoded), Bcc:
//! removed, and with `-t` the recipients of To:, Cc: and Bcc:, every one of
//! them checked.
//!
//! `std` only (`fuzz/` includes it).

use super::address::{self, BadAddress};

/// What [`prepare`] needs besides the input.
pub struct Options<'a> {
    /// `-t`.
    pub extract: bool,
    /// `-i`.
    pub ignore_dots: bool,
    /// The envelope sender, qualified (for a From: header we add); `""`
    /// is the null sender.
    pub sender: &'a str,
    /// `-F`, already made a display name ([`address::display_name`]).
    pub display_name: Option<&'a str>,
    /// The login name (a From: header for the null sender names it).
    pub user: &'a str,
}

/// The message to submit and the recipients its headers named.
#[derive(Debug)]
pub struct Prepared {
    pub message: Vec<u8>,
    /// With `-t`: the To:, Cc:, Bcc: addresses, checked, in order.
    pub header_recipients: Vec<String>,
    /// Some byte has the 8th bit set.
    pub eight_bit: bool,
}

/// A field name: printable ASCII but the colon (RFC 5322 2.2).
fn field_name(line: &[u8]) -> Option<&[u8]> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = &line[..colon];
    let name = name.strip_suffix(b" ").unwrap_or(name);
    (!name.is_empty() && name.iter().all(|&b| (33..=126).contains(&b))).then_some(name)
}

/// Turn stdin into the message to submit.
pub fn prepare(input: &[u8], opts: &Options<'_>) -> Result<Prepared, BadAddress> {
    // Lines without their endings, stopping at a lone dot unless -i.
    let mut lines: Vec<&[u8]> = Vec::new();
    for line in input.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !opts.ignore_dots && line == b"." {
            break;
        }
        lines.push(line);
    }
    if lines.last() == Some(&&b""[..]) && (input.ends_with(b"\n") || input.is_empty()) {
        lines.pop();
    }
    // The header section: header fields and their continuation lines, up
    // to the empty line, or the first line that is neither.
    let mut header_end = 0;
    let mut fields: Vec<(String, std::ops::Range<usize>)> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if (l.starts_with(b" ") || l.starts_with(b"\t")) && !fields.is_empty() {
            if let Some(f) = fields.last_mut() {
                f.1.end = i + 1;
            }
            header_end = i + 1;
            continue;
        }
        match field_name(l) {
            Some(name) => {
                fields.push((String::from_utf8_lossy(name).to_ascii_lowercase(), i..i + 1));
                header_end = i + 1;
            }
            None => break,
        }
    }
    let value = |r: &std::ops::Range<usize>| -> String {
        let mut v = String::new();
        for (k, l) in lines[r.clone()].iter().enumerate() {
            let text = String::from_utf8_lossy(l);
            let part = if k == 0 {
                text.split_once(':').map(|x| x.1).unwrap_or("").to_string()
            } else {
                text.into_owned()
            };
            if !v.is_empty() {
                v.push(' ');
            }
            v.push_str(part.trim());
        }
        v
    };
    let mut header_recipients = Vec::new();
    let mut drop = Vec::new();
    for (name, range) in &fields {
        if opts.extract && matches!(name.as_str(), "to" | "cc" | "bcc") {
            let v = value(range);
            let found = address::list(&v).map_err(|e| {
                BadAddress(format!(
                    "{}: header line {}: {e}",
                    match name.as_str() {
                        "to" => "To",
                        "cc" => "Cc",
                        _ => "Bcc",
                    },
                    range.start + 1
                ))
            })?;
            header_recipients.extend(found);
        }
        // Blind copies stay blind, with or without -t (as Postfix's cleanup
        // and msmtp do).
        if matches!(name.as_str(), "bcc" | "resent-bcc") {
            drop.push(range.clone());
        }
    }
    let has_from = fields.iter().any(|f| f.0 == "from");
    let mut out = Vec::with_capacity(input.len() + 256);
    if !has_from {
        let addr = if opts.sender.is_empty() {
            opts.user
        } else {
            opts.sender
        };
        match opts.display_name {
            Some(n) if !n.is_empty() => {
                out.extend_from_slice(format!("From: {n} <{addr}>\r\n").as_bytes())
            }
            _ => out.extend_from_slice(format!("From: {addr}\r\n").as_bytes()),
        }
    }
    let body_start = header_end;
    for (i, l) in lines.iter().enumerate() {
        if i == body_start && !l.is_empty() {
            // The body starts without the empty line that separates it.
            out.extend_from_slice(b"\r\n");
        }
        if drop.iter().any(|r| r.contains(&i)) {
            continue;
        }
        out.extend_from_slice(l);
        out.extend_from_slice(b"\r\n");
    }
    if body_start >= lines.len() {
        // Headers only: end them.
        out.extend_from_slice(b"\r\n");
    }
    let eight_bit = !out.is_ascii();
    Ok(Prepared {
        message: out,
        header_recipients,
        eight_bit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts<'a>(extract: bool, ignore_dots: bool, name: Option<&'a str>) -> Options<'a> {
        Options {
            extract,
            ignore_dots,
            sender: "me@host",
            display_name: name,
            user: "me",
        }
    }

    fn text(p: &Prepared) -> &str {
        std::str::from_utf8(&p.message).unwrap()
    }

    #[test]
    fn messages_get_crlf_a_from_and_lose_bcc() {
        let input = b"To: A <a@example.com>, b@example.com\nBcc: secret@example.com\nSubject: x\n\nbody\n.\nafter dot\n";
        let p = prepare(input, &opts(true, false, None)).unwrap();
        assert_eq!(
            p.header_recipients,
            ["a@example.com", "b@example.com", "secret@example.com"]
        );
        assert_eq!(
            text(&p),
            "From: me@host\r\nTo: A <a@example.com>, b@example.com\r\nSubject: x\r\n\r\nbody\r\n"
        );
        let p = prepare(b"From: x@y\n\n.\nkept\n", &opts(false, true, Some("Jo"))).unwrap();
        assert_eq!(text(&p), "From: x@y\r\n\r\n.\r\nkept\r\n");
        let p = prepare(b"To: a@x\nBcc: hidden@y\n\nhi\n", &opts(false, false, None)).unwrap();
        assert!(p.header_recipients.is_empty());
        assert!(!text(&p).contains("hidden"), "Bcc removed without -t too");
        let p = prepare(b"just a body line\n", &opts(false, true, Some("\"Jo X\""))).unwrap();
        assert_eq!(
            text(&p),
            "From: \"Jo X\" <me@host>\r\n\r\njust a body line\r\n"
        );
    }

    #[test]
    fn folded_and_grouped_recipients() {
        let input = b"To: root,\n ops@example.org\nCc: team: a@x.org, b@x.org;\nSubject: s\n\nb\n";
        let p = prepare(input, &opts(true, true, None)).unwrap();
        assert_eq!(
            p.header_recipients,
            ["root", "ops@example.org", "a@x.org", "b@x.org"]
        );
    }

    #[test]
    fn an_unusable_recipient_fails_the_message() {
        let e = prepare(
            b"To: root, not an address\nSubject: s\n\nb\n",
            &opts(true, true, None),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("To: header line 1: "), "{e}");
        // Without -t the headers are the message's business.
        assert!(prepare(b"To: not an address\n\nb\n", &opts(false, true, None)).is_ok());
    }

    #[test]
    fn headers_only_and_empty_input() {
        let p = prepare(b"Subject: s\n", &opts(false, true, None)).unwrap();
        assert_eq!(text(&p), "From: me@host\r\nSubject: s\r\n\r\n");
        let p = prepare(b"", &opts(false, true, None)).unwrap();
        assert_eq!(text(&p), "From: me@host\r\n\r\n");
        let p = prepare(b"Subject: s\nnot a header\n", &opts(false, true, None)).unwrap();
        assert_eq!(
            text(&p),
            "From: me@host\r\nSubject: s\r\n\r\nnot a header\r\n"
        );
    }
}
