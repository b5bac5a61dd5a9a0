//! Test harness: a real listener on 127.0.0.1:0 with a real spool in a
//! temporary directory, and a small SMTP client that checks reply codes.

#![allow(dead_code)]

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use inbound::{Inbound, Metrics, ServerConfig, Settings, UserConfig};
use spool::{Envelope, MessageId, Spool};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const HOST: &str = "relay.test";
pub const USER: &str = "printer";
pub const PASSWORD: &str = "s3cret";

/// Run a test body with an upper bound on its (possibly virtual) time.
pub async fn bounded<F: Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test took too long");
}

/// Defaults for tests: loopback trusted, RFC timeouts.
pub fn config() -> ServerConfig {
    ServerConfig {
        listen: Vec::new(),
        hostname: Some(HOST.into()),
        ..ServerConfig::default()
    }
}

/// One user `printer` / `s3cret` (hashed once per test binary).
pub fn users() -> Vec<UserConfig> {
    static HASH: OnceLock<String> = OnceLock::new();
    let hash = HASH
        .get_or_init(|| inbound::hash_password(PASSWORD))
        .clone();
    vec![UserConfig {
        name: USER.into(),
        password_hash: hash,
    }]
}

pub fn accept_all() -> inbound::SenderPolicy {
    inbound::accept_all_senders()
}

pub struct Server {
    pub addr: SocketAddr,
    pub spool: Spool,
    pub inbound: Inbound,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
    pub registry: Arc<std::sync::Mutex<prometheus_client::registry::Registry>>,
    pub dir: tempfile::TempDir,
}

pub async fn start(cfg: ServerConfig) -> Server {
    start_full(cfg, accept_all(), "127.0.0.1:0", None).await
}

pub async fn start_with_policy(cfg: ServerConfig, policy: inbound::SenderPolicy) -> Server {
    start_full(cfg, policy, "127.0.0.1:0", None).await
}

/// Start a server listening on `bind`, with its spool in `spool_dir` (or a
/// fresh temporary directory).
pub async fn start_full(
    cfg: ServerConfig,
    policy: inbound::SenderPolicy,
    bind: &str,
    spool_dir: Option<&Path>,
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let spool_path: PathBuf = spool_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.path().join("spool"));
    let (spool, _) = Spool::open(&spool_path).unwrap();
    let listener = TcpListener::bind(bind).await.unwrap();
    let mut addr = listener.local_addr().unwrap();
    if addr.ip().is_unspecified() {
        addr.set_ip("127.0.0.1".parse().unwrap());
    }
    let settings = Settings::new(cfg, HOST, policy).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let inbound = Inbound::new(settings, spool.clone(), metrics);
    let shutdown = CancellationToken::new();
    let task = {
        let inbound = inbound.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { inbound.serve(vec![listener], shutdown).await })
    };
    Server {
        addr,
        spool,
        inbound,
        shutdown,
        task,
        registry: Arc::new(std::sync::Mutex::new(registry)),
        dir,
    }
}

impl Server {
    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    pub async fn client_from(&self, ip: &str) -> Client {
        Client::connect_from(ip.parse().unwrap(), self.addr).await
    }

    /// Every queued message with its body.
    pub async fn messages(&self) -> Vec<(MessageId, Envelope, Vec<u8>)> {
        let mut out = Vec::new();
        for (id, queued) in self.spool.list() {
            let env = (*queued.envelope).clone();
            let body = self
                .spool
                .read_body(id)
                .unwrap()
                .read_to_end()
                .await
                .unwrap();
            out.push((id, env, body));
        }
        out
    }

    pub async fn body(&self, id: MessageId) -> Vec<u8> {
        self.spool
            .read_body(id)
            .unwrap()
            .read_to_end()
            .await
            .unwrap()
    }

    pub fn metrics_text(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry.lock().unwrap()).unwrap();
        s
    }

    /// Stop and wait until every session has ended.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A reply: code and its lines (text after `NNN-`/`NNN `).
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The first line as sent, `NNN text`.
    pub fn first(&self) -> String {
        format!(
            "{} {}",
            self.code,
            self.lines.first().cloned().unwrap_or_default()
        )
    }

    pub fn queue_id(&self) -> MessageId {
        let t = self.lines.last().unwrap();
        let id = t.rsplit(' ').next().unwrap();
        assert!(t.starts_with("2.0.0 Ok: queued as "), "{t}");
        id.parse().unwrap()
    }
}

pub struct Client {
    pub io: BufReader<Box<dyn Io>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        Client::over(Box::new(s))
    }

    /// Connect from a given local address (a loopback alias like 127.0.0.2).
    pub async fn connect_from(local: IpAddr, addr: SocketAddr) -> Client {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(local, 0)).unwrap();
        let s = sock.connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        Client::over(Box::new(s))
    }

    pub fn over(io: Box<dyn Io>) -> Client {
        Client {
            io: BufReader::new(io),
        }
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.io.get_mut().write_all(bytes.as_ref()).await.unwrap();
        self.io.get_mut().flush().await.unwrap();
    }

    pub async fn line(&mut self, line: &str) {
        self.send(format!("{line}\r\n")).await;
    }

    /// Read one reply (all its lines). Panics on EOF.
    pub async fn reply(&mut self) -> Reply {
        self.try_reply()
            .await
            .expect("connection closed while waiting for a reply")
    }

    /// Read one reply, or `None` at EOF.
    pub async fn try_reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut raw = Vec::new();
            let n = self.io.read_until(b'\n', &mut raw).await.ok()?;
            if n == 0 {
                assert!(lines.is_empty(), "EOF inside a multi-line reply");
                return None;
            }
            assert!(raw.ends_with(b"\r\n"), "reply line without CRLF: {raw:?}");
            let s = String::from_utf8(raw[..raw.len() - 2].to_vec()).unwrap();
            assert!(s.len() >= 3, "short reply line {s:?}");
            let code: u16 = s[..3].parse().unwrap_or_else(|_| panic!("bad reply {s:?}"));
            let sep = s.as_bytes().get(3).copied().unwrap_or(b' ');
            lines.push(s.get(4..).unwrap_or("").to_string());
            if sep == b' ' {
                return Some(Reply { code, lines });
            }
            assert_eq!(sep, b'-', "bad reply line {s:?}");
        }
    }

    /// Read a reply and check its code.
    pub async fn expect(&mut self, code: u16) -> Reply {
        let r = self.reply().await;
        assert_eq!(r.code, code, "unexpected reply {r:?}");
        r
    }

    /// Read a reply and check how its first line starts (`"250 2.1.0"`).
    pub async fn expect_start(&mut self, start: &str) -> Reply {
        let r = self.reply().await;
        assert!(
            r.first().starts_with(start),
            "expected {start:?}, got {r:?}"
        );
        r
    }

    /// Send a command and check the reply code.
    pub async fn cmd(&mut self, line: &str, code: u16) -> Reply {
        self.line(line).await;
        self.expect(code).await
    }

    /// Send a command and check the start of the reply.
    pub async fn cmd_start(&mut self, line: &str, start: &str) -> Reply {
        self.line(line).await;
        self.expect_start(start).await
    }

    pub async fn greeting(&mut self) -> Reply {
        self.expect(220).await
    }

    pub async fn ehlo(&mut self) -> Reply {
        self.cmd("EHLO client.test", 250).await
    }

    /// Greeting + EHLO.
    pub async fn hello(&mut self) -> Reply {
        self.greeting().await;
        self.ehlo().await
    }

    /// A whole DATA transaction; `body` is sent dot-stuffed. Returns the
    /// final reply.
    pub async fn send_mail(&mut self, from: &str, to: &[&str], body: &[u8]) -> Reply {
        self.cmd_start(&format!("MAIL FROM:<{from}>"), "250 2.1.0")
            .await;
        for r in to {
            self.cmd_start(&format!("RCPT TO:<{r}>"), "250 2.1.5").await;
        }
        self.cmd("DATA", 354).await;
        let mut wire = Vec::new();
        inbound::dot::stuff(body, &mut wire);
        self.send(&wire).await;
        self.reply().await
    }

    /// Whether the server has closed the connection (reads to EOF; any
    /// further reply is a failure).
    pub async fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        let _ = self.io.read_to_end(&mut rest).await;
        assert!(
            rest.is_empty(),
            "expected EOF, got {:?}",
            String::from_utf8_lossy(&rest)
        );
    }

    pub async fn auth_plain(&mut self, user: &str, pass: &str) -> Reply {
        use base64::Engine;
        let creds = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"));
        self.line(&format!("AUTH PLAIN {creds}")).await;
        self.reply().await
    }
}

pub fn b64(s: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Split a stored message into our `Received:` line and the rest.
pub fn split_received(stored: &[u8]) -> (String, Vec<u8>) {
    assert!(
        stored.starts_with(b"Received: "),
        "no Received: line on top"
    );
    let end = stored.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    (
        String::from_utf8(stored[..end].to_vec()).unwrap(),
        stored[end..].to_vec(),
    )
}

/// A certificate authority and a server certificate for `localhost` and
/// 127.0.0.1, written as PEM files into `dir`.
pub struct Certs {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client: Arc<rustls::ClientConfig>,
    pub ca: rustls_pki_types::CertificateDer<'static>,
}

impl Certs {
    /// A client trusting the CA, speaking only `versions`.
    pub fn client_with(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        Arc::new(cfg)
    }
}

pub fn certs(dir: &Path) -> Certs {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "inbound test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let cert_file = dir.join("server.pem");
    let key_file = dir.join("server.key");
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Certs {
        cert_file,
        key_file,
        client: Arc::new(client),
        ca: ca.der().clone(),
    }
}

impl Client {
    /// STARTTLS and the handshake (trusting `certs`' CA).
    pub async fn starttls(
        self,
        client_config: Arc<rustls::ClientConfig>,
    ) -> (Client, rustls::ProtocolVersion) {
        let mut me = self;
        me.cmd_start("STARTTLS", "220 2.0.0").await;
        assert!(me.io.buffer().is_empty(), "data after the 220");
        let stream = me.io.into_inner();
        let connector = tokio_rustls::TlsConnector::from(client_config);
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, stream).await.unwrap();
        let version = tls.get_ref().1.protocol_version().unwrap();
        (Client::over(Box::new(tls)), version)
    }
}
