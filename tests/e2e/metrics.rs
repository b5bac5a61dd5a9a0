//! The metrics as Prometheus and promtool see them: the format by
//! `Accept`, promtool on a live scrape, every series from the first
//! scrape, HELP texts equal to docs/operations.md, and the alert rules and
//! dashboard in contrib/ (their unit tests, their queries).

use std::process::Command;

use crate::harness::{BASE, Daemon, have_tool};
use crate::served::{UNAUTHORIZED, get, promtool, repo};

#[tokio::test]
async fn promtool_accepts_a_live_scrape_and_prometheus_gets_openmetrics() {
    let d = Daemon::start(&format!("{BASE}{UNAUTHORIZED}"));
    let addr = d.metrics.expect("metrics listener");

    // No preference (curl, promtool users): the text format 0.0.4.
    let (status, head, text) = get(addr, "/metrics", "").await;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    assert!(
        text.contains("# HELP oauthrelay_messages_received_total ") && !text.contains("# EOF"),
        "{text}"
    );
    // What Prometheus sends: OpenMetrics.
    let (status, head, om) = get(
        addr,
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(
        om.ends_with("# EOF\n") && om.contains("# TYPE oauthrelay_messages_received counter"),
        "{om}"
    );
    // Asked for the text format explicitly.
    let (_, head, _) = get(addr, "/metrics", "Accept: text/plain;version=0.0.4\r\n").await;
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");

    if have_tool("promtool") {
        let (ok, out) = promtool(&["check", "metrics"], &text);
        assert!(
            ok && out.trim().is_empty(),
            "promtool check metrics:\n{out}\n{text}"
        );
    }
}

/// `name{labels} value` lines of a text-format scrape.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn every_counter_and_label_known_at_start_is_there_at_zero() {
    let d = Daemon::start(&format!("{BASE}{UNAUTHORIZED}"));
    let (_, _, text) = get(d.metrics.unwrap(), "/metrics", "").await;
    let samples = samples(&text);
    let value = |series: &str| {
        samples
            .iter()
            .find(|(n, _)| n == series)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {series} in the first scrape:\n{text}"))
    };
    for series in [
        "oauthrelay_messages_received_total",
        "oauthrelay_messages_received_bytes_total",
        "oauthrelay_smtp_connections_accepted_total",
        "oauthrelay_smtp_connections_refused_total{reason=\"limit\"}",
        "oauthrelay_smtp_connections_refused_total{reason=\"network\"}",
        "oauthrelay_smtp_auth_failures_total",
        "oauthrelay_messages_rejected_total{reason=\"size\"}",
        "oauthrelay_messages_rejected_total{reason=\"relay\"}",
        "oauthrelay_messages_rejected_total{reason=\"sender\"}",
        "oauthrelay_messages_rejected_total{reason=\"recipients\"}",
        "oauthrelay_messages_rejected_total{reason=\"storage\"}",
        "oauthrelay_messages_delivered_total{account=\"default\"}",
        "oauthrelay_messages_bounced_total{account=\"default\"}",
        "oauthrelay_messages_failed_total{account=\"default\"}",
        "oauthrelay_delivery_attempts_total{account=\"default\",result=\"sent\"}",
        "oauthrelay_delivery_attempts_total{account=\"default\",result=\"deferred\"}",
        "oauthrelay_delivery_attempts_total{account=\"default\",result=\"failed\"}",
        "oauthrelay_delivery_duration_seconds_count",
        "oauthrelay_token_refreshes_total{account=\"default\",result=\"ok\"}",
        "oauthrelay_token_refreshes_total{account=\"default\",result=\"error\"}",
        "oauthrelay_account_authorized{account=\"default\"}",
        "oauthrelay_account_paused{account=\"default\",reason=\"daily_limit\"}",
        "oauthrelay_account_paused{account=\"default\",reason=\"login_throttled\"}",
        "oauthrelay_account_paused{account=\"default\",reason=\"unreachable\"}",
        "oauthrelay_queue_messages",
        "oauthrelay_smtp_sessions",
    ] {
        assert_eq!(value(series), 0.0, "{series}");
    }
    // Every counter of ours starts at zero; none is missing a series.
    for l in text.lines() {
        if let Some(name) = l
            .strip_prefix("# TYPE ")
            .and_then(|t| t.strip_suffix(" counter"))
            && name.starts_with("oauthrelay_")
        {
            let series: Vec<_> = samples
                .iter()
                .filter(|(n, _)| n == name || n.starts_with(&format!("{name}{{")))
                .collect();
            assert!(!series.is_empty(), "{name} has no series:\n{text}");
            assert!(
                series.iter().all(|(_, v)| *v == 0.0),
                "{name} is not 0 at start: {series:?}"
            );
        }
    }
    // Not authorized: its mail is held (a human must act).
    assert_eq!(value("oauthrelay_account_held{account=\"default\"}"), 1.0);
    assert_eq!(value("oauthrelay_spool_accepting"), 1.0);
    // Present (its value is this machine's free disk space).
    assert!(value("oauthrelay_spool_free_bytes") >= 0.0);
    assert_eq!(
        value("oauthrelay_spool_reserve_bytes"),
        (64u64 << 20) as f64
    );
    assert!(value("process_cpu_seconds_total") > 0.0);
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_open_fds") > 5.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = value("process_start_time_seconds");
    assert!(
        started <= now && started > now - 120.0,
        "{started} vs {now}"
    );
    assert_eq!(
        value(&format!(
            "oauthrelay_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
}

/// The metrics table of docs/operations.md: (name, HELP) per row.
fn documented_metrics() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(repo("docs/operations.md")).unwrap();
    let start = doc.find("## Metrics").expect("a Metrics section");
    doc[start..]
        .lines()
        .skip_while(|l| !l.starts_with("| metric"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
            let name = cells[0].trim_matches('`');
            let name = name.split('{').next().unwrap().to_string();
            (name, cells.last().unwrap().to_string())
        })
        .collect()
}

#[tokio::test]
async fn help_texts_are_the_table_in_the_docs() {
    let d = Daemon::start(&format!("{BASE}{UNAUTHORIZED}"));
    let (_, _, text) = get(d.metrics.unwrap(), "/metrics", "").await;
    let exported: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .map(|l| {
            let (name, help) = l.split_once(' ').unwrap();
            (name.to_string(), help.to_string())
        })
        .collect();
    let documented = documented_metrics();
    assert!(documented.len() >= 20, "{documented:?}");
    for (name, help) in &exported {
        let doc = documented
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is not in docs/operations.md's metrics table"));
        assert_eq!(
            &doc.1, help,
            "HELP of {name} differs from docs/operations.md"
        );
    }
    for (name, _) in &documented {
        assert!(
            exported.iter().any(|(n, _)| n == name),
            "docs/operations.md lists {name}, which /metrics does not export"
        );
    }
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    if !have_tool("promtool") {
        return;
    }
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(repo("contrib/prometheus/alerts.test.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Metric names in a PromQL expression (ours and the process ones).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("oauthrelay_") || word.starts_with("process_") {
                names.push(std::mem::take(&mut word));
            }
            word.clear();
        }
    }
    names
}

/// Every query of the dashboard and every alert parses (promtool checks
/// them as recording rules) and names only metrics a live relay exports.
#[tokio::test]
async fn the_dashboard_and_the_alerts_use_only_exported_metrics() {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("contrib/grafana/oauthrelay.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "oauthrelay");
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    let rules = std::fs::read_to_string(repo("contrib/prometheus/alerts.yml")).unwrap();
    let mut alert_exprs = 0;
    let mut lines = rules.lines().peekable();
    while let Some(l) = lines.next() {
        let Some(rest) = l.trim().strip_prefix("expr:") else {
            continue;
        };
        alert_exprs += 1;
        let mut e = rest.trim().trim_start_matches(">-").trim().to_string();
        while let Some(next) = lines.peek() {
            if next.trim().is_empty()
                || next.trim_start().contains(": ")
                || next.trim().ends_with(':')
            {
                break;
            }
            e.push(' ');
            e.push_str(next.trim());
            lines.next();
        }
        exprs.push(e);
    }
    assert!(alert_exprs >= 7, "{alert_exprs} alert expressions");
    assert!(exprs.len() > 20, "{exprs:?}");

    let d = Daemon::start(&format!("{BASE}{UNAUTHORIZED}"));
    let (_, _, text) = get(d.metrics.unwrap(), "/metrics", "").await;
    for e in &exprs {
        for name in metric_names(e) {
            assert!(
                text.lines()
                    .any(|l| !l.starts_with('#') && l.starts_with(&name)),
                "{name} (in `{e}`) is not exported"
            );
        }
    }
    if !have_tool("promtool") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".+")
            .replace("$job", ".+");
        file.push_str(&format!(
            "      - record: check:expr_{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let path = tmp.path().join("exprs.yml");
    std::fs::write(&path, &file).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}\n{file}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
