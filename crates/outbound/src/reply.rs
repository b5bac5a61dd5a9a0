//! An upstream reply, typed from the wire to the queue and the bounce:
//! code, enhanced status code (RFC 3463) and text. Control characters the
//! server sent are escaped when the reply is read, so no log line, `queue`
//! output or bounce ever carries them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smtp_proto::Response;

/// An enhanced status code, `class.subject.detail` (RFC 3463).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub [u16; 3]);

impl Status {
    pub const fn new(class: u16, subject: u16, detail: u16) -> Status {
        Status([class, subject, detail])
    }

    pub fn class(self) -> u16 {
        self.0[0]
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c] = self.0;
        write!(f, "{a}.{b}.{c}")
    }
}

impl FromStr for Status {
    type Err = ();
    fn from_str(s: &str) -> Result<Status, ()> {
        let mut parts = s.split('.');
        let mut out = [0u16; 3];
        for o in &mut out {
            let p = parts.next().ok_or(())?;
            if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            *o = p.parse().map_err(|_| ())?;
        }
        if parts.next().is_some() || !matches!(out[0], 2 | 4 | 5) {
            return Err(());
        }
        Ok(Status(out))
    }
}

impl Serialize for Status {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Status, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|()| serde::de::Error::custom(format!("not an enhanced status: {s:?}")))
    }
}

/// The variant of Exchange's `5.7.139` (SMTP AUTH disabled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthDisabled {
    /// `SmtpClientAuthentication is disabled for the Tenant`.
    Tenant,
    /// `SmtpClientAuthentication is disabled for the Mailbox`.
    Mailbox,
    /// `the user is locked by your organization's security defaults policy`.
    SecurityDefaults,
    /// A Conditional Access policy blocks it.
    ConditionalAccess,
    /// `5.7.139` without words we know.
    Unspecified,
}

/// One (possibly multi-line) reply from the upstream server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The enhanced status code, when the server gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// The text, lines joined by single spaces, enhanced status code
    /// removed, control characters escaped.
    pub text: String,
}

impl Reply {
    pub(crate) fn from_response(r: Response<String>) -> Reply {
        let status = (r.esc[0] != 0).then(|| Status(r.esc.map(u16::from)));
        Reply::new(r.code, status, &r.message)
    }

    /// A reply from its parts (lines of `text` are joined).
    pub fn new(code: u16, status: Option<Status>, text: &str) -> Reply {
        let joined = text
            .split('\n')
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Reply {
            code,
            status,
            text: escape_controls(&joined),
        }
    }

    /// Parse `code [x.y.z] text` as logs and older spools wrote it.
    pub fn parse(line: &str) -> Option<Reply> {
        let b = line.as_bytes();
        if b.len() < 3
            || !b[..3].iter().all(u8::is_ascii_digit)
            || b.get(3).is_some_and(|&c| c != b' ')
        {
            return None;
        }
        let code: u16 = line[..3].parse().ok()?;
        let rest = line.get(4..).unwrap_or("");
        let (status, text) = match rest.split_once(' ') {
            Some((first, text)) => match first.parse() {
                Ok(s) => (Some(s), text),
                Err(()) => (None, rest),
            },
            None => match rest.parse() {
                Ok(s) => (Some(s), ""),
                Err(()) => (None, rest),
            },
        };
        Some(Reply::new(code, status, text))
    }

    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn is_temporary(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    fn has_status(&self, s: [u16; 3]) -> bool {
        self.status == Some(Status(s))
    }

    fn text_contains(&self, needle: &str) -> bool {
        self.text.to_ascii_lowercase().contains(needle)
    }

    /// `550 5.4.5 Daily user sending limit exceeded`.
    pub fn is_daily_limit(&self) -> bool {
        self.code == 550
            && (self.has_status([5, 4, 5]) || self.text_contains("daily user sending limit"))
    }

    /// `454 4.7.0 Too many login attempts`.
    pub fn is_login_throttle(&self) -> bool {
        self.code == 454 && self.text_contains("too many login attempts")
    }

    /// `452 4.5.3 Your message has too many recipients`: send the rest in a
    /// new transaction.
    pub fn is_too_many_recipients(&self) -> bool {
        self.code == 452
            && (self.has_status([4, 5, 3]) || self.text_contains("too many recipients"))
    }

    /// Exchange Online: `535 5.7.139 Authentication unsuccessful, ...`:
    /// SMTP AUTH is disabled (tenant, mailbox, security defaults or
    /// Conditional Access). No token fixes it: an administrator must.
    pub fn is_smtp_auth_disabled(&self) -> bool {
        self.has_status([5, 7, 139])
            || (self.code == 535
                && (self.text_contains("smtpclientauthentication is disabled")
                    || self.text_contains("security defaults")))
    }

    /// Which variant of `5.7.139` Exchange named.
    pub fn smtp_auth_disabled_for(&self) -> AuthDisabled {
        if self.text_contains("security defaults") {
            AuthDisabled::SecurityDefaults
        } else if self.text_contains("conditional access") || self.text_contains("policy") {
            AuthDisabled::ConditionalAccess
        } else if self.text_contains("for the mailbox") {
            AuthDisabled::Mailbox
        } else if self.text_contains("for the tenant") {
            AuthDisabled::Tenant
        } else {
            AuthDisabled::Unspecified
        }
    }

    /// Exchange Online: the mailbox may not send as the envelope sender or
    /// `From:` (`550 5.7.60 SMTP; Client does not have permissions to send
    /// as this sender`, `554 5.2.252 SendAsDenied`). A verdict on this
    /// message: bounce it.
    pub fn is_send_as_denied(&self) -> bool {
        self.is_permanent()
            && (self.has_status([5, 7, 60])
                || self.has_status([5, 2, 252])
                || self.text_contains("sendasdenied")
                || self.text_contains("permissions to send as this sender"))
    }

    /// Exchange Online: `432 4.3.2 STOREDRV.ClientSubmit; sender thread
    /// limit exceeded`, or `421 4.4.2 Message submission rate for this
    /// client has exceeded the configured limit`: slow down.
    pub fn is_rate_limited(&self) -> bool {
        (self.is_temporary() && self.has_status([4, 3, 2]))
            || (self.code == 421
                && self.has_status([4, 4, 2])
                && (self.text_contains("rate") || self.text_contains("limit")))
    }

    /// Exchange Online: `554 5.2.0 STOREDRV.Submission.Exception:
    /// OutboundSpamException`: the mailbox is blocked from sending.
    pub fn is_outbound_spam_block(&self) -> bool {
        self.is_permanent()
            && (self.text_contains("outboundspamexception")
                || self.text_contains("banned sender")
                || self.text_contains("restricted from sending"))
    }

    /// `421`: the server is closing the connection.
    pub fn is_closing(&self) -> bool {
        self.code == 421
    }

    /// `530`/`535` after a successful AUTH: the session (or the token) lost
    /// its authentication. Never a verdict on the message.
    pub fn is_auth_failure(&self) -> bool {
        matches!(self.code, 530 | 535)
    }

    /// The enhanced status for a DSN: the reply's own when it is permanent,
    /// otherwise `5.0.0`.
    pub fn dsn_status(&self) -> Status {
        match self.status {
            Some(s) if s.class() == 5 => s,
            _ => Status::new(5, 0, 0),
        }
    }
}

impl fmt::Display for Reply {
    /// `code x.y.z text`: the whole reply on one line, for logs,
    /// `last_error` and `Diagnostic-Code`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(s) = self.status {
            write!(f, " {s}")?;
        }
        if !self.text.is_empty() {
            write!(f, " {}", self.text)?;
        }
        Ok(())
    }
}

/// What an attempt got for a recipient: the server's reply, or the error
/// that kept it from replying (network, TLS, timeout, token, a local
/// problem reading the spool).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Reply(Reply),
    Error(String),
}

impl Answer {
    pub fn error(text: impl fmt::Display) -> Answer {
        Answer::Error(escape_controls(&text.to_string()))
    }

    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Answer::Reply(r) => Some(r),
            Answer::Error(_) => None,
        }
    }

    /// From a line as older spools stored it: a reply when it starts with
    /// a code, else an error text.
    pub(crate) fn parse_legacy(text: &str) -> Answer {
        Reply::parse(text)
            .map(Answer::Reply)
            .unwrap_or_else(|| Answer::error(text))
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Reply(r) => r.fmt(f),
            Answer::Error(e) => f.write_str(e),
        }
    }
}

/// Control characters (ESC, BEL, NUL, CR, LF, C1...) and the invisible
/// Unicode characters that reorder or hide text or end lines (bidi
/// overrides, zero-width joiners, line separators) as visible escapes
/// (`\x1b`, `\u{202e}`), so text from a client or a server can be quoted
/// in a bounce or printed on an admin's terminal without driving it
/// (clearing the screen, setting the clipboard with OSC 52, retitling it).
/// Tabs pass.
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(needs_escape) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\r' => out.push_str(r"\r"),
            '\n' => out.push_str(r"\n"),
            c if needs_escape(c) && (c as u32) < 0x80 => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if needs_escape(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// C0 (but tab), DEL, C1, and the Unicode format characters that reorder
/// or hide text, or end lines.
fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use smtp_proto::response::parser::ResponseReceiver;

    fn wire(s: &str) -> Reply {
        let mut r = ResponseReceiver::default();
        let bytes = s.as_bytes();
        Reply::from_response(r.parse(&mut bytes.iter()).unwrap())
    }

    #[test]
    fn multi_line_gmail_reply() {
        let r = wire(
            "550-5.4.5 Daily user sending limit exceeded. For more information on Gmail\r\n550-5.4.5 sending limits go to\r\n550 5.4.5  https://support.google.com/a/answer/166852 x - gsmtp\r\n",
        );
        assert_eq!(r.code, 550);
        assert_eq!(r.status, Some(Status::new(5, 4, 5)));
        assert!(r.is_daily_limit());
        assert!(!r.is_login_throttle());
        assert_eq!(
            r.to_string(),
            "550 5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits go to https://support.google.com/a/answer/166852 x - gsmtp"
        );
    }

    #[test]
    fn classifiers() {
        assert!(wire("454-4.7.0 Too many login attempts, please try again later.\r\n454 4.7.0  https://x\r\n").is_login_throttle());
        assert!(
            !wire("454 4.7.0 Cannot authenticate due to a temporary system problem\r\n")
                .is_login_throttle()
        );
        assert!(
            wire("452 4.5.3 Your message has too many recipients\r\n").is_too_many_recipients()
        );
        assert!(!wire("452 4.2.2 Mailbox full\r\n").is_too_many_recipients());
        assert_eq!(
            wire("550 5.1.1 no such user\r\n").dsn_status().to_string(),
            "5.1.1"
        );
        assert_eq!(wire("554 no esc\r\n").dsn_status().to_string(), "5.0.0");
        assert_eq!(wire("250 OK\r\n").to_string(), "250 OK");
        assert!(wire("535 5.7.8 Username and Password not accepted\r\n").is_auth_failure());
    }

    #[test]
    fn control_characters_never_leave_the_reply() {
        let r = wire("550 5.7.1 evil \x1b]52;c;ZWNobyBwd25lZA==\x07 and \x1b[2J\r\n");
        assert!(!r.to_string().chars().any(char::is_control), "{r}");
        assert_eq!(r.text, "evil \\x1b]52;c;ZWNobyBwd25lZA==\\x07 and \\x1b[2J");
        assert!(
            !Answer::error("a\x1bb\u{9b}c")
                .to_string()
                .chars()
                .any(char::is_control)
        );
    }

    #[test]
    fn parses_what_logs_and_old_spools_wrote() {
        let r = Reply::parse("550 5.1.1 The email account does not exist").unwrap();
        assert_eq!(
            (r.code, r.status.unwrap().to_string()),
            (550, "5.1.1".into())
        );
        assert_eq!(r.text, "The email account does not exist");
        let r = Reply::parse("554 rejected").unwrap();
        assert_eq!((r.status, r.text.as_str()), (None, "rejected"));
        assert!(Reply::parse("connect to x failed").is_none());
        assert_eq!(
            Answer::parse_legacy("connect to x failed"),
            Answer::Error("connect to x failed".into())
        );
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Reply>(&json).unwrap(), r);
    }

    #[test]
    fn controls_are_escaped_and_text_kept() {
        let e = escape_controls;
        assert_eq!(
            e("plain text, ünïcode ✓\tand a tab"),
            "plain text, ünïcode ✓\tand a tab"
        );
        assert_eq!(e("a\x1b]52;c;cHduZWQ=\x07b"), r"a\x1b]52;c;cHduZWQ=\x07b");
        assert_eq!(e("\x1b[2J\x1b[H\rfake"), r"\x1b[2J\x1b[H\rfake");
        assert_eq!(e("x\u{9b}31m\u{7f}\0\n"), r"x\u{9b}31m\x7f\x00\n");
        assert_eq!(e("evil\u{202e}txt.exe"), r"evil\u{202e}txt.exe");
        assert_eq!(e(""), "");
    }
}
