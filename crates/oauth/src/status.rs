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
    /// Microsoft 365 application, app-only (client credentials).
    AppOnly,
}

/// Why an account cannot get access tokens until something changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// OAuth error code (`invalid_grant`, `invalid_client`...),
    /// `not_authorized` when no refresh token is stored, or
    /// `smtp_auth_rejected` when Gmail refused even a fresh token.
    pub code: String,
    /// What is wrong, in words.
    pub problem: String,
    /// What to run or change to fix it.
    pub fix: String,
    /// When the manager asks the token endpoint again by itself: for OAuth
    /// errors that may be temporary (anything but `invalid_grant`,
    /// `invalid_client`, `unauthorized_client` and a missing or refused
    /// token). `None`: only `authorize`, `token import` or a reload help.
    pub retry_at: Option<SystemTime>,
}

impl Refusal {
    /// Only a person can lift this refusal (a dead grant, a wrong client
    /// or missing delegation, no refresh token): `authorize`, `token
    /// import` or a fixed config and a reload. Others may be lifted by a
    /// hold probe ([`TokenManager::probe_token`](crate::TokenManager::probe_token)).
    pub fn needs_person(&self) -> bool {
        crate::manager::needs_person(&self.code)
    }
}

/// Whether an account can get tokens: the one source of "needs
/// authorization" for delivery, `/readyz`, `token status` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthState {
    /// It can (as far as is known). `trouble`: refreshes are failing for a
    /// reason that heals by itself (the endpoint is down).
    Authorized { trouble: Option<String> },
    /// It cannot until the refusal is dealt with (or, with `retry_at`, the
    /// endpoint answers again).
    NeedsAuthorization(Refusal),
}

impl AuthState {
    pub fn is_authorized(&self) -> bool {
        matches!(self, AuthState::Authorized { .. })
    }

    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            AuthState::NeedsAuthorization(r) => Some(r),
            AuthState::Authorized { .. } => None,
        }
    }

    /// What is wrong, in words (when something is).
    pub fn problem(&self) -> Option<&str> {
        match self {
            AuthState::Authorized { trouble } => trouble.as_deref(),
            AuthState::NeedsAuthorization(r) => Some(&r.problem),
        }
    }

    /// What fixes it.
    pub fn fix(&self) -> Option<&str> {
        self.refusal().map(|r| r.fix.as_str())
    }
}

/// The JSON of `token status --json` keeps its keys: `authorized`,
/// `needs_authorization`, `problem`, `fix` (and `retry_at` while the
/// manager retries by itself).
impl Serialize for AuthState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("AuthState", 5)?;
        st.serialize_field("authorized", &self.is_authorized())?;
        st.serialize_field("needs_authorization", &!self.is_authorized())?;
        st.serialize_field("problem", &self.problem())?;
        st.serialize_field("fix", &self.fix())?;
        if let Some(at) = self.refusal().and_then(|r| r.retry_at) {
            st.serialize_field("retry_at", &crate::timefmt::rfc3339(at))?;
        }
        st.end()
    }
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
    /// Whether the account can get tokens, and if not why.
    #[serde(flatten)]
    pub auth: AuthState,
    /// When the current access token expires.
    #[serde(with = "crate::timefmt::opt")]
    pub access_token_expires_at: Option<SystemTime>,
    /// The latest refresh: time, `ok`/`error`, error code and text.
    pub last_refresh: Option<RefreshRecord>,
    /// How the account sends (`smtp` or `gmail-api`).
    pub transport: crate::TransportKind,
    /// The scopes the stored token was granted (Google's answer to the
    /// last refresh; before one, what was requested). Empty when unknown.
    pub scopes: Vec<String>,
}

impl AccountStatus {
    pub(crate) fn base(account: &Account) -> AccountStatus {
        AccountStatus {
            account: account.name.clone(),
            email: account.email.clone(),
            kind: if account.is_app_only() {
                AccountKind::AppOnly
            } else if account.is_service_account() {
                AccountKind::ServiceAccount
            } else {
                AccountKind::OauthClient
            },
            token_file: account.token_file.clone(),
            refresh_token_stored: false,
            auth: AuthState::Authorized { trouble: None },
            access_token_expires_at: None,
            last_refresh: None,
            transport: account.config.transport,
            scopes: Vec::new(),
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
            st.auth = AuthState::NeedsAuthorization(Refusal {
                code: "token_file".into(),
                problem: e.to_string(),
                fix: format!(
                    "fix or remove {}, then run: oauthrelay authorize --account {}",
                    account.token_file.display(),
                    account.name
                ),
                retry_at: None,
            });
            return st;
        }
    };
    let file = file.unwrap_or_default();
    st.refresh_token_stored = file.refresh_token.is_some();
    st.access_token_expires_at = file.access_token_expires_at;
    st.last_refresh = file.last_refresh.clone();
    st.scopes = file.scopes.clone();
    let missing_token = !account.is_service_account() && file.refresh_token.is_none();
    if missing_token {
        st.auth = AuthState::NeedsAuthorization(Refusal {
            code: "not_authorized".into(),
            problem: format!(
                "no refresh token stored in {}",
                account.token_file.display()
            ),
            fix: crate::manager::fix_for(account, "not_authorized"),
            retry_at: None,
        });
    } else if let Some((problem, _)) = account.config.scope_problem(&file.scopes) {
        st.auth = AuthState::NeedsAuthorization(Refusal {
            code: crate::manager::SCOPE_MISMATCH.into(),
            problem,
            fix: crate::manager::fix_for(account, crate::manager::SCOPE_MISMATCH),
            retry_at: None,
        });
    } else if file.needs_authorization {
        let code = file
            .last_refresh
            .as_ref()
            .and_then(|r| r.error_code.clone())
            .unwrap_or_else(|| "invalid_grant".into());
        st.auth = AuthState::NeedsAuthorization(Refusal {
            problem: file
                .last_refresh
                .as_ref()
                .and_then(|r| r.error.clone())
                .unwrap_or_else(|| format!("Google refused the credentials ({code})")),
            fix: crate::manager::fix_for(account, &code),
            code,
            retry_at: None,
        });
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
