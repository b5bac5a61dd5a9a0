//! A fake Gmail API (`gmail.googleapis.com`) for `users.messages.send`, as
//! Google documents it (developers.google.com/workspace/gmail/api/reference/rest/v1/users.messages/send,
//! guides/uploads, the JSON error model):
//!
//! - `POST /upload/gmail/v1/users/me/messages/send?uploadType=media` with
//!   the raw message (`Content-Type: message/rfc822`) -> `200
//!   {"id","threadId","labelIds":["SENT"]}`.
//! - `POST ...?uploadType=resumable` (`X-Upload-Content-Type`,
//!   `X-Upload-Content-Length`) -> `200` with the session URI in
//!   `Location`; `PUT <session>` with `Content-Range: bytes a-b/N` and the
//!   bytes -> `308` with `Range: bytes=0-M` while incomplete, `200` with the
//!   message when complete; `PUT` with `Content-Range: bytes */N` and no
//!   body asks how much arrived (`308` + `Range`, or the final `200` again).
//! - A bearer check: a missing or unknown token is `401 UNAUTHENTICATED`
//!   (`authError`, `WWW-Authenticate`); a token without a scope that allows
//!   sending is `403 PERMISSION_DENIED` with `insufficientPermissions` and
//!   `ACCESS_TOKEN_SCOPE_INSUFFICIENT`. Any other endpoint (`users.getProfile`
//!   ...) needs more than `gmail.send` and is counted.
//! - Recipients come from `To`/`Cc`/`Bcc` only; none is `400
//!   invalidArgument` "Recipient address required".
//! - A per-user rate limit (token bucket; Google: 15,000 quota units a
//!   minute, 100 per send) answered with `429 userRateLimitExceeded`.
//! - Scripted faults: each error body above, 5xx, a dropped connection
//!   after the request (the response is lost), a connection dropped half
//!   way through an upload.
//!
//! HTTP/1.1 on loopback, plain ([`FakeGmailApi::start`]) or over TLS with
//! a [`TestCa`] certificate ([`FakeGmailApi::start_with_tls`], as Google
//! serves it), written by hand so a fault can cut a connection in the
//! middle of a body. For benchmarks, [`FakeGmailApi::keep_data`] keeps only
//! each message's header section.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::ca::TestCa;

/// `users.messages.send`'s upload path.
pub const SEND_PATH: &str = "/upload/gmail/v1/users/me/messages/send";
/// 35 MB: Gmail's limit for a message through the API.
pub const MAX_MESSAGE: u64 = 35 * 1024 * 1024;

/// Scopes that allow `users.messages.send`.
pub const SEND_SCOPES: &[&str] = &[
    "https://www.googleapis.com/auth/gmail.send",
    "https://www.googleapis.com/auth/gmail.compose",
    "https://www.googleapis.com/auth/gmail.modify",
    "https://mail.google.com/",
];

/// `token -> Some((user, scopes))` for a valid access token.
pub type BearerValidator = Arc<dyn Fn(&str) -> Option<(String, Vec<String>)> + Send + Sync>;

/// How a message came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadType {
    Media,
    Resumable,
}

/// A message the fake accepted.
#[derive(Debug, Clone)]
pub struct ApiMessage {
    /// Gmail's id for it (what the response carried).
    pub id: String,
    /// The user the bearer token was issued for.
    pub user: String,
    /// The raw bytes as uploaded; only the header section when
    /// [`FakeGmailApi::keep_data`] is off.
    pub raw: Vec<u8>,
    /// The size of the message as uploaded (also when `raw` is cut).
    pub size: usize,
    /// The addresses in `To`, `Cc` and `Bcc` (whom Gmail would mail).
    pub recipients: Vec<String>,
    pub upload: UploadType,
    /// Requests (`PUT`s) it took to upload, for resumable uploads.
    pub puts: usize,
    /// Which connection (1-based, in accept order) carried the request
    /// that completed it.
    pub connection: u64,
    /// When the head of the request that completed it was read (the
    /// simple upload's `POST`, the resumable upload's last `PUT`).
    pub request_at: Instant,
    /// When the fake accepted it (just before its `200`).
    pub at: Instant,
}

impl ApiMessage {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        crate::gmail::header_value(&self.raw, name)
    }
}

/// A scripted answer for the next send request(s).
#[derive(Debug, Clone)]
pub enum ApiFault {
    /// `403 accessNotConfigured`: the Gmail API is not enabled in the
    /// Cloud project.
    AccessNotConfigured,
    /// `403 insufficientPermissions` / `ACCESS_TOKEN_SCOPE_INSUFFICIENT`.
    ScopeInsufficient,
    /// `401 UNAUTHENTICATED` whatever the token.
    Unauthenticated,
    /// `403 rateLimitExceeded` (or `429 userRateLimitExceeded` with
    /// `user = true`) with `Retry-After: secs`.
    RateLimit { status_429: bool, retry_after: u64 },
    /// `429` "User-rate limit exceeded. Retry after <time> (Mail sending)":
    /// the per-user sending limit, until `until`.
    SendingLimit { until: SystemTime },
    /// `403 dailyLimitExceeded`: the project's daily quota.
    DailyLimit,
    /// `400 invalidArgument` with this message ("Invalid To header").
    InvalidArgument(String),
    /// A bare server error (`500`, `503`).
    Status(u16),
    /// Read the whole request (and, for the last part of an upload, keep
    /// the message as sent) and close the connection without an answer.
    DropResponse,
    /// Close the connection after this many bytes of a request body.
    DropAfterBytes(u64),
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiStats {
    pub connections: u64,
    pub requests: u64,
    /// Requests to anything but the send upload endpoint.
    pub other_endpoints: u64,
    pub unauthenticated: u64,
    pub rate_limited: u64,
    /// Resumable sessions opened.
    pub sessions: u64,
    /// Status queries (`Content-Range: bytes */N`).
    pub status_queries: u64,
    /// Answers lost on purpose ([`ApiFault::DropResponse`], drops mid-body).
    pub dropped: u64,
    /// Messages accepted (`200` with an id), also those cleared by
    /// [`FakeGmailApi::clear_messages`].
    pub messages: u64,
}

struct Session {
    user: String,
    total: u64,
    data: Vec<u8>,
    puts: usize,
    /// The message id once complete.
    done: Option<String>,
}

struct Bucket {
    rate: f64,
    burst: f64,
    level: f64,
    at: Instant,
}

struct State {
    validator: BearerValidator,
    messages: Vec<ApiMessage>,
    faults: VecDeque<ApiFault>,
    sessions: HashMap<String, Session>,
    stats: ApiStats,
    /// Per-user send rate: (sends per second, burst).
    rate: Option<(f64, f64)>,
    buckets: HashMap<String, Bucket>,
    next_id: u64,
    /// Every request line seen (`METHOD path`).
    log: Vec<String>,
    /// Keep whole messages (or only their header sections).
    keep_data: bool,
}

struct Shared {
    state: Mutex<State>,
    addr: SocketAddr,
    /// `http` or `https`.
    scheme: &'static str,
    /// Signalled whenever a message is accepted.
    changed: tokio::sync::Notify,
}

/// The request being answered: which connection, when its head arrived.
#[derive(Clone, Copy)]
struct Req {
    connection: u64,
    at: Instant,
}

/// A connection, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The fake server; dropping it stops it.
pub struct FakeGmailApi {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeGmailApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeGmailApi {
    /// Start on `http://127.0.0.1:<free port>` with Google's per-user
    /// limit (2.5 sends a second, a minute's quota of 150 as the burst).
    pub async fn start(
        validator: impl Fn(&str) -> Option<(String, Vec<String>)> + Send + Sync + 'static,
    ) -> io::Result<FakeGmailApi> {
        FakeGmailApi::start_inner(validator, None).await
    }

    /// The same on `https://127.0.0.1:<free port>` with a server
    /// certificate from `ca` (HTTP/1.1: no ALPN `h2`); clients trust it
    /// with `ca.write_to(dir)`'s `ca.pem` as their `ca_file`.
    /// (The future does not borrow `ca`: it can be spawned.)
    pub fn start_with_tls(
        validator: impl Fn(&str) -> Option<(String, Vec<String>)> + Send + Sync + 'static,
        ca: &TestCa,
    ) -> impl Future<Output = io::Result<FakeGmailApi>> + Send + 'static {
        FakeGmailApi::start_inner(validator, Some(TlsAcceptor::from(ca.server_config())))
    }

    async fn start_inner(
        validator: impl Fn(&str) -> Option<(String, Vec<String>)> + Send + Sync + 'static,
        tls: Option<TlsAcceptor>,
    ) -> io::Result<FakeGmailApi> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                validator: Arc::new(validator),
                messages: Vec::new(),
                faults: VecDeque::new(),
                sessions: HashMap::new(),
                stats: ApiStats::default(),
                rate: Some((2.5, 150.0)),
                buckets: HashMap::new(),
                next_id: 0x18c2_0000_0000_0000,
                log: Vec::new(),
                keep_data: true,
            }),
            addr,
            scheme: if tls.is_some() { "https" } else { "http" },
            changed: tokio::sync::Notify::new(),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let connection = {
                    let mut st = s.lock();
                    st.stats.connections += 1;
                    st.stats.connections
                };
                let s = s.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    match tls {
                        None => {
                            let _ = serve(s, stream, connection).await;
                        }
                        Some(acceptor) => {
                            if let Ok(Ok(stream)) =
                                tokio::time::timeout(READ_TIMEOUT, acceptor.accept(stream)).await
                            {
                                let _ = serve(s, stream, connection).await;
                            }
                        }
                    }
                });
            }
        });
        Ok(FakeGmailApi { shared, task })
    }

    /// The base URL (`api_url`): `http://127.0.0.1:PORT`, or `https://`
    /// when started with TLS.
    pub fn url(&self) -> String {
        format!("{}://{}", self.shared.scheme, self.shared.addr)
    }

    pub fn messages(&self) -> Vec<ApiMessage> {
        self.shared.lock().messages.clone()
    }

    /// Forget the messages accepted so far and the request log (the
    /// counters keep counting).
    pub fn clear_messages(&self) {
        let mut st = self.shared.lock();
        st.messages.clear();
        st.log.clear();
    }

    /// Keep each message whole (the default) or only its header section
    /// (at most 64 KiB: enough for [`ApiMessage::header`]), so a
    /// benchmark's memory does not grow with what it sends.
    pub fn keep_data(&self, keep: bool) {
        self.shared.lock().keep_data = keep;
    }

    /// Wait until `pred` holds for the counters or `timeout` passes;
    /// returns whether it held.
    pub async fn wait_for_stats(
        &self,
        timeout: Duration,
        pred: impl Fn(&ApiStats) -> bool,
    ) -> bool {
        crate::notify::until_changed(&self.shared.changed, timeout, || pred(&self.stats())).await
    }

    pub fn stats(&self) -> ApiStats {
        self.shared.lock().stats
    }

    /// Every request line seen, `METHOD /path?query`, in order.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().log.clone()
    }

    /// Answer the next `n` send requests (or upload parts) with `fault`.
    pub fn fail_next(&self, n: usize, fault: ApiFault) {
        let mut st = self.shared.lock();
        for _ in 0..n {
            st.faults.push_back(fault.clone());
        }
    }

    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// The per-user rate limit: `per_second` sends with a burst of
    /// `burst`; `None`: unlimited.
    pub fn set_rate_limit(&self, limit: Option<(f64, f64)>) {
        let mut st = self.shared.lock();
        st.rate = limit;
        st.buckets.clear();
    }
}

/// One parsed request head.
struct Head {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    fn query(&self, key: &str) -> Option<String> {
        let q = self.target.split_once('?')?.1;
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            status,
            headers: vec![(
                "Content-Type".into(),
                "application/json; charset=UTF-8".into(),
            )],
            body: body.to_string(),
        }
    }

    fn with(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Google's error model.
fn google_error(
    code: u16,
    status: &str,
    message: &str,
    reason: &str,
    domain: &str,
    details: Option<serde_json::Value>,
) -> Reply {
    let mut err = serde_json::json!({
        "code": code,
        "message": message,
        "errors": [{"message": message, "domain": domain, "reason": reason}],
        "status": status,
    });
    if let Some(d) = details {
        err["details"] = d;
    }
    Reply::json(code, serde_json::json!({ "error": err }))
}

fn unauthenticated() -> Reply {
    let mut r = google_error(
        401,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
        "authError",
        "global",
        None,
    );
    r.body = r.body.replace(
        "\"reason\":\"authError\"",
        "\"reason\":\"authError\",\"location\":\"Authorization\",\"locationType\":\"header\"",
    );
    r.with(
        "WWW-Authenticate",
        "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"",
    )
}

fn scope_insufficient() -> Reply {
    google_error(
        403,
        "PERMISSION_DENIED",
        "Request had insufficient authentication scopes.",
        "insufficientPermissions",
        "global",
        Some(serde_json::json!([{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
            "domain": "googleapis.com",
            "metadata": {"service": "gmail.googleapis.com", "method": "caribou.api.proto.MailboxService.SendMessage"}
        }])),
    )
    .with(
        "WWW-Authenticate",
        "Bearer realm=\"https://accounts.google.com/\", error=\"insufficient_scope\", scope=\"https://www.googleapis.com/auth/gmail.send\"",
    )
}

fn fault_reply(f: &ApiFault) -> Option<Reply> {
    Some(match f {
        ApiFault::AccessNotConfigured => google_error(
            403,
            "PERMISSION_DENIED",
            "Gmail API has not been used in project 123456789012 before or it is disabled. Enable it by visiting https://console.developers.google.com/apis/api/gmail.googleapis.com/overview?project=123456789012 then retry. If you enabled this API recently, wait a few minutes for the action to propagate to our systems and retry.",
            "accessNotConfigured",
            "usageLimits",
            Some(serde_json::json!([{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "SERVICE_DISABLED",
                "domain": "googleapis.com",
                "metadata": {"service": "gmail.googleapis.com", "consumer": "projects/123456789012",
                  "activationUrl": "https://console.developers.google.com/apis/api/gmail.googleapis.com/overview?project=123456789012"}
            }])),
        ),
        ApiFault::ScopeInsufficient => scope_insufficient(),
        ApiFault::Unauthenticated => unauthenticated(),
        ApiFault::RateLimit {
            status_429,
            retry_after,
        } => {
            let r = if *status_429 {
                google_error(
                    429,
                    "RESOURCE_EXHAUSTED",
                    "User-rate limit exceeded.",
                    "userRateLimitExceeded",
                    "usageLimits",
                    None,
                )
            } else {
                google_error(
                    403,
                    "PERMISSION_DENIED",
                    "Rate Limit Exceeded",
                    "rateLimitExceeded",
                    "usageLimits",
                    None,
                )
            };
            r.with("Retry-After", retry_after.to_string())
        }
        ApiFault::SendingLimit { until } => {
            let t = humantime::format_rfc3339_millis(*until);
            google_error(
                429,
                "RESOURCE_EXHAUSTED",
                &format!("User-rate limit exceeded.  Retry after {t} (Mail sending)"),
                "rateLimitExceeded",
                "usageLimits",
                None,
            )
        }
        ApiFault::DailyLimit => google_error(
            403,
            "PERMISSION_DENIED",
            "Daily Limit Exceeded. The quota will be reset at midnight Pacific Time (PT).",
            "dailyLimitExceeded",
            "usageLimits",
            None,
        ),
        ApiFault::InvalidArgument(m) => google_error(
            400,
            "INVALID_ARGUMENT",
            m,
            "invalidArgument",
            "global",
            None,
        ),
        ApiFault::Status(code) => google_error(
            *code,
            if *code == 503 {
                "UNAVAILABLE"
            } else {
                "INTERNAL"
            },
            if *code == 503 {
                "The service is currently unavailable."
            } else {
                "Internal error encountered."
            },
            "backendError",
            "global",
            None,
        ),
        ApiFault::DropResponse | ApiFault::DropAfterBytes(_) => return None,
    })
}

const HEAD_LIMIT: usize = 64 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Requests on one connection, until it closes.
async fn serve(shared: Arc<Shared>, stream: impl Io, connection: u64) -> io::Result<()> {
    let mut stream = BufReader::new(stream);
    loop {
        let Some(head) = read_head(&mut stream).await? else {
            return Ok(());
        };
        let req = Req {
            connection,
            at: Instant::now(),
        };
        let close = head
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        {
            let mut st = shared.lock();
            st.stats.requests += 1;
            st.log.push(format!("{} {}", head.method, head.target));
        }
        match handle(&shared, &head, &mut stream, req).await? {
            Some(reply) => write_reply(stream.get_mut(), &reply).await?,
            None => {
                shared.lock().stats.dropped += 1;
                let _ = stream.get_mut().shutdown().await;
                return Ok(());
            }
        }
        if close {
            let _ = stream.get_mut().shutdown().await;
            return Ok(());
        }
    }
}

/// The request line and header fields; `None` at a clean end of the
/// connection.
async fn read_head(s: &mut BufReader<impl Io>) -> io::Result<Option<Head>> {
    let mut buf = Vec::new();
    loop {
        let before = buf.len();
        let limited = (&mut *s).take((HEAD_LIMIT + 1 - before) as u64);
        tokio::pin!(limited);
        let n = tokio::time::timeout(READ_TIMEOUT, limited.read_until(b'\n', &mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "head"))??;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "head"));
        }
        if buf == b"\r\n" {
            // An empty line before the request line is ignored (RFC 9112
            // section 2.2).
            buf.clear();
            continue;
        }
        if buf.ends_with(b"\r\n\r\n") {
            break;
        }
        if buf.len() > HEAD_LIMIT {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Some(Head {
        method,
        target,
        headers,
    }))
}

/// Read the body into `out`; `Ok(false)`: cut at `cut` bytes (a fault).
async fn read_body(
    s: &mut BufReader<impl Io>,
    head: &Head,
    out: &mut Vec<u8>,
    cut: Option<u64>,
) -> io::Result<bool> {
    let chunked = head
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let mut read = 0u64;
    if !chunked {
        let len: u64 = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        return take(s, len, out, cut, &mut read).await;
    }
    loop {
        let mut line = Vec::new();
        loop {
            let b = s.read_u8().await?;
            line.push(b);
            if line.ends_with(b"\r\n") || line.len() > 100 {
                break;
            }
        }
        let size_text = String::from_utf8_lossy(&line);
        let size = u64::from_str_radix(size_text.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "chunk size"))?;
        if size == 0 {
            let mut crlf = [0u8; 2];
            s.read_exact(&mut crlf).await?;
            return Ok(true);
        }
        if !take(s, size, out, cut, &mut read).await? {
            return Ok(false);
        }
        let mut crlf = [0u8; 2];
        s.read_exact(&mut crlf).await?;
    }
}

/// Read `n` bytes into `out`, unless the cut comes first (`Ok(false)`).
async fn take(
    s: &mut BufReader<impl Io>,
    n: u64,
    out: &mut Vec<u8>,
    cut: Option<u64>,
    read: &mut u64,
) -> io::Result<bool> {
    let limit = cut.map(|c| c.saturating_sub(*read)).unwrap_or(u64::MAX);
    let n2 = n.min(limit);
    *read += n2;
    let mut left = n2;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = (left as usize).min(buf.len());
        let got = tokio::time::timeout(READ_TIMEOUT, s.read(&mut buf[..want]))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "body"))??;
        if got == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "body"));
        }
        out.extend_from_slice(&buf[..got]);
        left -= got as u64;
    }
    Ok(n2 == n)
}

async fn write_reply(s: &mut impl Io, r: &Reply) -> io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        308 => "Resume Incomplete",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Request Entity Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", r.status);
    for (n, v) in &r.headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", r.body.len()));
    out.push_str(&r.body);
    s.write_all(out.as_bytes()).await?;
    s.flush().await
}

/// Whom Gmail would mail: the addresses in `To`, `Cc`, `Bcc`.
pub fn header_recipients(raw: &[u8]) -> Vec<String> {
    let end = memchr::memmem::find(raw, b"\r\n\r\n")
        .or_else(|| memchr::memmem::find(raw, b"\n\n"))
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..end]).replace("\r\n", "\n");
    let mut fields: Vec<String> = Vec::new();
    for line in head.split('\n') {
        if line.starts_with([' ', '\t']) {
            if let Some(f) = fields.last_mut() {
                f.push(' ');
                f.push_str(line.trim());
            }
        } else {
            fields.push(line.to_string());
        }
    }
    let mut out = Vec::new();
    for f in fields {
        let Some((name, value)) = f.split_once(':') else {
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        if !matches!(name.as_str(), "to" | "cc" | "bcc") {
            continue;
        }
        out.extend(addresses(value));
    }
    out
}

/// Addresses in an address-list header value (display names, quoted
/// strings, groups handled well enough for tests).
pub fn addresses(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut angle = false;
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        let t = cur.trim();
        let addr = match (t.rfind('<'), t.rfind('>')) {
            (Some(a), Some(b)) if a < b => t[a + 1..b].trim().to_string(),
            _ => t
                .rsplit([' ', ':'])
                .next()
                .unwrap_or("")
                .trim_end_matches(';')
                .to_string(),
        };
        if addr.contains('@') {
            out.push(addr);
        }
        cur.clear();
    };
    for c in value.chars() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' | ';' if !quoted && !angle => {
                flush(&mut cur, &mut out);
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    flush(&mut cur, &mut out);
    out
}

/// The user a request is for, or the reply refusing it.
fn authenticate(shared: &Shared, head: &Head) -> Result<String, Reply> {
    let token = head
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let mut st = shared.lock();
    let Some(token) = token else {
        st.stats.unauthenticated += 1;
        return Err(unauthenticated());
    };
    let validator = st.validator.clone();
    let Some((user, scopes)) = validator(token) else {
        st.stats.unauthenticated += 1;
        return Err(unauthenticated());
    };
    if !scopes.iter().any(|s| SEND_SCOPES.contains(&s.as_str())) {
        return Err(scope_insufficient());
    }
    Ok(user)
}

/// Take a send from `user`'s bucket; the reply when over the limit.
fn rate_check(st: &mut State, user: &str) -> Option<Reply> {
    let (rate, burst) = st.rate?;
    let now = Instant::now();
    let b = st.buckets.entry(user.to_string()).or_insert(Bucket {
        rate,
        burst,
        level: burst,
        at: now,
    });
    b.level = (b.level + now.duration_since(b.at).as_secs_f64() * b.rate).min(b.burst);
    b.at = now;
    if b.level >= 1.0 {
        b.level -= 1.0;
        return None;
    }
    st.stats.rate_limited += 1;
    Some(
        google_error(
            429,
            "RESOURCE_EXHAUSTED",
            "User-rate limit exceeded.",
            "userRateLimitExceeded",
            "usageLimits",
            None,
        )
        .with("Retry-After", "1"),
    )
}

fn complete(
    shared: &Shared,
    st: &mut State,
    req: Req,
    user: String,
    mut raw: Vec<u8>,
    upload: UploadType,
    puts: usize,
) -> Reply {
    let recipients = header_recipients(&raw);
    if recipients.is_empty() {
        return google_error(
            400,
            "INVALID_ARGUMENT",
            "Recipient address required",
            "invalidArgument",
            "global",
            None,
        );
    }
    st.next_id += 0x1_0237;
    let id = format!("{:x}", st.next_id);
    let size = raw.len();
    if !st.keep_data {
        let head = memchr::memmem::find(&raw, b"\r\n\r\n")
            .map(|i| i + 4)
            .unwrap_or(raw.len())
            .min(HEAD_LIMIT);
        raw.truncate(head);
        raw.shrink_to_fit();
    }
    st.messages.push(ApiMessage {
        id: id.clone(),
        user,
        raw,
        size,
        recipients,
        upload,
        puts,
        connection: req.connection,
        request_at: req.at,
        at: Instant::now(),
    });
    st.stats.messages += 1;
    shared.changed.notify_waiters();
    sent(&id)
}

fn sent(id: &str) -> Reply {
    Reply::json(
        200,
        serde_json::json!({"id": id, "threadId": id, "labelIds": ["SENT"]}),
    )
}

async fn handle(
    shared: &Arc<Shared>,
    head: &Head,
    s: &mut BufReader<impl Io>,
    req: Req,
) -> io::Result<Option<Reply>> {
    let mut body = Vec::new();
    if head.path() != SEND_PATH {
        read_body(s, head, &mut body, None).await?;
        shared.lock().stats.other_endpoints += 1;
        if let Err(r) = authenticate(shared, head) {
            return Ok(Some(r));
        }
        // Everything else needs more than gmail.send; the relay must never
        // call it.
        return Ok(Some(scope_insufficient()));
    }
    // Faults that cut a body wait for a request that has one.
    let has_body = head
        .header("content-length")
        .is_some_and(|v| v.trim() != "0")
        || head.header("transfer-encoding").is_some();
    let fault = {
        let mut st = shared.lock();
        match st.faults.front() {
            Some(ApiFault::DropAfterBytes(_) | ApiFault::DropResponse) if !has_body => None,
            _ => st.faults.pop_front(),
        }
    };
    let cut = match &fault {
        Some(ApiFault::DropAfterBytes(n)) => Some(*n),
        _ => None,
    };
    if !read_body(s, head, &mut body, cut).await? {
        // Google keeps what arrived of a resumable upload (in 256 KiB
        // units) for the status query to report.
        keep_partial(shared, head, &body);
        return Ok(None);
    }
    let user = match authenticate(shared, head) {
        Ok(u) => u,
        Err(r) => return Ok(Some(r)),
    };
    let upload = head.query("uploadType").unwrap_or_default();
    let mut st = shared.lock();
    if let Some(f) = &fault
        && let Some(r) = fault_reply(f)
    {
        return Ok(Some(r));
    }
    let drop = matches!(fault, Some(ApiFault::DropResponse));
    let reply = match (head.method.as_str(), upload.as_str()) {
        ("POST", "media") => {
            if body.len() as u64 > MAX_MESSAGE {
                return Ok(Some(google_error(
                    413,
                    "INVALID_ARGUMENT",
                    "Request Entity Too Large",
                    "uploadTooLarge",
                    "global",
                    None,
                )));
            }
            if let Some(r) = rate_check(&mut st, &user) {
                return Ok(Some(r));
            }
            complete(shared, &mut st, req, user, body, UploadType::Media, 1)
        }
        ("POST", "resumable") if head.query("upload_id").is_none() => {
            let total: u64 = match head
                .header("x-upload-content-length")
                .and_then(|v| v.parse().ok())
            {
                Some(t) => t,
                None => {
                    return Ok(Some(google_error(
                        400,
                        "INVALID_ARGUMENT",
                        "Missing X-Upload-Content-Length",
                        "invalidArgument",
                        "global",
                        None,
                    )));
                }
            };
            if total > MAX_MESSAGE {
                return Ok(Some(google_error(
                    413,
                    "INVALID_ARGUMENT",
                    "Request Entity Too Large",
                    "uploadTooLarge",
                    "global",
                    None,
                )));
            }
            if let Some(r) = rate_check(&mut st, &user) {
                return Ok(Some(r));
            }
            st.next_id += 1;
            let upload_id = format!("ADPycdv{:x}", st.next_id.wrapping_mul(2_654_435_761));
            st.sessions.insert(
                upload_id.clone(),
                Session {
                    user,
                    total,
                    data: Vec::new(),
                    puts: 0,
                    done: None,
                },
            );
            st.stats.sessions += 1;
            Reply::json(200, serde_json::json!({})).with(
                "Location",
                format!(
                    "{}://{}{SEND_PATH}?uploadType=resumable&upload_id={upload_id}",
                    shared.scheme, shared.addr
                ),
            )
        }
        ("PUT", "resumable") => {
            let Some(id) = head.query("upload_id") else {
                return Ok(Some(google_error(
                    404,
                    "NOT_FOUND",
                    "Not Found",
                    "notFound",
                    "global",
                    None,
                )));
            };
            let range = head.header("content-range").unwrap_or("").to_string();
            let stats_query = range.starts_with("bytes */");
            if stats_query {
                st.stats.status_queries += 1;
            }
            let st = &mut *st;
            let Some(sess) = st.sessions.get_mut(&id) else {
                return Ok(Some(google_error(
                    404,
                    "NOT_FOUND",
                    "Upload session not found",
                    "notFound",
                    "global",
                    None,
                )));
            };
            if sess.user != user {
                return Ok(Some(unauthenticated()));
            }
            if let Some(mid) = &sess.done {
                sent(mid)
            } else if stats_query {
                incomplete(sess.data.len() as u64)
            } else {
                // `bytes a-b/N`
                let parsed = range
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split_once('/'))
                    .and_then(|(ab, n)| {
                        let (a, b) = ab.split_once('-')?;
                        Some((
                            a.parse::<u64>().ok()?,
                            b.parse::<u64>().ok()?,
                            n.parse::<u64>().ok()?,
                        ))
                    });
                match parsed {
                    Some((a, b, n))
                        if a == sess.data.len() as u64
                            && n == sess.total
                            && b + 1 == a + body.len() as u64 =>
                    {
                        sess.data.extend_from_slice(&body);
                        sess.puts += 1;
                        if sess.data.len() as u64 == sess.total {
                            let raw = std::mem::take(&mut sess.data);
                            let (u, puts) = (sess.user.clone(), sess.puts);
                            let r = complete(shared, st, req, u, raw, UploadType::Resumable, puts);
                            if r.status == 200
                                && let Some(m) = st.messages.last()
                                && let Some(sess) = st.sessions.get_mut(&id)
                            {
                                sess.done = Some(m.id.clone());
                            }
                            r
                        } else {
                            incomplete(sess.data.len() as u64)
                        }
                    }
                    _ => google_error(
                        400,
                        "INVALID_ARGUMENT",
                        &format!("Invalid Content-Range {range:?}"),
                        "invalidArgument",
                        "global",
                        None,
                    ),
                }
            }
        }
        _ => google_error(
            400,
            "INVALID_ARGUMENT",
            "Invalid upload request",
            "invalidArgument",
            "global",
            None,
        ),
    };
    if drop {
        return Ok(None);
    }
    Ok(Some(reply))
}

/// What arrived of a `PUT` to a session before its connection was cut.
fn keep_partial(shared: &Shared, head: &Head, body: &[u8]) {
    if head.method != "PUT" {
        return;
    }
    let Some(id) = head.query("upload_id") else {
        return;
    };
    let start = head
        .header("content-range")
        .and_then(|r| r.strip_prefix("bytes "))
        .and_then(|r| r.split('-').next())
        .and_then(|a| a.parse::<u64>().ok());
    let mut st = shared.lock();
    if let Some(sess) = st.sessions.get_mut(&id)
        && start == Some(sess.data.len() as u64)
    {
        let keep = body.len() / (256 * 1024) * (256 * 1024);
        sess.data.extend_from_slice(&body[..keep]);
        sess.puts += 1;
    }
}

/// `308` with how much arrived.
fn incomplete(have: u64) -> Reply {
    let r = Reply {
        status: 308,
        headers: Vec::new(),
        body: String::new(),
    };
    if have == 0 {
        r
    } else {
        r.with("Range", format!("bytes=0-{}", have - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_from_headers() {
        let m = b"From: a@b.c\r\nTo: \"Doe, J\" <j@x.org>, k@y.org\r\nCc: undisclosed-recipients:;\r\nBcc: <z@q.net>\r\n\r\nTo: not@me.org\r\n";
        assert_eq!(header_recipients(m), ["j@x.org", "k@y.org", "z@q.net"]);
    }
}
