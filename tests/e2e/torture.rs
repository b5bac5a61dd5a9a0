//! Crash torture (issue 5, item 2): while clients send continuously, the
//! daemon is SIGKILLed 20 times at random moments and restarted each time.
//! Some kills are aimed at upstream deliveries in flight (the fake Gmail
//! answers slowly), some at spool writes (a client streaming 1-5 MB
//! messages), the rest land wherever. At the end every message a client got
//! a `250` for must have reached the fake Gmail, byte-exact.
//!
//! The delays come from a seeded generator; the seed is printed and
//! `E2E_TORTURE_SEED=N` replays the same schedule (thread timing still
//! varies, so a replay aims at the same moments, not the same instants).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::gmail::{ReceivedMessage, TlsMode};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::fakes::{Upstream, prepended_fields, until};
use crate::harness::dot_stuff;

const KILLS: usize = 20;
/// Clients sending small messages (1-16 KB), and one sending large ones.
const SMALL_CLIENTS: u32 = 3;
const LARGE_CLIENT: u32 = SMALL_CLIENTS;
/// Upstream connections of the account: the most transactions one kill can
/// leave accepted by Gmail but not yet removed from the spool.
const CONCURRENCY: usize = 4;

/// xorshift64*: small, seeded, good enough for delays and message shapes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// What a client sent: enough to rebuild the exact bytes.
#[derive(Debug, Clone, Copy)]
struct Sent {
    client: u32,
    seq: u32,
    len: usize,
}

impl Sent {
    fn mid(&self) -> String {
        format!("<t{}-{}@e2e.test>", self.client, self.seq)
    }

    /// The message: headers with Date and Message-ID (so the relay adds only
    /// its `Received:`), then CRLF lines of varied length, some led by a dot,
    /// up to about `len` bytes. Deterministic in (client, seq, len).
    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "From: Torture <t{c}@example.com>\r\nTo: <r@example.org>\r\nSubject: torture {c}-{s}\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: {mid}\r\n\r\n",
            c = self.client,
            s = self.seq,
            mid = self.mid()
        )
        .into_bytes();
        out.reserve(self.len + 1000);
        let mut rng = Rng::new(
            (u64::from(self.client) << 40) ^ (u64::from(self.seq) << 8) ^ self.len as u64 ^ 0x9e37,
        );
        while out.len() < self.len {
            let n = rng.range(0, 990) as usize;
            let start = rng.next();
            if start.is_multiple_of(7) {
                out.push(b'.');
            }
            out.extend((0..n).map(|i| b'!' + ((start as usize + i) % 94) as u8));
            out.extend_from_slice(b"\r\n");
        }
        out
    }
}

/// Where the large client is in its current transaction.
const IDLE: u8 = 0;
const STREAMING: u8 = 1;
const AWAITING_250: u8 = 2;

struct Shared {
    /// The daemon's SMTP address (a new port after each restart).
    addr: watch::Receiver<SocketAddr>,
    stop: AtomicBool,
    /// Messages whose `250` the client read.
    acked: Mutex<Vec<Sent>>,
    /// Every message a client started to send (acknowledged or not).
    attempted: Mutex<HashMap<String, Sent>>,
    /// Replies other than `250` or a dropped connection: none expected.
    surprises: Mutex<Vec<String>>,
    large_phase: AtomicU8,
    /// Bytes of the current large message written so far, and its size.
    large_sent: AtomicUsize,
    large_len: AtomicUsize,
}

#[derive(Debug)]
enum Broken {
    /// The connection went away (the kill): not a failure.
    Closed,
    /// The daemon said something it should not have.
    Reply(String),
}

struct Conn {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Conn, Broken> {
        let s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .map_err(|_| Broken::Closed)?
            .map_err(|_| Broken::Closed)?;
        let (r, w) = s.into_split();
        let mut c = Conn {
            r: BufReader::new(r),
            w,
        };
        let greeting = c.expect("220").await?;
        if !greeting.ends_with(" ESMTP oauthrelay") {
            // Some other server took the port of a daemon killed since.
            return Err(Broken::Reply(format!("not our daemon: {greeting}")));
        }
        c.send(b"EHLO torture.test\r\n").await?;
        c.expect("250").await?;
        Ok(c)
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), Broken> {
        self.w.write_all(bytes).await.map_err(|_| Broken::Closed)
    }

    async fn reply(&mut self) -> Result<String, Broken> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(60), self.r.read_line(&mut line))
                .await
                .map_err(|_| Broken::Reply(format!("no reply within 60 s after {all:?}")))?
                .map_err(|_| Broken::Closed)?;
            if n == 0 {
                return Err(Broken::Closed);
            }
            all.push_str(line.trim_end());
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(all);
            }
            all.push('\n');
        }
    }

    async fn expect(&mut self, code: &str) -> Result<String, Broken> {
        let r = self.reply().await?;
        if r.starts_with(code) {
            Ok(r)
        } else {
            Err(Broken::Reply(r))
        }
    }
}

/// One transaction; `Ok` only when the final reply was `250`.
async fn transaction(c: &mut Conn, sh: &Shared, m: Sent, large: bool) -> Result<(), Broken> {
    let data = dot_stuff(&m.bytes());
    sh.attempted.lock().unwrap().insert(m.mid(), m);
    // Pipelined envelope, as most clients do it.
    c.send(b"MAIL FROM:<torture@example.com>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n")
        .await?;
    c.expect("250").await?;
    c.expect("250").await?;
    c.expect("354").await?;
    if large {
        sh.large_len.store(data.len(), Ordering::Relaxed);
        sh.large_sent.store(0, Ordering::Relaxed);
        sh.large_phase.store(STREAMING, Ordering::Relaxed);
    }
    for piece in data.chunks(64 << 10) {
        c.send(piece).await?;
        if large {
            sh.large_sent.fetch_add(piece.len(), Ordering::Relaxed);
        }
    }
    c.send(b".\r\n").await?;
    if large {
        sh.large_phase.store(AWAITING_250, Ordering::Relaxed);
    }
    let r = c.expect("250 2.0.0").await;
    if large {
        sh.large_phase.store(IDLE, Ordering::Relaxed);
    }
    r?;
    sh.acked.lock().unwrap().push(m);
    Ok(())
}

/// Send until told to stop, reconnecting after every kill.
async fn client(sh: Arc<Shared>, id: u32, seed: u64) {
    let large = id == LARGE_CLIENT;
    let mut rng = Rng::new(seed);
    let mut seq = 0u32;
    let mut conn: Option<Conn> = None;
    while !sh.stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                let addr = *sh.addr.borrow();
                match Conn::open(addr).await {
                    Ok(c) => conn.insert(c),
                    Err(Broken::Closed) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    // Each restart listens on a new port: the old one,
                    // free after the kill, may meanwhile belong to a server
                    // of another test running in parallel. Silence from an
                    // address that is no longer the daemon's is not ours.
                    Err(Broken::Reply(_)) if *sh.addr.borrow() != addr => continue,
                    Err(Broken::Reply(r)) => {
                        sh.surprises
                            .lock()
                            .unwrap()
                            .push(format!("client {id}: {r}"));
                        conn = None;
                        continue;
                    }
                }
            }
        };
        seq += 1;
        let len = if large {
            rng.range(1 << 20, 5 << 20) as usize
        } else {
            rng.range(1000, 16_000) as usize
        };
        let m = Sent {
            client: id,
            seq,
            len,
        };
        match transaction(c, &sh, m, large).await {
            Ok(()) => {}
            Err(Broken::Closed) => conn = None,
            Err(Broken::Reply(r)) => {
                sh.surprises
                    .lock()
                    .unwrap()
                    .push(format!("client {id}, {}: {r}", m.mid()));
                conn = None;
            }
        }
        if large {
            sh.large_phase.store(IDLE, Ordering::Relaxed);
        } else {
            // Modest pace: the machine is shared.
            tokio::time::sleep(Duration::from_millis(rng.range(0, 15))).await;
        }
    }
}

/// Log lines that would mean the spool found real damage (not a torn tail).
const CORRUPTION: [&str; 4] = [
    "moved aside",
    "moved to corrupt",
    "undecodable",
    "missing or damaged parts",
];

#[derive(Default)]
struct LogFindings {
    torn_tails: usize,
    corruption: Vec<String>,
    errors: Vec<String>,
}

impl LogFindings {
    fn scan(&mut self, logs: &str) {
        for l in logs.lines() {
            if l.contains("dropping an unacknowledged partial write") {
                self.torn_tails += 1;
            }
            if CORRUPTION.iter().any(|c| l.contains(c)) {
                self.corruption.push(l.to_string());
            }
            if l.contains("ERROR") {
                self.errors.push(l.to_string());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_under_load_lose_no_acknowledged_message() {
    let started = Instant::now();
    let seed: u64 = match std::env::var("E2E_TORTURE_SEED") {
        Ok(s) => s.parse().expect("E2E_TORTURE_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!("torture: seed={seed} (replay with E2E_TORTURE_SEED={seed})");
    let mut rng = Rng::new(seed);

    let up = Upstream::start(TlsMode::Implicit).await;
    // Slow replies: deliveries are in flight most of the time.
    up.gmail.set_reply_delay(Duration::from_millis(40));
    let mut d = up.relay(&format!("concurrency = {CONCURRENCY}\n"));
    let (addr_tx, addr_rx) = watch::channel(d.smtp);
    let sh = Arc::new(Shared {
        addr: addr_rx,
        stop: AtomicBool::new(false),
        acked: Mutex::new(Vec::new()),
        attempted: Mutex::new(HashMap::new()),
        surprises: Mutex::new(Vec::new()),
        large_phase: AtomicU8::new(IDLE),
        large_sent: AtomicUsize::new(0),
        large_len: AtomicUsize::new(0),
    });
    let clients: Vec<_> = (0..=LARGE_CLIENT)
        .map(|id| tokio::spawn(client(sh.clone(), id, rng.next())))
        .collect();

    // Transactions the fake saw start but never finish: those cut by
    // earlier kills. Anything above that is in flight now.
    let mut aborted = 0u64;
    let in_flight = |aborted: u64| {
        let s = up.gmail.stats();
        (s.mail_commands - s.messages - s.dropped_after_data).saturating_sub(aborted)
    };
    let mut findings = LogFindings::default();
    let (mut during_delivery, mut during_stream, mut during_commit) = (0, 0, 0);
    let mut schedule = Vec::new();
    for k in 0..KILLS {
        let delay = rng.range(150, 1200);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        // Aim: a third of the kills at deliveries, a third at large
        // messages being streamed into the spool (or committed), a third
        // wherever the delay fell. Each waits a bounded time for its moment.
        let aim = match k % 3 {
            0 => "delivery",
            1 => "spool write",
            _ => "anywhere",
        };
        let fraction = rng.range(5, 110) as usize;
        let deadline = Instant::now() + Duration::from_secs(6);
        while Instant::now() < deadline {
            let ready = match aim {
                "delivery" => in_flight(aborted) > 0,
                "spool write" => match sh.large_phase.load(Ordering::Relaxed) {
                    // Past 100%: the final dot is sent and the commit runs.
                    AWAITING_250 => fraction >= 100,
                    STREAMING => {
                        fraction < 100
                            && sh.large_sent.load(Ordering::Relaxed) * 100
                                >= sh.large_len.load(Ordering::Relaxed) * fraction
                    }
                    _ => false,
                },
                _ => true,
            };
            if ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let flying = in_flight(aborted);
        let phase = sh.large_phase.load(Ordering::Relaxed);
        d.kill9();
        // A reply the fake was holding back may still go out (into a closed
        // socket): the counters settle once the fake has seen every
        // connection of the killed daemon end.
        assert!(
            up.gmail
                .wait_for_stats(crate::fakes::T, |s| s.closed == s.connections)
                .await,
            "the fake still has connections from a killed daemon: {:?}",
            up.gmail.stats()
        );
        aborted = {
            let s = up.gmail.stats();
            s.mail_commands - s.messages - s.dropped_after_data
        };
        during_delivery += usize::from(flying > 0);
        during_stream += usize::from(phase == STREAMING);
        during_commit += usize::from(phase == AWAITING_250);
        schedule.push(format!(
            "kill {k}: +{delay}ms aim={aim} deliveries_in_flight={flying} large={}",
            match phase {
                STREAMING => format!(
                    "streaming {}%",
                    sh.large_sent.load(Ordering::Relaxed) * 100
                        / sh.large_len.load(Ordering::Relaxed).max(1)
                ),
                AWAITING_250 => "awaiting 250".into(),
                _ => "idle".into(),
            }
        ));
        findings.scan(&d.logs());
        d = d.restart();
        addr_tx.send(d.smtp).unwrap();
    }
    let kill_phase = started.elapsed();
    // Let the clients see the last daemon, then stop them.
    let acked_at_last_kill = sh.acked.lock().unwrap().len();
    until(
        "a message acknowledged by the last daemon",
        Duration::from_secs(30),
        async || {
            let n = sh.acked.lock().unwrap().len();
            if n > acked_at_last_kill {
                Ok(())
            } else {
                Err(format!("{n} acked"))
            }
        },
    )
    .await;
    sh.stop.store(true, Ordering::Relaxed);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .expect("clients stop")
            .unwrap();
    }
    for line in &schedule {
        eprintln!("torture: {line}");
    }

    // Upstream healthy: everything queued must drain.
    up.gmail.set_reply_delay(Duration::ZERO);
    until("the queue to empty", Duration::from_secs(120), async || {
        let out = d.cli(&["queue", "list", "--json"], None);
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && text == "[]" {
            Ok(())
        } else {
            Err(format!("{} bytes of queue listing", text.len()))
        }
    })
    .await;
    findings.scan(&d.logs());
    let surprises = sh.surprises.lock().unwrap().clone();
    assert!(surprises.is_empty(), "unexpected replies: {surprises:#?}");

    let acked = sh.acked.lock().unwrap().clone();
    let attempted = sh.attempted.lock().unwrap().clone();
    let msgs = up.gmail.messages();
    let mut copies: HashMap<&str, Vec<&ReceivedMessage>> = HashMap::new();
    for m in &msgs {
        let mid = m.message_id.as_deref().unwrap_or("<none>");
        copies.entry(mid).or_default().push(m);
    }
    // Whatever arrived is something a client sent, byte for byte, with only
    // our Received: in front: acknowledged or not, a committed message is
    // whole.
    for (mid, got) in &copies {
        let sent = attempted
            .get(*mid)
            .unwrap_or_else(|| panic!("the fake received {mid}, which no client sent"));
        let original = sent.bytes();
        for m in got {
            assert_eq!(
                prepended_fields(&m.data, &original),
                ["Received"],
                "{mid}: only our trace header in front of the client's bytes"
            );
            assert_eq!(m.rcpt_to, ["r@example.org"], "{mid}");
        }
    }
    let lost: Vec<String> = acked
        .iter()
        .map(Sent::mid)
        .filter(|mid| !copies.contains_key(mid.as_str()))
        .collect();
    let acked_ids: HashSet<String> = acked.iter().map(Sent::mid).collect();
    assert_eq!(acked_ids.len(), acked.len(), "Message-IDs are unique");
    let duplicates: usize = copies.values().map(|c| c.len() - 1).sum();
    let max_copies = copies.values().map(Vec::len).max().unwrap_or(0);
    let unacked_delivered = copies
        .keys()
        .filter(|mid| !acked_ids.contains(**mid))
        .count();
    let large_acked = acked.iter().filter(|s| s.client == LARGE_CLIENT).count();
    let elapsed = started.elapsed();
    eprintln!(
        "torture: acked={} delivered={} lost={} duplicates={duplicates} kills={KILLS}",
        acked.len(),
        acked.len() - lost.len(),
        lost.len()
    );
    eprintln!(
        "torture: {} upstream copies, most copies of one message {max_copies}, {unacked_delivered} delivered without a 250 reaching the client, {large_acked} large messages acked; kills during delivery {during_delivery}, while streaming a large message {during_stream}, while awaiting its 250 {during_commit}; torn tails dropped at recovery {}; {} ERROR log lines; kills took {kill_phase:.1?}, all {elapsed:.1?}",
        msgs.len(),
        findings.torn_tails,
        findings.errors.len()
    );
    for e in findings.errors.iter().take(10) {
        eprintln!("torture: logged: {e}");
    }
    assert!(
        lost.is_empty(),
        "acknowledged but never delivered: {lost:?}"
    );
    assert!(
        findings.corruption.is_empty(),
        "recovery after a plain kill found damage beyond a torn tail:\n{}",
        findings.corruption.join("\n")
    );
    let aside = d.dir.join("spool").join("corrupt");
    let aside_files = std::fs::read_dir(&aside).map(|r| r.count()).unwrap_or(0);
    assert_eq!(aside_files, 0, "files in {}", aside.display());
    // One kill can catch at most one transaction per upstream connection
    // between Gmail's 250 and the durable removal.
    assert!(
        duplicates <= KILLS * CONCURRENCY,
        "duplicates {duplicates} > {KILLS} kills x {CONCURRENCY} connections"
    );
    // The kills really landed where they were aimed.
    assert!(
        during_delivery >= KILLS / 4,
        "only {during_delivery} kills during a delivery"
    );
    assert!(
        during_stream + during_commit >= KILLS / 4,
        "only {} kills during a large spool write",
        during_stream + during_commit
    );
    assert!(
        acked.len() >= 100 && large_acked >= 3,
        "too little traffic to mean anything: {} acked, {large_acked} large",
        acked.len()
    );
}
