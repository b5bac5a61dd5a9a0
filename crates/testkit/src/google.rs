//! A fake Google OAuth2 server: the token endpoint and the consent
//! (authorization) endpoint, in process on `127.0.0.1:0`, answering the way
//! `docs/gmail-replies.md` says Google does, faults included.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use testkit::google::{Consent, Fault, FakeGoogle, GrantType};
//! let google = FakeGoogle::start().await?;            // plain http (loopback only)
//! google.add_client("client-1.apps.googleusercontent.com", "s3cret");
//! google.set_consent(Consent::approve("me@gmail.com"));
//! // point an account at google.auth_url() / google.token_url() ...
//! let refresh = google.issue_refresh_token("client-1.apps.googleusercontent.com", "me@gmail.com");
//! google.fail_next(2, Fault::Status(503));            // the next 2 token requests fail
//! assert_eq!(google.token_requests(GrantType::RefreshToken), 0);
//! # let _ = refresh; Ok(()) }
//! ```
//!
//! # Endpoints
//! - `GET /o/oauth2/v2/auth` ([`FakeGoogle::auth_url`]): consent. Checks the
//!   client id (unknown: a `401 invalid_client` page, no redirect, like
//!   Google), the redirect URI (must be loopback `http://`, else a
//!   `400 redirect_uri_mismatch` page), `response_type=code`, PKCE
//!   (`code_challenge_method=S256`), then, per [`Consent`], auto-approves
//!   (`302` to `redirect_uri?state=..&code=..&scope=..`) or denies
//!   (`302` to `redirect_uri?error=access_denied&state=..`). A refresh token
//!   is issued for the code only with `access_type=offline`.
//! - `POST /token` ([`FakeGoogle::token_url`]), form-encoded, client
//!   credentials in the form or HTTP Basic:
//!   - `authorization_code`: code known and unused, same client and
//!     `redirect_uri` as at consent, `code_verifier` matching the S256
//!     challenge;
//!   - `refresh_token`: token known, not revoked, issued to this client; no
//!     new refresh token unless [`FakeGoogle::set_rotate_refresh_tokens`];
//!   - `urn:ietf:params:oauth:grant-type:jwt-bearer`: RS256 assertion whose
//!     signature is verified with the registered service account's public
//!     key, `kid`, `iss`, `aud` (this endpoint's URL), `iat`/`exp` (at most
//!     one hour) and `sub` checked, domain-wide delegation required.
//!
//!   Answers: `200 {"access_token":"ya29...","expires_in":3599,"scope":...,
//!   "token_type":"Bearer"}`; `400 {"error":"invalid_grant","error_description":
//!   "Token has been expired or revoked."}`; `401 {"error":"invalid_client",
//!   "error_description":"Unauthorized"}`; `401 unauthorized_client` for a
//!   service account without delegation.
//!
//! # For a fake SMTP server
//! [`FakeGoogle::is_valid_access_token`], [`FakeGoogle::email_for`] and
//! [`FakeGoogle::token_validator`] (a `(user, token) -> bool` closure, for
//! `gmail::FakeGmail::set_token_validator`) say whether an access token was
//! issued here, is unexpired and unrevoked, and for which user. Expiry uses
//! Tokio's clock, so `tokio::time::pause()`/`advance()` expire tokens.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{KeyPair, RSA_PKCS1_2048_8192_SHA256, RsaKeyPair, UnparsedPublicKey};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::ca::TestCa;

/// The consent endpoint's path.
pub const AUTH_PATH: &str = "/o/oauth2/v2/auth";
/// The token endpoint's path.
pub const TOKEN_PATH: &str = "/token";
/// Gmail's scope.
pub const GMAIL_SCOPE: &str = "https://mail.google.com/";
/// The JWT bearer grant type.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// A TEST-ONLY RSA key (PKCS#8 PEM) used for fake service accounts.
pub const SERVICE_ACCOUNT_TEST_KEY: &str =
    include_str!("../fixtures/service-account-TEST-ONLY.key");
/// Another TEST-ONLY RSA key: signatures made with it do not verify against
/// [`SERVICE_ACCOUNT_TEST_KEY`].
pub const OTHER_TEST_KEY: &str = include_str!("../fixtures/other-TEST-ONLY.key");

/// What the consent screen does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consent {
    /// The user signs in as `email` and clicks Allow.
    Approve { email: String },
    /// Redirect back with `error=<error>` (`access_denied` when the user
    /// clicks Cancel, `invalid_scope`, `org_internal`...).
    Deny { error: String },
}

impl Consent {
    pub fn approve(email: &str) -> Consent {
        Consent::Approve {
            email: email.to_string(),
        }
    }
    /// The user clicked Cancel.
    pub fn cancel() -> Consent {
        Consent::Deny {
            error: "access_denied".into(),
        }
    }
}

/// Token request kinds, for [`FakeGoogle::token_requests`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrantType {
    AuthorizationCode,
    RefreshToken,
    JwtBearer,
    /// Anything else (answered `unsupported_grant_type`).
    Other,
}

/// A scripted failure of the token endpoint, used by the next request(s)
/// ([`FakeGoogle::fail_next`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and an HTML error page (as Google's
    /// front ends do for 500/502/503), without processing the request.
    Status(u16),
    /// Say nothing for this long, then drop the request unprocessed (a hung
    /// server: the client should time out first).
    Hang(Duration),
    /// Wait this long, then process the request normally.
    Slow(Duration),
    /// Answer with an OAuth error JSON body without processing.
    Error {
        status: u16,
        error: String,
        description: String,
    },
}

impl Fault {
    /// `400 {"error":"invalid_grant","error_description":"Token has been expired or revoked."}`
    pub fn invalid_grant() -> Fault {
        Fault::Error {
            status: 400,
            error: "invalid_grant".into(),
            description: "Token has been expired or revoked.".into(),
        }
    }
    /// `401 {"error":"invalid_client","error_description":"Unauthorized"}`
    pub fn invalid_client() -> Fault {
        Fault::Error {
            status: 401,
            error: "invalid_client".into(),
            description: "Unauthorized".into(),
        }
    }
    /// `401 unauthorized_client` (service account without delegation).
    pub fn unauthorized_client() -> Fault {
        Fault::Error {
            status: 401,
            error: "unauthorized_client".into(),
            description: "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.".into(),
        }
    }
    /// `400 admin_policy_enforced`.
    pub fn admin_policy_enforced() -> Fault {
        Fault::Error {
            status: 400,
            error: "admin_policy_enforced".into(),
            description:
                "Access to your account data is restricted by policies within your organization."
                    .into(),
        }
    }
}

/// A fake service account: the JSON key file to give the code under test,
/// and what the fake registered.
#[derive(Debug, Clone)]
pub struct ServiceAccountKeyFile {
    /// Google's JSON key format (`type`, `client_email`, `private_key`...).
    pub json: String,
    pub client_email: String,
    pub client_id: String,
    pub private_key_id: String,
}

/// What the consent endpoint saw, for asserting the authorization URL.
#[derive(Debug, Clone, Default)]
pub struct ConsentRequest {
    pub params: HashMap<String, String>,
}

impl ConsentRequest {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }
}

/// The fake server. Dropping it stops it.
pub struct FakeGoogle {
    shared: Arc<Shared>,
    http_addr: SocketAddr,
    https_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<FakeState>,
}

struct ClientReg {
    secret: String,
}

struct CodeGrant {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    email: String,
    scope: String,
    offline: bool,
}

struct RefreshGrant {
    client_id: String,
    email: String,
    scope: String,
    revoked: bool,
}

struct AccessGrant {
    email: String,
    /// Space-separated scopes granted.
    scope: String,
    expires: Instant,
    revoked: bool,
}

struct ServiceAccountReg {
    public_key: Vec<u8>,
    private_key_id: String,
    client_id: String,
    delegated: bool,
}

struct FakeState {
    clients: HashMap<String, ClientReg>,
    consent: Consent,
    codes: HashMap<String, CodeGrant>,
    refresh_tokens: HashMap<String, RefreshGrant>,
    access_tokens: HashMap<String, AccessGrant>,
    service_accounts: HashMap<String, ServiceAccountReg>,
    workspace_users: HashSet<String>,
    faults: VecDeque<Fault>,
    lifetime: Duration,
    rotate: bool,
    requests: HashMap<GrantType, usize>,
    consent_requests: usize,
    last_consent: Option<ConsentRequest>,
    last_jwt_claims: Option<serde_json::Value>,
    last_jwt_header: Option<serde_json::Value>,
    token_urls: Vec<String>,
    issued_codes: Vec<String>,
}

impl FakeGoogle {
    /// Start on `http://127.0.0.1:<free port>`.
    pub async fn start() -> io::Result<FakeGoogle> {
        FakeGoogle::start_inner(None).await
    }

    /// Start on plain HTTP and also on HTTPS (another port) with a server
    /// certificate from `ca`; clients trust it with `ca.write_to(dir)`'s
    /// `ca.pem` as their `ca_file`.
    pub async fn start_with_tls(ca: &TestCa) -> io::Result<FakeGoogle> {
        FakeGoogle::start_inner(Some(ca)).await
    }

    async fn start_inner(ca: Option<&TestCa>) -> io::Result<FakeGoogle> {
        let shared = Arc::new(Shared {
            state: Mutex::new(FakeState {
                clients: HashMap::new(),
                consent: Consent::Deny {
                    error: "access_denied".into(),
                },
                codes: HashMap::new(),
                refresh_tokens: HashMap::new(),
                access_tokens: HashMap::new(),
                service_accounts: HashMap::new(),
                workspace_users: HashSet::new(),
                faults: VecDeque::new(),
                lifetime: Duration::from_secs(3599),
                rotate: false,
                requests: HashMap::new(),
                consent_requests: 0,
                last_consent: None,
                last_jwt_claims: None,
                last_jwt_header: None,
                token_urls: Vec::new(),
                issued_codes: Vec::new(),
            }),
        });
        let router = Router::new()
            .route(AUTH_PATH, get(consent))
            .route(TOKEN_PATH, post(token))
            .with_state(shared.clone());

        let mut tasks = Vec::new();
        let http = TcpListener::bind("127.0.0.1:0").await?;
        let http_addr = http.local_addr()?;
        let r = router.clone();
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(http, r).await;
        }));
        let mut token_urls = vec![format!("http://{http_addr}{TOKEN_PATH}")];

        let https_addr = match ca {
            Some(ca) => {
                let tcp = TcpListener::bind("127.0.0.1:0").await?;
                let addr = tcp.local_addr()?;
                let listener = TlsListener {
                    tcp,
                    acceptor: TlsAcceptor::from(ca.server_config()),
                };
                tasks.push(tokio::spawn(async move {
                    let _ = axum::serve(listener, router).await;
                }));
                token_urls.push(format!("https://{addr}{TOKEN_PATH}"));
                token_urls.push(format!("https://localhost:{}{TOKEN_PATH}", addr.port()));
                Some(addr)
            }
            None => None,
        };
        token_urls.push(format!("http://localhost:{}{TOKEN_PATH}", http_addr.port()));
        shared.lock().token_urls = token_urls;
        Ok(FakeGoogle {
            shared,
            http_addr,
            https_addr,
            tasks,
        })
    }

    /// `http://127.0.0.1:PORT/token`
    pub fn token_url(&self) -> String {
        format!("http://{}{TOKEN_PATH}", self.http_addr)
    }

    /// `http://127.0.0.1:PORT/o/oauth2/v2/auth`
    pub fn auth_url(&self) -> String {
        format!("http://{}{AUTH_PATH}", self.http_addr)
    }

    /// `https://127.0.0.1:PORT/token` (only with [`FakeGoogle::start_with_tls`]).
    pub fn https_token_url(&self) -> Option<String> {
        self.https_addr.map(|a| format!("https://{a}{TOKEN_PATH}"))
    }

    /// `https://127.0.0.1:PORT/o/oauth2/v2/auth` (only with TLS).
    pub fn https_auth_url(&self) -> Option<String> {
        self.https_addr.map(|a| format!("https://{a}{AUTH_PATH}"))
    }

    // ---- set-up ----

    /// Register a Desktop-app OAuth client.
    pub fn add_client(&self, client_id: &str, client_secret: &str) {
        self.shared.lock().clients.insert(
            client_id.to_string(),
            ClientReg {
                secret: client_secret.to_string(),
            },
        );
    }

    /// What the consent screen does from now on (default: deny).
    pub fn set_consent(&self, consent: Consent) {
        self.shared.lock().consent = consent;
    }

    /// `expires_in` of new access tokens (default 3599 s).
    pub fn set_access_token_lifetime(&self, lifetime: Duration) {
        self.shared.lock().lifetime = lifetime;
    }

    /// Return a new refresh token with every refresh (and revoke the old
    /// one). Google normally does not.
    pub fn set_rotate_refresh_tokens(&self, rotate: bool) {
        self.shared.lock().rotate = rotate;
    }

    /// A refresh token for `email` issued to `client_id`, as if consent had
    /// happened (for `token import` tests).
    pub fn issue_refresh_token(&self, client_id: &str, email: &str) -> String {
        self.issue_refresh_token_with_scope(client_id, email, GMAIL_SCOPE)
    }

    /// A refresh token granting `scope` (space-separated), as if consent
    /// had happened with that scope.
    pub fn issue_refresh_token_with_scope(
        &self,
        client_id: &str,
        email: &str,
        scope: &str,
    ) -> String {
        let token = random_token("1//0g", 64);
        self.shared.lock().refresh_tokens.insert(
            token.clone(),
            RefreshGrant {
                client_id: client_id.to_string(),
                email: email.to_string(),
                scope: scope.to_string(),
                revoked: false,
            },
        );
        token
    }

    /// Register a service account whose key is [`SERVICE_ACCOUNT_TEST_KEY`],
    /// with domain-wide delegation granted, and return its JSON key file.
    pub fn add_service_account(&self, client_email: &str) -> ServiceAccountKeyFile {
        let key = key_pair(SERVICE_ACCOUNT_TEST_KEY);
        let private_key_id = random_hex(20);
        let client_id = format!("1{}", random_digits(20));
        self.shared.lock().service_accounts.insert(
            client_email.to_string(),
            ServiceAccountReg {
                public_key: key.public_key().as_ref().to_vec(),
                private_key_id: private_key_id.clone(),
                client_id: client_id.clone(),
                delegated: true,
            },
        );
        ServiceAccountKeyFile {
            json: key_json(
                client_email,
                &client_id,
                &private_key_id,
                SERVICE_ACCOUNT_TEST_KEY,
                &self.token_url(),
            ),
            client_email: client_email.to_string(),
            client_id,
            private_key_id,
        }
    }

    /// A key file for a registered service account, with the right `kid`
    /// but signed by [`OTHER_TEST_KEY`]: its assertions fail the signature
    /// check (`invalid_grant`, "Invalid JWT Signature.").
    pub fn forged_service_account_key(&self, registered: &ServiceAccountKeyFile) -> String {
        key_json(
            &registered.client_email,
            &registered.client_id,
            &registered.private_key_id,
            OTHER_TEST_KEY,
            &self.token_url(),
        )
    }

    /// Grant or withdraw domain-wide delegation (without it: `401
    /// unauthorized_client`).
    pub fn set_delegation(&self, client_email: &str, granted: bool) {
        if let Some(sa) = self.shared.lock().service_accounts.get_mut(client_email) {
            sa.delegated = granted;
        }
    }

    /// Restrict service-account `sub`s to these users (default: anyone).
    /// An unknown `sub` gets `invalid_grant` ("Invalid email or User ID").
    pub fn add_workspace_user(&self, email: &str) {
        self.shared
            .lock()
            .workspace_users
            .insert(email.to_ascii_lowercase());
    }

    // ---- faults ----

    /// The next `n` token requests fail with `fault` (queued after any
    /// faults already waiting).
    pub fn fail_next(&self, n: usize, fault: Fault) {
        let mut st = self.shared.lock();
        for _ in 0..n {
            st.faults.push_back(fault.clone());
        }
    }

    /// Drop any queued faults.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Revoke one refresh token (the user removed access): refreshing with
    /// it gets `invalid_grant`.
    pub fn revoke_refresh_token(&self, token: &str) {
        if let Some(g) = self.shared.lock().refresh_tokens.get_mut(token) {
            g.revoked = true;
        }
    }

    /// Revoke every refresh token of `email` (password change).
    pub fn revoke_all_refresh_tokens(&self, email: &str) {
        for g in self.shared.lock().refresh_tokens.values_mut() {
            if g.email.eq_ignore_ascii_case(email) {
                g.revoked = true;
            }
        }
    }

    /// Make one access token invalid (as if it expired).
    pub fn expire_access_token(&self, token: &str) {
        if let Some(g) = self.shared.lock().access_tokens.get_mut(token) {
            g.revoked = true;
        }
    }

    /// Make every access token issued so far invalid.
    pub fn expire_all_access_tokens(&self) {
        for g in self.shared.lock().access_tokens.values_mut() {
            g.revoked = true;
        }
    }

    // ---- validation (for the fake SMTP server) ----

    /// The token was issued here and is neither expired nor revoked.
    pub fn is_valid_access_token(&self, token: &str) -> bool {
        self.email_for(token).is_some()
    }

    /// The user a valid access token was issued for.
    pub fn email_for(&self, token: &str) -> Option<String> {
        self.shared.email_for(token)
    }

    /// The user and the granted scopes of a valid access token.
    pub fn grant_for(&self, token: &str) -> Option<(String, Vec<String>)> {
        let st = self.shared.lock();
        let g = st.access_tokens.get(token)?;
        (!g.revoked && Instant::now() < g.expires).then(|| {
            (
                g.email.clone(),
                g.scope.split_whitespace().map(str::to_string).collect(),
            )
        })
    }

    /// `token -> Some((user, scopes))` for valid tokens: plug into the fake
    /// Gmail API's bearer check.
    pub fn bearer_validator(
        &self,
    ) -> impl Fn(&str) -> Option<(String, Vec<String>)> + Send + Sync + 'static {
        let shared = self.shared.clone();
        move |token: &str| {
            let st = shared.lock();
            let g = st.access_tokens.get(token)?;
            (!g.revoked && Instant::now() < g.expires).then(|| {
                (
                    g.email.clone(),
                    g.scope.split_whitespace().map(str::to_string).collect(),
                )
            })
        }
    }

    /// `(user, token) -> bool`: the token is valid, was issued for `user`
    /// (case-insensitive) and carries `https://mail.google.com/`, the only
    /// scope Gmail's SMTP server takes. Plug into the fake Gmail's
    /// validator.
    pub fn token_validator(&self) -> impl Fn(&str, &str) -> bool + Send + Sync + 'static {
        let shared = self.shared.clone();
        move |user: &str, token: &str| {
            let st = shared.lock();
            st.access_tokens.get(token).is_some_and(|g| {
                !g.revoked
                    && Instant::now() < g.expires
                    && g.email.eq_ignore_ascii_case(user)
                    && g.scope.split_whitespace().any(|s| s == GMAIL_SCOPE)
            })
        }
    }

    /// Every access token issued so far (in no particular order).
    pub fn issued_access_tokens(&self) -> Vec<String> {
        self.shared.lock().access_tokens.keys().cloned().collect()
    }

    /// Every refresh token issued so far (including revoked ones).
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        self.shared.lock().refresh_tokens.keys().cloned().collect()
    }

    /// Every authorization code the consent endpoint handed out.
    pub fn issued_authorization_codes(&self) -> Vec<String> {
        self.shared.lock().issued_codes.clone()
    }

    // ---- counters ----

    /// Token requests received for `grant` (faulted ones included).
    pub fn token_requests(&self, grant: GrantType) -> usize {
        self.shared
            .lock()
            .requests
            .get(&grant)
            .copied()
            .unwrap_or(0)
    }

    /// All token requests received.
    pub fn total_token_requests(&self) -> usize {
        self.shared.lock().requests.values().sum()
    }

    /// Requests to the consent endpoint.
    pub fn consent_requests(&self) -> usize {
        self.shared.lock().consent_requests
    }

    /// The latest consent request's parameters.
    pub fn last_consent_request(&self) -> Option<ConsentRequest> {
        self.shared.lock().last_consent.clone()
    }

    /// Header and claims of the latest JWT assertion that passed the
    /// signature check.
    pub fn last_jwt(&self) -> Option<(serde_json::Value, serde_json::Value)> {
        let st = self.shared.lock();
        Some((st.last_jwt_header.clone()?, st.last_jwt_claims.clone()?))
    }
}

impl Drop for FakeGoogle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn email_for(&self, token: &str) -> Option<String> {
        let st = self.lock();
        let g = st.access_tokens.get(token)?;
        (!g.revoked && Instant::now() < g.expires).then(|| g.email.clone())
    }
}

// ---- HTTP handlers ----

async fn consent(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    let params: HashMap<String, String> =
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let mut st = shared.lock();
    st.consent_requests += 1;
    st.last_consent = Some(ConsentRequest {
        params: params.clone(),
    });
    let p = |k: &str| params.get(k).map(String::as_str).unwrap_or("");

    if !st.clients.contains_key(p("client_id")) {
        return error_page(
            StatusCode::UNAUTHORIZED,
            "Error 401: invalid_client",
            "The OAuth client was not found.",
        );
    }
    let redirect = match url::Url::parse(p("redirect_uri")) {
        Ok(u) if u.scheme() == "http" && is_loopback(&u) => u,
        _ => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Error 400: redirect_uri_mismatch",
                "You can't sign in to this app because it doesn't comply with Google's OAuth 2.0 policy.",
            );
        }
    };
    let state = p("state").to_string();
    let back = |pairs: &[(&str, &str)]| {
        let mut u = redirect.clone();
        {
            let mut q = u.query_pairs_mut();
            for (k, v) in pairs {
                q.append_pair(k, v);
            }
        }
        (StatusCode::FOUND, [(header::LOCATION, u.to_string())]).into_response()
    };
    if p("response_type") != "code" {
        return back(&[("error", "unsupported_response_type"), ("state", &state)]);
    }
    if p("code_challenge").is_empty() || p("code_challenge_method") != "S256" {
        return back(&[("error", "invalid_request"), ("state", &state)]);
    }
    let scope = p("scope").to_string();
    let known = [
        GMAIL_SCOPE,
        "https://www.googleapis.com/auth/gmail.send",
        "openid",
        "email",
    ];
    if scope.is_empty() || scope.split_whitespace().any(|s| !known.contains(&s)) {
        return back(&[("error", "invalid_scope"), ("state", &state)]);
    }
    match st.consent.clone() {
        Consent::Deny { error } => back(&[("error", &error), ("state", &state)]),
        Consent::Approve { email } => {
            let code = random_token("4/0A", 48);
            st.issued_codes.push(code.clone());
            st.codes.insert(
                code.clone(),
                CodeGrant {
                    client_id: p("client_id").to_string(),
                    redirect_uri: p("redirect_uri").to_string(),
                    challenge: p("code_challenge").to_string(),
                    email,
                    scope: scope.clone(),
                    offline: p("access_type") == "offline",
                },
            );
            back(&[("state", &state), ("code", &code), ("scope", &scope)])
        }
    }
}

async fn token(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let grant = match form.get("grant_type").map(String::as_str) {
        Some("authorization_code") => GrantType::AuthorizationCode,
        Some("refresh_token") => GrantType::RefreshToken,
        Some(JWT_BEARER) => GrantType::JwtBearer,
        _ => GrantType::Other,
    };
    let fault = {
        let mut st = shared.lock();
        *st.requests.entry(grant).or_default() += 1;
        st.faults.pop_front()
    };
    match fault {
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (
                status,
                [(header::CONTENT_TYPE, "text/html; charset=UTF-8")],
                format!(
                    "<!DOCTYPE html><html lang=en><title>Error {code} ({})!!1</title><p><b>{code}.</b> That's an error.</p></html>",
                    status.canonical_reason().unwrap_or("Error")
                ),
            )
                .into_response();
        }
        Some(Fault::Hang(d)) => {
            tokio::time::sleep(d).await;
            return StatusCode::GATEWAY_TIMEOUT.into_response();
        }
        Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
        Some(Fault::Error {
            status,
            error,
            description,
        }) => return oauth_error(status, &error, &description),
        None => {}
    }

    let mut st = shared.lock();
    match grant {
        GrantType::AuthorizationCode => st.authorization_code(&form, &headers),
        GrantType::RefreshToken => st.refresh(&form, &headers),
        GrantType::JwtBearer => st.jwt_bearer(&form),
        GrantType::Other => oauth_error(
            400,
            "unsupported_grant_type",
            &format!(
                "Invalid grant_type: {}",
                form.get("grant_type").map(String::as_str).unwrap_or("")
            ),
        ),
    }
}

impl FakeState {
    /// Client credentials from the form or HTTP Basic; `None`: answer
    /// `invalid_client`.
    fn client(&self, form: &HashMap<String, String>, headers: &HeaderMap) -> Option<String> {
        let (mut id, mut secret) = (
            form.get("client_id").cloned(),
            form.get("client_secret").cloned(),
        );
        if let Some(auth) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            && let Some(b64) = auth.strip_prefix("Basic ")
            && let Ok(raw) = STANDARD.decode(b64.trim())
            && let Ok(raw) = String::from_utf8(raw)
            && let Some((i, s)) = raw.split_once(':')
        {
            let dec = |s: &str| {
                url::form_urlencoded::parse(format!("x={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            };
            id = Some(dec(i));
            secret = Some(dec(s));
        }
        match (id, secret) {
            (Some(id), Some(secret))
                if self.clients.get(&id).is_some_and(|c| c.secret == secret) =>
            {
                Some(id)
            }
            _ => None,
        }
    }

    fn issue_access_token(&mut self, email: &str, scope: &str) -> (String, u64) {
        let token = random_token("ya29.a0", 120);
        self.access_tokens.insert(
            token.clone(),
            AccessGrant {
                email: email.to_string(),
                scope: scope.to_string(),
                expires: Instant::now() + self.lifetime,
                revoked: false,
            },
        );
        (token, self.lifetime.as_secs())
    }

    fn authorization_code(
        &mut self,
        form: &HashMap<String, String>,
        headers: &HeaderMap,
    ) -> Response {
        let Some(client_id) = self.client(form, headers) else {
            return oauth_error(401, "invalid_client", "Unauthorized");
        };
        let code = form.get("code").map(String::as_str).unwrap_or("");
        let Some(grant) = self.codes.remove(code) else {
            return oauth_error(400, "invalid_grant", "Malformed auth code.");
        };
        if grant.client_id != client_id {
            return oauth_error(400, "invalid_grant", "Bad Request");
        }
        if form.get("redirect_uri").map(String::as_str) != Some(grant.redirect_uri.as_str()) {
            return oauth_error(400, "redirect_uri_mismatch", "Bad Request");
        }
        let Some(verifier) = form.get("code_verifier") else {
            return oauth_error(400, "invalid_grant", "Missing code verifier.");
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
        if URL_SAFE_NO_PAD.encode(digest.as_ref()) != grant.challenge {
            return oauth_error(400, "invalid_grant", "Invalid code verifier.");
        }
        let (access, expires_in) = self.issue_access_token(&grant.email, &grant.scope);
        let mut body = serde_json::json!({
            "access_token": access,
            "expires_in": expires_in,
            "scope": grant.scope,
            "token_type": "Bearer",
        });
        if grant.offline {
            let refresh = random_token("1//0g", 64);
            self.refresh_tokens.insert(
                refresh.clone(),
                RefreshGrant {
                    client_id,
                    email: grant.email,
                    scope: grant.scope,
                    revoked: false,
                },
            );
            body["refresh_token"] = refresh.into();
        }
        json_ok(body)
    }

    fn refresh(&mut self, form: &HashMap<String, String>, headers: &HeaderMap) -> Response {
        let Some(client_id) = self.client(form, headers) else {
            return oauth_error(401, "invalid_client", "Unauthorized");
        };
        let token = form.get("refresh_token").map(String::as_str).unwrap_or("");
        let (email, scope) = match self.refresh_tokens.get(token) {
            Some(g) if !g.revoked && g.client_id == client_id => (g.email.clone(), g.scope.clone()),
            _ => {
                return oauth_error(400, "invalid_grant", "Token has been expired or revoked.");
            }
        };
        let (access, expires_in) = self.issue_access_token(&email, &scope);
        let mut body = serde_json::json!({
            "access_token": access,
            "expires_in": expires_in,
            "scope": scope,
            "token_type": "Bearer",
        });
        if self.rotate {
            if let Some(old) = self.refresh_tokens.get_mut(token) {
                old.revoked = true;
            }
            let new = random_token("1//0g", 64);
            self.refresh_tokens.insert(
                new.clone(),
                RefreshGrant {
                    client_id,
                    email,
                    scope,
                    revoked: false,
                },
            );
            body["refresh_token"] = new.into();
        }
        json_ok(body)
    }

    fn jwt_bearer(&mut self, form: &HashMap<String, String>) -> Response {
        let bad = |d: &str| oauth_error(400, "invalid_grant", d);
        let assertion = form.get("assertion").map(String::as_str).unwrap_or("");
        let parts: Vec<&str> = assertion.split('.').collect();
        let [h64, c64, s64] = parts[..] else {
            return bad("Invalid JWT: not three parts.");
        };
        let decode = |s: &str| -> Option<serde_json::Value> {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).ok()?).ok()
        };
        let (Some(header), Some(claims), Ok(signature)) =
            (decode(h64), decode(c64), URL_SAFE_NO_PAD.decode(s64))
        else {
            return bad("Invalid JWT: undecodable.");
        };
        if header["alg"] != "RS256" {
            return bad("Invalid JWT: alg must be RS256.");
        }
        let iss = claims["iss"].as_str().unwrap_or("");
        let Some(sa) = self.service_accounts.get(iss) else {
            return oauth_error(401, "invalid_client", "The OAuth client was not found.");
        };
        if header["kid"].as_str() != Some(sa.private_key_id.as_str()) {
            return bad("Invalid JWT Signature.");
        }
        let signed = format!("{h64}.{c64}");
        let key = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &sa.public_key);
        if key.verify(signed.as_bytes(), &signature).is_err() {
            return bad("Invalid JWT Signature.");
        }
        if !claims["aud"]
            .as_str()
            .is_some_and(|aud| self.token_urls.iter().any(|u| u == aud))
        {
            return bad("Invalid JWT: Failed audience check.");
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
            return bad("Invalid JWT: iat and exp are required.");
        };
        if exp <= now || iat > now + 300 || exp < iat || exp - iat > 3600 {
            return bad(
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
            );
        }
        let scope = claims["scope"].as_str().unwrap_or("").to_string();
        if scope.is_empty() {
            return bad("Invalid JWT: scope is required.");
        }
        let Some(sub) = claims["sub"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
        else {
            return oauth_error(
                400,
                "invalid_scope",
                "A subject (sub) is required for Gmail: domain-wide delegation.",
            );
        };
        if !sa.delegated {
            return oauth_error(
                401,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.",
            );
        }
        if !self.workspace_users.is_empty()
            && !self.workspace_users.contains(&sub.to_ascii_lowercase())
        {
            return bad("Invalid email or User ID");
        }
        let _ = &sa.client_id;
        self.last_jwt_header = Some(header);
        self.last_jwt_claims = Some(claims);
        let (access, expires_in) = self.issue_access_token(&sub, &scope);
        json_ok(serde_json::json!({
            "access_token": access,
            "expires_in": expires_in,
            "token_type": "Bearer",
        }))
    }
}

fn is_loopback(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn json_ok(body: serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json; charset=utf-8"),
            (
                header::CACHE_CONTROL,
                "no-cache, no-store, max-age=0, must-revalidate",
            ),
        ],
        body.to_string(),
    )
        .into_response()
}

fn oauth_error(status: u16, error: &str, description: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        serde_json::json!({"error": error, "error_description": description}).to_string(),
    )
        .into_response()
}

fn error_page(status: StatusCode, title: &str, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        format!("<!doctype html><html><title>{title}</title><h1>{title}</h1><p>{text}</p></html>"),
    )
        .into_response()
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    // SystemRandom only fails when the OS has no entropy source.
    SystemRandom::new().fill(&mut b).expect("OS random source");
    b
}

fn random_token(prefix: &str, len: usize) -> String {
    let mut s = URL_SAFE_NO_PAD.encode(random_bytes(len));
    s.truncate(len);
    format!("{prefix}{s}")
}

fn random_hex(n: usize) -> String {
    random_bytes(n).iter().map(|b| format!("{b:02x}")).collect()
}

fn random_digits(n: usize) -> String {
    random_bytes(n)
        .iter()
        .map(|b| char::from(b'0' + b % 10))
        .collect()
}

fn key_pair(pem: &str) -> RsaKeyPair {
    let Ok(PrivateKeyDer::Pkcs8(der)) = PrivateKeyDer::from_pem_slice(pem.as_bytes()) else {
        panic!("test key fixture is not PKCS#8 PEM");
    };
    RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("test key fixture is an RSA key")
}

fn key_json(client_email: &str, client_id: &str, kid: &str, pem: &str, token_uri: &str) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "type": "service_account",
        "project_id": "oauthrelay-test",
        "private_key_id": kid,
        "private_key": pem,
        "client_email": client_email,
        "client_id": client_id,
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com",
    }))
    .unwrap_or_default()
}

/// HTTPS for axum: TLS handshake on accept (bounded), failures skipped.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            if let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), self.acceptor.accept(tcp)).await
            {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// What a browser saw when following an authorization URL.
#[derive(Debug, Clone)]
pub struct BrowserVisit {
    /// Status of the consent page (302 when it redirected).
    pub consent_status: u16,
    /// Where Google sent the browser (the loopback redirect with `code` or
    /// `error`), when it redirected.
    pub redirected_to: Option<String>,
    /// Status and body of the redirect target's answer.
    pub final_status: Option<u16>,
    pub final_body: String,
}

/// Play the browser: GET `url` (plain `http://` only: the fake's consent
/// endpoint), and if it redirects, GET the `Location` too (the program's
/// loopback listener). Each request is bounded by `timeout`.
pub async fn browse(url: &str, timeout: Duration) -> io::Result<BrowserVisit> {
    let (status, headers, body) = http_get(url, timeout).await?;
    let location = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("location"))
        .map(|(_, v)| v.clone());
    let mut visit = BrowserVisit {
        consent_status: status,
        redirected_to: location.clone(),
        final_status: None,
        final_body: body,
    };
    if (300..400).contains(&status)
        && let Some(loc) = location
    {
        let (s, _, b) = http_get(&loc, timeout).await?;
        visit.final_status = Some(s);
        visit.final_body = b;
    }
    Ok(visit)
}

/// A minimal HTTP/1.1 GET over plain TCP (`Connection: close`).
pub async fn http_get(
    url: &str,
    timeout: Duration,
) -> io::Result<(u16, Vec<(String, String)>, String)> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
    let u = url::Url::parse(url).map_err(|_| bad("bad URL"))?;
    if u.scheme() != "http" {
        return Err(bad("only http:// is supported"));
    }
    let host = u.host_str().ok_or_else(|| bad("no host"))?.to_string();
    let port = u.port_or_known_default().unwrap_or(80);
    let target = match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_string(),
    };
    let exchange = async {
        let mut s = TcpStream::connect((host.as_str(), port)).await?;
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: testkit-browser\r\nAccept: text/html\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, io::Error>(raw)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "browser request timed out"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok((status, headers, body.to_string()))
}
