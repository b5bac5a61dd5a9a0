//! A fake Microsoft identity platform (v2.0 endpoints), in process on
//! `http://127.0.0.1:0`, answering as Microsoft's documentation describes,
//! for one tenant (plus `common`, `organizations`, `consumers`).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use testkit::microsoft::FakeMicrosoft;
//! let ms = FakeMicrosoft::start("contoso-tenant-id").await?;
//! ms.add_public_client("11111111-2222-3333-4444-555555555555");
//! ms.approve_as("relay@contoso.com");
//! // point an account at ms.authorize_url("common"), ms.token_url("common"),
//! // ms.devicecode_url("common") ...
//! # Ok(()) }
//! ```
//!
//! # Endpoints (`/{tenant}/oauth2/v2.0/...`)
//! - `GET authorize`: checks the client, `response_type=code`, PKCE S256;
//!   redirects to `redirect_uri?code=..&state=..` (or `error=access_denied`
//!   when the user declines).
//! - `POST devicecode` (RFC 8628): `device_code`, `user_code`,
//!   `verification_uri` = `https://microsoft.com/devicelogin`, `expires_in`
//!   900, `interval` (5 unless set), `message`.
//! - `POST token`, grants:
//!   - `authorization_code`: code unused, same client and `redirect_uri`,
//!     `code_verifier` matching; a refresh token only with `offline_access`;
//!   - `refresh_token`: always answers with a NEW refresh token. The old one
//!     stays valid (as Microsoft does) unless [`FakeMicrosoft::set_strict`]:
//!     then a used refresh token is refused (`invalid_grant`, AADSTS70000);
//!   - `urn:ietf:params:oauth:grant-type:device_code`:
//!     `authorization_pending` until approved, `slow_down` when scripted,
//!     `authorization_declined`, `expired_token`, `bad_verification_code`;
//!   - `client_credentials` (app-only): refused on `common`/`consumers`/
//!     `organizations` with AADSTS9001023; scope must end in `/.default`;
//!     the application proves itself with its secret or a PS256/RS256
//!     client assertion whose `x5t#S256` names the registered certificate,
//!     signature, `aud` (this endpoint), `iss` = `sub` = client id and `exp`
//!     checked.
//!
//!   Confidential clients must send their secret (`AADSTS7000218` without,
//!   `AADSTS7000215` when wrong); public clients none. Errors are JSON with
//!   `error`, `error_description` (`AADSTS...: ...`), `error_codes`,
//!   `timestamp`, `trace_id`, `correlation_id`.
//!
//! [`FakeMicrosoft::token_validator`] tells a fake Exchange which XOAUTH2
//! `(mailbox, token)` pairs are good: delegated tokens for their user,
//! app-only tokens for mailboxes granted with
//! [`FakeMicrosoft::grant_mailbox`] (the Exchange service principal with
//! FullAccess).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{
    KeyPair, RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256, RsaKeyPair, UnparsedPublicKey,
};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Delegated SMTP scope.
pub const SMTP_SCOPE: &str = "https://outlook.office.com/SMTP.Send";
/// App-only scope.
pub const APP_SCOPE: &str = "https://outlook.office365.com/.default";
pub const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Token requests by grant, for [`FakeMicrosoft::requests`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Grant {
    AuthorizationCode,
    RefreshToken,
    DeviceCode,
    ClientCredentials,
    Other,
}

/// An application certificate made for a test, registered with the fake.
#[derive(Debug, Clone)]
pub struct AppCertificate {
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Default)]
struct Client {
    secret: Option<String>,
    /// `x5t#S256` -> RSA public key (PKCS#1 DER).
    certs: HashMap<String, Vec<u8>>,
    mailboxes: HashSet<String>,
}

struct Code {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    email: String,
    scope: String,
}

struct Refresh {
    client_id: String,
    email: String,
    scope: String,
    used: bool,
}

enum Who {
    User(String),
    App(String),
}

struct Access {
    who: Who,
    expires: Instant,
}

#[derive(Clone, PartialEq, Eq)]
enum DeviceStatus {
    Pending,
    Approved(String),
    Declined,
}

struct Device {
    user_code: String,
    client_id: String,
    scope: String,
    status: DeviceStatus,
    expires: Instant,
}

/// Called when a refresh succeeded, before the answer is sent.
pub type Hook = Arc<dyn Fn() + Send + Sync>;

struct St {
    tenant: String,
    clients: HashMap<String, Client>,
    consent: Result<String, String>,
    codes: HashMap<String, Code>,
    refresh: HashMap<String, Refresh>,
    access: HashMap<String, Access>,
    devices: HashMap<String, Device>,
    strict: bool,
    lifetime: Duration,
    device_interval: u64,
    device_lifetime: Duration,
    slow_down: usize,
    requests: HashMap<Grant, usize>,
    before_refresh_answer: Option<Hook>,
    port: u16,
    last_assertion_header: Option<serde_json::Value>,
}

type Shared = Arc<Mutex<St>>;

/// The running fake. Dropping it stops it.
pub struct FakeMicrosoft {
    shared: Shared,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for FakeMicrosoft {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(s: &Shared) -> MutexGuard<'_, St> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeMicrosoft {
    /// Start with `tenant` as the one directory id.
    pub async fn start(tenant: &str) -> io::Result<FakeMicrosoft> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared: Shared = Arc::new(Mutex::new(St {
            tenant: tenant.to_string(),
            clients: HashMap::new(),
            consent: Err("access_denied".into()),
            codes: HashMap::new(),
            refresh: HashMap::new(),
            access: HashMap::new(),
            devices: HashMap::new(),
            strict: false,
            lifetime: Duration::from_secs(3599),
            device_interval: 5,
            device_lifetime: Duration::from_secs(900),
            slow_down: 0,
            requests: HashMap::new(),
            before_refresh_answer: None,
            port: addr.port(),
            last_assertion_header: None,
        }));
        let router = Router::new()
            .route("/{tenant}/oauth2/v2.0/authorize", get(authorize))
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .route("/{tenant}/oauth2/v2.0/devicecode", post(devicecode))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(FakeMicrosoft { shared, addr, task })
    }

    fn url(&self, tenant: &str, what: &str) -> String {
        format!("http://{}/{tenant}/oauth2/v2.0/{what}", self.addr)
    }
    pub fn authorize_url(&self, tenant: &str) -> String {
        self.url(tenant, "authorize")
    }
    pub fn token_url(&self, tenant: &str) -> String {
        self.url(tenant, "token")
    }
    pub fn devicecode_url(&self, tenant: &str) -> String {
        self.url(tenant, "devicecode")
    }

    /// A public client ("Allow public client flows"): no secret.
    pub fn add_public_client(&self, client_id: &str) {
        lock(&self.shared)
            .clients
            .insert(client_id.into(), Client::default());
    }

    /// A confidential client with a secret.
    pub fn add_client(&self, client_id: &str, secret: &str) {
        lock(&self.shared).clients.insert(
            client_id.into(),
            Client {
                secret: Some(secret.into()),
                ..Client::default()
            },
        );
    }

    /// Make a certificate for `client_id` (registering the client if new)
    /// from the TEST-ONLY RSA key, upload it, and return it with its key.
    pub fn add_certificate(&self, client_id: &str) -> AppCertificate {
        let key_pem = crate::google::SERVICE_ACCOUNT_TEST_KEY.to_string();
        let kp = rcgen::KeyPair::from_pem_and_sign_algo(&key_pem, &rcgen::PKCS_RSA_SHA256)
            .expect("test key");
        let params =
            rcgen::CertificateParams::new(vec!["oauthrelay-app".to_string()]).expect("cert params");
        let cert = params.self_signed(&kp).expect("self-signed cert");
        let der = cert.der().to_vec();
        let thumb = URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &der));
        let pkcs8 = match PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("pem") {
            PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            _ => panic!("test key is PKCS#8"),
        };
        let public = RsaKeyPair::from_pkcs8(&pkcs8)
            .expect("rsa")
            .public_key()
            .as_ref()
            .to_vec();
        lock(&self.shared)
            .clients
            .entry(client_id.into())
            .or_default()
            .certs
            .insert(thumb, public);
        AppCertificate {
            cert_pem: cert.pem(),
            key_pem,
        }
    }

    /// The application may send as `mailbox` (its Exchange service
    /// principal has FullAccess).
    pub fn grant_mailbox(&self, client_id: &str, mailbox: &str) {
        lock(&self.shared)
            .clients
            .entry(client_id.into())
            .or_default()
            .mailboxes
            .insert(mailbox.to_ascii_lowercase());
    }

    /// The sign-in page approves as `email` from now on.
    pub fn approve_as(&self, email: &str) {
        lock(&self.shared).consent = Ok(email.into());
    }

    /// Refuse used refresh tokens (stricter than Microsoft).
    pub fn set_strict(&self, strict: bool) {
        lock(&self.shared).strict = strict;
    }

    pub fn set_access_token_lifetime(&self, d: Duration) {
        lock(&self.shared).lifetime = d;
    }

    /// `interval` of new device codes, in seconds.
    pub fn set_device_interval(&self, secs: u64) {
        lock(&self.shared).device_interval = secs;
    }

    /// `expires_in` of new device codes.
    pub fn set_device_lifetime(&self, d: Duration) {
        lock(&self.shared).device_lifetime = d;
    }

    /// The next `n` polls of a pending device code get `slow_down`.
    pub fn slow_down_next(&self, n: usize) {
        lock(&self.shared).slow_down = n;
    }

    /// The user entered `user_code` and signed in as `email`.
    pub fn approve_device(&self, user_code: &str, email: &str) -> bool {
        self.device_status(user_code, DeviceStatus::Approved(email.into()))
    }

    /// The user entered `user_code` and declined.
    pub fn decline_device(&self, user_code: &str) -> bool {
        self.device_status(user_code, DeviceStatus::Declined)
    }

    /// Forget the device code behind `user_code` (the service lost it):
    /// its next poll gets `bad_verification_code`.
    pub fn forget_device(&self, user_code: &str) -> bool {
        let mut st = lock(&self.shared);
        let before = st.devices.len();
        st.devices.retain(|_, d| d.user_code != user_code);
        st.devices.len() < before
    }

    fn device_status(&self, user_code: &str, status: DeviceStatus) -> bool {
        let mut st = lock(&self.shared);
        match st.devices.values_mut().find(|d| d.user_code == user_code) {
            Some(d) => {
                d.status = status;
                true
            }
            None => false,
        }
    }

    /// Called when a refresh succeeded, before the answer is sent (e.g. to
    /// kill the client at that moment).
    pub fn before_refresh_answer(&self, hook: Option<Hook>) {
        lock(&self.shared).before_refresh_answer = hook;
    }

    /// A refresh token for `email`, as if it had signed in.
    pub fn issue_refresh_token(&self, client_id: &str, email: &str) -> String {
        let t = random("M.C5", 48);
        lock(&self.shared).refresh.insert(
            t.clone(),
            Refresh {
                client_id: client_id.into(),
                email: email.into(),
                scope: format!("{SMTP_SCOPE} offline_access"),
                used: false,
            },
        );
        t
    }

    /// Whether `token` is a refresh token the fake would still accept.
    pub fn refresh_token_valid(&self, token: &str) -> bool {
        let st = lock(&self.shared);
        st.refresh
            .get(token)
            .is_some_and(|r| !(st.strict && r.used))
    }

    pub fn requests(&self, g: Grant) -> usize {
        lock(&self.shared).requests.get(&g).copied().unwrap_or(0)
    }

    /// The header of the last client assertion received.
    pub fn last_assertion_header(&self) -> Option<serde_json::Value> {
        lock(&self.shared).last_assertion_header.clone()
    }

    /// `(mailbox, token) -> bool` for a fake Exchange.
    pub fn token_validator(&self) -> impl Fn(&str, &str) -> bool + Send + Sync + 'static {
        let shared = self.shared.clone();
        move |user: &str, token: &str| {
            let st = lock(&shared);
            let Some(a) = st.access.get(token) else {
                return false;
            };
            if a.expires <= Instant::now() {
                return false;
            }
            match &a.who {
                Who::User(e) => e.eq_ignore_ascii_case(user),
                Who::App(client) => st
                    .clients
                    .get(client)
                    .is_some_and(|c| c.mailboxes.contains(&user.to_ascii_lowercase())),
            }
        }
    }
}

fn random(prefix: &str, n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = SystemRandom::new().fill(&mut b);
    let mut s = URL_SAFE_NO_PAD.encode(&b);
    s.truncate(n);
    format!("{prefix}{s}")
}

/// Microsoft's error JSON.
fn aad(status: u16, error: &str, code: u32, text: &str) -> Response {
    let body = serde_json::json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {text} Trace ID: 0000aaaa-11bb-cccc-dd22-eeeeee333333 Correlation ID: aaaa0000-bb11-2222-33cc-444444dddddd Timestamp: 2026-01-01 00:00:00Z"),
        "error_codes": [code],
        "timestamp": "2026-01-01 00:00:00Z",
        "trace_id": "0000aaaa-11bb-cccc-dd22-eeeeee333333",
        "correlation_id": "aaaa0000-bb11-2222-33cc-444444dddddd",
    });
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

fn json(v: serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        v.to_string(),
    )
        .into_response()
}

fn form(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

fn known_tenant(st: &St, tenant: &str) -> bool {
    ["common", "organizations", "consumers"].contains(&tenant) || tenant == st.tenant
}

async fn authorize(
    State(s): State<Shared>,
    Path(tenant): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let p = form(q.unwrap_or_default().as_bytes());
    let mut st = lock(&s);
    let page = |code: StatusCode, t: &str| (code, t.to_string()).into_response();
    if !known_tenant(&st, &tenant) {
        return page(StatusCode::BAD_REQUEST, "AADSTS90002: Tenant not found.");
    }
    let client_id = p.get("client_id").cloned().unwrap_or_default();
    if !st.clients.contains_key(&client_id) {
        return page(
            StatusCode::BAD_REQUEST,
            "AADSTS700016: Application not found in the directory.",
        );
    }
    let Some(redirect) = p.get("redirect_uri").cloned() else {
        return page(
            StatusCode::BAD_REQUEST,
            "AADSTS900144: redirect_uri missing",
        );
    };
    let state = p.get("state").cloned().unwrap_or_default();
    let challenge = p.get("code_challenge").cloned().unwrap_or_default();
    if p.get("response_type").map(String::as_str) != Some("code")
        || p.get("code_challenge_method").map(String::as_str) != Some("S256")
        || challenge.is_empty()
    {
        return page(
            StatusCode::BAD_REQUEST,
            "AADSTS9002325: Proof Key for Code Exchange is required.",
        );
    }
    let mut to = url::Url::parse(&redirect).expect("redirect");
    match st.consent.clone() {
        Ok(email) => {
            let code = random("0.AX", 40);
            st.codes.insert(
                code.clone(),
                Code {
                    client_id,
                    redirect_uri: redirect.clone(),
                    challenge,
                    email,
                    scope: p.get("scope").cloned().unwrap_or_default(),
                },
            );
            to.query_pairs_mut()
                .append_pair("code", &code)
                .append_pair("state", &state);
        }
        Err(e) => {
            to.query_pairs_mut()
                .append_pair("error", &e)
                .append_pair(
                    "error_description",
                    "AADSTS65004: User declined to consent to access the app.",
                )
                .append_pair("state", &state);
        }
    }
    (StatusCode::FOUND, [(header::LOCATION, to.to_string())]).into_response()
}

async fn devicecode(State(s): State<Shared>, Path(tenant): Path<String>, body: Bytes) -> Response {
    let p = form(&body);
    let mut st = lock(&s);
    if !known_tenant(&st, &tenant) {
        return aad(400, "invalid_request", 90002, "Tenant not found.");
    }
    let client_id = p.get("client_id").cloned().unwrap_or_default();
    if !st.clients.contains_key(&client_id) {
        return aad(
            400,
            "unauthorized_client",
            700016,
            "Application not found in the directory.",
        );
    }
    let device_code = random("DAQABAAEAAA", 48);
    let user_code = random("", 9).to_ascii_uppercase().replace(['-', '_'], "X");
    let lifetime = st.device_lifetime;
    st.devices.insert(
        device_code.clone(),
        Device {
            user_code: user_code.clone(),
            client_id,
            scope: p.get("scope").cloned().unwrap_or_default(),
            status: DeviceStatus::Pending,
            expires: Instant::now() + lifetime,
        },
    );
    json(serde_json::json!({
        "device_code": device_code,
        "user_code": user_code,
        "verification_uri": "https://microsoft.com/devicelogin",
        "expires_in": lifetime.as_secs(),
        "interval": st.device_interval,
        "message": format!("To sign in, use a web browser to open the page https://microsoft.com/devicelogin and enter the code {user_code} to authenticate."),
    }))
}

/// Check the client's proof: `Err` is the answer.
#[allow(clippy::result_large_err)] // a test fake: the answer is built once
fn client_auth(st: &mut St, p: &HashMap<String, String>, url: &str) -> Result<String, Response> {
    let client_id = p.get("client_id").cloned().unwrap_or_default();
    let Some(c) = st.clients.get(&client_id) else {
        return Err(aad(
            400,
            "unauthorized_client",
            700016,
            &format!("Application with identifier '{client_id}' was not found in the directory."),
        ));
    };
    if let Some(assertion) = p.get("client_assertion") {
        if p.get("client_assertion_type").map(String::as_str) != Some(ASSERTION_TYPE) {
            return Err(aad(
                400,
                "invalid_request",
                50027,
                "Invalid client_assertion_type.",
            ));
        }
        let parts: Vec<&str> = assertion.split('.').collect();
        let bad = |t: &str| aad(401, "invalid_client", 700027, t);
        if parts.len() != 3 {
            return Err(bad("Client assertion is not a JWT."));
        }
        let dec = |s: &str| URL_SAFE_NO_PAD.decode(s).ok();
        let (Some(h), Some(c2), Some(sig)) = (dec(parts[0]), dec(parts[1]), dec(parts[2])) else {
            return Err(bad("Client assertion is not base64url."));
        };
        let header: serde_json::Value = serde_json::from_slice(&h).unwrap_or_default();
        let claims: serde_json::Value = serde_json::from_slice(&c2).unwrap_or_default();
        let thumb = header["x5t#S256"].as_str().unwrap_or_default().to_string();
        let Some(public) = c.certs.get(&thumb).cloned() else {
            return Err(bad(
                "Client assertion contains an invalid signature. [Reason - The key was not found.]",
            ));
        };
        let alg: &'static dyn ring::signature::VerificationAlgorithm = match header["alg"].as_str()
        {
            Some("PS256") => &RSA_PSS_2048_8192_SHA256,
            Some("RS256") => &RSA_PKCS1_2048_8192_SHA256,
            _ => return Err(bad("Unsupported alg.")),
        };
        let signed = format!("{}.{}", parts[0], parts[1]);
        if UnparsedPublicKey::new(alg, &public)
            .verify(signed.as_bytes(), &sig)
            .is_err()
        {
            return Err(bad("Client assertion contains an invalid signature."));
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if claims["aud"].as_str() != Some(url)
            || claims["iss"].as_str() != Some(client_id.as_str())
            || claims["sub"].as_str() != Some(client_id.as_str())
            || claims["exp"].as_u64().is_none_or(|e| e <= now)
            || claims["jti"].as_str().is_none_or(str::is_empty)
        {
            return Err(aad(
                400,
                "invalid_client",
                700024,
                "Client assertion is not within its valid time range or has wrong claims.",
            ));
        }
        st.last_assertion_header = Some(header);
        return Ok(client_id);
    }
    match (&c.secret, p.get("client_secret")) {
        (None, None) => Ok(client_id),
        (None, Some(_)) => Ok(client_id),
        (Some(_), None) => Err(aad(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        )),
        (Some(a), Some(b)) if a == b => Ok(client_id),
        (Some(_), Some(_)) => Err(aad(
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
        )),
    }
}

fn issue(
    st: &mut St,
    who: Who,
    scope: &str,
    refresh_for: Option<(&str, &str)>,
) -> serde_json::Value {
    let at = random("eyJ0eXAiOiJKV1Qi.", 64);
    let lifetime = st.lifetime;
    st.access.insert(
        at.clone(),
        Access {
            who,
            expires: Instant::now() + lifetime,
        },
    );
    let mut v = serde_json::json!({
        "token_type": "Bearer",
        "scope": scope,
        "expires_in": lifetime.as_secs(),
        "ext_expires_in": lifetime.as_secs(),
        "access_token": at,
    });
    if let Some((client, email)) = refresh_for
        && scope.split_whitespace().any(|s| s == "offline_access")
    {
        let rt = random("M.C5", 48);
        st.refresh.insert(
            rt.clone(),
            Refresh {
                client_id: client.into(),
                email: email.into(),
                scope: scope.into(),
                used: false,
            },
        );
        v["refresh_token"] = rt.into();
    }
    v
}

async fn token(State(s): State<Shared>, Path(tenant): Path<String>, body: Bytes) -> Response {
    let p = form(&body);
    let grant = match p.get("grant_type").map(String::as_str) {
        Some("authorization_code") => Grant::AuthorizationCode,
        Some("refresh_token") => Grant::RefreshToken,
        Some(DEVICE_GRANT) => Grant::DeviceCode,
        Some("client_credentials") => Grant::ClientCredentials,
        _ => Grant::Other,
    };
    let (answer, hook) = {
        let mut st = lock(&s);
        *st.requests.entry(grant).or_default() += 1;
        if !known_tenant(&st, &tenant) {
            return aad(
                400,
                "invalid_request",
                90002,
                &format!("Tenant '{tenant}' not found."),
            );
        }
        let url = format!("http://127.0.0.1:{}/{tenant}/oauth2/v2.0/token", st.port);
        let client_id = match client_auth(&mut st, &p, &url) {
            Ok(c) => c,
            Err(r) => return r,
        };
        match grant {
            Grant::AuthorizationCode => {
                let code = p.get("code").cloned().unwrap_or_default();
                let Some(c) = st.codes.remove(&code) else {
                    return aad(
                        400,
                        "invalid_grant",
                        54005,
                        "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.",
                    );
                };
                let verifier = p.get("code_verifier").cloned().unwrap_or_default();
                let digest = URL_SAFE_NO_PAD.encode(ring::digest::digest(
                    &ring::digest::SHA256,
                    verifier.as_bytes(),
                ));
                if c.client_id != client_id
                    || p.get("redirect_uri") != Some(&c.redirect_uri)
                    || digest != c.challenge
                {
                    return aad(
                        400,
                        "invalid_grant",
                        501481,
                        "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
                    );
                }
                (
                    issue(
                        &mut st,
                        Who::User(c.email.clone()),
                        &c.scope,
                        Some((&client_id, &c.email)),
                    ),
                    None,
                )
            }
            Grant::RefreshToken => {
                let rt = p.get("refresh_token").cloned().unwrap_or_default();
                let strict = st.strict;
                let Some(r) = st.refresh.get_mut(&rt) else {
                    return aad(
                        400,
                        "invalid_grant",
                        70000,
                        "The provided value for the 'refresh_token' is not valid.",
                    );
                };
                if (strict && r.used) || r.client_id != client_id {
                    return aad(
                        400,
                        "invalid_grant",
                        70000,
                        "The provided value for the 'refresh_token' is not valid. The refresh token has already been used.",
                    );
                }
                r.used = true;
                let (email, scope) = (r.email.clone(), r.scope.clone());
                let scope = if scope.contains("offline_access") {
                    scope
                } else {
                    format!("{scope} offline_access")
                };
                let v = issue(
                    &mut st,
                    Who::User(email.clone()),
                    &scope,
                    Some((&client_id, &email)),
                );
                (v, st.before_refresh_answer.clone())
            }
            Grant::DeviceCode => {
                let dc = p.get("device_code").cloned().unwrap_or_default();
                let slow = st.slow_down;
                let Some(d) = st.devices.get(&dc) else {
                    return aad(
                        400,
                        "bad_verification_code",
                        70019,
                        "Verification code is not valid.",
                    );
                };
                if d.client_id != client_id {
                    return aad(
                        400,
                        "bad_verification_code",
                        70019,
                        "Verification code is not valid.",
                    );
                }
                if d.expires <= Instant::now() {
                    return aad(
                        400,
                        "expired_token",
                        70020,
                        "The provided authorization code or refresh token has expired due to it being shown to the user for too long.",
                    );
                }
                match d.status.clone() {
                    DeviceStatus::Pending if slow > 0 => {
                        st.slow_down -= 1;
                        return aad(400, "slow_down", 70016, "Polling too fast.");
                    }
                    DeviceStatus::Pending => {
                        return aad(
                            400,
                            "authorization_pending",
                            70016,
                            "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
                        );
                    }
                    DeviceStatus::Declined => {
                        return aad(
                            400,
                            "authorization_declined",
                            70000,
                            "The user declined the authorization request.",
                        );
                    }
                    DeviceStatus::Approved(email) => {
                        let scope = d.scope.clone();
                        st.devices.remove(&dc);
                        (
                            issue(
                                &mut st,
                                Who::User(email.clone()),
                                &scope,
                                Some((&client_id, &email)),
                            ),
                            None,
                        )
                    }
                }
            }
            Grant::ClientCredentials => {
                if ["common", "consumers", "organizations"].contains(&tenant.as_str()) {
                    return aad(
                        400,
                        "invalid_request",
                        9001023,
                        "The grant type is not supported over the /common or /consumers endpoints. Please use the /organizations or tenant-specific endpoint.",
                    );
                }
                let scope = p.get("scope").cloned().unwrap_or_default();
                if !scope.ends_with("/.default") {
                    return aad(
                        400,
                        "invalid_scope",
                        1002012,
                        "The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.",
                    );
                }
                (issue(&mut st, Who::App(client_id), &scope, None), None)
            }
            Grant::Other => {
                return aad(
                    400,
                    "unsupported_grant_type",
                    70003,
                    "The app requested an unsupported grant type.",
                );
            }
        }
    };
    if let Some(h) = hook {
        h();
    }
    json(answer)
}
