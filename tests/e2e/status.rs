//! The status page (`/`) and `/status.json` as a person and a script see
//! them: loaded in a real headless browser while one account is held and
//! another delivers, with what clients and upstreams chose (an EHLO name,
//! a reply) shown as text and never as markup, and no secret anywhere.

use std::path::Path;
use std::time::Duration;

use testkit::gmail::{TlsMode, replies};

use crate::fakes::{FAST_DELIVERY, T, Upstream, message, submit, until};
use crate::harness::{Daemon, Smtp, have_tool, queued_id};
use crate::served::repo;

/// Where the README's screenshot lives; `OAUTHRELAY_UPDATE_SCREENSHOT=1`
/// makes the browser test write it.
const SCREENSHOT: &str = "docs/status-page.png";

const OFFICE: &str = "office.relay@gmail.com";

/// `chromium --headless` on `url` with `args` (`--dump-dom`,
/// `--screenshot=PATH`), in a new empty profile, with everything that
/// would reach the network or a session bus off. Its stdout.
async fn chromium(url: &str, args: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1100,1400",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .arg(url)
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium finishes within 90 s")
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 DOM")
}

/// What a person reads: the DOM's text, tags and the style sheet removed,
/// entities decoded, white space collapsed.
fn visible_text(dom: &str) -> String {
    let body = dom.split_once("<body").map(|x| x.1).unwrap_or(dom);
    let mut out = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' if in_tag => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    let out = out
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&");
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The tags of the DOM (`<name`), counted by name.
fn tags(dom: &str, name: &str) -> usize {
    dom.match_indices(&format!("<{name}"))
        .filter(|(i, _)| {
            let next = dom[i + 1 + name.len()..].chars().next();
            matches!(next, Some(' ' | '>' | '/'))
        })
        .count()
}

/// Width and height of a PNG, from its IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert!(b.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG: {path:?}");
    let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

async fn status_json(d: &Daemon) -> serde_json::Value {
    let (code, body) = d.http_get("/status.json").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status.json parses")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_held_account_its_fix_the_queue_and_the_last_attempts() {
    let up = Upstream::start(TlsMode::Implicit).await;
    // `scanner` has never been authorized (its mail is held); `office`
    // has a token and sends everything else.
    let accounts = [
        up.account(
            "scanner",
            "scans.relay@gmail.com",
            &["*@scanner.example"],
            false,
        ),
        up.account("office", OFFICE, &["*"], true),
    ];
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"relay.example.net\"\nshutdown_grace = \"5s\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[delivery]\n{FAST_DELIVERY}\n{}",
        accounts.join("\n")
    );
    up.import(&config, "office", OFFICE);
    let d = Daemon::start(&config);

    // Delivered; deferred once (451), then delivered; bounced (and its
    // bounce delivered); and a scan held for the unauthorized account.
    up.gmail
        .reject_recipient("nobody@example.org", replies::NO_SUCH_USER);
    up.gmail
        .fail_next(testkit::gmail::Stage::DataEnd, 1, replies::TRY_AGAIN_451);
    submit(
        &d,
        "cron@office.example",
        &["admin@example.org"],
        &message("s1", "backup done", "ok\r\n"),
    )
    .await;
    submit(
        &d,
        "app@office.example",
        &["team@example.org"],
        &message("s2", "report", "x\r\n"),
    )
    .await;
    submit(
        &d,
        "app@office.example",
        &["nobody@example.org"],
        &message("s3", "typo", "x\r\n"),
    )
    .await;
    let held = submit(
        &d,
        "printer@scanner.example",
        &["boss@example.org"],
        &message("s4", "scan", "x\r\n"),
    )
    .await;
    let s = until("five attempts and one held message", T, async || {
        let s = status_json(&d).await;
        let attempts = s["attempts"].as_array().unwrap().len();
        if attempts >= 5 && s["queue"]["messages"] == 1 {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;

    // The JSON: version, uptime, each account's token and state.
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["hostname"], "relay.example.net");
    assert!(s["uptime_seconds"].as_u64().is_some(), "{s}");
    assert_eq!(s["status"], "attention", "{s}");
    let account = |name: &str| {
        s["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {s}"))
            .clone()
    };
    let scanner = account("scanner");
    assert_eq!(scanner["state"], "held", "{scanner}");
    assert_eq!(scanner["token"]["state"], "needs authorization");
    assert!(
        scanner["fix"]
            .as_str()
            .unwrap()
            .contains("oauthrelay authorize --account scanner"),
        "{scanner}"
    );
    assert_eq!(scanner["queued"], 1);
    let office = account("office");
    assert_eq!(office["state"], "ready", "{office}");
    assert_eq!(office["token"]["state"], "valid", "{office}");
    assert!(office["token"]["expires_at"].is_string(), "{office}");
    assert_eq!(office["token"]["last_refresh"]["result"], "ok", "{office}");
    assert!(office["fix"].is_null());
    // The queue.
    let q = &s["queue"];
    assert_eq!(
        (q["messages"].as_u64(), q["held"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(q["oldest"]["id"], held.as_str(), "{q}");
    assert_eq!(q["oldest"]["from"], "printer@scanner.example");
    assert_eq!(q["oldest"]["helo"], "e2e.test");
    // The attempts, newest first, as the log tells them.
    let attempts = s["attempts"].as_array().unwrap();
    let results: Vec<&str> = attempts
        .iter()
        .map(|a| a["result"].as_str().unwrap())
        .collect();
    for want in ["sent", "deferred", "bounced"] {
        assert!(results.contains(&want), "{want} in {results:?}");
    }
    let bounced = attempts.iter().find(|a| a["result"] == "bounced").unwrap();
    assert_eq!(bounced["recipients"][0], "nobody@example.org");
    assert_eq!(bounced["dsn"], "5.1.1");
    assert!(
        bounced["reply"]
            .as_str()
            .unwrap()
            .starts_with("550 5.1.1 The email account"),
        "{bounced}"
    );
    assert!(bounced["delay_seconds"].as_f64().is_some());
    let deferred = attempts.iter().find(|a| a["result"] == "deferred").unwrap();
    assert_eq!(deferred["dsn"], "4.3.0", "{deferred}");
    let times: Vec<&str> = attempts.iter().map(|a| a["at"].as_str().unwrap()).collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );

    // The HTML, as served: no script, no outside asset, a self-refresh,
    // and headers that forbid any script anyway.
    let addr = d.metrics.unwrap();
    let (code, head, html) = crate::served::get(addr, "/", "").await;
    assert_eq!(code, 200);
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert!(html.contains("<meta http-equiv=\"refresh\" content=\"10\">"));
    for tag in ["script", "link", "img", "iframe", "object"] {
        assert_eq!(tags(&html, tag), 0, "no <{tag}>: {html}");
    }
    assert!(
        !html.contains("href=\"http") && !html.contains("href=\"/"),
        "links are relative to the page: {html}"
    );
    let (_, _, json_text) = crate::served::get(addr, "/status.json", "").await;
    up.assert_no_secrets("the status page", &html);
    up.assert_no_secrets("status.json", &json_text);

    if !have_tool("chromium") {
        return;
    }
    let url = format!("http://{addr}/");
    let dom = chromium(&url, &["--dump-dom".into()]).await;
    let text = visible_text(&dom);
    for seen in [
        "oauthrelay on relay.example.net",
        "Needs attention: mail of scanner is held until someone acts",
        "scanner <scans.relay@gmail.com> held",
        "Access token needs authorization",
        "Mail is held: needs authorization: no refresh token is stored",
        "To fix: run: oauthrelay authorize --account scanner",
        "office <office.relay@gmail.com> ready",
        "Access token valid, expires",
        "1 held",
        &format!("Oldest message {held}"),
        "from <printer@scanner.example>",
        "Last delivery attempts",
        "nobody@example.org bounced 5.1.1",
        "admin@example.org deferred 4.3.0",
        "550 5.1.1 The email account that you tried to reach does not exist.",
    ] {
        assert!(text.contains(seen), "a person sees {seen:?} in:\n{text}");
    }
    let shots = tempfile::tempdir().unwrap();
    let png = shots.path().join("status.png");
    chromium(&url, &[format!("--screenshot={}", png.display())]).await;
    assert_eq!(png_size(&png), (1100, 1400));
    if std::env::var_os("OAUTHRELAY_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&png, repo(SCREENSHOT)).unwrap();
    }

    // Hostile input: an EHLO name and an upstream reply that are markup.
    // Gone the earlier held message, the hostile one is the oldest.
    let out = d.cli(&["queue", "delete", &held], None);
    assert!(out.status.success(), "{out:?}");
    let ehlo = "<script>document.title='pwned'</script><iframe>x";
    let mut c = Smtp::open(d.smtp).await;
    assert!(c.cmd(&format!("EHLO {ehlo}")).await.starts_with("250"));
    let r = c
        .mail(
            "printer@scanner.example",
            &["boss@example.org"],
            &message("s5", "scan", "x\r\n"),
        )
        .await;
    let hostile_id = queued_id(&r);
    c.cmd("QUIT").await;
    let reply = "550 5.1.1 <img src=x onerror=\"document.title='pwned'\"> no such user";
    up.gmail.reject_recipient("evil@example.org", reply);
    submit(
        &d,
        "app@office.example",
        &["evil@example.org"],
        &message("s6", "x", "x\r\n"),
    )
    .await;
    until("the hostile reply on the page", T, async || {
        let s = status_json(&d).await;
        let seen = s["attempts"][0]["recipients"][0] == "evil@example.org"
            || s["attempts"][1]["recipients"][0] == "evil@example.org";
        if seen && s["queue"]["oldest"]["id"] == hostile_id.as_str() {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await;
    let dom = chromium(&url, &["--dump-dom".into()]).await;
    assert_eq!(tags(&dom, "script"), 0, "{dom}");
    assert_eq!(tags(&dom, "img"), 0, "{dom}");
    assert_eq!(tags(&dom, "iframe"), 0, "{dom}");
    assert!(
        dom.contains("<title>oauthrelay on relay.example.net"),
        "{dom}"
    );
    let text = visible_text(&dom);
    assert!(text.contains(&format!("sent by {ehlo}")), "{text}");
    assert!(text.contains("<img src=x onerror="), "{text}");
}

#[tokio::test]
async fn with_no_account_the_page_says_mail_is_held_and_what_to_add() {
    let d = Daemon::start(crate::harness::BASE);
    let (code, html) = d.http_get("/").await;
    assert_eq!(code, 200);
    assert!(
        html.contains("Needs attention: no account configured."),
        "{html}"
    );
    assert!(html.contains("add an [[accounts]] section"), "{html}");
    let (_, json) = d.http_get("/status.json").await;
    let s: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(s["status"], "attention");
    assert_eq!(s["accounts"], serde_json::json!([]));
    assert_eq!(s["queue"]["messages"], 0);
    assert_eq!(s["attempts"], serde_json::json!([]));
}
