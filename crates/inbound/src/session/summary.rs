//! What a session did, counted the way Postfix's smtpd does for its
//! `disconnect from` line: `ehlo=1 auth=0/1 mail=1 rcpt=1 data=1 quit=1
//! commands=5/6`. A count is `ok` when every such command succeeded, else
//! `ok/total`; a command succeeds when its final reply is 2xx (DATA and
//! AUTH are decided by the reply after their 354/334).

use std::fmt;

/// The commands counted, in the order they are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verb {
    Helo,
    Ehlo,
    Starttls,
    Auth,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Vrfy,
    Expn,
    Etrn,
    Help,
    Quit,
    /// Anything else, empty lines included.
    Unknown,
}

const VERBS: [(Verb, &str); 16] = [
    (Verb::Helo, "helo"),
    (Verb::Ehlo, "ehlo"),
    (Verb::Starttls, "starttls"),
    (Verb::Auth, "auth"),
    (Verb::Mail, "mail"),
    (Verb::Rcpt, "rcpt"),
    (Verb::Data, "data"),
    (Verb::Bdat, "bdat"),
    (Verb::Rset, "rset"),
    (Verb::Noop, "noop"),
    (Verb::Vrfy, "vrfy"),
    (Verb::Expn, "expn"),
    (Verb::Etrn, "etrn"),
    (Verb::Help, "help"),
    (Verb::Quit, "quit"),
    (Verb::Unknown, "unknown"),
];

impl Verb {
    /// The verb of a command line (its first word, any case).
    pub(crate) fn of(line: &[u8]) -> Verb {
        let word = line
            .split(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
            .find(|w| !w.is_empty())
            .unwrap_or_default();
        VERBS
            .iter()
            .find(|(v, name)| *v != Verb::Unknown && word.eq_ignore_ascii_case(name.as_bytes()))
            .map_or(Verb::Unknown, |(v, _)| *v)
    }

    /// Upper-case name, as in `lost connection after DATA`.
    pub(crate) fn upper(self) -> String {
        VERBS
            .iter()
            .find(|(v, _)| *v == self)
            .map_or("UNKNOWN", |(_, n)| n)
            .to_ascii_uppercase()
    }

    fn index(self) -> usize {
        VERBS.iter().position(|(v, _)| *v == self).unwrap_or(0)
    }
}

/// Per-verb `(succeeded, total)`.
#[derive(Debug, Default)]
pub(crate) struct Summary {
    counts: [(u32, u32); VERBS.len()],
    /// The command waiting for its final reply.
    pending: Option<Verb>,
    /// The last command the client started.
    last: Option<Verb>,
}

impl Summary {
    /// A command line arrived.
    pub(crate) fn begin(&mut self, verb: Verb) {
        if let Some(c) = self.counts.get_mut(verb.index()) {
            c.1 = c.1.saturating_add(1);
        }
        self.pending = Some(verb);
        self.last = Some(verb);
    }

    /// A reply was sent; an intermediate one (3xx) decides nothing yet.
    pub(crate) fn reply(&mut self, code: u16) {
        if (300..400).contains(&code) {
            return;
        }
        if let Some(v) = self.pending.take()
            && code < 400
            && let Some(c) = self.counts.get_mut(v.index())
        {
            c.0 = c.0.saturating_add(1);
        }
    }

    /// `DATA`, `MAIL`... or `CONNECT` before the first command (Postfix's
    /// words for `lost connection after ...`).
    pub(crate) fn last_command(&self) -> String {
        self.last.map_or_else(|| "CONNECT".into(), Verb::upper)
    }
}

impl fmt::Display for Summary {
    /// ` ehlo=1 mail=1 ... commands=N` (with a leading space), or nothing
    /// when the client sent no command.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mut ok, mut total) = (0u32, 0u32);
        for ((_, name), (good, all)) in VERBS.iter().zip(self.counts) {
            if all == 0 {
                continue;
            }
            ok = ok.saturating_add(good);
            total = total.saturating_add(all);
            write_count(f, name, good, all)?;
        }
        if total > 0 {
            write_count(f, "commands", ok, total)?;
        }
        Ok(())
    }
}

fn write_count(f: &mut fmt::Formatter<'_>, name: &str, ok: u32, total: u32) -> fmt::Result {
    if ok == total {
        write!(f, " {name}={ok}")
    } else {
        write!(f, " {name}={ok}/{total}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(steps: &[(&str, &[u16])]) -> String {
        let mut s = Summary::default();
        for (line, replies) in steps {
            s.begin(Verb::of(line.as_bytes()));
            for r in *replies {
                s.reply(*r);
            }
        }
        s.to_string()
    }

    #[test]
    fn a_clean_session_reads_like_postfix() {
        let line = run(&[
            ("EHLO printer", &[250]),
            ("AUTH PLAIN AHByaW50ZXIAcw==", &[235]),
            ("MAIL FROM:<a@example.com>", &[250]),
            ("RCPT TO:<b@example.com>", &[250]),
            ("DATA", &[354, 250]),
            ("QUIT", &[221]),
        ]);
        assert_eq!(
            line,
            " ehlo=1 auth=1 mail=1 rcpt=1 data=1 quit=1 commands=6"
        );
    }

    #[test]
    fn failures_show_as_ok_over_total() {
        let line = run(&[
            ("ehlo x", &[250]),
            ("AUTH LOGIN", &[334, 334, 535]),
            ("auth plain", &[535]),
            ("MAIL FROM:<a@example.com>", &[250]),
            ("RCPT TO:<b@example.com>", &[550]),
            ("RCPT TO:<c@example.com>", &[250]),
            ("DATA", &[354, 552]),
            ("BOGUS", &[500]),
            ("", &[500]),
        ]);
        assert_eq!(
            line,
            " ehlo=1 auth=0/2 mail=1 rcpt=1/2 data=0/1 unknown=0/2 commands=3/9"
        );
    }

    #[test]
    fn a_command_cut_off_counts_as_failed() {
        let mut s = Summary::default();
        assert_eq!(s.to_string(), "");
        assert_eq!(s.last_command(), "CONNECT");
        s.begin(Verb::of(b"DATA\r\n"));
        s.reply(354);
        assert_eq!(s.to_string(), " data=0/1 commands=0/1");
        assert_eq!(s.last_command(), "DATA");
    }

    #[test]
    fn replies_without_a_command_are_ignored() {
        let mut s = Summary::default();
        s.reply(220);
        s.reply(421);
        assert_eq!(s.to_string(), "");
    }
}
