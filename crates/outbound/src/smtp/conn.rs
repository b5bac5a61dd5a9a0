//! One SMTP client connection: TCP, TLS (implicit or STARTTLS), EHLO, and
//! reading replies over a persistent buffer, so pipelined replies that
//! arrive together are never lost. Every network step has a deadline.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use oauth::config::SmtpTls;
use rustls_pki_types::ServerName;
use smtp_proto::Response;
use smtp_proto::response::parser::ResponseReceiver;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::TlsConnector;

use crate::reply::Reply;

/// Where in the session something went wrong, for messages.
pub type Stage = &'static str;

/// A failure of the connection itself (as opposed to a reply).
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {host} failed: {source}")]
    Tls {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    TlsConfig(String),
    #[error("timed out after {} {stage}", humantime::format_duration(*after))]
    Timeout { stage: Stage, after: Duration },
    #[error("connection closed by the server {stage}")]
    Closed { stage: Stage },
    #[error("I/O error {stage}: {source}")]
    Io {
        stage: Stage,
        #[source]
        source: io::Error,
    },
    #[error("malformed reply {stage}: {detail}")]
    Protocol { stage: Stage, detail: String },
    #[error("unexpected reply {stage}: {reply}")]
    Unexpected { stage: Stage, reply: Reply },
}

impl ConnError {
    fn io(stage: Stage, e: io::Error) -> ConnError {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => ConnError::Closed { stage },
            _ => ConnError::Io { stage, source: e },
        }
    }

    /// The server's reply, when the failure was one.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            ConnError::Unexpected { reply, .. } => Some(reply),
            _ => None,
        }
    }
}

/// What the server offered in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    pub chunking: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    pub enhanced_status_codes: bool,
    pub xoauth2: bool,
    /// `SIZE n` (0: no limit announced).
    pub size: Option<u64>,
}

impl Capabilities {
    /// From the lines of an EHLO reply (the first is the greeting).
    pub(crate) fn parse(message: &str) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in message.split('\n').skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "CHUNKING" => caps.chunking = true,
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "STARTTLS" => caps.starttls = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "AUTH" => {
                    caps.xoauth2 = words.any(|m| m.eq_ignore_ascii_case("XOAUTH2"));
                }
                "SIZE" => caps.size = words.next().and_then(|n| n.parse().ok()),
                _ => {}
            }
        }
        caps
    }

    /// Names of the extensions, for `send-test`.
    pub fn describe(&self) -> String {
        let mut v = Vec::new();
        for (on, name) in [
            (self.pipelining, "PIPELINING"),
            (self.chunking, "CHUNKING"),
            (self.eight_bit_mime, "8BITMIME"),
            (self.smtputf8, "SMTPUTF8"),
            (self.enhanced_status_codes, "ENHANCEDSTATUSCODES"),
            (self.xoauth2, "AUTH XOAUTH2"),
            (self.starttls, "STARTTLS"),
        ] {
            if on {
                v.push(name.to_string());
            }
        }
        if let Some(s) = self.size {
            v.push(format!("SIZE {s}"));
        }
        v.join(" ")
    }
}

/// The byte stream under a connection.
type Stream = netstream::Stream<TcpStream>;

/// Where to connect and how long each step may take.
#[derive(Debug, Clone)]
pub(crate) struct Target<'a> {
    pub host: &'a str,
    pub port: u16,
    pub tls: SmtpTls,
    pub tls_config: Arc<rustls::ClientConfig>,
    /// Our name in EHLO.
    pub hostname: &'a str,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
}

/// An open SMTP session (TLS up, EHLO done; AUTH is the caller's).
pub(crate) struct Connection {
    stream: Stream,
    rbuf: Vec<u8>,
    receiver: ResponseReceiver,
    pub caps: Capabilities,
    /// `host[ip]:port`, as Postfix logs the relay.
    pub relay: String,
    /// TLS version and cipher suite, for `send-test`.
    pub tls_info: String,
    pub command_timeout: Duration,
    /// Transactions finished on this connection (reuse counter).
    pub transactions: u64,
}

impl Connection {
    /// Resolve, connect, TLS, greeting, EHLO (and STARTTLS + EHLO again).
    /// `trace` gets one line per step (never anything secret).
    pub(crate) async fn open(
        t: &Target<'_>,
        trace: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Connection, ConnError> {
        let addrs: Vec<SocketAddr> =
            match timeout(t.connect_timeout, tokio::net::lookup_host((t.host, t.port))).await {
                Ok(Ok(a)) => a.collect(),
                Ok(Err(e)) => {
                    return Err(ConnError::Resolve {
                        host: t.host.to_string(),
                        source: e,
                    });
                }
                Err(_) => {
                    return Err(ConnError::Timeout {
                        stage: "resolving the host name",
                        after: t.connect_timeout,
                    });
                }
            };
        if addrs.is_empty() {
            return Err(ConnError::Resolve {
                host: t.host.to_string(),
                source: io::Error::new(io::ErrorKind::NotFound, "no address"),
            });
        }
        let mut last = None;
        let mut tcp = None;
        for addr in &addrs {
            match timeout(t.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tcp = Some((s, *addr));
                    break;
                }
                Ok(Err(e)) => {
                    last = Some(ConnError::Connect {
                        addr: format!("{}[{}]:{}", t.host, addr.ip(), addr.port()),
                        source: e,
                    })
                }
                Err(_) => {
                    last = Some(ConnError::Timeout {
                        stage: "connecting",
                        after: t.connect_timeout,
                    })
                }
            }
        }
        let Some((tcp, addr)) = tcp else {
            return Err(last.unwrap_or(ConnError::Resolve {
                host: t.host.to_string(),
                source: io::Error::new(io::ErrorKind::NotFound, "no address"),
            }));
        };
        let _ = tcp.set_nodelay(true);
        let relay = format!("{}[{}]:{}", t.host, addr.ip(), addr.port());
        trace(&format!("connected to {relay}"));
        let mut conn = Connection {
            stream: Stream::Plain(tcp),
            rbuf: Vec::with_capacity(4096),
            receiver: ResponseReceiver::default(),
            caps: Capabilities::default(),
            relay,
            tls_info: String::new(),
            command_timeout: t.command_timeout,
            transactions: 0,
        };
        if t.tls == SmtpTls::Implicit {
            conn.start_tls(t).await?;
            trace(&format!("TLS established ({})", conn.tls_info));
        }
        let greeting = conn
            .read_reply(t.command_timeout, "reading the greeting")
            .await?;
        trace(&format!("greeting: {greeting}"));
        if greeting.code != 220 {
            return Err(ConnError::Unexpected {
                stage: "in the greeting",
                reply: greeting,
            });
        }
        conn.ehlo(t.hostname, trace).await?;
        if t.tls == SmtpTls::Starttls {
            if !conn.caps.starttls {
                return Err(ConnError::TlsConfig(format!(
                    "{} does not offer STARTTLS; refusing to authenticate in the clear",
                    conn.relay
                )));
            }
            conn.send(b"STARTTLS\r\n", "sending STARTTLS").await?;
            let r = conn.read_reply(t.command_timeout, "after STARTTLS").await?;
            trace(&format!("STARTTLS: {r}"));
            if r.code != 220 {
                return Err(ConnError::Unexpected {
                    stage: "after STARTTLS",
                    reply: r,
                });
            }
            if !conn.rbuf.is_empty() {
                // Bytes after the 220 were sent before TLS: an injection.
                return Err(ConnError::Protocol {
                    stage: "after STARTTLS",
                    detail: "the server sent data before the TLS handshake".into(),
                });
            }
            conn.start_tls(t).await?;
            trace(&format!("TLS established ({})", conn.tls_info));
            conn.ehlo(t.hostname, trace).await?;
        }
        Ok(conn)
    }

    async fn start_tls(&mut self, t: &Target<'_>) -> Result<(), ConnError> {
        let Some(tcp) = self.stream.take_plain() else {
            return Err(ConnError::TlsConfig("TLS is already active".into()));
        };
        let name = ServerName::try_from(t.host.to_string())
            .map_err(|e| ConnError::TlsConfig(format!("invalid smtp_host {:?}: {e}", t.host)))?;
        let connector = TlsConnector::from(t.tls_config.clone());
        let tls = match timeout(t.connect_timeout, connector.connect(name, tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(ConnError::Tls {
                    host: t.host.to_string(),
                    source: e,
                });
            }
            Err(_) => {
                return Err(ConnError::Timeout {
                    stage: "in the TLS handshake",
                    after: t.connect_timeout,
                });
            }
        };
        self.stream = Stream::from(tls);
        self.tls_info = self.stream.tls_info().unwrap_or_default();
        Ok(())
    }

    async fn ehlo(
        &mut self,
        hostname: &str,
        trace: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), ConnError> {
        self.send(format!("EHLO {hostname}\r\n").as_bytes(), "sending EHLO")
            .await?;
        let raw = self
            .read_response(self.command_timeout, "after EHLO")
            .await?;
        if raw.code == 250 {
            self.caps = Capabilities::parse(&raw.message);
            let first = raw.message.split('\n').next().unwrap_or("");
            trace(&format!(
                "EHLO: {} ({})",
                crate::reply::escape_controls(first.trim()),
                self.caps.describe()
            ));
            return Ok(());
        }
        let r = Reply::from_response(raw);
        if r.is_closing() {
            return Err(ConnError::Unexpected {
                stage: "after EHLO",
                reply: r,
            });
        }
        // An old server: HELO, no extensions.
        self.send(format!("HELO {hostname}\r\n").as_bytes(), "sending HELO")
            .await?;
        let r = self.read_reply(self.command_timeout, "after HELO").await?;
        if r.code != 250 {
            return Err(ConnError::Unexpected {
                stage: "after HELO",
                reply: r,
            });
        }
        trace(&format!("HELO: {r}"));
        self.caps = Capabilities::default();
        Ok(())
    }

    /// Write `bytes` and flush, within the command timeout.
    pub(crate) async fn send(&mut self, bytes: &[u8], stage: Stage) -> Result<(), ConnError> {
        let t = self.command_timeout;
        let fut = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match timeout(t, fut).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ConnError::io(stage, e)),
            Err(_) => Err(ConnError::Timeout { stage, after: t }),
        }
    }

    /// Read one complete reply within `limit`.
    pub(crate) async fn read_reply(
        &mut self,
        limit: Duration,
        stage: Stage,
    ) -> Result<Reply, ConnError> {
        self.read_response(limit, stage)
            .await
            .map(Reply::from_response)
    }

    async fn read_response(
        &mut self,
        limit: Duration,
        stage: Stage,
    ) -> Result<Response<String>, ConnError> {
        let deadline = Instant::now() + limit;
        loop {
            if !self.rbuf.is_empty() {
                let mut iter = self.rbuf.iter();
                let parsed = self.receiver.parse(&mut iter);
                let consumed = self.rbuf.len() - iter.as_slice().len();
                self.rbuf.drain(..consumed);
                match parsed {
                    Ok(r) => {
                        self.receiver.reset();
                        return Ok(r);
                    }
                    Err(smtp_proto::Error::NeedsMoreData { .. }) => {}
                    Err(e) => {
                        self.receiver.reset();
                        self.rbuf.clear();
                        return Err(ConnError::Protocol {
                            stage,
                            detail: format!("{e:?}"),
                        });
                    }
                }
            }
            self.rbuf.reserve(4096);
            match timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)).await {
                Ok(Ok(0)) => return Err(ConnError::Closed { stage }),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(ConnError::io(stage, e)),
                Err(_) => {
                    return Err(ConnError::Timeout {
                        stage,
                        after: limit,
                    });
                }
            }
        }
    }

    /// Resolves when the idle connection becomes unusable: the server sent
    /// something (a `421` timeout notice) or closed it. Cancel-safe: use it
    /// in `select!` while waiting for work.
    pub(crate) async fn closed_by_server(&mut self) {
        let mut byte = [0u8; 512];
        let _ = self.stream.read(&mut byte).await;
    }

    /// A connection over an already connected plain stream, greeting read
    /// (tests of the exchanges built on it).
    #[cfg(test)]
    pub(crate) fn over_plain(tcp: TcpStream, command_timeout: Duration) -> Connection {
        Connection {
            stream: Stream::Plain(tcp),
            rbuf: Vec::new(),
            receiver: ResponseReceiver::default(),
            caps: Capabilities::default(),
            relay: "test".into(),
            tls_info: String::new(),
            command_timeout,
            transactions: 0,
        }
    }

    /// Bytes received that no command asked for yet: after a complete
    /// exchange, a sign that the server and we are out of step.
    pub(crate) fn has_unread(&self) -> bool {
        !self.rbuf.is_empty()
    }

    /// Say goodbye (best effort, bounded) and close.
    pub(crate) async fn quit(mut self) {
        let limit = self.command_timeout.min(Duration::from_secs(5));
        let _ = timeout(limit, async {
            if self.send(b"QUIT\r\n", "sending QUIT").await.is_ok() {
                let _ = self.read_reply(limit, "after QUIT").await;
            }
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gmail_capabilities() {
        let c = Capabilities::parse(
            "smtp.gmail.com at your service, [1.2.3.4]\nSIZE 35882577\n8BITMIME\nAUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH\nENHANCEDSTATUSCODES\nPIPELINING\nCHUNKING\nSMTPUTF8",
        );
        assert!(c.pipelining && c.chunking && c.eight_bit_mime && c.smtputf8);
        assert!(c.xoauth2 && c.enhanced_status_codes && !c.starttls);
        assert_eq!(c.size, Some(35_882_577));
    }
}
