//! `sendmail`: submission from stdin, as cron, mail(1) and scripts expect.
//!
//! The message goes to the running daemon over SMTP on its loopback
//! listener, so it gets exactly the same treatment as any SMTP client's.
//! When no daemon runs, the spool is opened here and an in-process SMTP
//! session stores the message (like Postfix's maildrop): it is delivered when
//! the daemon starts.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// sysexits.h codes callers may act on.
pub const EX_USAGE: u8 = 64;
pub const EX_DATAERR: u8 = 65;
pub const EX_SOFTWARE: u8 = 70;
pub const EX_TEMPFAIL: u8 = 75;

const USAGE: &str = "usage: sendmail [-t] [-i] [-oi] [-f ADDR] [-F NAME] [RCPT...]";

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    /// `-t`: take recipients from To:, Cc: and Bcc: (Bcc: is removed).
    pub extract: bool,
    /// `-i`/`-oi`: a line with a single dot does not end the message.
    pub ignore_dots: bool,
    /// `-f`: envelope sender.
    pub from: Option<String>,
    /// `-F`: full name for a From: header we add.
    pub full_name: Option<String>,
    pub recipients: Vec<String>,
}

/// Parse sendmail's options; unknown `-o`/`-b`/`-v` style options that do
/// not change what we do are accepted and ignored, as Postfix does.
pub fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = args.iter().peekable();
    while let Some(arg) = it.next() {
        let s = arg.as_str();
        if s == "--" {
            a.recipients.extend(it.by_ref().cloned());
            break;
        }
        if !s.starts_with('-') || s == "-" {
            a.recipients.push(arg.clone());
            continue;
        }
        let mut value = |flag: &str, rest: &str| -> Result<String, String> {
            if !rest.is_empty() {
                Ok(rest.to_string())
            } else {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("option {flag} needs a value\n{USAGE}"))
            }
        };
        match s {
            "-t" => a.extract = true,
            "-i" | "-oi" => a.ignore_dots = true,
            _ if s.starts_with("-f") => a.from = Some(value("-f", &s[2..])?),
            _ if s.starts_with("-F") => a.full_name = Some(value("-F", &s[2..])?),
            _ if s.starts_with("-r") => a.from = Some(value("-r", &s[2..])?),
            // Delivery mode, error mode, verbosity, queue options: accepted,
            // meaningless here (we always queue).
            "-bm" | "-v" | "-U" | "-m" | "-n" => {}
            _ if s.starts_with("-o")
                || s.starts_with("-od")
                || s.starts_with("-N")
                || s.starts_with("-R")
                || s.starts_with("-V") => {}
            "-bs" | "-bp" | "-bd" | "-q" | "-bv" => {
                return Err(format!(
                    "option {s} is not supported by oauthrelay's sendmail (use `oauthrelay queue list`, or SMTP directly)\n{USAGE}"
                ));
            }
            _ => return Err(format!("unknown option {s}\n{USAGE}")),
        }
    }
    Ok(a)
}

/// Turn what came on stdin into the message to submit (CRLF line endings,
/// a From: header when missing, Bcc: removed with `-t`), plus the extra
/// recipients `-t` found.
pub fn prepare(input: &[u8], args: &Args, sender: &str) -> (Vec<u8>, Vec<String>) {
    // Lines, without their endings, stopping at a lone dot unless -i.
    let mut lines: Vec<&[u8]> = Vec::new();
    for line in input.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !args.ignore_dots && line == b"." {
            break;
        }
        lines.push(line);
    }
    if input.ends_with(b"\n") && lines.last() == Some(&&b""[..]) {
        lines.pop();
    }
    let header_end = lines
        .iter()
        .position(|l| l.is_empty())
        .unwrap_or(lines.len());
    // Header fields, unfolded, with their line ranges.
    let mut fields: Vec<(String, String, std::ops::Range<usize>)> = Vec::new();
    for (i, l) in lines[..header_end].iter().enumerate() {
        if (l.starts_with(b" ") || l.starts_with(b"\t")) && !fields.is_empty() {
            if let Some(f) = fields.last_mut() {
                f.1.push(' ');
                f.1.push_str(String::from_utf8_lossy(l).trim());
                f.2.end = i + 1;
            }
            continue;
        }
        let text = String::from_utf8_lossy(l);
        if let Some((name, value)) = text.split_once(':') {
            fields.push((
                name.trim().to_ascii_lowercase(),
                value.trim().to_string(),
                i..i + 1,
            ));
        } else if i == 0 {
            // Not a header at all: the whole input is body.
            fields.clear();
            break;
        }
    }
    let looks_like_headers = !fields.is_empty();
    let mut extra = Vec::new();
    let mut drop = Vec::new();
    for (name, value, range) in &fields {
        if args.extract && matches!(name.as_str(), "to" | "cc" | "bcc") {
            extra.extend(addresses(value));
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
        match &args.full_name {
            Some(n) => out
                .extend_from_slice(format!("From: {} <{sender}>\r\n", quote_phrase(n)).as_bytes()),
            None => out.extend_from_slice(format!("From: {sender}\r\n").as_bytes()),
        }
    }
    if !looks_like_headers {
        out.extend_from_slice(b"\r\n");
    }
    for (i, l) in lines.iter().enumerate() {
        if drop.iter().any(|r| r.contains(&i)) {
            continue;
        }
        out.extend_from_slice(l);
        out.extend_from_slice(b"\r\n");
    }
    (out, extra)
}

fn quote_phrase(name: &str) -> String {
    if name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || " !#$%&'*+-/=?^_`{|}~".contains(c))
    {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// Addresses in an address-list header value (`A <a@x>, b@y (B), "C, D" <c@z>`,
/// groups like `team: a@x, b@y;`).
pub fn addresses(value: &str) -> Vec<String> {
    // Split on commas outside quotes, comments and angle brackets, dropping
    // comments as we go.
    let mut parts = vec![String::new()];
    let (mut quoted, mut comment, mut angle) = (false, 0u32, false);
    for c in value.chars() {
        match c {
            '"' if comment == 0 => quoted = !quoted,
            '(' if !quoted => {
                comment += 1;
                continue;
            }
            ')' if !quoted && comment > 0 => {
                comment -= 1;
                continue;
            }
            '<' if !quoted && comment == 0 => angle = true,
            '>' if !quoted && comment == 0 => angle = false,
            ',' if !quoted && comment == 0 && !angle => {
                parts.push(String::new());
                continue;
            }
            _ => {}
        }
        if comment == 0
            && let Some(p) = parts.last_mut()
        {
            p.push(c);
        }
    }
    parts
        .iter()
        .filter_map(|part| {
            let part = part.trim();
            let addr = match (part.find('<'), part.rfind('>')) {
                (Some(a), Some(b)) if a < b => &part[a + 1..b],
                _ => part.rsplit(':').next().unwrap_or(part),
            };
            let addr = addr.trim().trim_end_matches(';').trim();
            addr.contains('@').then(|| addr.to_string())
        })
        .collect()
}

/// Default envelope sender: `user@hostname`.
pub fn default_sender(hostname: &str) -> String {
    let user = std::env::var("LOGNAME")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "root".into());
    format!("{user}@{hostname}")
}

/// Where to reach the daemon: its first listener, on loopback when it
/// listens on every address.
pub fn daemon_address(listen: &[SocketAddr]) -> Option<SocketAddr> {
    let a = *listen.first()?;
    let ip = match a.ip() {
        IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Some(SocketAddr::new(ip, a.port()))
}

/// Why a submission did not end in `250`.
#[derive(Debug)]
pub enum SubmitError {
    /// Nobody listens there.
    Unreachable(std::io::Error),
    /// The server answered with an error.
    Reply {
        code: u16,
        text: String,
    },
    Io(std::io::Error),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::Unreachable(e) => write!(f, "cannot connect to oauthrelay: {e}"),
            SubmitError::Reply { code, text } => write!(f, "{code} {text}"),
            SubmitError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl SubmitError {
    pub fn exit_code(&self) -> u8 {
        match self {
            SubmitError::Reply { code, .. } if *code >= 500 => EX_DATAERR,
            _ => EX_TEMPFAIL,
        }
    }
}

/// Submit one message over SMTP; returns the server's final reply text.
pub async fn submit(
    addr: SocketAddr,
    sender: &str,
    rcpts: &[String],
    message: &[u8],
) -> Result<String, SubmitError> {
    let stream = tokio::time::timeout(Duration::from_secs(30), TcpStream::connect(addr))
        .await
        .map_err(|_| {
            SubmitError::Unreachable(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timeout",
            ))
        })?
        .map_err(SubmitError::Unreachable)?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let step = Duration::from_secs(300);
    expect(&mut r, 2, step).await?;
    let utf8 = !sender.is_ascii() || rcpts.iter().any(|r| !r.is_ascii());
    let mut cmds = vec!["EHLO localhost\r\n".to_string()];
    cmds.push(format!(
        "MAIL FROM:<{sender}>{}\r\n",
        if utf8 { " SMTPUTF8" } else { "" }
    ));
    for rc in rcpts {
        cmds.push(format!("RCPT TO:<{rc}>\r\n"));
    }
    for c in &cmds {
        w.write_all(c.as_bytes()).await.map_err(SubmitError::Io)?;
        expect(&mut r, 2, step).await?;
    }
    w.write_all(b"DATA\r\n").await.map_err(SubmitError::Io)?;
    expect(&mut r, 3, step).await?;
    let mut body = Vec::with_capacity(message.len() + 64);
    let mut at_line_start = true;
    for &b in message {
        if at_line_start && b == b'.' {
            body.push(b'.');
        }
        body.push(b);
        at_line_start = b == b'\n';
    }
    if !body.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b".\r\n");
    w.write_all(&body).await.map_err(SubmitError::Io)?;
    let done = expect(&mut r, 2, Duration::from_secs(600)).await?;
    let _ = w.write_all(b"QUIT\r\n").await;
    Ok(done)
}

/// Read one (possibly multi-line) reply; error unless its first digit is `class`.
async fn expect<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    class: u8,
    limit: Duration,
) -> Result<String, SubmitError> {
    let mut text = String::new();
    let code = loop {
        let mut line = String::new();
        let n = tokio::time::timeout(limit, r.read_line(&mut line))
            .await
            .map_err(|_| {
                SubmitError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no reply from oauthrelay",
                ))
            })?
            .map_err(SubmitError::Io)?;
        if n == 0 {
            return Err(SubmitError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "oauthrelay closed the connection",
            )));
        }
        let line = line.trim_end();
        let code: u16 = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(line.get(4..).unwrap_or(""));
        if line.as_bytes().get(3) != Some(&b'-') {
            break code;
        }
    };
    if code / 100 == u16::from(class) {
        Ok(text)
    } else {
        Err(SubmitError::Reply { code, text })
    }
}

/// Read stdin up to `limit` bytes.
pub fn read_stdin(limit: u64) -> std::io::Result<Result<Vec<u8>, u64>> {
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .take(limit + 1)
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Ok(Err(limit));
    }
    Ok(Ok(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn options_parse_like_sendmail() {
        let a = parse_args(&v(&[
            "-t",
            "-oi",
            "-f",
            "cron@host",
            "-FCron Daemon",
            "root@example.com",
        ]))
        .unwrap();
        assert!(a.extract && a.ignore_dots);
        assert_eq!(a.from.as_deref(), Some("cron@host"));
        assert_eq!(a.full_name.as_deref(), Some("Cron Daemon"));
        assert_eq!(a.recipients, v(&["root@example.com"]));
        assert!(parse_args(&v(&["-odi", "-oem", "x@y"])).is_ok());
        assert!(parse_args(&v(&["-Z"])).is_err());
        assert!(parse_args(&v(&["-f"])).is_err());
    }

    #[test]
    fn messages_get_crlf_a_from_and_lose_bcc() {
        let args = parse_args(&v(&["-t"])).unwrap();
        let input = b"To: A <a@example.com>, b@example.com\nBcc: secret@example.com\nSubject: x\n\nbody\n.\nafter dot\n";
        let (msg, extra) = prepare(input, &args, "me@host");
        assert_eq!(
            extra,
            v(&["a@example.com", "b@example.com", "secret@example.com"])
        );
        let text = String::from_utf8(msg).unwrap();
        assert_eq!(
            text,
            "From: me@host\r\nTo: A <a@example.com>, b@example.com\r\nSubject: x\r\n\r\nbody\r\n"
        );
        let args = parse_args(&v(&["-i", "-F", "Jo \"X\""])).unwrap();
        let (msg, _) = prepare(b"From: x@y\n\n.\nkept\n", &args, "me@host");
        assert_eq!(
            String::from_utf8(msg).unwrap(),
            "From: x@y\r\n\r\n.\r\nkept\r\n"
        );
        let (msg, extra) = prepare(
            b"To: a@x\nBcc: hidden@y\n\nhi\n",
            &parse_args(&v(&["a@x", "hidden@y"])).unwrap(),
            "me@host",
        );
        assert!(extra.is_empty());
        assert!(
            !String::from_utf8(msg).unwrap().contains("hidden"),
            "Bcc removed without -t too"
        );
        let (msg, _) = prepare(b"just a body line\n", &args, "me@host");
        assert_eq!(
            String::from_utf8(msg).unwrap(),
            "From: \"Jo \\\"X\\\"\" <me@host>\r\n\r\njust a body line\r\n"
        );
    }

    #[test]
    fn address_lists() {
        assert_eq!(
            addresses("\"Doe, J\" <j@x.org>, k@y.org (K, Q)"),
            v(&["j@x.org", "k@y.org"])
        );
        assert_eq!(addresses("team: a@x, b@y;"), v(&["a@x", "b@y"]));
    }
}
