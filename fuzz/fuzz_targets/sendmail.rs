//! `sendmail`'s argument and message handling, with the binary's own code
//! (`src/sendmail/args.rs`, `address.rs`, `message.rs`, compiled in here as
//! they are: std and clap only).
//!
//! Input layout: the bytes up to the first `\0\0` are the arguments,
//! separated by `\0`; the rest is the message on stdin. Byte 0's low bits
//! choose the starting mode (sendmail, mailq, newaliases).
//!
//! What must hold for any input:
//!
//! - no panic, whatever the arguments and the message;
//! - every sender, recipient and `-F` name that is accepted is free of
//!   control characters, and an accepted address never contains `<`, `>`
//!   or a space outside a quoted local part (nothing can end the SMTP path
//!   or add a command);
//! - a checked address checks again to itself (idempotent);
//! - the prepared message has only CRLF line ends, no bare CR-LF confusion
//!   (every LF is preceded by CR), no `Bcc:` field left in its header,
//!   and a `From:` field in its header;
//! - with `-t`, every To/Cc/Bcc recipient is returned, or the whole message
//!   is refused (never a silent drop: the count of header addresses found
//!   by an independent comma count is not checked, but a refusal is an
//!   `Err`, never a shorter list).

#![no_main]

// At the crate root: message.rs names `super::address`.
#[allow(dead_code)]
#[path = "../../crates/oauthrelay/src/sendmail/address.rs"]
mod address;
#[allow(dead_code)]
#[path = "../../crates/oauthrelay/src/sendmail/args.rs"]
mod args;
#[allow(dead_code)]
#[path = "../../crates/oauthrelay/src/sendmail/message.rs"]
mod message;

use libfuzzer_sys::fuzz_target;

fn assert_safe_address(a: &str) {
    assert!(!a.chars().any(char::is_control), "control in {a:?}");
    // Outside a quoted local part: no space, no angle bracket.
    let unquoted = match a.strip_prefix('"') {
        Some(rest) => {
            let mut esc = false;
            let mut end = None;
            for (i, c) in rest.char_indices() {
                if esc {
                    esc = false;
                } else if c == '\\' {
                    esc = true;
                } else if c == '"' {
                    end = Some(i + 1);
                    break;
                }
            }
            let end = end.expect("an accepted quoted local part is terminated");
            assert!(!rest[..end].contains(['<', '>']), "{a:?}");
            &rest[end..]
        }
        None => a,
    };
    assert!(!unquoted.contains(['<', '>', ' ']), "{a:?}");
    assert_eq!(address::check(a).as_deref(), Ok(a), "not idempotent");
}

fuzz_target!(|data: &[u8]| {
    let split = data.windows(2).position(|w| w == b"\0\0").unwrap_or(data.len());
    let (head, input) = (&data[..split], data.get(split + 2..).unwrap_or_default());
    let mode = match head.first().map(|b| b % 3) {
        Some(1) => args::Mode::ListQueue,
        Some(2) => args::Mode::Aliases,
        _ => args::Mode::Deliver,
    };
    let argv: Vec<String> = head
        .get(1..)
        .unwrap_or_default()
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let Ok(a) = args::parse(&argv, mode) else {
        return;
    };
    for w in a.warnings.iter().chain(&a.ignored) {
        assert!(!w.contains(['\r', '\n', '\0']), "a warning carries a control: {w:?}");
    }
    let sender = match a.from.as_deref().map(address::sender) {
        Some(Ok(s)) => {
            if !s.is_empty() {
                assert_safe_address(&s);
            }
            s
        }
        Some(Err(_)) => return,
        None => "user@host.example".to_string(),
    };
    let display = match a.full_name.as_deref().map(address::display_name) {
        Some(Ok(n)) => {
            assert!(!n.chars().any(char::is_control), "{n:?}");
            Some(n)
        }
        Some(Err(_)) => return,
        None => None,
    };
    for r in &a.recipients {
        if let Ok(list) = address::list(r) {
            for x in &list {
                assert_safe_address(x);
            }
        }
    }
    let opts = message::Options {
        extract: a.extract,
        ignore_dots: a.ignore_dots,
        sender: if sender.is_empty() { "user@host.example" } else { &sender },
        display_name: display.as_deref(),
        user: "user@host.example",
    };
    let Ok(p) = message::prepare(input, &opts) else {
        assert!(a.extract, "only -t can refuse a message");
        return;
    };
    for x in &p.header_recipients {
        assert_safe_address(x);
    }
    if !a.extract {
        assert!(p.header_recipients.is_empty());
    }
    let m = &p.message;
    for (i, &b) in m.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && m[i - 1] == b'\r', "a bare LF at {i}");
        }
    }
    assert!(m.ends_with(b"\r\n"), "the message ends its last line");
    // The header section: up to the first empty line.
    let end = m
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(m.len());
    let header = &m[..end];
    let mut has_from = false;
    for line in header.split(|&b| b == b'\n') {
        let l = line.to_ascii_lowercase();
        let name = l.split(|&b| b == b':').next().unwrap_or_default();
        let name = name.strip_suffix(b" ").unwrap_or(name);
        if l.contains(&b':') && !l.starts_with(b" ") && !l.starts_with(b"\t") {
            assert!(name != b"bcc" && name != b"resent-bcc", "Bcc kept");
            has_from |= name == b"from";
        }
    }
    assert!(has_from, "no From: in {:?}", String::from_utf8_lossy(header));
});
