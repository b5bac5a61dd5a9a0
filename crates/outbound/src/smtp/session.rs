//! Opening an authenticated session for an account: access token, connect,
//! TLS, EHLO, `AUTH XOAUTH2`; when the server refuses the token, invalidate
//! it, get a fresh one, reconnect and try once more; a second refusal
//! tells the token manager (the one source of "needs authorization").

use std::sync::Arc;
use std::time::Duration;

use oauth::config::AccountConfig;
use oauth::{AccessToken, TokenError, TokenManager};

use super::conn::{ConnError, Connection, Target};
use super::xoauth2::{self, AuthError};
use crate::classify::AccountSignal;
use crate::reply::{Answer, Reply};

/// An account as the workers see it: its config and TLS settings. Replaced
/// (not mutated) on reload, so a pooled connection can tell it is stale.
pub(crate) struct AccountCtx {
    pub config: AccountConfig,
    pub tls: Result<Arc<rustls::ClientConfig>, String>,
    /// The Gmail API's HTTP client (`transport = "gmail-api"`), shared by
    /// the account's workers.
    pub api: Option<Result<reqwest::Client, String>>,
    /// The account's pacing (`max_rate`, else the provider's or the
    /// transport's default), shared by its workers.
    pub pace: Option<Arc<crate::pace::Pacer>>,
}

impl AccountCtx {
    pub(crate) fn new(config: AccountConfig) -> AccountCtx {
        let tls = super::tls::client_config(config.ca_file.as_deref());
        let api = (config.transport == oauth::TransportKind::GmailApi)
            .then(|| crate::gmail_api::client(&tls, Duration::from_secs(30)));
        let pace = config
            .effective_max_rate()
            .map(|r| Arc::new(crate::pace::Pacer::new(r)));
        AccountCtx {
            config,
            tls,
            api,
            pace,
        }
    }
}

/// Why no authenticated session could be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("{0}")]
    Conn(#[from] ConnError),
    #[error("{0}")]
    TlsConfig(String),
    /// The server refused the access token twice, the second time a fresh
    /// one; the token manager now holds the account.
    #[error(
        "{relay} refused the access token for {email} even after a refresh ({reply}); the account needs attention: run `oauthrelay authorize --account {account}`"
    )]
    AuthRejected {
        account: String,
        email: String,
        relay: String,
        reply: Reply,
    },
    /// Any other reply to AUTH (throttling, temporary problems, no XOAUTH2).
    #[error("AUTH XOAUTH2 refused: {0}")]
    AuthRefused(Reply),
}

impl OpenError {
    /// What this means for the account (`mailbox`: the account's address,
    /// for the words of a hold).
    pub(crate) fn signal(&self, mailbox: &str) -> AccountSignal {
        let answer = Answer::error(self);
        match self {
            OpenError::AuthRefused(r) if r.is_smtp_auth_disabled() => {
                crate::exchange::auth_disabled(r, mailbox)
            }
            OpenError::AuthRefused(r) if r.is_rate_limited() => AccountSignal::RateLimited {
                answer: Answer::Reply(r.clone()),
                until: None,
            },
            OpenError::Token(TokenError::Temporary { .. }) => AccountSignal::Unreachable(answer),
            OpenError::Token(_) | OpenError::AuthRejected { .. } => {
                AccountSignal::AuthFailed(answer)
            }
            OpenError::Conn(_) | OpenError::TlsConfig(_) => AccountSignal::Unreachable(answer),
            OpenError::AuthRefused(r) if r.is_login_throttle() => {
                AccountSignal::LoginThrottled(Answer::Reply(r.clone()))
            }
            OpenError::AuthRefused(r) if r.is_permanent() => AccountSignal::AuthFailed(answer),
            OpenError::AuthRefused(_) => AccountSignal::Unreachable(answer),
        }
    }
}

/// Timeouts and names for [`open`].
pub(crate) struct OpenParams<'a> {
    pub hostname: &'a str,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
}

/// What a session is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Delivering mail: the cached token; a refused one is refreshed once,
    /// and a second refusal holds the account.
    Deliver,
    /// A held account's probe: a token fresh from the token endpoint
    /// ([`TokenManager::probe_token`]) and one AUTH; if the upstream takes
    /// it, the token manager hears so ([`TokenManager::auth_accepted`]).
    Probe,
}

/// Open an authenticated connection for `ctx`'s account; also returns the
/// token it used (to invalidate if the server later says the session lost
/// its authentication). `trace` gets a line per step (never a token).
pub(crate) async fn open(
    ctx: &AccountCtx,
    tokens: &TokenManager,
    p: &OpenParams<'_>,
    trace: &mut (dyn FnMut(&str) + Send),
) -> Result<(Connection, AccessToken), OpenError> {
    open_for(Purpose::Deliver, ctx, tokens, p, trace).await
}

/// [`open`], for `purpose`.
pub(crate) async fn open_for(
    purpose: Purpose,
    ctx: &AccountCtx,
    tokens: &TokenManager,
    p: &OpenParams<'_>,
    trace: &mut (dyn FnMut(&str) + Send),
) -> Result<(Connection, AccessToken), OpenError> {
    let tls_config = ctx.tls.clone().map_err(OpenError::TlsConfig)?;
    let a = &ctx.config;
    let target = Target {
        host: &a.smtp_host,
        port: a.smtp_port,
        tls: a.smtp_tls,
        tls_config,
        hostname: p.hostname,
        connect_timeout: p.connect_timeout,
        command_timeout: p.command_timeout,
    };
    let mut refreshed = false;
    loop {
        let token = match purpose {
            Purpose::Deliver => tokens.access_token(&a.name).await,
            Purpose::Probe => tokens.probe_token(&a.name).await,
        };
        let token = token.inspect_err(|e| trace(&format!("access token: {e}")))?;
        trace(&format!(
            "access token for {}: {} (expires in {})",
            a.name,
            match purpose {
                Purpose::Deliver => "ok",
                Purpose::Probe => "refreshed",
            },
            humantime::format_duration(Duration::from_secs(token.expires_in().as_secs()))
        ));
        let mut conn = Connection::open(&target, trace)
            .await
            .inspect_err(|e| trace(&format!("connecting: {e}")))?;
        let refused = match xoauth2::authenticate(&mut conn, &a.email, &token).await {
            Ok(()) => {
                trace(&format!("AUTH XOAUTH2 as {}: 235 accepted", a.email));
                if purpose == Purpose::Probe {
                    tokens.auth_accepted(&a.name).await;
                }
                return Ok((conn, token));
            }
            Err(AuthError::TokenRejected { reply }) => reply,
            Err(AuthError::Refused(reply)) => {
                trace(&format!("AUTH XOAUTH2: {reply}"));
                conn.quit().await;
                return Err(OpenError::AuthRefused(reply));
            }
            Err(AuthError::Conn(e)) => {
                trace(&format!("AUTH XOAUTH2: {e}"));
                return Err(OpenError::Conn(e));
            }
        };
        trace(&format!("AUTH XOAUTH2: token refused: {refused}"));
        let relay = conn.relay.clone();
        conn.quit().await;
        // A probe asks once: the account stays held as it was.
        let again = match purpose {
            Purpose::Deliver => token_refused(tokens, ctx, &token, &refused, refreshed).await,
            Purpose::Probe => None,
        };
        match again {
            Some(()) => {
                refreshed = true;
                trace("refreshing the access token and reconnecting once");
            }
            None => {
                return Err(OpenError::AuthRejected {
                    account: a.name.clone(),
                    email: a.email.clone(),
                    relay,
                    reply: refused,
                });
            }
        }
    }
}

/// The server refused `token` (at AUTH, or later with a `530`/`535`):
/// the first time, invalidate it so the next use refreshes (`Some`: try
/// once more); after a refresh, tell the token manager the account is
/// refused (`None`: hold).
pub(crate) async fn token_refused(
    tokens: &TokenManager,
    ctx: &AccountCtx,
    token: &AccessToken,
    reply: &Reply,
    refreshed: bool,
) -> Option<()> {
    let name = &ctx.config.name;
    // Only if no other worker already got this token replaced: several
    // connections refused the same token cause one refresh.
    tokens.invalidate(name, token).await;
    if refreshed {
        // Not a stale token: the account itself is refused. Hold it where
        // everyone sees it (readyz, token status, metrics) until a human
        // re-authorizes it.
        tokens.mark_rejected(name, &reply.to_string()).await;
        return None;
    }
    Some(())
}
