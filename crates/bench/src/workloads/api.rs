//! `api`: 1 KB and 1 MB messages end to end through the Gmail API
//! transport (`transport = "gmail-api"`, HTTPS to the fake Gmail API, a
//! token with only the `gmail.send` scope) beside the SMTP transport
//! (XOAUTH2 over implicit TLS to the fake Gmail), the two taking turns
//! round by round in the same run; then a short run at the transport's
//! default pacing (`max_rate` 2.5 a second) against the fake's per-user
//! rate limit, to show the pacing holds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::client::{Conn, MessageTemplate};
use crate::report::{self, LoadRun, System};
use crate::upstream::{Arrivals, Sink};

use super::{Bench, conditions, load_rows, warm_up};

/// The transport's default `max_rate` (`AccountConfig::effective_max_rate`)
/// and the pacer's burst for it (the rate rounded up).
const DEFAULT_RATE: f64 = 2.5;
const DEFAULT_BURST: usize = 3;
/// Google's per-user limit, as the fake plays it: 15,000 quota units a
/// minute at 100 per send, a minute's worth at once.
const GOOGLE_LIMIT: (f64, f64) = (2.5, 150.0);

fn label(s: System) -> &'static str {
    match s {
        System::GmailApi => "gmail-api",
        _ => "smtp",
    }
}

impl Bench {
    pub(super) async fn api(&mut self) -> anyhow::Result<()> {
        let sizes = [
            ("1k", 1024, self.args.sessions_1k),
            ("1m", 1024 * 1024, self.args.sessions_1m),
        ];
        for (name, size, sessions) in sizes {
            self.api_throughput(name, size, sessions).await?;
        }
        if self.args.api_paced_messages > 0 {
            self.up.gmail_api.set_rate_limit(Some(GOOGLE_LIMIT));
            let r = self.api_paced(self.args.api_paced_messages).await;
            self.up.gmail_api.set_rate_limit(None);
            r?;
        }
        Ok(())
    }

    async fn api_throughput(
        &mut self,
        name: &str,
        size: usize,
        sessions: usize,
    ) -> anyhow::Result<()> {
        let tpl = MessageTemplate::new(size);
        let load = self.window_load(sessions);
        println!(
            "\n== api {name}: {size}-byte messages, {sessions} sessions, {:.0} s window, {} round(s); \
             smtp: XOAUTH2 over implicit TLS to the fake Gmail; gmail-api: users.messages.send over \
             HTTPS to the fake Gmail API, max_rate = {} (no pacing to speak of; the fake has no rate \
             limit); {}",
            self.args.duration,
            self.args.rounds,
            self.args.api_max_rate,
            conditions().await
        );
        let systems = [System::Oauthrelay, System::GmailApi];
        let runs = self
            .load_rounds(&format!("api{name}"), &tpl, &load, &systems, label)
            .await?;
        let api = &runs["gmail-api"];
        let smtp = &runs["smtp"];
        let rows = load_rows(api, Some(smtp));
        print!(
            "{}",
            report::table_of(
                &format!(
                    "api {name} summary: medians of {} run(s) per transport",
                    self.args.rounds
                ),
                &rows,
                "gmail-api",
                Some((
                    "smtp",
                    "vs smtp",
                    "(vs smtp: how many times better the Gmail API transport is; rates gmail-api/smtp, latency and memory smtp/gmail-api; below 1x: worse)"
                )),
            )
        );
        let lost: u64 = runs
            .values()
            .flatten()
            .map(|r: &LoadRun| r.acked_total.saturating_sub(r.delivered_total))
            .sum();
        let errors: u64 = runs.values().flatten().map(|r| r.errors).sum();
        if lost > 0 || errors > 0 {
            println!(
                "  NOT CLEAN: {lost} acknowledged message(s) not delivered, {errors} client error(s)"
            );
        }
        Ok(())
    }

    /// `n` 1 KB messages at once at the default `max_rate`, the fake
    /// answering `429` above Google's per-user rate.
    async fn api_paced(&mut self, n: usize) -> anyhow::Result<()> {
        println!(
            "\n== api paced: {n} 1 KB messages at once through the Gmail API at the default max_rate \
             ({DEFAULT_RATE} a second, burst {DEFAULT_BURST}), the fake enforcing Google's per-user \
             limit ({} a second, {} at once), {}",
            GOOGLE_LIMIT.0,
            GOOGLE_LIMIT.1,
            conditions().await
        );
        let (_inst, mut d) = self.fresh_api_daemon("apipaced", None).await?;
        let sink = Sink::Api(&self.up.gmail_api);
        warm_up(d.smtp(), sink, "apipacedw").await?;
        // The warm-up took a token: let the bucket fill up again.
        tokio::time::sleep(Duration::from_secs_f64(
            DEFAULT_BURST as f64 / DEFAULT_RATE + 0.5,
        ))
        .await;
        sink.clear();
        let base = sink.count();
        let limited0 = self.up.gmail_api.stats().rate_limited;
        let tpl = MessageTemplate::new(1024);
        let mut c = Conn::open(d.smtp()).await?;
        let t0 = Instant::now();
        let mut wanted = HashMap::with_capacity(n);
        for i in 0..n {
            let id = format!("<apipaced.{i}@bench.test>");
            let at = c.send(&tpl, &id, i as u64).await?;
            wanted.insert(id, at);
        }
        let submitted = t0.elapsed();
        let _ = c.quit().await;
        let limit = Duration::from_secs_f64(n as f64 / DEFAULT_RATE + 60.0);
        let arrivals = Arrivals::wait(sink, base, &wanted, limit).await;
        d.terminate().await?;
        let limited = self.up.gmail_api.stats().rate_limited - limited0;
        let mut times: Vec<Instant> = arrivals.accepted.values().map(|(_, a)| *a).collect();
        times.sort_unstable();
        let delivered = times.len();
        let span = match (times.first(), times.last()) {
            (Some(a), Some(b)) => b.duration_since(*a),
            _ => Duration::ZERO,
        };
        // After the burst, one token every 1 / rate seconds.
        let steady = (delivered > DEFAULT_BURST).then(|| {
            let after = times[delivered - 1].duration_since(times[DEFAULT_BURST - 1]);
            (delivered - DEFAULT_BURST) as f64 / after.as_secs_f64()
        });
        println!(
            "  the relay accepted all {n} in {:.2} s; {delivered} of {n} reached the fake Gmail API, \
             the first at {:.2} s, the last {:.2} s after the first",
            submitted.as_secs_f64(),
            times
                .first()
                .map(|f| f.saturating_duration_since(t0).as_secs_f64())
                .unwrap_or(f64::NAN),
            span.as_secs_f64(),
        );
        match steady {
            Some(rate) => println!(
                "  the first {DEFAULT_BURST} at once (the burst), then {rate:.2} a second (one every {:.0} ms); the fake's 429s: {limited}",
                1000.0 / rate
            ),
            None => println!("  too few delivered to measure a rate; the fake's 429s: {limited}"),
        }
        let held =
            delivered == n && limited == 0 && steady.is_some_and(|r| r <= DEFAULT_RATE * 1.05);
        println!(
            "  pacing {}",
            if held {
                "held: every message delivered, none above the rate, no 429"
            } else {
                "NOT HELD"
            }
        );
        Ok(())
    }
}
