//! oauthrelay's accounts (Google and Microsoft): configuration, first
//! consent (browser with PKCE, device code, service accounts, app-only),
//! token storage (rotating refresh tokens included), access-token refresh
//! and the SASL XOAUTH2 initial response.
//!
//! # For the binary (CLI and daemon)
//!
//! ```no_run
//! # async fn demo(configs: Vec<oauth::AccountConfig>) -> Result<(), Box<dyn std::error::Error>> {
//! use oauth::{Account, AccountContext, ManagerOptions, OAuthMetrics, TokenManager};
//!
//! // `[[accounts]]` entries -> resolved accounts (secrets read, files checked).
//! // AccountContext::new reads $CREDENTIALS_DIRECTORY (systemd credentials).
//! let ctx = AccountContext::new("/var/lib/oauthrelay").with_config_dir("/etc/oauthrelay");
//! let accounts = oauth::resolve_all(&configs, &ctx)?;
//!
//! // `oauthrelay authorize --account NAME [--no-browser] [--port N]`
//! let opts = oauth::authorize::Options { no_browser: true, ..Default::default() };
//! // Pasted redirect addresses come from a line reader: in the binary
//! // tokio::io::BufReader::new(tokio::io::stdin()) (tokio feature "io-std").
//! let stdin = tokio::io::BufReader::new(tokio::io::empty());
//! let summary = oauth::authorize::run(&accounts[0], &opts, &mut std::io::stdout(), Some(stdin)).await?;
//! println!("{summary}");
//!
//! // `oauthrelay token import --account NAME` (token read from stdin).
//! // It and `token status` need no client secret: resolve without reading
//! // one (it may be a systemd credential only the unit sees).
//! let lean = oauth::Account::resolve(&configs[0], &ctx.clone().without_secrets())?;
//! oauth::import_refresh_token(&lean, "1//0g-refresh-token")?;
//!
//! // `oauthrelay token status [--json]`
//! let status = oauth::status(&accounts);
//! println!("{}", serde_json::to_string_pretty(&status)?);
//!
//! // `serve`: one manager shared by delivery workers, metrics, /readyz.
//! let mut registry = prometheus_client::registry::Registry::default();
//! let metrics = OAuthMetrics::register(&mut registry);
//! let manager = TokenManager::new(accounts, ManagerOptions { metrics: Some(metrics), ..Default::default() })?;
//! let mut events = manager.subscribe(); // AccountEvent::{Authorized, NeedsAuthorization}
//! let ready = manager.status().iter().all(|s| s.authorized); // /readyz
//! manager.reload(None).await?; // on SIGHUP (or Some(new accounts) after re-reading the config)
//! # let _ = (events.try_recv(), ready); Ok(()) }
//! ```
//!
//! # For delivery
//!
//! ```no_run
//! # async fn demo(manager: oauth::TokenManager, stream: tokio::net::TcpStream) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use oauth::xoauth2::{self, StreamTransport, Xoauth2Error};
//!
//! let token = manager.access_token("default").await?; // TokenError: is_temporary() / needs_authorization()
//! let mut conn = StreamTransport::new(stream); // after EHLO (and TLS) on your side
//! match xoauth2::authenticate(&mut conn, "me@gmail.com", &token, Duration::from_secs(30)).await {
//!     Ok(()) => {}
//!     Err(Xoauth2Error::TokenRejected { .. }) => {
//!         manager.invalidate("default", &token).await; // then reconnect and try once more with a new token
//!     }
//!     Err(other) => { /* 454 4.7.0: back off the account; classify other.reply() */ let _ = other; }
//! }
//! # Ok(()) }
//! ```
//!
//! Secrets (client secret, refresh and access tokens, private keys) are
//! [`secrecy`] types or redacted by hand: they never appear in `Debug`,
//! `Display`, errors or logs.

pub mod account;
pub mod authorize;
pub mod check;
pub mod client_cert;
pub mod config;
pub mod device;
mod explain;
mod http;
mod jwt;
pub mod manager;
pub mod metrics;
pub mod perms;
pub mod service_account;
pub mod status;
pub mod store;
mod timefmt;
pub mod token;
pub mod xoauth2;

pub use account::{
    Account, AccountContext, AccountError, AppAuth, Credentials, SecretSource, resolve_all,
};
pub use config::{AccountConfig, Endpoint, Provider, SmtpTls, TransportKind, sender_matches};
pub use explain::explain;
pub use manager::{AccountEvent, ManagerError, ManagerOptions, TokenError, TokenManager};
pub use metrics::OAuthMetrics;
pub use perms::TooOpen;
pub use status::{
    AccountKind, AccountStatus, AuthState, ImportError, Refusal, import_refresh_token, status,
};
pub use token::AccessToken;
