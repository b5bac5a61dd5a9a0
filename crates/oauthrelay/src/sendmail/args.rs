//! sendmail's command line, as Postfix's sendmail(1) takes it.
//!
//! This file depends on `std` and `clap` only, never on `crate::`:
//! `crates/xtask` includes it (`#[path]`) to make oauthrelay-sendmail(8)
//! from [`command`], and `fuzz/` to fuzz [`parse`]. [`OPTIONS`] is the one
//! table both the parser and the manual page are made from.
//!
//! Parsing follows getopt(3) with Postfix's option string: short options,
//! bundled (`-ti`, `-tif root`), a value attached or in the next argument
//! (`-fme`, `-f me`), `--` before recipients. Options may also follow
//! recipients (as GNU getopt permits), since no address starts with `-`.
//! Nothing a caller passes costs the mail: options with no meaning here are
//! accepted (and named on stderr with `-v`), unknown ones are ignored with a
//! warning. Only a missing value is a usage error (exit 64).

/// What an option letter takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    Flag,
    Value,
}

/// One option: its letter, what it takes, the value's name in the manual,
/// and what it does here.
pub struct OptionSpec {
    pub letter: char,
    pub arity: Arity,
    pub value_name: &'static str,
    #[allow(dead_code)] // read by `command` (xtask, tests)
    pub help: &'static str,
}

const fn flag(letter: char, help: &'static str) -> OptionSpec {
    OptionSpec {
        letter,
        arity: Arity::Flag,
        value_name: "",
        help,
    }
}

const fn value(letter: char, value_name: &'static str, help: &'static str) -> OptionSpec {
    OptionSpec {
        letter,
        arity: Arity::Value,
        value_name,
        help,
    }
}

/// Every option Postfix's sendmail takes (its getopt string
/// `A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q:tvx`).
pub const OPTIONS: &[OptionSpec] = &[
    value('A', "FILE", "Ignored (sendmail 8's alternate submit.cf)."),
    value(
        'B',
        "TYPE",
        "Body type: 8BITMIME (the message is announced with BODY=8BITMIME) or 7BIT. \
         Messages with 8-bit bytes are announced as 8BITMIME anyway.",
    ),
    value(
        'C',
        "FILE",
        "Configuration file to use instead of the default (like --config).",
    ),
    value(
        'F',
        "NAME",
        "Full name of the sender, for the From: header added when the message has none \
         (encoded as RFC 2047 when not ASCII; control characters are refused).",
    ),
    flag('G', "Ignored (gateway submission)."),
    flag('I', "Same as -bi: check the aliases file (newaliases)."),
    value('L', "LABEL", "Ignored (syslog label)."),
    value(
        'N',
        "DSN",
        "Ignored: delivery status notification requests (never, success, delay, failure); \
         failures are always reported to the sender.",
    ),
    value('O', "OPTION=VALUE", "Ignored (sendmail 8's long options)."),
    value(
        'R',
        "RET",
        "Ignored: how much of the message a bounce returns (hdrs, full).",
    ),
    flag('U', "Ignored (initial user submission)."),
    value('V', "ENVID", "Ignored: the DSN envelope id."),
    value('X', "FILE", "Ignored (sendmail 8's traffic log file)."),
    value(
        'b',
        "MODE",
        "Mode: m (the default) queues the message on stdin; s runs an SMTP session on stdin \
         and stdout; p lists the queue (mailq); i checks the aliases file (newaliases); v shows \
         where each recipient goes, sending nothing; d and l say to run `oauthrelay serve`; \
         h and H do nothing.",
    ),
    flag('c', "Ignored."),
    value(
        'e',
        "MODE",
        "Ignored (error mode): errors are always reported on stderr and in the exit status.",
    ),
    value(
        'f',
        "ADDR",
        "Envelope sender. Default: the login name of the user, qualified with [local] domain. \
         An empty value or <> is the null sender.",
    ),
    value('h', "COUNT", "Ignored (hop count)."),
    flag(
        'i',
        "A line with a single dot does not end the message (also -oi).",
    ),
    flag('m', "Ignored (also send to me)."),
    flag(
        'n',
        "Ignored (do not use aliases); aliases are applied by the daemon.",
    ),
    value(
        'o',
        "OPTION",
        "sendmail 8 options: -oi is -i; every other one (-oem, -odi, -odb, -oQ...) is ignored.",
    ),
    value('p', "PROTOCOL", "Ignored (received protocol)."),
    value(
        'q',
        "WHEN",
        "Make deferred mail due now: -q or -qINTERVAL for the whole queue, -qIID for one message.",
    ),
    value('r', "ADDR", "Same as -f."),
    flag(
        't',
        "Read recipients from the To:, Cc: and Bcc: headers (added to those on the command \
         line); Bcc: is removed. An address that cannot be used fails the whole message (exit 65).",
    ),
    flag(
        'v',
        "Verbose: name the options that had no effect, and report each step.",
    ),
    flag('x', "Ignored."),
];

/// The option table entry for `letter`.
pub fn spec(letter: char) -> Option<&'static OptionSpec> {
    OPTIONS.iter().find(|o| o.letter == letter)
}

/// What sendmail is asked to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// `-bm`: queue the message on stdin.
    #[default]
    Deliver,
    /// `-bs`: an SMTP session on stdin and stdout.
    Smtp,
    /// `-bp`, `mailq`: the queue list.
    ListQueue,
    /// `-bi`, `-I`, `newaliases`: check the aliases file.
    Aliases,
    /// `-bv`: where each recipient goes, sending nothing.
    Verify,
    /// `-q`: make deferred mail due now.
    FlushQueue,
    /// `-bd`, `-bl`: run as a daemon.
    Daemon,
    /// `-bh`, `-bH`: host status, which there is none of.
    Nothing,
}

/// The message body type (`-B`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

/// A parsed command line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Args {
    pub mode: Mode,
    /// `-t`: recipients from To:, Cc:, Bcc:.
    pub extract: bool,
    /// `-i`/`-oi`: a line with a single dot does not end the message.
    pub ignore_dots: bool,
    /// `-f`/`-r`: envelope sender (as given, not yet checked).
    pub from: Option<String>,
    /// `-F`: full name (as given, not yet checked).
    pub full_name: Option<String>,
    /// `-C`: configuration file.
    pub config: Option<String>,
    /// `-B`.
    pub body: Option<Body>,
    /// `-v`.
    pub verbose: bool,
    /// `-qIID`: the one message `-q` makes due.
    pub flush_id: Option<String>,
    /// Command-line recipients (as given, not yet checked).
    pub recipients: Vec<String>,
    /// Options accepted without effect (told with `-v`).
    pub ignored: Vec<String>,
    /// Warnings always told: unknown options, unusable values.
    pub warnings: Vec<String>,
}

/// A command line that cannot be used (exit 64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub const USAGE: &str = "usage: sendmail [-t] [-i] [-f ADDR] [-F NAME] [-bm|-bs|-bp|-bi|-bv|-q] [options] [--] [RCPT...]";

/// Parse `args` (without the program name), starting in `mode` (what the
/// program was called as: `mailq` lists the queue).
pub fn parse(args: &[String], mode: Mode) -> Result<Args, UsageError> {
    let mut a = Args {
        mode,
        ..Args::default()
    };
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        i += 1;
        if arg == "--" {
            a.recipients.extend(args[i..].iter().cloned());
            break;
        }
        if arg == "-q" {
            a.mode = Mode::FlushQueue;
            continue;
        }
        let Some(letters) = arg.strip_prefix('-').filter(|l| !l.is_empty()) else {
            a.recipients.push(arg.to_string());
            continue;
        };
        let mut rest = letters;
        while let Some(letter) = rest.chars().next() {
            rest = &rest[letter.len_utf8()..];
            let Some(spec) = spec(letter) else {
                a.warnings
                    .push(format!("unknown option -{} ignored", printable(letter)));
                continue;
            };
            if spec.arity == Arity::Flag {
                a.flag(letter);
                continue;
            }
            let value = if !rest.is_empty() {
                std::mem::take(&mut rest).to_string()
            } else if let Some(next) = args.get(i) {
                i += 1;
                next.clone()
            } else {
                return Err(UsageError(format!(
                    "option -{letter} needs a value ({})\n{USAGE}",
                    spec.value_name
                )));
            };
            a.value(letter, value);
        }
    }
    Ok(a)
}

/// A character as it may be shown in a message (controls escaped).
fn printable(c: char) -> String {
    if c.is_control() {
        c.escape_default().to_string()
    } else {
        c.to_string()
    }
}

/// A value as it may be shown in a message: at most 60 characters,
/// controls escaped.
fn shown(v: &str) -> String {
    let mut s: String = v.chars().take(60).flat_map(char::escape_default).collect();
    if v.chars().count() > 60 {
        s.push_str("...");
    }
    s
}

impl Args {
    fn flag(&mut self, letter: char) {
        match letter {
            't' => self.extract = true,
            'i' => self.ignore_dots = true,
            'v' => self.verbose = true,
            'I' => self.mode = Mode::Aliases,
            other => self.ignored.push(format!("-{other}")),
        }
    }

    fn value(&mut self, letter: char, value: String) {
        match letter {
            'f' | 'r' => self.from = Some(value),
            'F' => self.full_name = Some(value),
            'C' => self.config = Some(value),
            'B' => match value.to_ascii_uppercase().as_str() {
                "8BITMIME" => self.body = Some(Body::EightBitMime),
                "7BIT" => self.body = Some(Body::SevenBit),
                _ => self.warnings.push(format!(
                    "-B {}: not 8BITMIME or 7BIT; ignored",
                    shown(&value)
                )),
            },
            'b' => match value.chars().next() {
                Some('m') => self.mode = Mode::Deliver,
                Some('s') => self.mode = Mode::Smtp,
                Some('p') => self.mode = Mode::ListQueue,
                Some('i') => self.mode = Mode::Aliases,
                Some('v') => self.mode = Mode::Verify,
                Some('d' | 'l') => self.mode = Mode::Daemon,
                Some('h' | 'H') => self.mode = Mode::Nothing,
                _ => self
                    .warnings
                    .push(format!("unknown mode -b{} ignored", shown(&value))),
            },
            'o' => match value.chars().next() {
                Some('i') => self.ignore_dots = true,
                _ => self.ignored.push(format!("-o{}", shown(&value))),
            },
            'q' => {
                self.mode = Mode::FlushQueue;
                match value.chars().next() {
                    Some(c) if c.is_ascii_digit() => {}
                    Some('I') if value.len() > 1 => self.flush_id = Some(value[1..].to_string()),
                    Some('R' | 'S') => self.ignored.push(format!(
                        "-q{}: every deferred message is made due",
                        shown(&value)
                    )),
                    _ => self.warnings.push(format!(
                        "-q{}: not understood; every deferred message is made due",
                        shown(&value)
                    )),
                }
            }
            other => self.ignored.push(format!("-{other} {}", shown(&value))),
        }
    }
}

/// sendmail's options as a clap command, for the manual page (and `--help`
/// of nothing: the parser above reads the command line). A test checks it
/// describes exactly [`OPTIONS`].
#[allow(dead_code)] // the binary parses with `parse`; xtask and the tests use this
pub fn command() -> clap::Command {
    use clap::{Arg, ArgAction};
    let mut cmd = clap::Command::new("sendmail")
        .bin_name("sendmail")
        .about("Submit mail to oauthrelay the way sendmail(1) does")
        .long_about(
            "oauthrelay's sendmail: reads a message on stdin and queues it in oauthrelay \
             (through the running daemon; with the daemon stopped, root writes the spool \
             directly and other users' mail goes to the maildrop, which the daemon imports \
             when it starts). It runs as `oauthrelay [--config PATH] [--log-format FORMAT] \
             sendmail [options] [RCPT...]`, or through a link named sendmail, mailq (-bp) or \
             newaliases (-bi), which take no long options (use -C or $OAUTHRELAY_CONFIG). It takes every \
             option of Postfix's sendmail(1); those that mean nothing here are ignored, \
             unknown ones are ignored with a warning. Unqualified names (root) get [local] \
             domain; local names go through [local] aliases, and those without an alias to \
             the postmaster. Exit status (sysexits): 0 queued, 64 usage, 65 bad data (an \
             address or name with control characters, an unusable To: with -t), 75 try again \
             later (nothing was queued), 78 configuration error.",
        )
        .disable_help_flag(true)
        .disable_version_flag(true);
    for o in OPTIONS {
        // clap ids are static strings: each letter's own slice of LETTERS.
        const LETTERS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let id = LETTERS
            .find(o.letter)
            .map(|i| &LETTERS[i..i + 1])
            .unwrap_or("option");
        let mut arg = Arg::new(id).short(o.letter).help(o.help);
        arg = match o.arity {
            Arity::Flag => arg.action(ArgAction::SetTrue),
            Arity::Value => arg.value_name(o.value_name).action(ArgAction::Set),
        };
        cmd = cmd.arg(arg);
    }
    cmd.arg(
        Arg::new("recipients")
            .value_name("RCPT")
            .num_args(0..)
            .help("Recipients: addresses, or local names such as root (after -- if one could look like an option)."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Args {
        let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse(&v, Mode::Deliver).unwrap()
    }

    #[test]
    fn debian_cron_and_cronie() {
        let a = p(&["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"]);
        assert_eq!(a.full_name.as_deref(), Some("CronDaemon"));
        assert!(a.ignore_dots && !a.extract);
        assert_eq!(a.body, Some(Body::EightBitMime));
        assert_eq!(a.recipients, ["root"]);
        assert!(a.warnings.is_empty(), "{:?}", a.warnings);
        assert_eq!(a.mode, Mode::Deliver);

        let a = p(&[
            "-FCronDaemon",
            "-i",
            "-odi",
            "-oem",
            "-oi",
            "-t",
            "-f",
            "root",
        ]);
        assert!(a.extract && a.ignore_dots);
        assert_eq!(a.from.as_deref(), Some("root"));
        assert!(a.recipients.is_empty());
        assert_eq!(a.ignored, ["-odi", "-oem"]);
    }

    #[test]
    fn bundled_flags_and_values() {
        for args in [&["-ti"][..], &["-it"], &["-t", "-i"], &["-oi", "-t"]] {
            let a = p(args);
            assert!(a.extract && a.ignore_dots, "{args:?}");
        }
        let a = p(&["-tifme@example.com", "x@example.com"]);
        assert!(a.extract && a.ignore_dots);
        assert_eq!(a.from.as_deref(), Some("me@example.com"));
        assert_eq!(a.recipients, ["x@example.com"]);
        let a = p(&["-tf", "me@example.com"]);
        assert_eq!(a.from.as_deref(), Some("me@example.com"));
    }

    #[test]
    fn dsn_and_other_values_are_not_recipients() {
        let a = p(&[
            "-N",
            "never",
            "-R",
            "hdrs",
            "-V",
            "envid1",
            "-h",
            "3",
            "-L",
            "x",
            "-O",
            "A=B",
            "-X",
            "/tmp/log",
            "-e",
            "q",
            "-p",
            "smtp",
            "-A",
            "c",
            "-U",
            "-n",
            "-m",
            "-G",
            "-x",
            "-c",
            "a@example.com",
        ]);
        assert_eq!(a.recipients, ["a@example.com"]);
        assert!(a.warnings.is_empty(), "{:?}", a.warnings);
        assert_eq!(a.ignored.len(), 16, "{:?}", a.ignored);
    }

    #[test]
    fn modes() {
        assert_eq!(p(&["-bs"]).mode, Mode::Smtp);
        assert_eq!(p(&["-bp"]).mode, Mode::ListQueue);
        assert_eq!(p(&["-bi"]).mode, Mode::Aliases);
        assert_eq!(p(&["-I"]).mode, Mode::Aliases);
        assert_eq!(p(&["-bv", "root"]).mode, Mode::Verify);
        assert_eq!(p(&["-bd"]).mode, Mode::Daemon);
        assert_eq!(p(&["-bh"]).mode, Mode::Nothing);
        assert_eq!(p(&["-bs", "-bm"]).mode, Mode::Deliver);
        assert_eq!(p(&["-q"]).mode, Mode::FlushQueue);
        assert_eq!(p(&["-q30m"]).mode, Mode::FlushQueue);
        let a = p(&["-qIabc123"]);
        assert_eq!(
            (a.mode, a.flush_id.as_deref()),
            (Mode::FlushQueue, Some("abc123"))
        );
        let v: Vec<String> = vec![];
        assert_eq!(parse(&v, Mode::ListQueue).unwrap().mode, Mode::ListQueue);
        // An unknown mode warns and keeps the default.
        let a = p(&["-bz"]);
        assert_eq!(a.mode, Mode::Deliver);
        assert_eq!(a.warnings.len(), 1);
    }

    #[test]
    fn unknown_options_warn_and_never_fail() {
        let a = p(&["-Q", "-Z", "-t"]);
        assert!(a.extract);
        assert_eq!(a.warnings.len(), 2, "{:?}", a.warnings);
        let a = p(&["-\r\n"]);
        assert!(
            a.warnings.iter().all(|w| !w.contains('\r')),
            "{:?}",
            a.warnings
        );
        let a = p(&["-Bbinary"]);
        assert_eq!((a.body, a.warnings.len()), (None, 1));
    }

    #[test]
    fn double_dash_and_missing_values() {
        let a = p(&["-t", "--", "-odd@example.com", "b@example.com"]);
        assert_eq!(a.recipients, ["-odd@example.com", "b@example.com"]);
        let v: Vec<String> = vec!["-f".into()];
        assert!(parse(&v, Mode::Deliver).is_err());
        // Options after a recipient still count.
        let a = p(&["a@example.com", "-f", "me@example.com"]);
        assert_eq!(a.recipients, ["a@example.com"]);
        assert_eq!(a.from.as_deref(), Some("me@example.com"));
        // "-" alone is a recipient-ish word, not an option.
        assert_eq!(p(&["-"]).recipients, ["-"]);
    }

    #[test]
    fn the_manual_describes_exactly_the_parsed_options() {
        let cmd = command();
        cmd.clone().debug_assert();
        let shorts: Vec<char> = cmd.get_arguments().filter_map(|a| a.get_short()).collect();
        let table: Vec<char> = OPTIONS.iter().map(|o| o.letter).collect();
        assert_eq!(shorts, table);
        for o in OPTIONS {
            assert!(!o.help.is_empty(), "-{}", o.letter);
            assert_eq!(
                o.arity == Arity::Value,
                !o.value_name.is_empty(),
                "-{}",
                o.letter
            );
        }
    }
}
