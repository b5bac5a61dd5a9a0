//! The status page's HTML: one self-contained document (inline style, no
//! script, no external asset) that reloads itself. Every value goes
//! through maud's escaping: a client's EHLO name, an address or an
//! upstream's reply is text on the page, never markup.

use std::time::{Duration, SystemTime};

use maud::{DOCTYPE, Markup, html};

use super::{AccountView, AttemptView, QueueView, REFRESH, Snapshot};

/// Recipients listed per attempt before "and N more".
const RCPTS_SHOWN: usize = 3;
/// Characters of a reply shown in the table (the whole reply is in the
/// cell's title and in `/status.json`).
const REPLY_SHOWN: usize = 200;

const STYLE: &str = r#"
:root { color-scheme: light; --ok: #1a7f37; --warn: #9a6700; --bad: #cf222e; --line: #d0d7de; --muted: #57606a; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1f2328; background: #f6f8fa; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 16px 20px 32px; }
h1 { font-size: 22px; margin: 8px 0 2px; }
h1 small { font-weight: normal; color: var(--muted); }
h2 { font-size: 17px; margin: 24px 0 8px; }
h3 { font-size: 16px; margin: 0 0 6px; }
.meta { color: var(--muted); margin: 0 0 12px; }
.banner { padding: 10px 14px; border-radius: 6px; font-weight: 600; border: 1px solid; }
.banner.ok { background: #dafbe1; border-color: #4ac26b; color: #116329; }
.banner.attention { background: #ffebe9; border-color: #ff8182; color: #82071e; }
.card { background: #fff; border: 1px solid var(--line); border-left-width: 5px; border-radius: 6px; padding: 12px 14px; margin: 0 0 10px; }
.card.ready { border-left-color: var(--ok); }
.card.paused { border-left-color: var(--warn); }
.card.held { border-left-color: var(--bad); }
.badge { display: inline-block; font-size: 12px; font-weight: 700; text-transform: uppercase; letter-spacing: .04em; padding: 1px 8px; border-radius: 10px; color: #fff; vertical-align: 2px; margin-left: 6px; }
.badge.ready, .badge.sent { background: var(--ok); }
.badge.paused, .badge.deferred { background: var(--warn); }
.badge.held, .badge.bounced { background: var(--bad); }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 6px 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
.why { margin: 8px 0 4px; }
.note { margin: 4px 0 0; color: var(--muted); }
.fix { margin: 4px 0 0; padding: 8px 10px; background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; }
code { font: 13px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
.counts { display: flex; flex-wrap: wrap; gap: 10px; margin: 0 0 8px; }
.count { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; min-width: 90px; }
.count b { display: block; font-size: 20px; }
.count span { color: var(--muted); font-size: 13px; }
table { width: 100%; border-collapse: collapse; background: #fff; border: 1px solid var(--line); font-size: 13px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #f0f3f6; font-weight: 600; }
td.reply { overflow-wrap: anywhere; max-width: 420px; }
td.num, td.result, td.when { text-align: right; white-space: nowrap; }
td.result, td.when { text-align: left; }
.muted { color: var(--muted); }
footer { margin-top: 24px; color: var(--muted); font-size: 13px; }
"#;

/// The whole page.
pub fn render(s: &Snapshot) -> String {
    let title = if s.status == "ok" {
        "all good"
    } else {
        "needs attention"
    };
    let page: Markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta http-equiv="refresh" content=(REFRESH.as_secs());
                meta name="robots" content="noindex";
                title { "oauthrelay on " (s.hostname) ": " (title) }
                style { (maud::PreEscaped(STYLE)) }
            }
            body {
                main {
                    h1 { "oauthrelay " small { "on " (s.hostname) } }
                    p.meta {
                        "version " (s.version)
                        " · up " (short(Duration::from_secs(s.uptime_seconds)))
                        " (since " (utc(s.started)) ")"
                        " · as of " (utc(s.now))
                        " · reloads every " (REFRESH.as_secs()) " s"
                    }
                    (banner(s))
                    h2 { "Accounts" }
                    @if s.accounts.is_empty() {
                        div.card.held {
                            p.why { "No account is configured: mail is accepted and held, never sent." }
                            p.fix { "To fix: " code { "add an [[accounts]] section (docs/gmail-setup.md), systemctl reload oauthrelay, then oauthrelay authorize --account NAME" } }
                        }
                    }
                    @for a in &s.accounts {
                        (account(a, s.now))
                    }
                    h2 { "Queue" }
                    (queue(&s.queue, s.now))
                    @if let Some(p) = &s.spool.problem {
                        div.card.held { p.why { "Spool: " (p) } }
                    }
                    h2 { "Last delivery attempts" }
                    (attempts(&s.attempts, s.now))
                    footer {
                        "For scripts: " a href="status.json" { "status.json" }
                        " · " a href="metrics" { "metrics" }
                        " · " a href="readyz" { "readyz" }
                        ". Times are UTC."
                    }
                }
            }
        }
    };
    page.into_string()
}

fn banner(s: &Snapshot) -> Markup {
    let held: Vec<&str> = s
        .accounts
        .iter()
        .filter(|a| a.state == "held")
        .map(|a| a.name.as_str())
        .collect();
    let paused = s.accounts.iter().filter(|a| a.state == "paused").count();
    html! {
        @if s.status == "ok" {
            div.banner.ok {
                "All good: every account can send"
                @if paused > 0 { " (" (paused) " paused for a while, resuming by itself)" }
                "; " (s.queue.messages) " message" @if s.queue.messages != 1 { "s" } " queued."
            }
        } @else {
            div.banner.attention {
                "Needs attention: "
                @if s.accounts.is_empty() { "no account configured. " }
                @if !held.is_empty() {
                    "mail of " (held.join(", ")) " is held until someone acts (see below). "
                }
                @if !s.spool.accepting { "the spool refuses new mail. " }
            }
        }
    }
}

fn account(a: &AccountView, now: SystemTime) -> Markup {
    let badge = match a.state {
        "held" => "held",
        "paused" => "paused",
        _ => "ready",
    };
    html! {
        div class={ "card " (badge) } {
            h3 {
                (a.name) " "
                span.muted { "<" (a.email) ">" }
                span class={ "badge " (badge) } { (a.state) }
            }
            dl {
                dt { "Access token" }
                dd {
                    (a.token.state)
                    @if let Some(e) = a.token.expires_at {
                        @if e > now { ", expires " (utc(e)) " (in " (short(e.duration_since(now).unwrap_or_default())) ")" }
                        @else { ", expired " (utc(e)) }
                    }
                }
                dt { "Last refresh" }
                dd {
                    @match &a.token.last_refresh {
                        Some(r) => {
                            (utc(r.at)) " (" (ago(r.at, now)) "): " (r.result)
                            @if let Some(e) = &r.error { ": " (e) }
                        }
                        None => { span.muted { "none since start" } }
                    }
                }
                @if let Some(p) = &a.token.problem {
                    @if a.held.is_none() {
                        dt { "Token problem" }
                        dd { (p) }
                    }
                }
                dt { "Queue" }
                dd { (a.queued) " message" @if a.queued != 1 { "s" } ", " (a.in_flight) " being sent" }
            }
            @if let Some(h) = &a.held {
                p.why { strong { "Mail is held: " } (h.reason) }
            }
            @if let Some(p) = &a.paused {
                p.why {
                    strong { "Paused (" (p.reason) ") until " (utc(p.until)) }
                    " (in " (short(p.until.duration_since(now).unwrap_or_default())) ")"
                    @if let Some(r) = &p.reply { ": " (r) }
                }
            }
            @if a.held.is_some() {
                @if let Some(f) = &a.fix {
                    p.fix { "To fix: " code { (f) } }
                }
            } @else if a.paused.is_some() {
                p.note {
                    "Nothing to do: delivery resumes by itself. To try now: "
                    code { "oauthrelay queue retry --all" }
                }
            }
        }
    }
}

fn queue(q: &QueueView, now: SystemTime) -> Markup {
    html! {
        div.counts {
            (count(q.messages, "in the queue"))
            (count(q.queued, "queued"))
            (count(q.deferred, "deferred"))
            (count(q.held, "held"))
            (count(q.failed, "failed"))
            (count(q.in_flight, "being sent"))
            @if q.dropped > 0 {
                (count(q.dropped as usize, "dropped since start: nobody could be told (see the ERROR lines)"))
            }
        }
        div.card {
            dl {
                dt { "Oldest message" }
                dd {
                    @match &q.oldest {
                        Some(o) => {
                            code { (o.id) } ", " (short(Duration::from_secs(o.age_seconds))) " old, " (o.state)
                            ", from <" (o.from) ">"
                            ", sent by " (o.helo)
                            @if let Some(c) = &o.client { " [" (c) "]" }
                            // A held message's error is its hold, shown below.
                            @if o.state != "held" {
                                @if let Some(e) = &o.last_error { "; last error: " (e) }
                            }
                        }
                        None => { span.muted { "none: the queue is empty" } }
                    }
                }
                dt { "Next retry" }
                dd {
                    @match &q.next_retry {
                        Some(n) => { (utc(n.at)) " (in " (short(n.at.duration_since(now).unwrap_or_default())) "), " code { (n.id) } }
                        None => { span.muted { "none scheduled" } }
                    }
                }
                @for g in &q.held_reasons {
                    dt { "Held (" (g.messages) ")" }
                    dd { (g.reason) }
                }
            }
        }
    }
}

fn count(n: usize, what: &str) -> Markup {
    html! { div.count { b { (n) } span { (what) } } }
}

fn attempts(list: &[AttemptView], now: SystemTime) -> Markup {
    html! {
        @if list.is_empty() {
            p.muted { "No delivery attempt since the relay started." }
        } @else {
            table {
                thead {
                    tr {
                        th { "When" } th { "Queue id" } th { "Recipient" } th { "Result" }
                        th { "Delay" } th { "Reply" }
                    }
                }
                tbody {
                    @for a in list {
                        tr {
                            td.when title=(utc(a.at)) { (ago(a.at, now)) }
                            td { code { (a.queue_id) } }
                            td {
                                @for (i, r) in a.recipients.iter().take(RCPTS_SHOWN).enumerate() {
                                    @if i > 0 { br; }
                                    (r)
                                }
                                @if a.recipients.len() > RCPTS_SHOWN {
                                    br; span.muted { "and " (a.recipients.len() - RCPTS_SHOWN) " more" }
                                }
                            }
                            td.result {
                                span class={ "badge " (a.result) } { (a.result) }
                                " " span.muted { (a.dsn) }
                                @if a.attempt > 1 { br; span.muted { "attempt " (a.attempt) } }
                            }
                            td.num { (format!("{:.1} s", a.delay_seconds)) }
                            td.reply title=(a.reply) { (clip(&a.reply, REPLY_SHOWN)) }
                        }
                    }
                }
            }
        }
    }
}

/// `2026-12-02 14:05:09Z`.
fn utc(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replacen('T', " ", 1)
}

fn ago(t: SystemTime, now: SystemTime) -> String {
    match now.duration_since(t) {
        Ok(d) if d.as_secs() == 0 => "just now".into(),
        Ok(d) => format!("{} ago", short(d)),
        Err(_) => "just now".into(),
    }
}

/// A duration in its two largest units: `45s`, `3m 20s`, `2h 5m`, `3d 4h`.
fn short(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {mins}m")
    } else if mins > 0 {
        format!("{mins}m {secs}s")
    } else {
        format!("{secs}s")
    }
}

/// At most `n` characters, with an ellipsis when cut.
fn clip(text: &str, n: usize) -> String {
    match text.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    fn snapshot() -> Snapshot {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hostile = "<script>alert(1)</script>\"'&";
        Snapshot {
            version: "9.9.9",
            hostname: format!("relay{hostile}"),
            now,
            started: now - Duration::from_secs(3725),
            uptime_seconds: 3725,
            status: "attention",
            accounts: vec![AccountView {
                name: "default".into(),
                email: "me@example.com".into(),
                state: "held",
                token: TokenView {
                    state: "needs authorization",
                    authorized: false,
                    expires_at: None,
                    last_refresh: None,
                    problem: Some("no refresh token stored".into()),
                },
                paused: None,
                held: Some(HeldView {
                    reason: "needs authorization: no refresh token stored".into(),
                }),
                fix: Some("run: oauthrelay authorize --account default".into()),
                queued: 2,
                in_flight: 0,
            }],
            queue: QueueView {
                messages: 2,
                held: 2,
                oldest: Some(OldestView {
                    id: "0006427A1B2C3D".into(),
                    from: format!("a{hostile}@example.com"),
                    helo: hostile.into(),
                    client: Some("127.0.0.1:4000".into()),
                    received: now - Duration::from_secs(200),
                    age_seconds: 200,
                    state: "held",
                    last_error: None,
                }),
                ..QueueView::default()
            },
            spool: SpoolView {
                accepting: true,
                problem: None,
            },
            attempts: vec![AttemptView {
                at: now - Duration::from_secs(5),
                queue_id: "0006427A1B2C3E".into(),
                account: "default".into(),
                recipients: vec![format!("r{hostile}@example.org")],
                result: "deferred",
                dsn: "4.3.0".into(),
                delay_seconds: 1.25,
                attempt: 2,
                relay: None,
                reply: format!("451 4.3.0 {hostile}"),
            }],
        }
    }

    #[test]
    fn what_clients_and_upstreams_choose_is_text_never_markup() {
        let html = render(&snapshot());
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("alert(1)</"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;'&amp;"));
        // The only markup is ours: no attribute was broken out of.
        assert_eq!(html.matches("<table").count(), 1);
        assert!(html.contains(r#"<meta http-equiv="refresh" content="10">"#));
    }

    #[test]
    fn a_held_account_shows_why_and_the_command_that_fixes_it() {
        let html = render(&snapshot());
        assert!(html.contains("Needs attention: "), "{html}");
        assert!(
            html.contains("Mail is held: </strong>needs authorization: no refresh token stored")
        );
        assert!(html.contains("To fix: <code>run: oauthrelay authorize --account default</code>"));
        assert!(html.contains("version 9.9.9 · up 1h 2m"), "{html}");
    }

    #[test]
    fn a_paused_account_says_until_when_and_that_nothing_needs_doing() {
        let mut s = snapshot();
        s.status = "ok";
        let a = &mut s.accounts[0];
        a.state = "paused";
        a.held = None;
        a.paused = Some(PauseView {
            until: s.now + Duration::from_secs(3600),
            reason: "daily_limit",
            reply: Some("550 5.4.5 Daily user sending limit exceeded.".into()),
        });
        a.fix = Some("nothing to do".into());
        let html = render(&s);
        assert!(
            html.contains(
                "All good: every account can send (1 paused for a while, resuming by itself)"
            ),
            "{html}"
        );
        assert!(html.contains("Paused (daily_limit) until 2027-01-15 09:00:00Z</strong> (in 1h 0m): 550 5.4.5 Daily user sending limit exceeded."), "{html}");
        assert!(html.contains("Nothing to do: delivery resumes by itself. To try now: <code>oauthrelay queue retry --all</code>"), "{html}");
        assert!(!html.contains("To fix"), "{html}");
    }

    #[test]
    fn short_durations() {
        assert_eq!(short(Duration::from_secs(45)), "45s");
        assert_eq!(short(Duration::from_secs(200)), "3m 20s");
        assert_eq!(short(Duration::from_secs(7500)), "2h 5m");
        assert_eq!(
            short(Duration::from_secs(3 * 86_400 + 4 * 3600 + 5)),
            "3d 4h"
        );
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(clip("abc", 3), "abc");
    }
}
