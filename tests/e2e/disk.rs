//! Issue 11: a full disk never wedges the relay, readiness tells the truth
//! about it, and damage found at start-up is reported at ERROR with the
//! evidence kept. Through the real daemon, on small tmpfs mounts (root).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use testkit::gmail::TlsMode;

use crate::fakes::{EMAIL, T, Upstream, metric, metrics, until, wait_queue_empty};
use crate::faults::{TinyFs, free_space, readyz, sized_message};
use crate::harness::{Daemon, Smtp};

/// A transaction as Python's smtplib sends it: `SIZE=` declared at MAIL,
/// so a spool without room refuses it there, before the writer sees it.
async fn mail_sized(s: &mut Smtp, body: &[u8]) -> String {
    let r = s
        .cmd(&format!("MAIL FROM:<a@example.com> SIZE={}", body.len()))
        .await;
    if !r.starts_with("250") {
        return r;
    }
    let r = s.cmd("RCPT TO:<r@example.org>").await;
    assert!(r.starts_with("250"), "RCPT: {r}");
    let r = s.cmd("DATA").await;
    assert!(r.starts_with("354"), "DATA: {r}");
    s.send(&crate::harness::dot_stuff(body)).await;
    s.send(b".\r\n").await;
    s.reply().await
}

/// Send 100 KB messages until one is refused; returns how many were taken.
async fn fill(d: &Daemon, prefix: &str) -> usize {
    let mut s = Smtp::open(d.smtp).await;
    assert!(s.cmd("EHLO e2e.test").await.starts_with("250"));
    for n in 0..400 {
        let r = mail_sized(&mut s, &sized_message(&format!("{prefix}{n}"), 100 << 10)).await;
        if !r.starts_with("250") {
            assert!(r.starts_with("452 4.3.1"), "refused for want of space: {r}");
            s.cmd("RSET").await;
            s.cmd("QUIT").await;
            return n;
        }
    }
    panic!("the spool never filled up");
}

/// New mail is taken again within 10 s; returns how long it took.
async fn accepted_within_10s(d: &Daemon, id: &str) -> Duration {
    let start = Instant::now();
    loop {
        let mut s = Smtp::open(d.smtp).await;
        assert!(s.cmd("EHLO e2e.test").await.starts_with("250"));
        let r = mail_sized(&mut s, &sized_message(id, 100 << 10)).await;
        s.cmd("QUIT").await;
        if r.starts_with("250 ") {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "new mail still refused 10 s after the queue emptied: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn assert_refusing(d: &Daemon) {
    let (code, body) = readyz(d).await;
    if code != 503 {
        let logs = d.logs();
        let tail: Vec<&str> = logs.lines().rev().take(40).collect();
        panic!(
            "readyz {code} {body} while mail is refused; log tail (newest first):\n{}",
            tail.join("\n")
        );
    }
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["reason"], "spool_full", "{body}");
    assert!(ready["spool"]["free_bytes"].is_u64(), "{body}");
    assert_eq!(ready["spool"]["reserved_bytes"], 1 << 20, "{body}");
    let m = metrics(d).await;
    assert_eq!(metric(&m, "oauthrelay_spool_accepting"), 0.0);
    assert!(metric(&m, "oauthrelay_spool_free_bytes") < (1 << 20) as f64);
}

async fn assert_accepting(d: &Daemon) {
    until("readyz 200 with room again", T, async || {
        match readyz(d).await {
            (200, _) => Ok(()),
            (c, b) => Err(format!("{c} {b}")),
        }
    })
    .await;
    let m = metrics(d).await;
    assert_eq!(metric(&m, "oauthrelay_spool_accepting"), 1.0);
    assert!(metric(&m, "oauthrelay_spool_free_bytes") > (8 << 20) as f64);
}

/// The report of issue 11: on a 20 MB tmpfs with a 1 MiB reserve, mail
/// from clients declaring SIZE= until refused while Gmail is down; Gmail
/// back, the queue drains, and new mail is taken again within 10 s (it was
/// refused for good before). Then the same across a restart on the full
/// spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_takes_mail_again_once_delivered_and_readiness_follows() {
    let Some(fs) = TinyFs::mount("20m") else {
        return;
    };
    let up = Upstream::start(TlsMode::Implicit).await;
    up.gmail.stop_listening();
    let spool_dir: PathBuf = fs.path().join("spool");
    let config = format!(
        "{}\n[spool]\ndir = \"{}\"\nmin_free_space = \"1MiB\"\n",
        up.config(
            "retry_initial = \"1h\"\nretry_max = \"1h\"\nconnect_timeout = \"5s\"\n",
            &[up.account("default", EMAIL, &["*"], true)],
        ),
        spool_dir.display()
    );
    up.import(&config, "default", EMAIL);
    let d = Daemon::start(&config);
    assert_accepting(&d).await;

    let taken = fill(&d, "first").await;
    assert!(taken >= 100, "{taken} messages before the spool was full");
    assert_refusing(&d).await;

    up.gmail.resume_listening().expect("listen again");
    let out = d.cli(&["queue", "retry", "--all"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_queue_empty(&d, T).await;
    let took = accepted_within_10s(&d, "again").await;
    eprintln!("{taken} messages filled the spool; new mail taken {took:?} after the queue emptied");
    assert_accepting(&d).await;
    wait_queue_empty(&d, T).await;

    // Full again while Gmail is down, and restarted on the full spool.
    up.gmail.stop_listening();
    let taken = fill(&d, "second").await;
    assert!(taken >= 100, "{taken}");
    assert_refusing(&d).await;
    let mut d = d;
    assert!(d.terminate(Duration::from_secs(20)).success());
    let d = d.restart();
    assert_refusing(&d).await;
    up.gmail.resume_listening().expect("listen again");
    let out = d.cli(&["queue", "retry", "--all"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_queue_empty(&d, T).await;
    let took = accepted_within_10s(&d, "after-restart").await;
    eprintln!("after a restart on the full spool: new mail taken {took:?} after the queue emptied");
    assert_accepting(&d).await;
    assert!(free_space(fs.path()) > 10 << 20, "the space is back");
    drop(d);
}

/// A byte flipped in a chunk of a queued message while the daemon was
/// stopped: the start says so at ERROR, naming the message, and keeps its
/// envelope and every part found in `corrupt/`; the other mail goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_found_at_start_is_an_error_naming_the_message_with_its_parts_kept() {
    let up = Upstream::start(TlsMode::Implicit).await;
    up.gmail.stop_listening();
    let config = up.config(
        "retry_initial = \"1h\"\nretry_max = \"1h\"\nconnect_timeout = \"5s\"\n",
        &[up.account("default", EMAIL, &["*"], true)],
    );
    up.import(&config, "default", EMAIL);
    let d = Daemon::start(&config);
    let mut s = Smtp::open(d.smtp).await;
    assert!(s.cmd("EHLO e2e.test").await.starts_with("250"));
    let big = sized_message("big", 300 << 10);
    let r = s.mail("a@example.com", &["r@example.org"], &big).await;
    assert!(r.starts_with("250 "), "{r}");
    let big_id = crate::harness::queued_id(&r);
    let small = sized_message("small", 2 << 10);
    assert!(
        s.mail("a@example.com", &["r@example.org"], &small)
            .await
            .starts_with("250 ")
    );
    s.cmd("QUIT").await;
    let mut d = d;
    assert!(d.terminate(Duration::from_secs(20)).success());

    let spool_dir = d.dir.join("spool");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&spool_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    let seg = segs
        .iter()
        .find(|p| std::fs::metadata(p).unwrap().len() > 300 << 10)
        .expect("the big message's segment")
        .clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    // A line of the big message's second chunk (lines are numbered).
    let needle = b"00001000 ";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    bytes[at + 20] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();

    let d = d.restart();
    let line = d.wait_log("cannot be delivered", T);
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&big_id), "names the message: {line}");
    let summary = d.wait_log("acknowledged message(s)", T);
    assert!(
        summary.contains("ERROR") && summary.contains(&big_id),
        "{summary}"
    );
    let aside: Vec<String> = std::fs::read_dir(spool_dir.join("corrupt"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        aside.contains(&format!("{big_id}.envelope.json")),
        "{aside:?}"
    );
    assert!(
        aside
            .iter()
            .filter(|n| n.starts_with(&format!("{big_id}.part-")))
            .count()
            >= 3,
        "{aside:?}"
    );
    up.gmail.resume_listening().expect("listen again");
    let out = d.cli(&["queue", "retry", "--all"], None);
    assert!(out.status.success());
    wait_queue_empty(&d, T).await;
    assert_eq!(up.gmail.messages().len(), 1, "the intact message goes out");
}
