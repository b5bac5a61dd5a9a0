//! `token import`'s test of a refresh token: one refresh at the account's
//! token endpoint before the token is stored, so a revoked or mistyped
//! token is refused at once rather than stored, picked up by the daemon
//! and found dead a moment later.

use std::time::Duration;

use secrecy::ExposeSecret as _;

use crate::account::{Account, Credentials};
use crate::http::{self, Failure};

/// What one refresh with a refresh token said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenCheck {
    /// The endpoint gave an access token for it.
    Works,
    /// The endpoint refused it (`invalid_grant`: revoked, expired, or
    /// issued to another client); storing it would only hold the mail.
    Refused {
        code: String,
        description: Option<String>,
    },
    /// The endpoint refused the OAuth client rather than the token
    /// (`invalid_client`, `unauthorized_client`...): the token may be fine.
    ClientRefused {
        code: String,
        description: Option<String>,
    },
    /// No answer (network, TLS, a 5xx): the token could not be tried.
    Unreachable(String),
    /// The token could not be tried here (the client secret cannot be
    /// read by this user, say).
    NotTried(String),
}

/// Try `refresh_token` once against the account's token endpoint.
pub async fn check_refresh_token(
    account: &Account,
    refresh_token: &str,
    timeout: Duration,
) -> TokenCheck {
    let Credentials::Client {
        client_id,
        client_secret,
        ..
    } = &account.credentials
    else {
        return TokenCheck::NotTried("the client secret was not loaded".into());
    };
    let client = match http::client(&account.extra_roots, timeout) {
        Ok(c) => c,
        Err(e) => return TokenCheck::Unreachable(e),
    };
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("client_id", client_id.as_str()),
        ("refresh_token", refresh_token.trim()),
    ];
    if let Some(secret) = client_secret {
        form.push(("client_secret", secret.expose_secret()));
    }
    match http::post_token(&client, account.token_url.url(), &form, timeout).await {
        Ok(_) => TokenCheck::Works,
        Err(Failure::Rejected {
            code, description, ..
        }) if code == "invalid_grant" => TokenCheck::Refused { code, description },
        Err(Failure::Rejected {
            code, description, ..
        }) => TokenCheck::ClientRefused { code, description },
        Err(Failure::Temporary(e)) => TokenCheck::Unreachable(e),
    }
}
