//! Recipients are the envelope's, exactly. The Gmail API has no envelope:
//! it mails every address in `To`, `Cc` and `Bcc` (a `Resent-` block does
//! not change that) and strips `Bcc`. So before a message goes to the API:
//!
//! - envelope recipients missing from those headers are added in one
//!   `Bcc:` field (the usual case: a cron mail or a `sendmail -t` Bcc);
//! - when the headers name addresses *outside* the envelope (a partial
//!   retry after some recipients were delivered or failed, a list
//!   expansion, an alias), the message cannot be sent as it is: a copy is
//!   sent whose `To:` and `Cc:` fields are kept as `X-Original-To:` and
//!   `X-Original-Cc:` (what the recipients read), whose original `Bcc:`
//!   fields are dropped (they must stay blind), and whose one `Bcc:` names
//!   exactly the envelope recipients being tried. The log and the delivery
//!   record say so.
//!
//! Addresses compare case-insensitively.

use crate::body::header_end;

/// What must change in the header section.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Envelope recipients the headers do not name: added as `Bcc:`.
    pub missing: Vec<String>,
    /// Header recipients outside the envelope: rewrite the copy.
    pub outside: Vec<String>,
}

impl Plan {
    pub(crate) fn unchanged(&self) -> bool {
        self.missing.is_empty() && self.outside.is_empty()
    }

    /// One sentence for the log and `queue show`.
    pub(crate) fn describe(&self) -> Option<String> {
        if !self.outside.is_empty() {
            return Some(format!(
                "the headers name recipients outside the envelope ({}); sent a copy with To:/Cc: kept as X-Original-To:/X-Original-Cc: and the envelope's recipients in Bcc:",
                self.outside.join(", ")
            ));
        }
        if !self.missing.is_empty() {
            return Some(format!(
                "added envelope recipients missing from To/Cc/Bcc as Bcc: {}",
                self.missing.join(", ")
            ));
        }
        None
    }
}

/// Split a header section (optionally ending with its blank line) into
/// fields (a line and its continuation lines) and the rest.
fn fields(header: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let end = header_end(header)
        .map(|e| {
            if header[..e].ends_with(b"\r\n") {
                e - 2
            } else {
                e - 1
            }
        })
        .unwrap_or(header.len());
    let (body, tail) = header.split_at(end);
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < body.len() {
        let next = memchr::memchr(b'\n', &body[i..])
            .map(|p| i + p + 1)
            .unwrap_or(body.len());
        if i > start && !matches!(body[i], b' ' | b'\t') {
            out.push(&body[start..i]);
            start = i;
        }
        i = next;
    }
    if start < body.len() {
        out.push(&body[start..]);
    }
    (out, tail)
}

fn name_of(field: &[u8]) -> String {
    let colon = field.iter().position(|&b| b == b':').unwrap_or(0);
    String::from_utf8_lossy(&field[..colon])
        .trim()
        .to_ascii_lowercase()
}

fn value_of(field: &[u8]) -> String {
    let colon = field
        .iter()
        .position(|&b| b == b':')
        .map(|c| c + 1)
        .unwrap_or(field.len());
    String::from_utf8_lossy(&field[colon..])
        .replace(['\r', '\n'], " ")
        .trim()
        .to_string()
}

fn is_recipient_field(name: &str) -> bool {
    matches!(name, "to" | "cc" | "bcc")
}

/// The addresses the API would mail.
pub(crate) fn header_recipients(header: &[u8]) -> Vec<String> {
    let (fs, _) = fields(header);
    fs.iter()
        .filter(|f| is_recipient_field(&name_of(f)))
        .flat_map(|f| addresses(&value_of(f)))
        .collect()
}

/// Addresses in an address-list value (RFC 5322 `address-list`: display
/// names, quoted strings, comments, groups).
pub(crate) fn addresses(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut angle, mut comment) = (false, false, 0usize);
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        let t = cur.trim();
        let addr = match (t.rfind('<'), t.rfind('>')) {
            (Some(a), Some(b)) if a < b => t[a + 1..b].trim().to_string(),
            _ => t
                .rsplit([' ', ':', '\t'])
                .next()
                .unwrap_or("")
                .trim_end_matches(';')
                .to_string(),
        };
        if addr.contains('@') {
            out.push(addr);
        }
        cur.clear();
    };
    let mut escaped = false;
    for c in value.chars() {
        if escaped {
            escaped = false;
            cur.push(c);
            continue;
        }
        match c {
            '\\' if quoted || comment > 0 => escaped = true,
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
            ',' | ';' if !quoted && !angle => {
                flush(&mut cur, &mut out);
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    flush(&mut cur, &mut out);
    out
}

/// Compare `header` with the envelope recipients being tried.
pub(crate) fn plan(header: &[u8], envelope: &[String]) -> Plan {
    let named: Vec<String> = header_recipients(header)
        .into_iter()
        .map(|a| a.to_ascii_lowercase())
        .collect();
    let env: Vec<String> = envelope.iter().map(|a| a.to_ascii_lowercase()).collect();
    let mut p = Plan::default();
    for (i, e) in env.iter().enumerate() {
        if !named.contains(e) && !p.missing.iter().any(|m| m.eq_ignore_ascii_case(e)) {
            p.missing.push(envelope[i].clone());
        }
    }
    for n in &named {
        if !env.contains(n) && !p.outside.contains(n) {
            p.outside.push(n.clone());
        }
    }
    p
}

/// `Bcc: a,\r\n b\r\n`.
fn bcc(addrs: &[String]) -> Vec<u8> {
    let list: Vec<String> = addrs.iter().map(|a| format!("<{a}>")).collect();
    format!("Bcc: {}\r\n", list.join(",\r\n ")).into_bytes()
}

/// The header section to send (same blank line as `header`).
pub(crate) fn apply(header: &[u8], plan: &Plan, envelope: &[String]) -> Vec<u8> {
    if plan.unchanged() {
        return header.to_vec();
    }
    let (fs, tail) = fields(header);
    let mut out = Vec::with_capacity(header.len() + 64 * envelope.len());
    let ensure_eol = |out: &mut Vec<u8>| {
        if !out.is_empty() && !out.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
    };
    if plan.outside.is_empty() {
        for f in &fs {
            out.extend_from_slice(f);
        }
        ensure_eol(&mut out);
        out.extend_from_slice(&bcc(&plan.missing));
    } else {
        for f in &fs {
            let name = name_of(f);
            match name.as_str() {
                "bcc" => continue,
                "to" | "cc" => {
                    let colon = f.iter().position(|&b| b == b':').unwrap_or(0);
                    out.extend_from_slice(if name == "to" {
                        b"X-Original-To"
                    } else {
                        b"X-Original-Cc"
                    });
                    out.extend_from_slice(&f[colon..]);
                }
                _ => out.extend_from_slice(f),
            }
        }
        ensure_eol(&mut out);
        out.extend_from_slice(&bcc(envelope));
    }
    if tail.is_empty() {
        // A message that is all headers: the blank line that ends them.
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(tail);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn address_lists() {
        assert_eq!(
            addresses("\"Doe, J\" <j@x.org>, k@y.org (Kay), Team: a@b.c, d@e.f;"),
            ["j@x.org", "k@y.org", "a@b.c", "d@e.f"]
        );
        assert!(addresses("undisclosed-recipients:;").is_empty());
    }

    #[test]
    fn missing_envelope_recipients_become_bcc() {
        let h = b"From: a@b.c\r\nTo: x@y.org\r\nSubject: s\r\n\r\n";
        let p = plan(h, &env(&["X@y.org", "hidden@z.org"]));
        assert_eq!(p.missing, ["hidden@z.org"]);
        assert!(p.outside.is_empty());
        let out = apply(h, &p, &env(&["X@y.org", "hidden@z.org"]));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "From: a@b.c\r\nTo: x@y.org\r\nSubject: s\r\nBcc: <hidden@z.org>\r\n\r\n"
        );
    }

    #[test]
    fn a_message_naming_only_its_envelope_is_unchanged() {
        let h = b"To: a@b.c,\r\n c@d.e\r\nCc: f@g.h\r\n\r\n";
        let e = env(&["a@b.c", "c@d.e", "f@g.h"]);
        let p = plan(h, &e);
        assert!(p.unchanged());
        assert_eq!(apply(h, &p, &e), h);
    }

    #[test]
    fn headers_outside_the_envelope_get_a_rewritten_copy() {
        let h = b"From: a@b.c\r\nTo: done@x.org,\r\n todo@x.org\r\nCc: other@x.org\r\nBcc: secret@x.org\r\nSubject: s\n\r\n";
        let e = env(&["todo@x.org"]);
        let p = plan(h, &e);
        assert_eq!(p.outside, ["done@x.org", "other@x.org", "secret@x.org"]);
        let out = String::from_utf8(apply(h, &p, &e)).unwrap();
        assert_eq!(
            out,
            "From: a@b.c\r\nX-Original-To: done@x.org,\r\n todo@x.org\r\nX-Original-Cc: other@x.org\r\nSubject: s\nBcc: <todo@x.org>\r\n\r\n"
        );
        // What the API would mail now: exactly the envelope.
        assert_eq!(header_recipients(out.as_bytes()), ["todo@x.org"]);
        assert!(!out.contains("secret@"));
    }

    #[test]
    fn headers_only_message() {
        let h = b"Subject: no recipients";
        let e = env(&["a@b.c"]);
        let p = plan(h, &e);
        let out = apply(h, &p, &e);
        assert_eq!(out, b"Subject: no recipients\r\nBcc: <a@b.c>\r\n\r\n");
    }
}
