//! What `token status` shows, and `token import`.

use std::path::PathBuf;
use std::time::SystemTime;

use secrecy::SecretString;
use serde::Serialize;

use crate::account::Account;
use crate::store::{self, RefreshRecord, StoreError, TokenFile};

/// What kind of credentials an account uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    /// Desktop-app OAuth client + refresh token.
    OauthClient,
    /// Workspace service account (JWT bearer grant).
    ServiceAccount,
}

/// One account's state, for `token status` (text or `--json`) and
/// `/readyz`. Serializes to JSON with RFC 3339 times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountStatus {
    pub account: String,
    pub email: String,
    pub kind: AccountKind,
    pub token_file: PathBuf,
    /// A refresh token is stored (always `false` for service accounts,
    /// which need none).
    pub refresh_token_stored: bool,
    /// The account can get access tokens, as far as is known.
    pub authorized: bool,
    /// The account waits for `authorize` / `token import` / a config fix.
    pub needs_authorization: bool,
    /// When the current access token expires.
    #[serde(with = "crate::timefmt::opt")]
    pub access_token_expires_at: Option<SystemTime>,
    /// The latest refresh: time, `ok`/`error`, error code and text.
    pub last_refresh: Option<RefreshRecord>,
    /// What is wrong, in words (when something is).
    pub problem: Option<String>,
    /// What to run to fix it.
    pub fix: Option<String>,
}

impl AccountStatus {
    pub(crate) fn base(account: &Account) -> AccountStatus {
        AccountStatus {
            account: account.name.clone(),
            email: account.email.clone(),
            kind: if account.is_service_account() {
                AccountKind::ServiceAccount
            } else {
                AccountKind::OauthClient
            },
            token_file: account.token_file.clone(),
            refresh_token_stored: false,
            authorized: false,
            needs_authorization: false,
            access_token_expires_at: None,
            last_refresh: None,
            problem: None,
            fix: None,
        }
    }
}

/// Per-account status read from the token files (what `oauthrelay token
/// status` shows; the daemon's live view is
/// [`crate::TokenManager::status`]).
pub fn status(accounts: &[Account]) -> Vec<AccountStatus> {
    accounts.iter().map(file_status).collect()
}

fn file_status(account: &Account) -> AccountStatus {
    let mut st = AccountStatus::base(account);
    let file = match store::load(&account.token_file) {
        Ok(f) => f,
        Err(e) => {
            st.needs_authorization = true;
            st.problem = Some(e.to_string());
            return st;
        }
    };
    let file = file.unwrap_or_default();
    st.refresh_token_stored = file.refresh_token.is_some();
    st.access_token_expires_at = file.access_token_expires_at;
    st.last_refresh = file.last_refresh.clone();
    let missing_token = !account.is_service_account() && file.refresh_token.is_none();
    st.needs_authorization = missing_token || file.needs_authorization;
    st.authorized = !st.needs_authorization;
    if missing_token {
        st.problem = Some(format!(
            "no refresh token stored in {}",
            account.token_file.display()
        ));
        st.fix = Some(crate::manager::fix_for(account, "not_authorized"));
    } else if file.needs_authorization {
        let code = file
            .last_refresh
            .as_ref()
            .and_then(|r| r.error_code.clone())
            .unwrap_or_else(|| "invalid_grant".into());
        st.problem = Some(
            file.last_refresh
                .as_ref()
                .and_then(|r| r.error.clone())
                .unwrap_or_else(|| format!("Google refused the credentials ({code})")),
        );
        st.fix = Some(crate::manager::fix_for(account, &code));
    }
    st
}

/// Why `token import` refused.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(
        "account {0:?} uses a service account (service_account_key_file); it has no refresh token to import"
    )]
    ServiceAccount(String),
    #[error("not a refresh token: {0}")]
    Invalid(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Store `refresh_token` (as read from stdin: surrounding whitespace is
/// trimmed) as the account's refresh token, clearing any stored access
/// token and the needs-authorization flag. A running daemon notices the new
/// file within seconds. Returns what was written.
pub fn import_refresh_token(
    account: &Account,
    refresh_token: &str,
) -> Result<TokenFile, ImportError> {
    if account.is_service_account() {
        return Err(ImportError::ServiceAccount(account.name.clone()));
    }
    let token = refresh_token.trim();
    if token.is_empty() {
        return Err(ImportError::Invalid("it is empty"));
    }
    if token.len() > 4096 {
        return Err(ImportError::Invalid("it is longer than 4096 bytes"));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ImportError::Invalid(
            "it contains spaces or control characters (paste exactly one token)",
        ));
    }
    if token.starts_with("ya29.") {
        return Err(ImportError::Invalid(
            "this is an access token (ya29...), which expires within an hour; import the refresh token (Google's start with 1//)",
        ));
    }
    let secret = SecretString::from(token.to_string());
    let written = store::update(&account.token_file, |f| {
        f.account = account.name.clone();
        f.email = account.email.clone();
        f.refresh_token = Some(secret);
        f.access_token = None;
        f.access_token_expires_at = None;
        f.scopes = account.scopes.clone();
        f.authorized_at = Some(SystemTime::now());
        f.last_refresh = None;
        f.needs_authorization = false;
    })?;
    tracing::info!(account = %account.name, file = %account.token_file.display(), "refresh token imported");
    Ok(written)
}
