//! The load generator: a minimal SMTP client (no pipelining, lockstep like
//! Postfix's `smtp-source`) and N concurrent sessions sending messages of
//! one size, each with a unique Message-ID.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Every reply must come within this (a relay that stalls fails the run
/// instead of hanging it).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

pub const SENDER: &str = "sender@example.com";
pub const RECIPIENT: &str = "rcpt@example.org";

#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("connection closed by the server")]
    Closed,
    #[error("{stage}: expected {expected}, got {reply:?}")]
    Unexpected {
        stage: &'static str,
        expected: &'static str,
        reply: String,
    },
}

/// Message bytes: a per-message header section and a shared body.
#[derive(Clone)]
pub struct MessageTemplate {
    body: Arc<Vec<u8>>,
}

impl MessageTemplate {
    /// Messages of about `size` bytes in total (headers included), lines of
    /// 78 characters, none starting with a dot (no stuffing needed).
    pub fn new(size: usize) -> MessageTemplate {
        let head = header("<x>", 0).len();
        let want = size.saturating_sub(head).max(2);
        let line: Vec<u8> = (0..76u8).map(|i| b'a' + i % 26).collect();
        let mut body = Vec::with_capacity(want + 80);
        while body.len() + 78 <= want {
            body.extend_from_slice(&line);
            body.extend_from_slice(b"\r\n");
        }
        let rest = want - body.len();
        if rest >= 2 {
            body.extend_from_slice(&line[..rest - 2]);
            body.extend_from_slice(b"\r\n");
        }
        MessageTemplate {
            body: Arc::new(body),
        }
    }
}

fn header(message_id: &str, seq: u64) -> String {
    format!(
        "Message-ID: {message_id}\r\nDate: Tue, 25 Nov 2025 04:00:00 +0000\r\nFrom: Bench <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench message {seq:08}\r\n\r\n"
    )
}

/// One SMTP connection, greeted and past EHLO.
pub struct Conn {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    line: String,
}

impl Conn {
    /// Connect, read the `220`, send `EHLO`.
    pub async fn open(addr: SocketAddr) -> Result<Conn, SmtpError> {
        let mut c = Conn::connect(addr).await?;
        c.expect("greeting", "220").await?;
        c.command("EHLO client.bench.test", "EHLO", "250").await?;
        Ok(c)
    }

    /// Connect and read the greeting only.
    pub async fn connect(addr: SocketAddr) -> Result<Conn, SmtpError> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Conn {
            r: BufReader::with_capacity(4096, r),
            w,
            line: String::new(),
        })
    }

    /// Connect from a given local address (a loopback alias such as
    /// 127.0.1.7, so the relay sees many clients) and read nothing yet.
    pub async fn connect_from(
        local: std::net::IpAddr,
        addr: SocketAddr,
    ) -> Result<Conn, SmtpError> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(local, 0))?;
        let s = sock.connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Conn {
            r: BufReader::with_capacity(4096, r),
            w,
            line: String::new(),
        })
    }

    /// Send a command line; returns the last line of its reply, whatever
    /// the code.
    pub async fn ask(&mut self, line: &str) -> Result<String, SmtpError> {
        let mut buf = Vec::with_capacity(line.len() + 2);
        buf.extend_from_slice(line.as_bytes());
        buf.extend_from_slice(b"\r\n");
        self.w.write_all(&buf).await?;
        self.reply().await
    }

    /// Read one reply (all its lines); returns its last line.
    pub async fn reply(&mut self) -> Result<String, SmtpError> {
        loop {
            self.line.clear();
            let n = tokio::time::timeout(REPLY_TIMEOUT, self.r.read_line(&mut self.line))
                .await
                .map_err(|_| SmtpError::Timeout(REPLY_TIMEOUT))??;
            if n == 0 {
                return Err(SmtpError::Closed);
            }
            if self.line.as_bytes().get(3) != Some(&b'-') {
                return Ok(self.line.trim_end().to_string());
            }
        }
    }

    pub async fn expect(
        &mut self,
        stage: &'static str,
        code: &'static str,
    ) -> Result<String, SmtpError> {
        let r = self.reply().await?;
        if !r.starts_with(code) {
            return Err(SmtpError::Unexpected {
                stage,
                expected: code,
                reply: r,
            });
        }
        Ok(r)
    }

    pub async fn command(
        &mut self,
        line: &str,
        stage: &'static str,
        code: &'static str,
    ) -> Result<String, SmtpError> {
        let mut buf = Vec::with_capacity(line.len() + 2);
        buf.extend_from_slice(line.as_bytes());
        buf.extend_from_slice(b"\r\n");
        self.w.write_all(&buf).await?;
        self.expect(stage, code).await
    }

    /// One transaction: MAIL, RCPT, DATA, the message, the final dot.
    /// Returns when the final `250` was read.
    pub async fn send(
        &mut self,
        tpl: &MessageTemplate,
        message_id: &str,
        seq: u64,
    ) -> Result<Instant, SmtpError> {
        self.command(&format!("MAIL FROM:<{SENDER}>"), "MAIL", "250")
            .await?;
        self.command(&format!("RCPT TO:<{RECIPIENT}>"), "RCPT", "250")
            .await?;
        self.command("DATA", "DATA", "354").await?;
        let head = header(message_id, seq);
        if tpl.body.len() <= 64 * 1024 {
            let mut all = Vec::with_capacity(head.len() + tpl.body.len() + 3);
            all.extend_from_slice(head.as_bytes());
            all.extend_from_slice(&tpl.body);
            all.extend_from_slice(b".\r\n");
            self.w.write_all(&all).await?;
        } else {
            self.w.write_all(head.as_bytes()).await?;
            self.w.write_all(&tpl.body).await?;
            self.w.write_all(b".\r\n").await?;
        }
        self.expect("end of data", "250").await?;
        Ok(Instant::now())
    }

    /// `QUIT` and read the `221`.
    pub async fn quit(mut self) -> Result<(), SmtpError> {
        self.command("QUIT", "QUIT", "221").await?;
        Ok(())
    }
}

/// How the load is applied.
#[derive(Debug, Clone)]
pub struct Load {
    pub sessions: usize,
    pub duration: Duration,
    /// Send every message over one long-lived connection per session
    /// (`smtp-source -d`); otherwise connect, send one message, QUIT
    /// (`smtp-source`'s default).
    pub reuse: bool,
    /// Stop after this many messages in total (whatever the duration).
    pub max_messages: Option<u64>,
}

/// One accepted message.
#[derive(Debug, Clone)]
pub struct Ack {
    pub message_id: String,
    /// When the final `250` was read.
    pub at: Instant,
    /// From writing `MAIL` to reading the final `250`.
    pub latency: Duration,
}

/// What the clients saw.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub acks: Vec<Ack>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl LoadResult {
    pub fn ids(&self) -> HashMap<String, Instant> {
        self.acks
            .iter()
            .map(|a| (a.message_id.clone(), a.at))
            .collect()
    }
}

/// Run `load` against `addr` from `t0` until `t0 + load.duration`: no new
/// transaction starts after that; those in flight finish.
pub async fn run(
    addr: SocketAddr,
    tpl: &MessageTemplate,
    load: &Load,
    tag: &str,
    t0: Instant,
) -> LoadResult {
    let deadline = t0 + load.duration;
    let budget = Arc::new(std::sync::atomic::AtomicU64::new(
        load.max_messages.unwrap_or(u64::MAX),
    ));
    let mut tasks = Vec::new();
    for s in 0..load.sessions {
        let tpl = tpl.clone();
        let tag = tag.to_string();
        let reuse = load.reuse;
        let budget = budget.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = LoadResult::default();
            let mut conn: Option<Conn> = None;
            let mut seq = 0u64;
            while Instant::now() < deadline {
                if budget
                    .fetch_update(
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                        |b| b.checked_sub(1),
                    )
                    .is_err()
                {
                    break;
                }
                let mut c = match conn.take() {
                    Some(c) => c,
                    None => match Conn::open(addr).await {
                        Ok(c) => c,
                        Err(e) => {
                            out.error(e);
                            budget.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                seq += 1;
                let id = format!("<{tag}.{s}.{seq}@bench.test>");
                let start = Instant::now();
                match c.send(&tpl, &id, seq).await {
                    Ok(at) => {
                        out.acks.push(Ack {
                            message_id: id,
                            at,
                            latency: at - start,
                        });
                        if reuse {
                            conn = Some(c);
                        } else if let Err(e) = c.quit().await {
                            out.error(e);
                        }
                    }
                    Err(e) => {
                        out.error(e);
                        budget.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            if let Some(c) = conn {
                let _ = c.quit().await;
            }
            out
        }));
    }
    let mut all = LoadResult::default();
    for t in tasks {
        match t.await {
            Ok(r) => {
                all.acks.extend(r.acks);
                all.errors += r.errors;
                if all.first_error.is_none() {
                    all.first_error = r.first_error;
                }
            }
            Err(e) => {
                all.errors += 1;
                all.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    all
}

impl LoadResult {
    fn error(&mut self, e: SmtpError) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_the_requested_size() {
        for size in [1024, 1 << 20, 300] {
            let t = MessageTemplate::new(size);
            let total = header("<x>", 0).len() + t.body.len();
            assert!(total.abs_diff(size) <= 2, "{size}: {total}");
            assert!(t.body.ends_with(b"\r\n"));
            assert!(!t.body.windows(3).any(|w| w == b"\n.\r" || w == b"\n.."));
        }
    }
}
