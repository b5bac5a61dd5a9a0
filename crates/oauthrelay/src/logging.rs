//! Logging: to stderr as text or JSON lines; under systemd with the
//! journal's priority on every line.
//!
//! Under systemd, stderr is a stream to journald, which reads a `<N>`
//! syslog-priority prefix at the start of each line (sd-daemon(3),
//! `SyslogLevelPrefix=`, on by default), so `journalctl -p err` finds our
//! errors. We use the prefix rather than `tracing-journald` (journald's
//! native socket): it needs no socket beyond the stderr systemd already
//! gave us (nothing to lose when `/run/systemd/journal/socket` is not
//! reachable), keeps one output path for text and JSON, and a test can read
//! exactly what journald would. Whether stderr is the journal is decided as
//! systemd.exec(5) says: `$JOURNAL_STREAM` names the device and inode of
//! the stream, and must match stderr's (a shell redirect in `ExecStart=`
//! keeps the variable but not the stream).

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Install the global subscriber. `level` is `[log] level` (a filter);
/// `RUST_LOG` wins over it. `quiet` (one-shot commands): warnings and
/// errors only, unless `RUST_LOG` says otherwise.
pub fn init(level: &str, format: LogFormat, quiet: bool) {
    let default = if quiet { "warn" } else { level };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let journal = stderr_is_journal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let _ = match format {
        LogFormat::Text => {
            let text = format::format().with_target(false).with_ansi(false);
            let builder = builder.fmt_fields(TextFields);
            if journal {
                // The journal stamps each line and keeps its priority.
                builder
                    .event_format(Prefixed {
                        inner: text.without_time().with_level(false),
                        on: true,
                    })
                    .try_init()
            } else {
                builder.event_format(text).try_init()
            }
        }
        LogFormat::Json => {
            let json = format::format()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false);
            let builder = builder.fmt_fields(format::JsonFields::new());
            builder
                .event_format(Prefixed {
                    inner: json,
                    on: journal,
                })
                .try_init()
        }
    };
}

/// Is stderr the journal's stream (`$JOURNAL_STREAM` = `DEV:INODE` of
/// stderr)?
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat on fd 2 writes only into `st`, which lives here.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(libc::STDERR_FILENO, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// The syslog priority journald reads from a `<N>` prefix.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Text written outside tracing (configuration errors before logging is
/// set up), with the `err` priority on every line under the journal.
pub fn early_error(text: &str) {
    let journal = stderr_is_journal();
    let mut out = String::new();
    for line in text.lines() {
        if journal {
            out.push_str("<3>");
        }
        out.push_str(line);
        out.push('\n');
    }
    use std::io::Write as _;
    let _ = std::io::stderr().write_all(out.as_bytes());
}

/// An event format that, when on, puts the journal priority before every
/// line of the event (a multi-line error stays one priority).
struct Prefixed<F> {
    inner: F,
    on: bool,
}

impl<S, N, F> FormatEvent<S, N> for Prefixed<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if !self.on {
            return self.inner.format_event(ctx, writer, event);
        }
        let mut buf = String::new();
        self.inner.format_event(ctx, Writer::new(&mut buf), event)?;
        let prio = priority(event.metadata().level());
        for line in buf.split_inclusive('\n') {
            write!(writer, "<{prio}>{line}")?;
        }
        Ok(())
    }
}

/// Text fields: the message, then `name=value` for each field whose value
/// the message does not already show. Lines stay Postfix-like
/// (`ID: client=...` is not followed by `queue_id=ID`), while the JSON
/// format carries every field for machines.
struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = Collect::default();
        fields.record(&mut v);
        let mut first = true;
        if let Some(m) = &v.message {
            writer.write_str(m)?;
            first = false;
        }
        let message = v.message.as_deref().unwrap_or("");
        for (name, value) in &v.fields {
            if !value.is_empty() && message.contains(value.as_str()) {
                continue;
            }
            if !first {
                writer.write_char(' ')?;
            }
            first = false;
            // logfmt: a value with spaces or quotes is quoted, so what a
            // client chose (a user name) cannot pass for another field.
            if value.is_empty() || value.contains(|c: char| c.is_whitespace() || c == '"') {
                write!(writer, "{name}={value:?}")?;
            } else {
                write!(writer, "{name}={value}")?;
            }
        }
        Ok(())
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        if !current.fields.is_empty() {
            current.fields.push(' ');
        }
        self.format_fields(current.as_writer(), fields)
    }
}

#[derive(Default)]
struct Collect {
    message: Option<String>,
    fields: Vec<(&'static str, String)>,
}

impl tracing::field::Visit for Collect {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.put(field, value.to_string());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl Collect {
    fn put(&mut self, field: &tracing::field::Field, value: String) {
        if field.name() == "message" {
            self.message = Some(value);
        } else {
            self.fields.push((field.name(), value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(journal: bool, f: impl FnOnce()) -> String {
        let out = Captured::default();
        let w = out.clone();
        let text = format::format()
            .with_target(false)
            .with_ansi(false)
            .without_time();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .with_max_level(Level::DEBUG)
            .fmt_fields(TextFields)
            .event_format(Prefixed {
                inner: text,
                on: journal,
            })
            .finish();
        tracing::subscriber::with_default(sub, f);
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn journal_lines_carry_their_priority() {
        let out = capture(true, || {
            tracing::error!("account needs authorization");
            tracing::warn!(client = "192.0.2.1:4000", "authentication failed");
            tracing::info!("ready");
            tracing::debug!("detail");
            tracing::error!("first line\nsecond line");
        });
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("<3>"), "{out}");
        assert!(lines[1].starts_with("<4>"), "{out}");
        assert!(lines[2].starts_with("<6>"), "{out}");
        assert!(lines[3].starts_with("<7>"), "{out}");
        assert!(
            lines[4].starts_with("<3>") && lines[5] == "<3>second line",
            "every line of a multi-line event keeps its priority: {out}"
        );
    }

    #[test]
    fn text_fields_are_not_repeated_when_the_message_shows_them() {
        let out = capture(false, || {
            tracing::info!(
                queue_id = "7Q2X",
                client = "192.0.2.1:4000",
                "7Q2X: client=192.0.2.1:4000, size=12 (queued)"
            );
            tracing::warn!(
                client = "192.0.2.1:4000",
                user = "printer",
                "authentication failed"
            );
            tracing::info!(n = 3, text = "two words", empty = "", "other");
            tracing::warn!(user = %"x from unknown[203.0.113.9]", "failed");
        });
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].ends_with("INFO 7Q2X: client=192.0.2.1:4000, size=12 (queued)"),
            "{out}"
        );
        assert!(
            lines[1].ends_with("WARN authentication failed client=192.0.2.1:4000 user=printer"),
            "{out}"
        );
        assert!(
            lines[2].ends_with(r#"other n=3 text="two words" empty="""#),
            "{out}"
        );
        assert!(
            lines[3].ends_with(r#"failed user="x from unknown[203.0.113.9]""#),
            "{out}"
        );
        assert!(!out.contains("<"), "no priority outside the journal: {out}");
    }
}
