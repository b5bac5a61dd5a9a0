//! What a sysadmin watches: the log (text, JSON, journal priorities), the
//! metrics (promtool on a live scrape, every series from the first scrape,
//! HELP texts equal to docs/operations.md), and the contrib files that use
//! them (the fail2ban filter on real log lines).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{BASE, BIN, Daemon, Smtp, config_in, have_tool, queued_id};

/// An account that is configured but not authorized: its series exist,
/// its mail is held. The token endpoint is never called (no token).
pub const UNAUTHORIZED: &str = "\n[[accounts]]\nname = \"default\"\nemail = \"me@example.com\"\nclient_id = \"id.apps.googleusercontent.com\"\nclient_secret = \"not-a-real-secret\"\ntoken_url = \"http://127.0.0.1:9/token\"\n";

/// `oauthrelay serve` with full control of its environment and stderr.
pub struct Served {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Served {
    /// Start `oauthrelay --config CONFIG ARGS... serve` with `env` added to
    /// a clean environment. With `journal`, stderr is a pipe named by
    /// `$JOURNAL_STREAM`, as systemd sets it up.
    pub fn start(config: &Path, args: &[&str], env: &[(&str, String)], journal: bool) -> Served {
        let (reader, writer) = std::io::pipe().unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(config)
            .args(args)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if journal {
            use std::os::fd::AsRawFd;
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::fstat(writer.as_raw_fd(), &mut st) }, 0);
            cmd.env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino));
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stderr(Stdio::from(writer));
        let child = cmd.spawn().expect("spawn oauthrelay");
        // Our copy of the write end is gone with `cmd`: EOF comes when the
        // daemon exits.
        drop(cmd);
        let lines = Arc::new(Mutex::new(Vec::new()));
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("E2E_ECHO").is_some() {
                        eprintln!("[daemon] {line}");
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Served {
            child: Some(child),
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The first line containing `needle`, waiting up to `limit`.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            let exited = self.child.as_mut().map(|c| c.try_wait().ok().flatten());
            if start.elapsed() > limit || matches!(exited, Some(Some(_))) {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "no log line with {needle:?} (exited: {exited:?}); logs:\n{}",
                    self.lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address after `marker` in the log (`SMTP listening on `...).
    pub fn addr(&mut self, marker: &str) -> SocketAddr {
        let line = self.wait_for(marker, Duration::from_secs(30));
        let rest = &line[line.find(marker).unwrap() + marker.len()..];
        let token: String = rest
            .chars()
            .take_while(|c| !c.is_whitespace() && !matches!(c, '"' | '/' | ','))
            .collect();
        token
            .parse()
            .unwrap_or_else(|_| panic!("no address in {line}"))
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Wait for the exit (bounded); the status.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                // Let the reader collect the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return s;
            }
            if start.elapsed() > limit {
                let _ = c.kill();
                panic!(
                    "oauthrelay did not exit within {limit:?}; logs:\n{}",
                    self.lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(30))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// GET `path` with these request headers: (status, headers, body).
pub async fn get(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// Run `promtool ARGS` with `stdin`; (success, output).
pub fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

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
        "oauthrelay_messages_delivered_total",
        "oauthrelay_messages_bounced_total",
        "oauthrelay_delivery_attempts_total{result=\"sent\"}",
        "oauthrelay_delivery_attempts_total{result=\"deferred\"}",
        "oauthrelay_delivery_attempts_total{result=\"failed\"}",
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

#[tokio::test]
async fn json_logs_parse_line_by_line_and_carry_queue_id_and_client() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(tmp.path(), &format!("{BASE}\n[log]\nformat = \"json\"\n"));
    let mut d = Served::start(&cfg, &[], &[], false);
    d.wait_for("\"message\":\"ready\"", Duration::from_secs(30));
    let smtp = d.addr("SMTP listening on ");
    let mut s = Smtp::open(smtp).await;
    s.cmd("EHLO json.test").await;
    let reply = s
        .mail(
            "a@example.com",
            &["b@example.com"],
            b"Subject: j\r\n\r\nx\r\n",
        )
        .await;
    let id = queued_id(&reply);
    s.cmd("QUIT").await;
    let out = crate::harness::run_cli(&cfg, &["queue", "delete", &id], None);
    assert!(out.status.success(), "{out:?}");
    d.wait_for("removed by queue delete", Duration::from_secs(10));
    d.wait_for("disconnect from", Duration::from_secs(10));
    assert!(d.stop().success());

    let events: Vec<serde_json::Value> = d
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for e in &events {
        assert!(
            e["timestamp"].is_string() && e["level"].is_string() && e["message"].is_string(),
            "{e}"
        );
    }
    let find = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        events
            .iter()
            .find(|e| pred(e))
            .cloned()
            .unwrap_or_else(|| panic!("no such event in {events:#?}"))
    };
    let queued = find(&|e| e["message"].as_str().unwrap().ends_with("(queued)"));
    assert_eq!(queued["queue_id"], id.as_str(), "{queued}");
    assert!(
        queued["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{queued}"
    );
    assert_eq!(queued["level"], "INFO");
    let connect = find(&|e| e["message"] == "connect from unknown[127.0.0.1]");
    assert_eq!(connect["client"], queued["client"]);
    let disconnect = find(&|e| {
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=1 quit=1")
    });
    assert_eq!(disconnect["client"], queued["client"]);
    let deleted = find(&|e| {
        e["message"]
            .as_str()
            .unwrap()
            .contains("removed by queue delete")
    });
    assert_eq!(deleted["queue_id"], id.as_str(), "{deleted}");

    // --log-format wins over the file.
    let mut d = Served::start(&cfg, &["--log-format", "text"], &[], false);
    let ready = d.wait_for(" ready", Duration::from_secs(30));
    assert!(!ready.starts_with('{'), "{ready}");
}

#[tokio::test]
async fn under_the_journal_every_line_carries_its_priority() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(tmp.path(), &format!("{BASE}{UNAUTHORIZED}"));
    let mut d = Served::start(&cfg, &[], &[], true);
    d.wait_for("ready", Duration::from_secs(30));
    let smtp = d.addr("SMTP listening on ");
    // A client that drops in the middle of DATA: a warning.
    let mut s = Smtp::open(smtp).await;
    s.cmd("EHLO journal.test").await;
    s.cmd("MAIL FROM:<a@example.com>").await;
    s.cmd("RCPT TO:<b@example.com>").await;
    assert!(s.cmd("DATA").await.starts_with("354"));
    s.send(b"Subject: cut\r\n\r\nhalf").await;
    drop(s);
    d.wait_for("lost connection after DATA", Duration::from_secs(10));
    assert!(d.stop().success());

    let lines = d.lines();
    let prio = |needle: &str| {
        let l = lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {lines:#?}"));
        l[1..2].parse::<u8>().unwrap()
    };
    assert_eq!(
        prio("account needs authorization"),
        3,
        "err: journalctl -p err shows it"
    );
    assert_eq!(prio("lost connection after DATA"), 4);
    assert_eq!(prio("connect from unknown[127.0.0.1]"), 6);
    assert_eq!(prio("ready"), 6);
    for l in &lines {
        let b = l.as_bytes();
        assert!(
            b.len() > 3 && b[0] == b'<' && b[1].is_ascii_digit() && b[2] == b'>',
            "every line has a priority: {l:?}"
        );
        assert!(
            !b[3].is_ascii_digit(),
            "no timestamp under the journal (it adds its own): {l:?}"
        );
    }

    // JOURNAL_STREAM naming another stream (a redirect in ExecStart=):
    // plain lines.
    let mut d = Served::start(&cfg, &[], &[("JOURNAL_STREAM", "1:1".to_string())], false);
    let ready = d.wait_for("ready", Duration::from_secs(30));
    assert!(!ready.starts_with('<'), "{ready}");
}

/// Run a daemon with `format` (`journal`: text under `$JOURNAL_STREAM`)
/// and one user, fail AUTH four times (once with a user name that carries
/// another address), succeed once; its log lines.
async fn auth_failures_logged(format: &str) -> Vec<String> {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().unwrap();
    let hash = crate::harness::run_cli(
        &config_in(tmp.path(), BASE),
        &["hash-password"],
        Some(b"right-password\n"),
    );
    let hash = String::from_utf8(hash.stdout).unwrap();
    let log_format = if format == "json" { "json" } else { "text" };
    let cfg = config_in(
        tmp.path(),
        &format!(
            "{BASE}\n[log]\nformat = \"{log_format}\"\n\n[[server.users]]\nname = \"printer\"\npassword_hash = \"{}\"\n",
            hash.trim()
        ),
    );
    let mut d = Served::start(&cfg, &[], &[], format == "journal");
    let smtp = d.addr("SMTP listening on ");
    let mut s = Smtp::open(smtp).await;
    s.cmd("EHLO attacker").await;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    for (user, pass) in [
        ("printer", "guess1"),
        ("printer", "guess2"),
        ("printer", "guess3"),
        // A user name that tries to get another address banned.
        ("x from unknown[203.0.113.9]", "nope"),
    ] {
        let r = s
            .cmd(&format!(
                "AUTH PLAIN {}",
                b64(format!("\0{user}\0{pass}").as_bytes())
            ))
            .await;
        assert!(r.starts_with("535"), "{r}");
    }
    let r = s
        .cmd(&format!("AUTH PLAIN {}", b64(b"\0printer\0right-password")))
        .await;
    assert!(r.starts_with("235"), "a good login is not a failure: {r}");
    s.cmd("QUIT").await;
    d.wait_for("disconnect from", Duration::from_secs(10));
    assert!(d.stop().success());
    d.lines()
}

#[tokio::test]
async fn the_fail2ban_filter_bans_on_the_daemons_own_auth_failures() {
    let mut runs = Vec::new();
    for format in ["text", "json", "journal"] {
        runs.push((format, auth_failures_logged(format).await));
    }
    if !have_tool("fail2ban-regex") {
        return;
    }
    // The filter includes fail2ban's common.conf from its own directory.
    let tmp = tempfile::tempdir().unwrap();
    let filter_d = tmp.path().join("filter.d");
    std::fs::create_dir(&filter_d).unwrap();
    std::fs::copy(
        "/etc/fail2ban/filter.d/common.conf",
        filter_d.join("common.conf"),
    )
    .unwrap();
    let filter = filter_d.join("oauthrelay.conf");
    std::fs::copy(repo("contrib/fail2ban/filter.d/oauthrelay.conf"), &filter).unwrap();
    for (format, lines) in runs {
        // A file gets the lines as written; the journal backend hands
        // fail2ban "HOST IDENT[PID]: MESSAGE", the priority prefix gone.
        let (lines, args): (Vec<String>, &[&str]) = if format == "journal" {
            let lines = lines
                .iter()
                .map(|l| format!("relay oauthrelay[4242]: {}", &l[3..]))
                .collect();
            (lines, &["-d", "{NONE}"])
        } else {
            (lines, &[])
        };
        let log = tmp.path().join(format!("{format}.log"));
        std::fs::write(&log, lines.join("\n") + "\n").unwrap();
        // `-o ip`: the address each match would ban, one per line.
        let out = Command::new("fail2ban-regex")
            .args(args)
            .args(["-o", "ip"])
            .arg(&log)
            .arg(&filter)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{format}: {text}");
        let banned: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(
            banned,
            ["127.0.0.1"; 4],
            "{format}: the four failures, each for the client's own address \
             (never the one in the user name); log:\n{}",
            lines.join("\n")
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
