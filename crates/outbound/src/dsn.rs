//! Delivery status notifications (RFC 3464): what the sender gets back when
//! a recipient fails for good.
//!
//! ```text
//! multipart/report; report-type=delivery-status
//!   text/plain                 what happened, in words
//!   message/delivery-status    Reporting-MTA, Arrival-Date, then per failed
//!                              recipient Final-Recipient, Action: failed,
//!                              Status 5.x.x, Remote-MTA, Diagnostic-Code
//!   text/rfc822-headers        the original message's header section
//! ```
//!
//! A recipient that expired (still undelivered after `max_age`, see
//! `Recipient::expired`) is reported with `Status: 5.4.7` whatever its last
//! reply was, and the text says so and quotes that reply.
//!
//! `From:` is the account's own address (with the display name "Mail
//! Delivery System"): Gmail rewrites any other `From:` to the account
//! anyway, and a reply to the bounce then reaches someone who can act. The
//! bounce is sent with the null envelope sender through the same account.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spool::{Envelope, MessageId, RcptState};

/// What a DSN needs besides the failed message's envelope.
pub(crate) struct DsnInput<'a> {
    /// Our host name (Reporting-MTA, Message-ID).
    pub hostname: &'a str,
    /// The account's address: the bounce's `From:`.
    pub from: &'a str,
    pub queue_id: MessageId,
    pub envelope: &'a Envelope,
    /// The upstream host (Remote-MTA).
    pub remote_mta: &'a str,
    /// The original header section, complete lines.
    pub headers: &'a [u8],
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
    let failed: Vec<_> = env
        .recipients
        .iter()
        .filter(|r| r.state == RcptState::Failed)
        .collect();

    let mut m = String::with_capacity(4096 + d.headers.len());
    let _ = write!(
        m,
        "From: Mail Delivery System <{from}>\r\n\
         To: <{to}>\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
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
        to = env.sender,
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
         \r\n\
         I'm sorry to have to inform you that your message could not\r\n\
         be delivered to one or more recipients. It's attached below.\r\n\
         \r\n\
         For further assistance, please send mail to your postmaster.\r\n\
         \r\n",
        host = d.hostname
    );
    for r in &failed {
        let why = r.reply.as_deref().unwrap_or("delivery failed");
        let said = if starts_with_code(why) {
            format!("host {} said: {why}", d.remote_mta)
        } else {
            why.to_string()
        };
        let line = if r.expired {
            format!(
                "<{}>: the message expired after {} in the queue without being delivered; the last attempt got: {said}",
                r.address,
                humantime::format_duration(d.max_age)
            )
        } else {
            format!("<{}>: {said}", r.address)
        };
        m.push_str(&fold_text(&line, 76));
        m.push_str("\r\n\r\n");
    }

    // Part 2: for machines.
    let _ = write!(
        m,
        "--{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {host}\r\n\
         X-Oauthrelay-Queue-ID: {id}\r\n\
         Arrival-Date: {arrival}\r\n",
        host = d.hostname,
        id = d.queue_id,
        arrival = rfc5322_date(env.received),
    );
    for r in &failed {
        let why = r.reply.as_deref().unwrap_or("");
        let _ = write!(
            m,
            "\r\n\
             Final-Recipient: rfc822; {addr}\r\n\
             Action: failed\r\n\
             Status: {status}\r\n\
             Remote-MTA: dns; {remote}\r\n",
            addr = r.address,
            status = if r.expired {
                EXPIRED.to_string()
            } else {
                status_of(why)
            },
            remote = d.remote_mta,
        );
        if starts_with_code(why) {
            m.push_str(&fold_field(&format!("Diagnostic-Code: smtp; {why}")));
            m.push_str("\r\n");
        } else if !why.is_empty() {
            m.push_str(&fold_field(&format!("X-Oauthrelay-Diagnostic: {why}")));
            m.push_str("\r\n");
        }
        let _ = write!(m, "Last-Attempt-Date: {}\r\n", rfc5322_date(d.now));
    }
    m.push_str("\r\n");

    // Part 3: the original headers.
    let _ = write!(
        m,
        "--{boundary}\r\n\
         Content-Description: Undelivered Message Headers\r\n\
         Content-Type: text/rfc822-headers\r\n\
         \r\n"
    );
    let mut out = m.into_bytes();
    out.extend_from_slice(d.headers);
    if !d.headers.is_empty() && !d.headers.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// RFC 3463 "delivery time expired".
const EXPIRED: &str = "5.4.7";

/// Whether `text` is an SMTP reply (`NNN ...`).
fn starts_with_code(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() >= 3 && b[..3].iter().all(u8::is_ascii_digit) && b.get(3).is_none_or(|&c| c == b' ')
}

/// The DSN status for a failed recipient's last reply: the reply's own
/// `5.x.x`, `5.0.0` for a 5xx without one, and `5.4.7` (delivery time
/// expired) when the last word was temporary or not from the server: the
/// only way a recipient fails without a 5xx is by running out of time.
pub(crate) fn status_of(reply: &str) -> String {
    if !starts_with_code(reply) || !reply.starts_with('5') {
        return EXPIRED.to_string();
    }
    let esc = reply[3..].split_whitespace().next().unwrap_or("");
    let parts: Vec<&str> = esc.split('.').collect();
    if parts.len() == 3
        && parts[0] == "5"
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
    {
        esc.to_string()
    } else {
        "5.0.0".to_string()
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

/// `Tue, 25 Nov 2025 04:16:00 +0000`.
pub(crate) fn rfc5322_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(days);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {d} {} {y} {:02}:{:02}:{:02} +0000",
        WD[days.rem_euclid(7) as usize],
        MON[(mo - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc5322_date(t), "Tue, 14 Nov 2023 22:13:20 +0000");
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 1 Jan 1970 00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn statuses() {
        assert_eq!(
            status_of("550 5.1.1 The email account does not exist"),
            "5.1.1"
        );
        assert_eq!(status_of("554 rejected"), "5.0.0");
        assert_eq!(status_of("451 4.3.0 try later"), "5.4.7");
        assert_eq!(status_of("connect to x failed"), "5.4.7");
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
        let mut env = Envelope::new(
            "app@example.com",
            ["bad@example.org".to_string(), "ok@example.org".to_string()],
        );
        env.recipients[0].state = RcptState::Failed;
        env.recipients[0].reply = Some(
            "550 5.1.1 The email account that you tried to reach does not exist. - gsmtp".into(),
        );
        env.recipients[1].state = RcptState::Delivered;
        let dsn = build(&DsnInput {
            hostname: "relay.example.net",
            from: "me@gmail.com",
            queue_id: MessageId::from_u64(0x1234),
            envelope: &env,
            remote_mta: "smtp.gmail.com",
            headers: b"Subject: hello\r\nFrom: app@example.com\r\n",
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
        let mut env = Envelope::new(
            "app@example.com",
            ["a@example.org".to_string(), "b@example.org".to_string()],
        );
        // Even a 5xx-looking last reply (530: the session lost its login).
        env.recipients[0].state = RcptState::Failed;
        env.recipients[0].expired = true;
        env.recipients[0].reply = Some("530 5.7.0 Authentication Required. - gsmtp".into());
        env.recipients[1].state = RcptState::Failed;
        env.recipients[1].expired = true;
        env.recipients[1].reply = Some("connect to smtp.gmail.com failed: refused".into());
        let dsn = build(&DsnInput {
            hostname: "relay.example.net",
            from: "me@gmail.com",
            queue_id: MessageId::from_u64(0x99),
            envelope: &env,
            remote_mta: "smtp.gmail.com",
            headers: b"Subject: old\r\n",
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
}
