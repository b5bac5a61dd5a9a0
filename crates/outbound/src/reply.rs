//! An upstream SMTP reply, kept whole for logs and bounces.

use std::fmt;

use smtp_proto::Response;

/// One (possibly multi-line) reply from the upstream server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The enhanced status code (RFC 3463), when the server gave one.
    pub esc: Option<[u8; 3]>,
    /// The text of each line, enhanced status code removed.
    pub lines: Vec<String>,
}

impl Reply {
    pub(crate) fn from_response(r: Response<String>) -> Reply {
        let esc = (r.esc[0] != 0).then_some(r.esc);
        let lines = r
            .message
            .split('\n')
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect();
        Reply {
            code: r.code,
            esc,
            lines,
        }
    }

    /// A reply built by hand (tests).
    pub fn new(code: u16, esc: Option<[u8; 3]>, text: &str) -> Reply {
        Reply {
            code,
            esc,
            lines: text.split('\n').map(str::to_string).collect(),
        }
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

    /// `x.y.z`, or `None`.
    pub fn status(&self) -> Option<String> {
        self.esc.map(|[a, b, c]| format!("{a}.{b}.{c}"))
    }

    fn has_esc(&self, esc: [u8; 3]) -> bool {
        self.esc == Some(esc)
    }

    fn text_contains(&self, needle: &str) -> bool {
        self.lines
            .iter()
            .any(|l| l.to_ascii_lowercase().contains(needle))
    }

    /// `550 5.4.5 Daily user sending limit exceeded`.
    pub fn is_daily_limit(&self) -> bool {
        self.code == 550
            && (self.has_esc([5, 4, 5]) || self.text_contains("daily user sending limit"))
    }

    /// `454 4.7.0 Too many login attempts`.
    pub fn is_login_throttle(&self) -> bool {
        self.code == 454 && self.text_contains("too many login attempts")
    }

    /// `452 4.5.3 Your message has too many recipients`: send the rest in a
    /// new transaction.
    pub fn is_too_many_recipients(&self) -> bool {
        self.code == 452 && (self.has_esc([4, 5, 3]) || self.text_contains("too many recipients"))
    }

    /// `421`: the server is closing the connection.
    pub fn is_closing(&self) -> bool {
        self.code == 421
    }

    /// The enhanced status for a DSN: the reply's own when it is permanent,
    /// otherwise `5.0.0`.
    pub fn dsn_status(&self) -> String {
        match self.esc {
            Some([5, b, c]) => format!("5.{b}.{c}"),
            _ => "5.0.0".to_string(),
        }
    }
}

impl fmt::Display for Reply {
    /// `code x.y.z text` with the lines joined by spaces: the whole reply on
    /// one line, for logs, `last_error` and `Diagnostic-Code`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(s) = self.status() {
            write!(f, " {s}")?;
        }
        for l in &self.lines {
            let l = l.trim();
            if !l.is_empty() {
                write!(f, " {l}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smtp_proto::response::parser::ResponseReceiver;

    fn parse(s: &str) -> Reply {
        let mut r = ResponseReceiver::default();
        let bytes = s.as_bytes();
        Reply::from_response(r.parse(&mut bytes.iter()).unwrap())
    }

    #[test]
    fn multi_line_gmail_reply() {
        let r = parse(
            "550-5.4.5 Daily user sending limit exceeded. For more information on Gmail\r\n550-5.4.5 sending limits go to\r\n550 5.4.5  https://support.google.com/a/answer/166852 x - gsmtp\r\n",
        );
        assert_eq!(r.code, 550);
        assert_eq!(r.esc, Some([5, 4, 5]));
        assert!(r.is_daily_limit());
        assert!(!r.is_login_throttle());
        assert_eq!(
            r.to_string(),
            "550 5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits go to https://support.google.com/a/answer/166852 x - gsmtp"
        );
    }

    #[test]
    fn classifiers() {
        assert!(parse("454-4.7.0 Too many login attempts, please try again later.\r\n454 4.7.0  https://x\r\n").is_login_throttle());
        assert!(
            !parse("454 4.7.0 Cannot authenticate due to a temporary system problem\r\n")
                .is_login_throttle()
        );
        assert!(
            parse("452 4.5.3 Your message has too many recipients\r\n").is_too_many_recipients()
        );
        assert!(!parse("452 4.2.2 Mailbox full\r\n").is_too_many_recipients());
        assert_eq!(parse("550 5.1.1 no such user\r\n").dsn_status(), "5.1.1");
        assert_eq!(parse("554 no esc\r\n").dsn_status(), "5.0.0");
        assert_eq!(parse("250 OK\r\n").to_string(), "250 OK");
    }
}
