//! Opening an authenticated session for an account: access token, connect,
//! TLS, EHLO, `AUTH XOAUTH2`; when Gmail refuses the token (the 334
//! challenge), invalidate it, get a fresh one, reconnect and try once more.

use std::sync::Arc;
use std::time::Duration;

use oauth::config::AccountConfig;
use oauth::xoauth2::{self, Xoauth2Error};
use oauth::{TokenError, TokenManager};

use crate::classify::AccountSignal;
use crate::conn::{ConnError, Connection, Target};
use crate::reply::Reply;

/// An account as the workers see it: its config and TLS settings. Replaced
/// (not mutated) on reload, so a pooled connection can tell it is stale.
pub(crate) struct AccountCtx {
    pub config: AccountConfig,
    pub tls: Result<Arc<rustls::ClientConfig>, String>,
}

impl AccountCtx {
    pub(crate) fn new(config: AccountConfig) -> AccountCtx {
        let tls = crate::tls::client_config(config.ca_file.as_deref());
        AccountCtx { config, tls }
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
    /// Gmail refused the access token twice, the second time a fresh one.
    #[error(
        "Gmail refused the access token for {email} even after a refresh ({reply}); the account needs attention: run `oauthrelay authorize --account {account}`"
    )]
    AuthRejected {
        account: String,
        email: String,
        reply: String,
    },
    /// Any other reply to AUTH (throttling, temporary problems, no XOAUTH2).
    #[error("AUTH XOAUTH2 refused: {0}")]
    AuthRefused(Reply),
}

impl OpenError {
    /// What this means for the account.
    pub(crate) fn signal(&self) -> AccountSignal {
        let text = self.to_string();
        match self {
            OpenError::Token(TokenError::Temporary { .. }) => AccountSignal::Unreachable(text),
            OpenError::Token(_) => AccountSignal::Held(text),
            OpenError::Conn(_) | OpenError::TlsConfig(_) => AccountSignal::Unreachable(text),
            OpenError::AuthRejected { .. } => AccountSignal::Held(text),
            OpenError::AuthRefused(r) if r.is_login_throttle() => {
                AccountSignal::LoginThrottled(text)
            }
            OpenError::AuthRefused(r) if r.is_permanent() => AccountSignal::Held(text),
            OpenError::AuthRefused(_) => AccountSignal::Unreachable(text),
        }
    }
}

/// Timeouts and names for [`open`].
pub(crate) struct OpenParams<'a> {
    pub hostname: &'a str,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
}

/// Open an authenticated connection for `ctx`'s account. `trace` gets a
/// line per step (never a token).
pub(crate) async fn open(
    ctx: &AccountCtx,
    tokens: &TokenManager,
    p: &OpenParams<'_>,
    trace: &mut (dyn FnMut(&str) + Send),
) -> Result<Connection, OpenError> {
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
        let token = tokens.access_token(&a.name).await?;
        trace(&format!(
            "access token for {}: ok (expires in {})",
            a.name,
            humantime::format_duration(Duration::from_secs(token.expires_in().as_secs()))
        ));
        let mut conn = Connection::open(&target, trace).await?;
        let result = xoauth2::authenticate(&mut conn, &a.email, &token, p.command_timeout).await;
        let refused_reply = match result {
            Ok(()) => {
                trace(&format!("AUTH XOAUTH2 as {}: 235 accepted", a.email));
                return Ok(conn);
            }
            Err(Xoauth2Error::TokenRejected { reply, .. }) => Reply::from_response(reply),
            // A bare 535 is the same verdict without the challenge.
            Err(Xoauth2Error::Refused { reply }) if reply.code == 535 => {
                Reply::from_response(reply)
            }
            Err(Xoauth2Error::Refused { reply }) => {
                let reply = Reply::from_response(reply);
                trace(&format!("AUTH XOAUTH2: {reply}"));
                conn.quit().await;
                return Err(OpenError::AuthRefused(reply));
            }
            Err(Xoauth2Error::Timeout(after)) => {
                return Err(OpenError::Conn(ConnError::Timeout {
                    stage: "during AUTH",
                    after,
                }));
            }
            Err(Xoauth2Error::Io(e)) => {
                return Err(OpenError::Conn(ConnError::Io {
                    stage: "during AUTH",
                    source: e,
                }));
            }
        };
        trace(&format!("AUTH XOAUTH2: token refused: {refused_reply}"));
        conn.quit().await;
        // Only if no other worker already got this token replaced: several
        // connections refused the same token cause one refresh.
        tokens.invalidate(&a.name, &token).await;
        drop(token);
        if refreshed {
            // Not a stale token: the account itself is refused. Hold it
            // where everyone sees it (readyz, token status, metrics) until
            // a human re-authorizes it.
            tokens
                .mark_rejected(&a.name, &refused_reply.to_string())
                .await;
            return Err(OpenError::AuthRejected {
                account: a.name.clone(),
                email: a.email.clone(),
                reply: refused_reply.to_string(),
            });
        }
        refreshed = true;
        trace("refreshing the access token and reconnecting once");
    }
}
