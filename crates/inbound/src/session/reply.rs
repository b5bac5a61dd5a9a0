//! Every reply the server sends, built in one place.
//!
//! All 2xx, 4xx and 5xx replies carry an enhanced status code (RFC 3463),
//! except the ones RFC 2034 exempts: the 220 greeting and the replies to
//! HELO and EHLO, whose first word must be our host name. 3xx replies have no
//! enhanced code class; AUTH challenges must be exactly `334 <base64>`.

use std::fmt;
use std::io::Write;
use std::net::IpAddr;

use spool::{MessageId, SpoolError};

/// The host name and client facts some replies mention.
pub(crate) struct ReplyCtx<'a> {
    pub host: &'a str,
}

/// One reply. Borrowed text (addresses, names) comes from the command being
/// answered and is sanitised when written.
#[derive(Debug, Clone)]
pub(crate) enum Reply<'a> {
    // Connection level.
    Greeting,
    NetworkRefused(IpAddr),
    TooManyConnections,
    TooManyFromClient(IpAddr),
    Timeout,
    TooManyJunkCommands,
    TooManyErrors,
    ShuttingDown,
    Bye,

    // Greetings (no enhanced codes: RFC 2034).
    Helo,

    // Simple commands.
    Ok,
    Vrfy,
    Help,
    NotImplemented(&'static str),

    // Transaction.
    MailOk,
    RcptOk,
    DataGo,
    BdatChunk(u64),
    Queued(MessageId),
    SizeExceeded,
    TooManyRecipients,
    RelayDenied(&'a str),
    SenderRejected(&'a str),
    NonAsciiAddress,
    BadRecipient,
    Storage(SpoolError),

    // Errors.
    Unknown,
    LineTooLong,
    EmptyLine,
    Syntax(&'static str),
    BadSender,
    InvalidParameter(&'static str),
    UnsupportedParameter(&'a str),
    Sequence(&'static str),

    // STARTTLS.
    TlsGo,
    TlsUnavailable,

    // AUTH.
    AuthChallenge,
    AuthUsername,
    AuthPassword,
    AuthOk,
    AuthFailed,
    AuthCancelled,
    AuthBadBase64,
    AuthUnknownMechanism,
    AuthTlsRequired,
    AuthRateLimited,
    AuthBusy,
}

impl Reply<'_> {
    /// The three-digit reply code.
    pub(crate) fn code(&self) -> u16 {
        match self {
            Reply::Greeting | Reply::TlsGo => 220,
            Reply::Bye => 221,
            Reply::Help => 214,
            Reply::AuthOk => 235,
            Reply::Helo
            | Reply::Ok
            | Reply::MailOk
            | Reply::RcptOk
            | Reply::BdatChunk(_)
            | Reply::Queued(_) => 250,
            Reply::Vrfy => 252,
            Reply::AuthChallenge | Reply::AuthUsername | Reply::AuthPassword => 334,
            Reply::DataGo => 354,
            Reply::TooManyConnections
            | Reply::TooManyFromClient(_)
            | Reply::Timeout
            | Reply::TooManyJunkCommands
            | Reply::TooManyErrors
            | Reply::ShuttingDown => 421,
            Reply::TooManyRecipients => 452,
            Reply::AuthRateLimited | Reply::AuthBusy => 454,
            Reply::Storage(e) => storage_reply(e).0,
            Reply::Unknown | Reply::LineTooLong | Reply::EmptyLine => 500,
            Reply::Syntax(_)
            | Reply::BadSender
            | Reply::BadRecipient
            | Reply::InvalidParameter(_)
            | Reply::AuthCancelled
            | Reply::AuthBadBase64 => 501,
            Reply::NotImplemented(_) | Reply::TlsUnavailable => 502,
            Reply::Sequence(_) => 503,
            Reply::AuthUnknownMechanism => 504,
            Reply::AuthTlsRequired => 530,
            Reply::AuthFailed => 535,
            Reply::SenderRejected(_) => 550,
            Reply::SizeExceeded => 552,
            Reply::NonAsciiAddress => 553,
            Reply::NetworkRefused(_) | Reply::RelayDenied(_) => 554,
            Reply::UnsupportedParameter(_) => 555,
        }
    }

    /// Whether this reply counts against `max_errors`: every permanent
    /// refusal of something the client did wrong. A message that is too big
    /// is the client's content, not a protocol error.
    pub(crate) fn is_client_error(&self) -> bool {
        self.code() >= 500 && !matches!(self, Reply::SizeExceeded | Reply::NetworkRefused(_))
    }

    /// Append the reply, CRLF included, to `out`.
    pub(crate) fn write(&self, out: &mut Vec<u8>, cx: &ReplyCtx<'_>) {
        let host = cx.host;
        let code = self.code();
        // Writing into a Vec cannot fail.
        let _ = match self {
            Reply::Greeting => write!(out, "220 {host} ESMTP oauthrelay\r\n"),
            Reply::NetworkRefused(ip) => write!(
                out,
                "554 5.7.1 {ip} is not allowed to relay; add it to [server] allow_networks\r\n"
            ),
            Reply::TooManyConnections => {
                write!(out, "421 4.7.0 {host} Error: too many connections\r\n")
            }
            Reply::TooManyFromClient(ip) => {
                write!(
                    out,
                    "421 4.7.0 {host} Error: too many connections from {ip}\r\n"
                )
            }
            Reply::Timeout => write!(out, "421 4.4.2 {host} Error: timeout exceeded\r\n"),
            Reply::TooManyJunkCommands => write!(
                out,
                "421 4.7.0 {host} Error: too many commands without authentication\r\n"
            ),
            Reply::TooManyErrors => write!(out, "421 4.7.0 Too many errors\r\n"),
            Reply::ShuttingDown => write!(out, "421 4.3.2 Service shutting down\r\n"),
            Reply::Bye => write!(out, "221 2.0.0 Bye\r\n"),
            Reply::Helo => write!(out, "250 {host}\r\n"),
            Reply::Ok => write!(out, "250 2.0.0 Ok\r\n"),
            Reply::Vrfy => write!(
                out,
                "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"
            ),
            Reply::Help => write!(
                out,
                "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH\r\n"
            ),
            Reply::NotImplemented(what) => {
                write!(out, "502 5.5.1 Error: {what} not implemented\r\n")
            }
            Reply::MailOk => write!(out, "250 2.1.0 Ok\r\n"),
            Reply::RcptOk => write!(out, "250 2.1.5 Ok\r\n"),
            Reply::DataGo => write!(out, "354 End data with <CR><LF>.<CR><LF>\r\n"),
            Reply::BdatChunk(n) => write!(out, "250 2.0.0 Ok: {n} bytes received\r\n"),
            Reply::Queued(id) => write!(out, "250 2.0.0 Ok: queued as {id}\r\n"),
            Reply::SizeExceeded => write!(
                out,
                "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
            ),
            Reply::TooManyRecipients => write!(out, "452 4.5.3 Too many recipients\r\n"),
            Reply::RelayDenied(addr) => {
                write!(out, "554 5.7.1 <{}>: Relay access denied\r\n", Clean(addr))
            }
            Reply::SenderRejected(addr) => write!(
                out,
                "550 5.7.1 <{}>: Sender address rejected: no account accepts this sender\r\n",
                Clean(addr)
            ),
            Reply::NonAsciiAddress => write!(
                out,
                "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter of MAIL FROM\r\n"
            ),
            Reply::BadRecipient => write!(out, "501 5.1.3 Bad recipient address syntax\r\n"),
            Reply::Storage(e) => {
                let (code, esc, text) = storage_reply(e);
                write!(out, "{code} {esc} {text}\r\n")
            }
            Reply::Unknown => write!(out, "500 5.5.1 Error: command not recognized\r\n"),
            Reply::LineTooLong => write!(out, "500 5.5.2 Line too long\r\n"),
            Reply::EmptyLine => write!(out, "500 5.5.2 Error: bad syntax\r\n"),
            Reply::Syntax(syntax) => write!(out, "501 5.5.4 Syntax: {syntax}\r\n"),
            Reply::BadSender => write!(out, "501 5.1.7 Bad sender address syntax\r\n"),
            Reply::InvalidParameter(p) => write!(out, "501 5.5.4 Invalid {p} parameter\r\n"),
            Reply::UnsupportedParameter(p) => {
                write!(out, "555 5.5.4 Unsupported parameter {}\r\n", Clean(p))
            }
            Reply::Sequence(why) => write!(out, "503 5.5.1 Error: {why}\r\n"),
            Reply::TlsGo => write!(out, "220 2.0.0 Ready to start TLS\r\n"),
            Reply::TlsUnavailable => write!(out, "502 5.5.1 Error: STARTTLS not available\r\n"),
            Reply::AuthChallenge => write!(out, "334 \r\n"),
            Reply::AuthUsername => write!(out, "334 VXNlcm5hbWU6\r\n"),
            Reply::AuthPassword => write!(out, "334 UGFzc3dvcmQ6\r\n"),
            Reply::AuthOk => write!(out, "235 2.7.0 Authentication successful\r\n"),
            Reply::AuthFailed => write!(out, "535 5.7.8 Authentication credentials invalid\r\n"),
            Reply::AuthCancelled => write!(out, "501 5.0.0 Authentication cancelled\r\n"),
            Reply::AuthBadBase64 => write!(out, "501 5.5.2 Cannot decode base64 response\r\n"),
            Reply::AuthUnknownMechanism => {
                write!(out, "504 5.5.4 Unrecognized authentication type\r\n")
            }
            Reply::AuthTlsRequired => {
                write!(out, "530 5.7.0 Must issue a STARTTLS command first\r\n")
            }
            Reply::AuthRateLimited => write!(
                out,
                "454 4.7.0 Too many failed authentication attempts, try again later\r\n"
            ),
            Reply::AuthBusy => write!(
                out,
                "454 4.7.0 Temporary authentication failure, try again later\r\n"
            ),
        };
        debug_assert!(out.len() >= 5, "reply {code} written");
    }
}

/// The EHLO reply: host line, then one line per extension.
pub(crate) struct EhloReply<'a> {
    pub host: &'a str,
    pub client_name: &'a str,
    pub client_ip: IpAddr,
    pub max_size: u64,
    pub starttls: bool,
    pub auth: bool,
}

impl EhloReply<'_> {
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        let _ = write!(
            out,
            "250-{} Hello {} [{}]\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-PIPELINING\r\n\
             250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n",
            self.host,
            Clean(self.client_name),
            self.client_ip,
            self.max_size
        );
        if self.starttls {
            out.extend_from_slice(b"250-STARTTLS\r\n");
        }
        if self.auth {
            // The second line is the pre-RFC 2554 form some old clients
            // (Outlook Express, older printers and scanners) look for
            // instead; Postfix sends it with `broken_sasl_auth_clients`.
            out.extend_from_slice(b"250-AUTH PLAIN LOGIN\r\n250-AUTH=LOGIN PLAIN\r\n");
        }
        out.extend_from_slice(b"250 CHUNKING\r\n");
    }
}

/// Client-supplied text echoed in a reply or a log line: printable ASCII
/// and UTF-8 pass, control characters become `?`, and it is cut at 256
/// characters, so it can never break a reply line.
pub(crate) struct Clean<'a>(pub &'a str);

impl fmt::Display for Clean<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        for c in self.0.chars().take(256) {
            if c.is_control() {
                f.write_char('?')?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// The reply when the spool cannot store a message: `(code, enhanced
/// status, text)`.
fn storage_reply(e: &SpoolError) -> (u16, &'static str, &'static str) {
    match e {
        SpoolError::DiskFull => (452, "4.3.1", "Insufficient system storage, try again later"),
        SpoolError::Closed => (421, "4.3.2", "Service shutting down, try again later"),
        SpoolError::EnvelopeTooLarge => (552, "5.3.4", "Message envelope too big for system"),
        _ => (451, "4.3.0", "Local error in processing, try again later"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: Reply<'_>) -> String {
        let mut out = Vec::new();
        r.write(&mut out, &ReplyCtx { host: "relay.test" });
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn codes_match_the_text() {
        let all = [
            Reply::Greeting,
            Reply::Ok,
            Reply::Queued(MessageId::from_u64(1)),
            Reply::SizeExceeded,
            Reply::TooManyRecipients,
            Reply::RelayDenied("a@b"),
            Reply::Storage(SpoolError::DiskFull),
            Reply::Timeout,
            Reply::AuthUsername,
            Reply::Sequence("need MAIL command"),
        ];
        for r in all {
            let code = r.code();
            let t = text(r);
            assert!(t.starts_with(&code.to_string()), "{t}");
            assert!(t.ends_with("\r\n"));
            let first = t.as_bytes()[0];
            let esc = t.split(' ').nth(1).unwrap();
            if matches!(first, b'2' | b'4' | b'5') && !t.starts_with("220 relay") {
                assert_eq!(esc.as_bytes()[0], first, "enhanced code class of {t}");
            }
        }
        assert_eq!(
            text(Reply::Storage(SpoolError::DiskFull)).get(..9),
            Some("452 4.3.1")
        );
    }

    #[test]
    fn echoed_text_cannot_break_lines() {
        let t = text(Reply::RelayDenied("a\r\nQUIT@b"));
        assert_eq!(t, "554 5.7.1 <a??QUIT@b>: Relay access denied\r\n");
    }
}
