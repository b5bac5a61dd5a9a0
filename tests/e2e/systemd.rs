//! oauthrelay as systemd runs it: readiness, the reload handshake of
//! `Type=notify-reload`, the watchdog (and that it stops when the spool
//! writer hangs), exit 78 on configuration errors, socket activation, and
//! the unit files themselves.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{BASE, BIN, Smtp, config_in, have_tool, run_cli};
use crate::served::Served;

/// A fake `$NOTIFY_SOCKET`: what the daemon tells systemd.
struct Notify {
    sock: UnixDatagram,
    path: std::path::PathBuf,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Notify { sock, path }
    }

    fn env(&self) -> (&'static str, String) {
        ("NOTIFY_SOCKET", self.path.display().to_string())
    }

    /// The next message within `limit`.
    fn recv(&self, limit: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Messages until one contains `needle` (panics after `limit`).
    fn until(&self, needle: &str, limit: Duration) -> String {
        let start = Instant::now();
        while let Some(left) = limit.checked_sub(start.elapsed()) {
            if let Some(m) = self.recv(left)
                && m.contains(needle)
            {
                return m;
            }
        }
        panic!("no {needle:?} from the daemon within {limit:?}");
    }

    /// How many `WATCHDOG=1` arrive during `span`.
    fn pings_during(&self, span: Duration) -> usize {
        let end = Instant::now() + span;
        let mut n = 0;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if left.is_zero() {
                break;
            }
            match self.recv(left) {
                Some(m) if m.lines().any(|l| l == "WATCHDOG=1") => n += 1,
                Some(_) => {}
                None => break,
            }
        }
        n
    }
}

fn monotonic_usec() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

#[test]
fn ready_then_reload_with_monotonic_usec_as_notify_reload_wants() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(tmp.path(), BASE);
    let notify = Notify::bind(tmp.path());
    let mut d = Served::start(&cfg, &[], &[notify.env()], false);
    let ready = notify.until("READY=1", Duration::from_secs(30));
    assert!(ready.contains("STATUS="), "{ready}");
    d.wait_for("ready", Duration::from_secs(5));

    let before = monotonic_usec();
    d.signal(libc::SIGHUP);
    let reloading = notify.until("RELOADING=1", Duration::from_secs(10));
    let after = monotonic_usec();
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("MONOTONIC_USEC in the same message: {reloading:?}"))
        .parse()
        .unwrap();
    assert!(
        (before..=after).contains(&usec),
        "{before} <= {usec} <= {after}"
    );
    notify.until("READY=1", Duration::from_secs(10));
    d.wait_for("configuration reloaded", Duration::from_secs(5));
    assert!(d.stop().success());
}

/// The daemon's thread named `name` (its `comm`).
fn thread_of(pid: u32, name: &str) -> Option<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(Result::ok)
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .and_then(|t| t.file_name().to_str()?.parse().ok())
}

/// One thread of another process held still, as if it hung in the kernel
/// (a write to a dying disk): ptrace stops that thread alone.
struct Frozen(i32);

impl Frozen {
    fn thread(tid: i32) -> Option<Frozen> {
        unsafe {
            if libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) != 0 {
                return None;
            }
            if libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) != 0 {
                libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0);
                return None;
            }
            let mut status = 0;
            if libc::waitpid(tid, &mut status, libc::__WALL) != tid {
                libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0);
                return None;
            }
        }
        Some(Frozen(tid))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
    }
}

#[test]
fn the_watchdog_stops_pinging_while_the_spool_writer_is_stuck() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(tmp.path(), BASE);
    let notify = Notify::bind(tmp.path());
    // A 400 ms watchdog: a ping every 200 ms while all is well.
    let mut d = Served::start(
        &cfg,
        &[],
        &[notify.env(), ("WATCHDOG_USEC", "400000".into())],
        false,
    );
    notify.until("READY=1", Duration::from_secs(30));
    d.wait_for("systemd watchdog: 400ms", Duration::from_secs(5));
    let healthy = notify.pings_during(Duration::from_secs(2));
    assert!(healthy >= 3, "{healthy} pings in 2 s while healthy");

    let tid = thread_of(d.pid(), "spool-writer").expect("the spool writer thread");
    let Some(frozen) = Frozen::thread(tid) else {
        let msg = "SKIPPED: ptrace is not permitted here, cannot hold the spool writer";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{msg}; CI must run this test");
        }
        eprintln!("\n!!!! {msg} !!!!\n");
        return;
    };
    // A ping already on its way may still arrive; then silence.
    notify.pings_during(Duration::from_millis(500));
    let stuck = notify.pings_during(Duration::from_millis(1500));
    assert_eq!(stuck, 0, "pings while the spool writer is stuck");
    let line = d.wait_for("watchdog: the spool writer", Duration::from_secs(5));
    assert!(
        line.contains("ERROR") && line.contains("not pinging systemd"),
        "{line}"
    );
    // The rest of the daemon still answers: it is the writer alone.
    assert_eq!(thread_of(d.pid(), "spool-writer"), Some(tid));

    drop(frozen);
    notify.until("WATCHDOG=1", Duration::from_secs(5));
    d.wait_for("every part answers again", Duration::from_secs(5));
    assert!(d.stop().success());
}

#[test]
fn no_watchdog_pings_unless_systemd_asks() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(tmp.path(), BASE);
    let notify = Notify::bind(tmp.path());
    // WATCHDOG_PID names another process: not ours to ping for.
    let mut d = Served::start(
        &cfg,
        &[],
        &[
            notify.env(),
            ("WATCHDOG_USEC", "200000".into()),
            ("WATCHDOG_PID", "1".into()),
        ],
        false,
    );
    notify.until("READY=1", Duration::from_secs(30));
    assert_eq!(notify.pings_during(Duration::from_secs(1)), 0);
    assert!(d.stop().success());
}

#[test]
fn configuration_errors_exit_78_so_systemd_does_not_restart_in_a_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("open.secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    for (what, body) in [
        (
            "an unknown key",
            format!("{BASE}\n[delivery]\nconcurency = 4\n"),
        ),
        (
            "a bad value",
            "[server]\nlisten = [\"127.0.0.1:0\"]\nmax_message_size = \"lots\"\n".to_string(),
        ),
        (
            "a missing certificate",
            format!(
                "{BASE}\n[server.tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n"
            ),
        ),
        (
            "a secret file others can read",
            format!(
                "{BASE}\n[[accounts]]\nname = \"default\"\nemail = \"me@example.com\"\nclient_id = \"id\"\nclient_secret_file = \"{}\"\n",
                secret.display()
            ),
        ),
        (
            "an address not on this host",
            "[server]\nlisten = [\"192.0.2.1:2525\"]\n[metrics]\nlisten = \"\"\n".to_string(),
        ),
    ] {
        let cfg = config_in(tmp.path(), &body);
        let mut d = Served::start(&cfg, &[], &[], true);
        let status = d.wait(Duration::from_secs(30));
        let log = d.lines().join("\n");
        assert_eq!(status.code(), Some(78), "{what}: {log}");
        assert!(
            log.lines().any(|l| l.starts_with("<3>")),
            "{what}: logged as an error for the journal: {log}"
        );
    }
    // The validator keeps its documented 0/1.
    let cfg = config_in(tmp.path(), &format!("{BASE}\n[delivery]\nconcurency = 4\n"));
    assert_eq!(
        run_cli(&cfg, &["check-config"], None).status.code(),
        Some(1)
    );
}

/// A port free right now on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn socket_activation_serves_on_the_socket_systemd_passes() {
    if !have_tool("systemd-socket-activate") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The configured address is not used when systemd passes a socket.
    let cfg = config_in(tmp.path(), BASE);
    let log = tmp.path().join("daemon.log");
    let port = free_port();
    let mut activator = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{port}"), "--fdname=smtp"])
        .args(["-E", "RUST_LOG=info", "-E", "PATH=/usr/bin:/bin"])
        .arg("sh")
        .arg("-c")
        .arg("exec \"$0\" --config \"$1\" serve 2>\"$2\"")
        .arg(BIN)
        .arg(&cfg)
        .arg(&log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the activator listens, then connect: that starts the
    // daemon, which greets on the passed socket.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let start = Instant::now();
    let mut s = loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break Smtp::open(addr).await;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "activator never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let r = s.cmd("EHLO activated").await;
    assert!(r.starts_with("250"), "{r}");
    s.cmd("QUIT").await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("socket activation") && text.contains(&format!("SMTP listening on {addr}")),
        "{text}"
    );
    // The activator execs the daemon in a child: stop that, then it.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", activator.id()))
        .unwrap_or_default();
    for pid in children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let _ = activator.kill();
    let _ = activator.wait();
}

/// The unit files as systemd reads them (`systemd-analyze verify`), with
/// ExecStart= pointing at the binary under test. On systemd older than
/// 253, which lacks `Type=notify-reload`, the override the unit's comment
/// gives for it is applied, as a user there would.
#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    if !have_tool("systemd-analyze") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../systemd");
    let service = std::fs::read_to_string(root.join("oauthrelay.service")).unwrap();
    let socket = std::fs::read_to_string(root.join("oauthrelay.socket")).unwrap();
    for needed in [
        "Type=notify-reload",
        "WatchdogSec=",
        "RestartPreventExitStatus=78",
        "Documentation=man:oauthrelay(8)",
    ] {
        assert!(service.contains(needed), "the unit lacks {needed}");
    }
    assert!(
        !service.lines().any(|l| l.starts_with("ExecReload=")),
        "notify-reload sends SIGHUP itself"
    );
    let version: u32 = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let mut service = service.replace("/usr/local/bin/oauthrelay", BIN);
    if version < 253 {
        assert!(
            service.contains("#   Type=notify\n#   ExecReload=/bin/kill -HUP $MAINPID"),
            "the unit explains the override for systemd < 253"
        );
        service = service.replace(
            "\nType=notify-reload\n",
            "\nType=notify\nExecReload=/bin/kill -HUP $MAINPID\n",
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("oauthrelay.service"), service).unwrap();
    std::fs::write(tmp.path().join("oauthrelay.socket"), socket).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(tmp.path().join("oauthrelay.service"))
        .arg(tmp.path().join("oauthrelay.socket"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd {version}: {text}"
    );
}
