//! First consent: the installed-app ("Desktop app") flow with a loopback
//! redirect and PKCE.
//!
//! 1. [`Flow::start`] listens on `127.0.0.1:<port>` (a free port unless one
//!    is given) and builds Google's authorization URL: PKCE S256, a random
//!    `state`, `access_type=offline`, `prompt=consent`, the configured
//!    scopes and `login_hint` = the account's email.
//! 2. The user opens it (the CLI tries `xdg-open` unless `--no-browser`),
//!    signs in and approves; Google sends the browser to
//!    `http://127.0.0.1:<port>/?code=...&state=...`.
//! 3. [`Flow::finish`] takes that redirect, or the same address pasted on a
//!    line of input (headless machines: the browser ran elsewhere and
//!    failed to load the page, but the address bar holds the code), checks
//!    `state`, exchanges the code (with the PKCE verifier) for tokens,
//!    stores them in the token file and answers the browser with a short
//!    page. [`run`] does all of it, printing instructions to a writer.
//!
//! The other way for a headless machine is `ssh -L PORT:127.0.0.1:PORT host`
//! with a fixed `port`, so that the browser's redirect reaches the listener.

use std::fmt;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use oauth2::basic::BasicClient;
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet,
    EndpointSet, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RequestTokenError, Scope,
    TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::account::{Account, Credentials};
use crate::store::{self, RefreshRecord, RefreshResult, StoreError};

/// How to run the flow.
#[derive(Debug, Clone)]
pub struct Options {
    /// Do not try to open a browser (`--no-browser`).
    pub no_browser: bool,
    /// Port for the redirect listener on 127.0.0.1; `0` picks a free one.
    /// Fix it to forward it with `ssh -L`.
    pub port: u16,
    /// How long to wait for the user. Default 5 minutes.
    pub timeout: Duration,
    /// Bound on the code exchange request. Default 30 s.
    pub request_timeout: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            no_browser: false,
            port: 0,
            timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// How the answer came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The browser followed Google's redirect to the listener.
    Redirect,
    /// The user pasted the redirect address.
    Pasted,
    /// Device-code sign-in (RFC 8628).
    Device,
}

/// What was stored; `Display` tells the user what to do next.
#[derive(Debug, Clone)]
pub struct Summary {
    pub account: String,
    pub email: String,
    pub token_file: PathBuf,
    pub scopes: Vec<String>,
    pub access_token_expires_at: SystemTime,
    pub via: Via,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Authorized: account '{}' ({}) now has a refresh token, stored in {}.",
            self.account,
            self.email,
            self.token_file.display()
        )?;
        writeln!(f, "Scopes: {}", self.scopes.join(" "))?;
        writeln!(
            f,
            "Next: a running oauthrelay picks the new token up within seconds (held mail is sent);"
        )?;
        writeln!(
            f,
            "check with: oauthrelay token status --account {}",
            self.account
        )?;
        write!(
            f,
            "then try: oauthrelay send-test --account {} --to YOUR-ADDRESS",
            self.account
        )
    }
}

/// Why authorization failed. Every variant says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error(
        "account {0:?} uses a service account (service_account_key_file): there is nothing to authorize; a Workspace admin sets up domain-wide delegation instead (see docs/gmail-setup.md)"
    )]
    ServiceAccount(String),
    #[error(
        "account {0:?} sends app-only (scope https://outlook.office365.com/.default): there is nothing to authorize; an administrator grants the application SMTP.SendAsApp and registers its Exchange service principal for the mailbox instead (see docs/microsoft-setup.md)"
    )]
    AppOnly(String),
    #[error(
        "cannot listen on {addr} for Google's redirect: {source} (choose another --port, or 0 for any free port)"
    )]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "gave up after {}: no answer from the browser; run authorize again (on a machine without a browser, paste the final http://127.0.0.1:PORT/?code=... address, or use ssh -L)",
        humantime::format_duration(*.0)
    )]
    Timeout(Duration),
    #[error(
        "refused Google's answer: its state does not match this run (a stale URL from an earlier run, or a forged request: possible CSRF); run authorize again and use the new URL"
    )]
    StateMismatch,
    /// Google refused, at consent or at the code exchange.
    #[error("Google says {code}{}: {explanation}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Google {
        code: String,
        description: Option<String>,
        explanation: String,
    },
    #[error("could not exchange the code for tokens: {0}")]
    Exchange(String),
    #[error(
        "Google returned no refresh token; remove oauthrelay's access at https://myaccount.google.com/permissions and run authorize again"
    )]
    NoRefreshToken,
    #[error("could not store the tokens: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Setup(String),
}

/// An answer from Google, via the redirect or pasted.
#[derive(Debug, Default, Clone)]
struct Callback {
    code: Option<SecretString>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

type Client = BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// An authorization in progress: the listener is bound and the URL built.
pub struct Flow {
    account: Account,
    options: Options,
    listener: TcpListener,
    port: u16,
    redirect_uri: String,
    url: url::Url,
    state: CsrfToken,
    verifier: PkceCodeVerifier,
    client: Client,
}

impl fmt::Debug for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flow")
            .field("account", &self.account.name)
            .field("redirect_uri", &self.redirect_uri)
            .finish_non_exhaustive()
    }
}

impl Flow {
    /// Bind the redirect listener and build the authorization URL.
    pub async fn start(account: &Account, options: &Options) -> Result<Flow, AuthorizeError> {
        let (client_id, client_secret) = match &account.credentials {
            Credentials::Client {
                client_id,
                client_secret,
                ..
            } => (client_id.clone(), client_secret.clone()),
            Credentials::AppOnly { .. } => {
                return Err(AuthorizeError::AppOnly(account.name.clone()));
            }
            Credentials::ServiceAccount(_)
            | Credentials::NotLoaded {
                service_account: true,
            } => {
                return Err(AuthorizeError::ServiceAccount(account.name.clone()));
            }
            Credentials::NotLoaded { .. } => {
                return Err(AuthorizeError::Setup(format!(
                    "account {:?} was resolved without its client secret",
                    account.name
                )));
            }
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, options.port));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AuthorizeError::Listen { addr, source })?;
        let port = listener
            .local_addr()
            .map_err(|source| AuthorizeError::Listen { addr, source })?
            .port();
        let redirect_uri = format!("http://127.0.0.1:{port}/");
        let redirect = RedirectUrl::new(redirect_uri.clone())
            .map_err(|e| AuthorizeError::Setup(format!("redirect URI: {e}")))?;
        let mut client = BasicClient::new(ClientId::new(client_id));
        if let Some(secret) = &client_secret {
            client =
                client.set_client_secret(ClientSecret::new(secret.expose_secret().to_string()));
        }
        let client = client
            .set_auth_uri(AuthUrl::from_url(account.auth_url.url().clone()))
            .set_token_uri(TokenUrl::from_url(account.token_url.url().clone()))
            .set_redirect_uri(redirect)
            .set_auth_type(AuthType::RequestBody);
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client
            .authorize_url(CsrfToken::new_random)
            .add_scopes(account.scopes.iter().cloned().map(Scope::new))
            .set_pkce_challenge(challenge);
        if account.config.provider == crate::config::Provider::Google {
            // Microsoft gives a refresh token for the offline_access scope.
            request = request.add_extra_param("access_type", "offline");
        }
        let (url, state) = request
            .add_extra_param("prompt", "consent")
            .add_extra_param("login_hint", account.email.clone())
            .url();
        Ok(Flow {
            account: account.clone(),
            options: options.clone(),
            listener,
            port,
            redirect_uri,
            url,
            state,
            verifier,
            client,
        })
    }

    /// The address to open in a browser.
    pub fn url(&self) -> &url::Url {
        &self.url
    }

    /// The port the redirect listener is on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT/`
    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// Try to open the URL in a browser with `xdg-open`. Returns whether a
    /// browser could be started (never on a machine without a display).
    pub fn open_browser(&self) -> bool {
        let has_display = ["DISPLAY", "WAYLAND_DISPLAY"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
        if !has_display {
            return false;
        }
        match std::process::Command::new("xdg-open")
            .arg(self.url.as_str())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(mut child) => {
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
                true
            }
            Err(_) => false,
        }
    }

    /// The instructions `run` prints.
    pub fn instructions(&self, browser_opened: bool) -> String {
        let port = self.port;
        let a = &self.account;
        let mut s = format!(
            "Authorize oauthrelay to send mail as {email} (account '{name}').\n\n\
             Open this address in a browser and sign in as {email}:\n\n    {url}\n\n",
            email = a.email,
            name = a.name,
            url = self.url
        );
        if browser_opened {
            s.push_str("(A browser was started with it.)\n\n");
        }
        s.push_str(&format!(
            "Waiting up to {} for Google to send the browser back to {}\n\n\
             No browser on this machine? Either:\n  \
             - open the address on any computer and approve; the browser then fails to load a\n    \
             http://127.0.0.1:{port}/?code=... page: copy that whole address from the address bar,\n    \
             paste it here and press Enter; or\n  \
             - forward the port from the computer with the browser first:\n      \
             ssh -L {port}:127.0.0.1:{port} THIS-HOST\n    \
             (choose the port in advance with --port {port})\n\
             If Google shows \"Error 400: redirect_uri_mismatch\", the OAuth client is not a \"Desktop app\" client.\n",
            humantime::format_duration(self.options.timeout),
            self.redirect_uri
        ));
        s
    }

    /// Wait for Google's answer (redirect or a pasted line from `paste`),
    /// then exchange the code and store the tokens. `out` gets short
    /// progress messages.
    pub async fn finish<R>(
        self,
        paste: Option<R>,
        out: &mut (dyn Write + Send),
    ) -> Result<Summary, AuthorizeError>
    where
        R: AsyncBufRead + Unpin + Send,
    {
        let (tx, mut rx) = mpsc::channel::<Answer>(8);
        let server = tokio::spawn(serve(self.listener, tx));
        let _stop = AbortOnDrop(server);

        let mut lines = paste.map(|r| r.lines());
        let deadline = tokio::time::sleep(self.options.timeout);
        tokio::pin!(deadline);

        let (callback, via, reply) = loop {
            tokio::select! {
                _ = &mut deadline => return Err(AuthorizeError::Timeout(self.options.timeout)),
                Some((cb, reply, written)) = rx.recv() => break (cb, Via::Redirect, Some((reply, written))),
                line = next_line(&mut lines) => match line {
                    None => lines = None,
                    Some(line) if line.trim().is_empty() => {}
                    Some(line) => match parse_pasted(&line) {
                        Ok(cb) => break (cb, Via::Pasted, None),
                        Err(hint) => {
                            let _ = writeln!(out, "{hint}");
                        }
                    },
                },
            }
        };

        let account = self.account.clone();
        let result = complete(
            &self.client,
            &self.account,
            &self.options,
            self.state,
            self.verifier,
            callback,
            via,
        )
        .await;
        if let Some((reply, written)) = reply {
            let _ = reply.send(match &result {
                Ok(_) => page(
                    "Authorized",
                    &format!(
                        "oauthrelay can now send mail as {} (account '{}'). You can close this tab.",
                        account.email, account.name
                    ),
                ),
                Err(e) => page("Authorization failed", &e.to_string()),
            });
            // The process may exit as soon as we return, dropping the task
            // that answers the browser: wait (briefly) until the page is
            // written, or the browser would get an empty reply.
            let _ = tokio::time::timeout(Duration::from_secs(5), written).await;
        }
        result
    }
}

/// The whole flow: start, print the instructions and URL to `out`, open a
/// browser unless `options.no_browser`, and finish. `paste` (normally
/// stdin) may carry the pasted redirect address.
pub async fn run<R>(
    account: &Account,
    options: &Options,
    out: &mut (dyn Write + Send),
    paste: Option<R>,
) -> Result<Summary, AuthorizeError>
where
    R: AsyncBufRead + Unpin + Send,
{
    let flow = Flow::start(account, options).await?;
    let opened = !options.no_browser && flow.open_browser();
    let _ = write!(out, "{}", flow.instructions(opened));
    let _ = out.flush();
    flow.finish(paste, out).await
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn next_line<R>(lines: &mut Option<tokio::io::Lines<R>>) -> Option<String>
where
    R: AsyncBufRead + Unpin,
{
    match lines {
        Some(l) => l.next_line().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

async fn complete(
    client: &Client,
    account: &Account,
    options: &Options,
    expected_state: CsrfToken,
    verifier: PkceCodeVerifier,
    cb: Callback,
    via: Via,
) -> Result<Summary, AuthorizeError> {
    let state_ok = cb
        .state
        .as_deref()
        .is_some_and(|s| constant_time_eq(s.as_bytes(), expected_state.secret().as_bytes()));
    if !state_ok {
        tracing::warn!(account = %account.name, "authorization answer refused: state mismatch");
        return Err(AuthorizeError::StateMismatch);
    }
    if let Some(code) = cb.error {
        return Err(google_error(code, cb.error_description, false));
    }
    let Some(code) = cb.code else {
        return Err(AuthorizeError::Exchange(
            "Google's answer holds neither a code nor an error".into(),
        ));
    };

    let http = crate::http::client(&account.extra_roots, options.request_timeout)
        .map_err(AuthorizeError::Setup)?;
    let exchange = client
        .exchange_code(AuthorizationCode::new(code.expose_secret().to_string()))
        .set_pkce_verifier(verifier)
        .request_async(&http);
    let token = match tokio::time::timeout(options.request_timeout, exchange).await {
        Err(_) => {
            return Err(AuthorizeError::Exchange(format!(
                "no answer from {} within {}",
                account.token_url,
                humantime::format_duration(options.request_timeout)
            )));
        }
        Ok(Err(e)) => return Err(exchange_error(e)),
        Ok(Ok(t)) => t,
    };
    let Some(refresh) = token.refresh_token() else {
        return Err(AuthorizeError::NoRefreshToken);
    };
    let refresh = SecretString::from(refresh.secret().clone());
    let access = SecretString::from(token.access_token().secret().clone());
    let lifetime = token
        .expires_in()
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(3599))
        .min(crate::http::MAX_LIFETIME);
    let expires_at = SystemTime::now() + lifetime;
    let scopes = match token.scopes() {
        Some(s) if !s.is_empty() => s.iter().map(|s| s.to_string()).collect(),
        _ => account.scopes.clone(),
    };
    store_authorized(account, refresh, access, expires_at, scopes.clone())?;
    tracing::info!(account = %account.name, file = %account.token_file.display(), "authorized; refresh token stored");
    if !scopes.iter().any(|s| account.scopes.contains(s)) {
        tracing::warn!(account = %account.name, granted = %scopes.join(" "), "Google granted other scopes than requested");
    }
    Ok(Summary {
        account: account.name.clone(),
        email: account.email.clone(),
        token_file: account.token_file.clone(),
        scopes,
        access_token_expires_at: expires_at,
        via,
    })
}

/// Store a new grant from a first sign-in (code or device flow): the
/// refresh token and access token, atomically, clearing any refusal.
pub(crate) fn store_authorized(
    account: &Account,
    refresh: SecretString,
    access: SecretString,
    expires_at: SystemTime,
    scopes: Vec<String>,
) -> Result<(), StoreError> {
    let now = SystemTime::now();
    store::update(&account.token_file, |f| {
        f.account = account.name.clone();
        f.email = account.email.clone();
        f.refresh_token = Some(refresh);
        f.access_token = Some(access);
        f.access_token_expires_at = Some(expires_at);
        f.scopes = scopes;
        f.authorized_at = Some(now);
        f.last_refresh = Some(RefreshRecord {
            at: now,
            result: RefreshResult::Ok,
            error_code: None,
            error: None,
        });
        f.needs_authorization = false;
        f.refresh_started_at = None;
    })?;
    Ok(())
}

fn google_error(code: String, description: Option<String>, at_exchange: bool) -> AuthorizeError {
    let explanation = match code.as_str() {
        "invalid_grant" if at_exchange => {
            "the authorization code expired, was already used, or does not match this run's PKCE verifier; run authorize again".to_string()
        }
        c => crate::explain::explain(c)
            .map(str::to_string)
            .unwrap_or_else(|| "see docs/gmail-setup.md".to_string()),
    };
    AuthorizeError::Google {
        code,
        description,
        explanation,
    }
}

fn exchange_error<RE>(e: RequestTokenError<RE, oauth2::basic::BasicErrorResponse>) -> AuthorizeError
where
    RE: std::error::Error + 'static,
{
    match e {
        RequestTokenError::ServerResponse(r) => google_error(
            r.error().as_ref().to_string(),
            r.error_description().cloned(),
            true,
        ),
        RequestTokenError::Request(e) => {
            let mut s = e.to_string();
            let mut source = e.source();
            while let Some(inner) = source {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                source = inner.source();
            }
            AuthorizeError::Exchange(s)
        }
        // Never print the body or serde's message: either may quote a token.
        RequestTokenError::Parse(e, _) => AuthorizeError::Exchange(format!(
            "the token endpoint's answer is not a token response (at {})",
            e.path()
        )),
        RequestTokenError::Other(s) => AuthorizeError::Exchange(s),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parse what the user pasted: the whole redirect address, or just its
/// query string.
fn parse_pasted(line: &str) -> Result<Callback, &'static str> {
    let hint = "That is not the redirect address. After approving, copy the whole address from the browser's address bar (it starts with http://127.0.0.1:) and paste it here.";
    let line = line
        .trim()
        .trim_matches(|c| c == '"' || c == '\'' || c == '<' || c == '>');
    let query = if line.starts_with("http://") || line.starts_with("https://") {
        let url = url::Url::parse(line).map_err(|_| hint)?;
        url.query().unwrap_or_default().to_string()
    } else {
        line.trim_start_matches('/')
            .trim_start_matches('?')
            .to_string()
    };
    let cb = parse_query(&query);
    if cb.state.is_none() || (cb.code.is_none() && cb.error.is_none()) {
        return Err(hint);
    }
    Ok(cb)
}

fn parse_query(query: &str) -> Callback {
    let mut cb = Callback::default();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "code" if !v.is_empty() => cb.code = Some(SecretString::from(v.into_owned())),
            "state" => cb.state = Some(v.into_owned()),
            "error" if !v.is_empty() => cb.error = Some(v.into_owned()),
            "error_description" => cb.error_description = Some(v.into_owned()),
            _ => {}
        }
    }
    cb
}

/// From the loopback listener to [`Flow::finish`]: Google's answer, where
/// to send the page for the browser, and word once that page is written.
type Answer = (Callback, oneshot::Sender<String>, oneshot::Receiver<()>);

/// The redirect listener: answers Google's redirect and nothing else.
async fn serve(listener: TcpListener, tx: mpsc::Sender<Answer>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(answer(stream, tx.clone()));
    }
}

const MAX_REQUEST_HEAD: usize = 16 * 1024;

async fn answer(mut stream: TcpStream, tx: mpsc::Sender<Answer>) {
    // Browsers open spare connections that never send anything: bound the
    // wait for a request.
    let head = match tokio::time::timeout(Duration::from_secs(30), read_head(&mut stream)).await {
        Ok(Some(h)) => h,
        _ => return,
    };
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if method != "GET" || path != "/" {
        let _ = respond(
            &mut stream,
            "404 Not Found",
            &page("Not found", "Nothing here."),
        )
        .await;
        return;
    }
    let cb = parse_query(query);
    if cb.code.is_none() && cb.error.is_none() {
        let _ = respond(
            &mut stream,
            "400 Bad Request",
            &page(
                "Waiting for Google",
                "This address only receives Google's answer. Open the address printed by oauthrelay authorize.",
            ),
        )
        .await;
        return;
    }
    let (reply_tx, reply_rx) = oneshot::channel();
    let (written_tx, written_rx) = oneshot::channel();
    if tx.send((cb, reply_tx, written_rx)).await.is_err() {
        let _ = respond(
            &mut stream,
            "410 Gone",
            &page(
                "Too late",
                "oauthrelay authorize is no longer waiting; run it again.",
            ),
        )
        .await;
        return;
    }
    let body = match tokio::time::timeout(Duration::from_secs(60), reply_rx).await {
        Ok(Ok(body)) => body,
        _ => page(
            "Answer received",
            "oauthrelay received Google's answer; see the terminal for the result.",
        ),
    };
    let _ = respond(&mut stream, "200 OK", &body).await;
    let _ = written_tx.send(());
}

async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Some(String::from_utf8_lossy(&buf).into_owned());
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return None;
        }
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.flush().await?;
    stream.shutdown().await
}

fn page(title: &str, text: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>oauthrelay: {t}</title></head>\
         <body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\"><h1>oauthrelay: {t}</h1><p>{x}</p></body></html>",
        t = html_escape(title),
        x = html_escape(text)
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn pasted_addresses() {
        let cb = parse_pasted(
            "  http://127.0.0.1:4321/?state=abc&code=4/0Ab-x&scope=https://mail.google.com/ \n",
        )
        .unwrap();
        assert_eq!(cb.state.as_deref(), Some("abc"));
        assert_eq!(cb.code.unwrap().expose_secret(), "4/0Ab-x");
        let cb = parse_pasted("/?code=xyz&state=s1").unwrap();
        assert_eq!(cb.code.unwrap().expose_secret(), "xyz");
        let cb = parse_pasted("http://127.0.0.1:1/?error=access_denied&state=s").unwrap();
        assert_eq!(cb.error.as_deref(), Some("access_denied"));
        assert!(parse_pasted("4/0Ab-just-a-code").is_err());
        assert!(parse_pasted("http://127.0.0.1:1/?code=x").is_err());
    }
}
