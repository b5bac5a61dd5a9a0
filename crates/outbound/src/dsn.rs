//! Delivery status notifications (RFC 3464): what the sender gets back when
//! a recipient fails for good, and what the postmaster gets when that
//! bounce (or any failing mail from the null sender) cannot be delivered.
//!
//! ```text
//! multipart/report; report-type=delivery-status
//!   text/plain                 what happened, in words
//!   message/delivery-status    Reporting-MTA, Arrival-Date, then per failed
//!                              recipient Final-Recipient, Action: failed,
//!                              Status 5.x.x, Remote-MTA, Diagnostic-Code
//!   text/rfc822-headers        the original message's header section
//!   (or message/rfc822)        the whole failed message (postmaster copies)
//! ```
//!
//! A recipient that expired (still undelivered after `max_age`, see
//! `RcptStatus::expired`) is reported with `Status: 5.4.7` whatever its last
//! reply was, and the text says so and quotes that reply.
//!
//! The postmaster's copy is Postfix's double bounce: subject `Postmaster
//! Copy: Undelivered Mail`, `X-Oauthrelay-Sender:` naming the failed
//! message's sender, and the failed message itself attached as
//! `message/rfc822` (so a bounce that could not be delivered arrives whole,
//! with its own report inside), or its header section when it is large.
//!
//! `From:` is the account's own address (with the display name "Mail
//! Delivery System"): Gmail rewrites any other `From:` to the account
//! anyway, and a reply to the bounce then reaches someone who can act. The
//! bounce is sent with the null envelope sender through the same account.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spool::{Envelope, MessageId};

use crate::reply::{Answer, Status};
use crate::state::DeliveryState;

/// What of the failed message a report carries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Original<'a> {
    /// Its header section, complete lines (`text/rfc822-headers`).
    Headers(&'a [u8]),
    /// All of it (`message/rfc822`).
    Message(&'a [u8]),
}

/// Who a report goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum To<'a> {
    /// The failed message's envelope sender.
    Sender,
    /// The postmaster, at this address.
    Postmaster(&'a str),
}

/// What a DSN needs besides the failed message's envelope.
pub(crate) struct DsnInput<'a> {
    /// Our host name (Reporting-MTA, Message-ID).
    pub hostname: &'a str,
    /// The account's address: the bounce's `From:`.
    pub from: &'a str,
    pub to: To<'a>,
    pub queue_id: MessageId,
    pub envelope: &'a Envelope,
    pub state: &'a DeliveryState,
    /// The failed recipients (indices) this bounce reports.
    pub report: &'a [usize],
    /// The upstream host (Remote-MTA).
    pub remote_mta: &'a str,
    /// The failed message, or its header section.
    pub original: Original<'a>,
    /// `[delivery] max_age`, for the words about expired recipients.
    pub max_age: Duration,
    pub now: SystemTime,
}

/// The complete bounce message, CRLF line ends.
pub(crate) fn build(d: &DsnInput<'_>) -> Vec<u8> {
    let env = d.envelope;
    let micros = d
        .now
        .duration_since(UNIX_EPOCH)
        .map(|t| t.as_micros())
        .unwrap_or(0);
    let boundary = format!("{}.{micros}/{}", d.queue_id, d.hostname);
    let failed: Vec<(&str, &crate::state::RcptStatus)> = d
        .report
        .iter()
        .filter_map(|&i| Some((env.recipients.get(i)?.as_str(), d.state.recipients.get(i)?)))
        .collect();

    let (to, subject) = match d.to {
        To::Sender => (env.sender.as_str(), "Undelivered Mail Returned to Sender"),
        To::Postmaster(p) => (p, "Postmaster Copy: Undelivered Mail"),
    };
    let original = match d.original {
        Original::Headers(b) | Original::Message(b) => b,
    };
    let mut m = String::with_capacity(4096 + original.len());
    let _ = write!(
        m,
        "From: Mail Delivery System <{from}>\r\n\
         To: <{to}>\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}.{micros}.dsn@{host}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n",
        from = d.from,
        date = rfc5322_date(d.now),
        id = d.queue_id,
        host = d.hostname,
    );

    // Part 1: in words.
    let _ = write!(
        m,
        "--{boundary}\r\n\
         Content-Description: Notification\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\
         \r\n\
         This is the mail system at host {host}.\r\n\
         \r\n",
        host = d.hostname
    );
    match d.to {
        To::Sender => m.push_str(
            "I'm sorry to have to inform you that your message could not\r\n\
             be delivered to one or more recipients. It's attached below.\r\n\
             \r\n\
             For further assistance, please send mail to your postmaster.\r\n\
             \r\n",
        ),
        To::Postmaster(_) => {
            let what = if env.sender.is_empty() && d.state.bounce_of.is_some() {
                format!(
                    "A non-delivery notification (queue ID {id}) about message {of} could not be delivered. Nobody else can receive it, so this copy goes to the postmaster; it is attached below, with its report inside.",
                    id = d.queue_id,
                    of = d.state.bounce_of.map(|b| b.to_string()).unwrap_or_default(),
                )
            } else {
                format!(
                    "A message from the null sender (queue ID {id}), which gets no bounce, could not be delivered to one or more recipients. This copy goes to the postmaster; the message is attached below.",
                    id = d.queue_id,
                )
            };
            m.push_str(&fold_text(&what, 72));
            m.push_str("\r\n\r\n");
        }
    }
    for (address, r) in &failed {
        let said = match &r.answer {
            Some(Answer::Reply(reply)) => format!("host {} said: {reply}", d.remote_mta),
            Some(Answer::Error(e)) => e.clone(),
            None => "delivery failed".to_string(),
        };
        let line = if r.expired {
            format!(
                "<{address}>: the message expired after {} in the queue without being delivered; the last attempt got: {said}",
                humantime::format_duration(d.max_age)
            )
        } else {
            format!("<{address}>: {said}")
        };
        m.push_str(&fold_text(&line, 76));
        m.push_str("\r\n\r\n");
        if let Some(Answer::Reply(reply)) = &r.answer
            && reply.is_send_as_denied()
        {
            let hint = crate::exchange::send_as_hint(d.from, &env.sender);
            m.push_str(&fold_text(&hint, 76));
            m.push_str("\r\n\r\n");
        }
    }

    // Part 2: for machines.
    let _ = write!(
        m,
        "--{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {host}\r\n\
         X-Oauthrelay-Queue-ID: {id}\r\n",
        host = d.hostname,
        id = d.queue_id,
    );
    if matches!(d.to, To::Postmaster(_)) {
        let _ = write!(m, "X-Oauthrelay-Sender: rfc822; {}\r\n", env.sender);
    }
    let _ = write!(m, "Arrival-Date: {}\r\n", rfc5322_date(env.received));
    for (address, r) in &failed {
        let _ = write!(
            m,
            "\r\n\
             Final-Recipient: rfc822; {address}\r\n\
             Action: failed\r\n\
             Status: {status}\r\n\
             Remote-MTA: dns; {remote}\r\n",
            status = if r.expired {
                EXPIRED
            } else {
                status_of(r.answer.as_ref())
            },
            remote = d.remote_mta,
        );
        match &r.answer {
            Some(Answer::Reply(reply)) => {
                m.push_str(&fold_field(&format!("Diagnostic-Code: smtp; {reply}")));
                m.push_str("\r\n");
            }
            Some(Answer::Error(e)) if !e.is_empty() => {
                m.push_str(&fold_field(&format!("X-Oauthrelay-Diagnostic: {e}")));
                m.push_str("\r\n");
            }
            _ => {}
        }
        let _ = write!(m, "Last-Attempt-Date: {}\r\n", rfc5322_date(d.now));
    }
    m.push_str("\r\n");

    // Part 3: the original headers, or the whole message.
    match d.original {
        Original::Headers(_) => {
            let _ = write!(
                m,
                "--{boundary}\r\n\
                 Content-Description: Undelivered Message Headers\r\n\
                 Content-Type: text/rfc822-headers\r\n\
                 \r\n"
            );
        }
        Original::Message(b) => {
            let _ = write!(
                m,
                "--{boundary}\r\n\
                 Content-Description: Undelivered Message\r\n\
                 Content-Type: message/rfc822\r\n\
                 Content-Transfer-Encoding: {}\r\n\
                 \r\n",
                if b.is_ascii() { "7bit" } else { "8bit" }
            );
        }
    }
    let mut out = m.into_bytes();
    out.extend_from_slice(original);
    if !original.is_empty() && !original.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// RFC 3463 "delivery time expired".
const EXPIRED: Status = Status::new(5, 4, 7);

/// The DSN status for a failed recipient's last answer: the reply's own
/// `5.x.x`, `5.0.0` for a 5xx without one, and `5.4.7` (delivery time
/// expired) when the last word was temporary or not from the server: the
/// only way a recipient fails without a 5xx is by running out of time.
pub(crate) fn status_of(answer: Option<&Answer>) -> Status {
    match answer.and_then(Answer::reply) {
        Some(r) if r.is_permanent() => r.dsn_status(),
        _ => EXPIRED,
    }
}

/// Fold a header field at spaces so lines stay near 78 characters.
fn fold_field(field: &str) -> String {
    let mut out = String::with_capacity(field.len() + 16);
    let mut line_len = 0;
    for (i, word) in field.split(' ').enumerate() {
        if i > 0 {
            if line_len + 1 + word.len() > 78 && line_len > 0 {
                out.push_str("\r\n ");
                line_len = 1;
            } else {
                out.push(' ');
                line_len += 1;
            }
        }
        out.push_str(word);
        line_len += word.len();
    }
    out
}

/// Wrap body text at spaces.
fn fold_text(text: &str, width: usize) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut line_len = 0;
    for word in text.split(' ') {
        if line_len > 0 && line_len + 1 + word.len() > width {
            out.push_str("\r\n    ");
            line_len = 4;
        } else if line_len > 0 {
            out.push(' ');
            line_len += 1;
        }
        out.push_str(word);
        line_len += word.len();
    }
    out
}

/// `Tue, 25 Nov 2025 04:16:00 +0000` (RFC 5322 3.3, UTC), by the `time`
/// crate.
pub(crate) fn rfc5322_date(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_else(|_| "Thu, 01 Jan 1970 00:00:00 +0000".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::RcptState;
    use std::time::Duration;

    #[test]
    fn dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc5322_date(t), "Tue, 14 Nov 2023 22:13:20 +0000");
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    fn answer(text: &str) -> Answer {
        Answer::parse_legacy(text)
    }

    #[test]
    fn statuses() {
        let st = |t: &str| status_of(Some(&answer(t))).to_string();
        assert_eq!(st("550 5.1.1 The email account does not exist"), "5.1.1");
        assert_eq!(st("554 rejected"), "5.0.0");
        assert_eq!(st("451 4.3.0 try later"), "5.4.7");
        assert_eq!(st("connect to x failed"), "5.4.7");
    }

    #[test]
    fn control_characters_from_the_upstream_never_reach_the_bounce() {
        let env = Envelope::new("app@example.com", ["a@example.org".to_string()]);
        let mut state = DeliveryState::new(1);
        state.recipients[0].state = RcptState::Failed;
        state.recipients[0].answer = Some(Answer::Reply(crate::reply::Reply::new(
            550,
            Some(Status::new(5, 7, 1)),
            "bad \x1b]52;c;cHduZWQ=\x07 \x1b[2J\x08",
        )));
        let dsn = build(&DsnInput {
            hostname: "relay.example.net",
            from: "me@gmail.com",
            queue_id: MessageId::from_u64(0x77),
            envelope: &env,
            state: &state,
            report: &[0],
            remote_mta: "smtp.gmail.com",
            to: To::Sender,
            original: Original::Headers(b"Subject: x\r\n"),
            max_age: Duration::from_secs(5 * 86_400),
            now: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        });
        assert!(
            !dsn.iter()
                .any(|&b| b < 0x20 && b != b'\r' && b != b'\n' && b != b'\t'),
            "{}",
            String::from_utf8_lossy(&dsn)
        );
        assert!(String::from_utf8_lossy(&dsn).contains("bad \\x1b]52;c;cHduZWQ=\\x07"));
    }

    #[test]
    fn folding() {
        let f = fold_field(&format!(
            "Diagnostic-Code: smtp; 550 5.1.1 {}",
            "word ".repeat(30)
        ));
        assert!(f.split("\r\n").all(|l| l.len() <= 80), "{f}");
        assert!(f.contains("\r\n "));
    }

    #[test]
    fn builds_a_report() {
        let env = Envelope::new(
            "app@example.com",
            ["bad@example.org".to_string(), "ok@example.org".to_string()],
        );
        let mut state = DeliveryState::new(2);
        state.recipients[0].state = RcptState::Failed;
        state.recipients[0].answer = Some(answer(
            "550 5.1.1 The email account that you tried to reach does not exist. - gsmtp",
        ));
        state.recipients[1].state = RcptState::Delivered;
        let dsn = build(&DsnInput {
            hostname: "relay.example.net",
            from: "me@gmail.com",
            queue_id: MessageId::from_u64(0x1234),
            envelope: &env,
            state: &state,
            report: &[0],
            remote_mta: "smtp.gmail.com",
            to: To::Sender,
            original: Original::Headers(b"Subject: hello\r\nFrom: app@example.com\r\n"),
            max_age: Duration::from_secs(5 * 86_400),
            now: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        });
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(text.contains("Reporting-MTA: dns; relay.example.net\r\n"));
        assert!(text.contains("Final-Recipient: rfc822; bad@example.org\r\n"));
        assert!(!text.contains("Final-Recipient: rfc822; ok@example.org"));
        assert!(text.contains("Action: failed\r\nStatus: 5.1.1\r\n"));
        assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 The email account"));
        assert!(text.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: hello\r\n"));
        assert!(text.ends_with("--\r\n"));
        assert!(text.split("\r\n").all(|l| l.len() < 998));
        assert!(!text.contains("expired"));
    }

    #[test]
    fn an_expired_recipient_is_5_4_7_with_its_last_reply() {
        let env = Envelope::new(
            "app@example.com",
            ["a@example.org".to_string(), "b@example.org".to_string()],
        );
        let mut state = DeliveryState::new(2);
        // Even a 5xx-looking last reply (530: the session lost its login).
        state.recipients[0].state = RcptState::Failed;
        state.recipients[0].expired = true;
        state.recipients[0].answer = Some(answer("530 5.7.0 Authentication Required. - gsmtp"));
        state.recipients[1].state = RcptState::Failed;
        state.recipients[1].expired = true;
        state.recipients[1].answer = Some(answer("connect to smtp.gmail.com failed: refused"));
        let dsn = build(&DsnInput {
            hostname: "relay.example.net",
            from: "me@gmail.com",
            queue_id: MessageId::from_u64(0x99),
            envelope: &env,
            state: &state,
            report: &[0, 1],
            remote_mta: "smtp.gmail.com",
            to: To::Sender,
            original: Original::Headers(b"Subject: old\r\n"),
            max_age: Duration::from_secs(5 * 86_400),
            now: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        });
        let text = String::from_utf8(dsn).unwrap();
        let flat = text.replace("\r\n    ", " ").replace("\r\n ", " ");
        assert!(
            flat.contains("<a@example.org>: the message expired after 5days in the queue without being delivered; the last attempt got: host smtp.gmail.com said: 530 5.7.0 Authentication Required."),
            "{flat}"
        );
        assert!(flat.contains("the last attempt got: connect to smtp.gmail.com failed"));
        assert_eq!(
            text.matches("Action: failed\r\nStatus: 5.4.7\r\n").count(),
            2
        );
        assert!(!text.contains("Status: 5.7.0"));
        assert!(flat.contains("Diagnostic-Code: smtp; 530 5.7.0 Authentication Required."));
        assert!(flat.contains("X-Oauthrelay-Diagnostic: connect to smtp.gmail.com failed"));
    }

    #[test]
    fn the_postmaster_copy_attaches_the_undeliverable_bounce_whole() {
        let mut env = Envelope::new("", ["root@nowhere.invalid".to_string()]);
        env.received = UNIX_EPOCH + Duration::from_secs(1_699_999_000);
        let mut state = DeliveryState::new(1);
        state.bounce_of = Some(MessageId::from_u64(0x42));
        state.reports = vec![0];
        state.recipients[0].state = RcptState::Failed;
        state.recipients[0].answer = Some(answer(
            "553 5.1.2 We weren't able to find the recipient domain.",
        ));
        let bounce = b"From: Mail Delivery System <me@gmail.com>\r\nSubject: Undelivered Mail Returned to Sender\r\n\r\nFinal-Recipient: rfc822; nobody@example.org\r\n";
        let dsn = build(&DsnInput {
            hostname: "relay.example.net",
            from: "me@gmail.com",
            to: To::Postmaster("admin@example.com"),
            queue_id: MessageId::from_u64(0x43),
            envelope: &env,
            state: &state,
            report: &[0],
            remote_mta: "smtp.gmail.com",
            original: Original::Message(bounce),
            max_age: Duration::from_secs(5 * 86_400),
            now: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        });
        let text = String::from_utf8(dsn).unwrap();
        let flat = text.replace("\r\n    ", " ").replace("\r\n ", " ");
        assert!(text.contains("To: <admin@example.com>\r\n"), "{text}");
        assert!(text.contains("Subject: Postmaster Copy: Undelivered Mail\r\n"));
        assert!(text.contains("report-type=delivery-status"));
        assert!(flat.contains("A non-delivery notification (queue ID 00000000000043) about message 00000000000042 could not be delivered"), "{flat}");
        assert!(text.contains("X-Oauthrelay-Sender: rfc822; \r\n"));
        assert!(text.contains(
            "Final-Recipient: rfc822; root@nowhere.invalid\r\nAction: failed\r\nStatus: 5.1.2\r\n"
        ));
        assert!(text.contains("Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n\r\nFrom: Mail Delivery System"));
        assert!(
            text.contains("Final-Recipient: rfc822; nobody@example.org\r\n"),
            "the bounce's own report inside"
        );
        assert!(!text.contains("text/rfc822-headers"));
    }
}
