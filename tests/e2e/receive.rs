//! Receiving: what a client sees from the running daemon, and what ends up
//! in the queue.

use std::time::Duration;

use crate::harness::{BASE, Daemon, Smtp, queued_id};

fn queue_json(d: &Daemon) -> serde_json::Value {
    let out = d.cli(&["queue", "list", "--json"], None);
    assert!(
        out.status.success(),
        "queue list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn accepted_mail_waits_in_the_queue_with_its_envelope() {
    let d = Daemon::start(BASE);
    let mut s = Smtp::open(d.smtp).await;
    let ehlo = s.cmd("EHLO printer.local").await;
    for ext in [
        "SIZE",
        "8BITMIME",
        "PIPELINING",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
    ] {
        assert!(ehlo.contains(ext), "EHLO lacks {ext}: {ehlo}");
    }
    let r = s
        .mail(
            "scanner@example.com",
            &["boss@example.com", "archive@example.com"],
            b"Subject: scan\r\n\r\npage 1\r\n",
        )
        .await;
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    let id = queued_id(&r);
    assert_eq!(s.cmd("QUIT").await.get(..3), Some("221"));

    let q = queue_json(&d);
    let list = q.as_array().unwrap();
    assert_eq!(list.len(), 1);
    let m = &list[0];
    assert_eq!(m["id"], id.as_str());
    assert_eq!(m["from"], "scanner@example.com");
    assert_eq!(
        m["recipients"],
        serde_json::json!(["boss@example.com", "archive@example.com"])
    );
    assert_eq!(m["attempts"], 0);
    assert!(m["size"].as_u64().unwrap() > 20);
    assert!(m["created"].as_str().unwrap().ends_with('Z'));
    assert!(
        ["queued", "held"].contains(&m["state"].as_str().unwrap()),
        "{m}"
    );
    assert!(
        d.logs().contains(&id),
        "the accepted message is logged with its queue id"
    );

    let show = d.cli(&["queue", "show", &id], None);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("Received: from printer.local"), "{text}");
    assert!(text.contains("Message-ID:"), "added when missing: {text}");
}

#[tokio::test]
async fn metrics_and_health_are_served() {
    let d = Daemon::start(BASE);
    let mut s = Smtp::open(d.smtp).await;
    s.cmd("EHLO x").await;
    s.mail(
        "a@example.com",
        &["b@example.com"],
        b"Subject: m\r\n\r\nx\r\n",
    )
    .await;
    let (code, body) = d.http_get("/metrics").await;
    assert_eq!(code, 200);
    for family in [
        "oauthrelay_messages_received_total 1",
        "oauthrelay_messages_delivered_total",
        "oauthrelay_messages_bounced_total",
        "oauthrelay_delivery_attempts_total",
        "oauthrelay_queue_messages 1",
        "oauthrelay_queue_oldest_age_seconds",
        "oauthrelay_delivery_duration_seconds",
    ] {
        assert!(body.contains(family), "missing {family:?} in\n{body}");
    }
    // The 250 came after the commit's fdatasync.
    for counter in [
        "oauthrelay_spool_syncs_total",
        "oauthrelay_spool_synced_operations_total",
    ] {
        let value = body
            .lines()
            .find_map(|l| l.strip_prefix(counter)?.trim().parse::<u64>().ok());
        assert!(
            value.is_some_and(|v| v >= 1),
            "{counter}: {value:?}\n{body}"
        );
    }
    assert_eq!(d.http_get("/healthz").await.0, 200);
    // No account: mail is taken, but held until one is configured.
    let (code, body) = d.http_get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("no account configured; mail is held"),
        "{body}"
    );
}

#[tokio::test]
async fn sigterm_lets_a_transfer_finish_and_turns_idle_clients_away() {
    let mut d = Daemon::start(BASE);
    let mut idle = Smtp::open(d.smtp).await;
    idle.cmd("EHLO idle").await;
    let mut busy = Smtp::open(d.smtp).await;
    busy.cmd("EHLO busy").await;
    busy.cmd("MAIL FROM:<a@example.com>").await;
    busy.cmd("RCPT TO:<b@example.com>").await;
    assert!(busy.cmd("DATA").await.starts_with("354"));
    busy.send(b"Subject: half\r\n\r\nfirst half\r\n").await;

    d.signal("TERM");
    let bye = idle.reply().await;
    assert!(bye.starts_with("421 4.3.2"), "idle session told: {bye}");
    // Shutdown goes on (the listener closes); the transfer in progress
    // may still finish and is acknowledged.
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(d.smtp).is_ok() {
        assert!(
            start.elapsed() < crate::fakes::T,
            "the listener stays open after TERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    busy.send(b"second half\r\n.\r\n").await;
    let r = busy.reply().await;
    assert!(r.starts_with("250 2.0.0"), "in-flight DATA finished: {r}");
    let status = d.terminate(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
    assert!(
        std::net::TcpStream::connect(d.smtp).is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn a_30_mb_message_is_streamed_to_disk_not_held_in_memory() {
    let d = Daemon::start(BASE);
    let mut s = Smtp::open(d.smtp).await;
    s.cmd("EHLO big").await;
    // Warm up: a small message, so buffers that exist anyway exist.
    s.mail(
        "a@example.com",
        &["b@example.com"],
        b"Subject: warm\r\n\r\nx\r\n",
    )
    .await;
    d.reset_peak_rss();
    let (before, rss) = d.memory_kib();
    // No reading (no /proc, another kernel's format) would make the check
    // below pass whatever happens.
    assert!(
        before > 0 && rss > 0,
        "cannot read the daemon's memory use from /proc/{}/status",
        d.pid()
    );
    let line =
        b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3\r\n";
    let mut body = b"Subject: scan.pdf\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n".to_vec();
    while body.len() < 30 << 20 {
        body.extend_from_slice(line);
    }
    let r = s.mail("a@example.com", &["b@example.com"], &body).await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let (peak, rss) = d.memory_kib();
    assert!(
        peak > 0 && rss > 0,
        "the daemon's memory use after the message"
    );
    let grew = peak.saturating_sub(before);
    eprintln!("30 MB message: peak RSS {before} KiB -> {peak} KiB (+{grew} KiB)");
    assert!(
        grew < 12 * 1024,
        "peak RSS grew by {grew} KiB for a 30 MB message"
    );
    let id = queued_id(&r);
    let list = queue_json(&d);
    let size = list[1]["size"].as_u64().unwrap();
    assert_eq!(list[1]["id"], id.as_str());
    assert!(
        size > body.len() as u64,
        "stored whole, with our headers: {size}"
    );
}

#[tokio::test]
async fn a_client_outside_allow_networks_cannot_relay() {
    let d = Daemon::start(&BASE.replace(
        "[server]\n",
        "[server]\nallow_networks = [\"127.0.0.1/32\"]\n",
    ));
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = sock.connect(d.smtp).await.unwrap();
    let mut line = String::new();
    let mut r = tokio::io::BufReader::new(stream);
    tokio::io::AsyncBufReadExt::read_line(&mut r, &mut line)
        .await
        .unwrap();
    assert!(line.starts_with("554 5.7.1"), "{line}");
    // And nothing was queued from it.
    assert_eq!(queue_json(&d).as_array().unwrap().len(), 0);
}

/// Text from a client reaches an admin's terminal through `queue show` and
/// `queue list`: its control characters are printed escaped, so a hostile
/// EHLO name or header cannot clear the screen, set the clipboard (OSC 52)
/// or retitle the window.
#[tokio::test]
async fn queue_show_and_list_escape_terminal_controls() {
    let d = Daemon::start(BASE);
    let mut s = Smtp::open(d.smtp).await;
    // EHLO names end at a space: ESC, BEL and the C1 CSI fit in one.
    s.cmd("EHLO evil\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2J\u{9b}31m.test")
        .await;
    let r = s
        .mail(
            "a@example.com",
            &["b@example.com"],
            b"Subject: hi \x1b]0;owned\x07 there\r\nX-Clear: \x1b[2J\x1b[H\rfake line\r\n\r\nbody\r\n",
        )
        .await;
    let id = queued_id(&r);
    let show = d.cli(&["queue", "show", &id], None);
    assert!(show.status.success());
    let list = d.cli(&["queue", "list"], None);
    assert!(list.status.success());
    for (what, out) in [("show", &show.stdout), ("list", &list.stdout)] {
        let text = String::from_utf8_lossy(out);
        let raw: Vec<char> = text
            .chars()
            .filter(|c| c.is_control() && !matches!(c, '\n' | '\t'))
            .collect();
        assert!(
            raw.is_empty(),
            "queue {what} printed raw controls {raw:?}:\n{text}"
        );
    }
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains(r"evil\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2J\u{9b}31m.test"),
        "{text}"
    );
    assert!(
        text.contains(r"Subject: hi \x1b]0;owned\x07 there"),
        "{text}"
    );
    assert!(
        text.contains(r"X-Clear: \x1b[2J\x1b[H\rfake line"),
        "{text}"
    );
}
