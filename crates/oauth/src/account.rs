//! Resolving an `[[accounts]]` entry into something ready to use: paths made
//! absolute, the client secret read from wherever it lives, files checked.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use secrecy::{ExposeSecret, SecretString};

use crate::config::{AccountConfig, Endpoint};
use crate::perms::{self, PrivateFileError, TooOpen};
use crate::service_account::{KeyError, ServiceAccountKey};

/// Where relative paths and default files live.
#[derive(Debug, Clone, Default)]
pub struct AccountContext {
    /// State directory: tokens default to `<state_dir>/tokens/<name>.json`.
    pub state_dir: PathBuf,
    /// Directory of the config file: relative paths in the config are
    /// relative to it. `None`: relative to the current directory.
    pub config_dir: Option<PathBuf>,
    /// systemd's `$CREDENTIALS_DIRECTORY`: a credential named
    /// `<name>.client_secret` supplies the client secret.
    pub credentials_dir: Option<PathBuf>,
}

impl AccountContext {
    /// A context with `state_dir`, no config dir, and the credentials
    /// directory taken from `$CREDENTIALS_DIRECTORY` (set by systemd for
    /// `LoadCredential=`/`SetCredentialEncrypted=`).
    pub fn new(state_dir: impl Into<PathBuf>) -> AccountContext {
        AccountContext {
            state_dir: state_dir.into(),
            config_dir: None,
            credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        }
    }

    pub fn with_config_dir(mut self, dir: impl Into<PathBuf>) -> AccountContext {
        self.config_dir = Some(dir.into());
        self
    }

    pub fn with_credentials_dir(mut self, dir: Option<PathBuf>) -> AccountContext {
        self.credentials_dir = dir;
        self
    }

    fn absolute(&self, p: &Path) -> PathBuf {
        match &self.config_dir {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        }
    }
}

/// A resolved account, ready for [`crate::TokenManager`] and
/// [`crate::authorize`]. `Debug` never shows the client secret or the
/// service account's private key.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    /// XOAUTH2 `user=` (for service accounts: the user acted as).
    pub email: String,
    /// Absolute path of the token file.
    pub token_file: PathBuf,
    pub credentials: Credentials,
    pub auth_url: Endpoint,
    pub token_url: Endpoint,
    pub scopes: Vec<String>,
    /// Extra trusted root for the HTTPS endpoints (absolute path).
    pub ca_file: Option<PathBuf>,
    /// The config entry this came from (SMTP settings, sender routing).
    pub config: AccountConfig,
    pub(crate) extra_roots: Vec<CertificateDer<'static>>,
}

/// How an account gets access tokens.
#[derive(Clone)]
pub enum Credentials {
    /// An installed-app ("Desktop app") OAuth client: a refresh token from
    /// `authorize` or `token import` is exchanged for access tokens.
    Client {
        client_id: String,
        client_secret: SecretString,
        /// Where the secret came from (for messages).
        secret_source: SecretSource,
    },
    /// A Workspace service account with domain-wide delegation: JWT bearer
    /// grant, no refresh token.
    ServiceAccount(ServiceAccountKey),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Client {
                client_id,
                secret_source,
                ..
            } => f
                .debug_struct("Client")
                .field("client_id", client_id)
                .field("client_secret", &"[REDACTED]")
                .field("secret_source", secret_source)
                .finish(),
            Credentials::ServiceAccount(key) => f.debug_tuple("ServiceAccount").field(key).finish(),
        }
    }
}

/// Where a client secret was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `client_secret = "..."` in the config file.
    Inline,
    /// `client_secret_file = "..."`.
    File(PathBuf),
    /// `$CREDENTIALS_DIRECTORY/<name>.client_secret`.
    Credential(PathBuf),
}

impl Account {
    /// Resolve one config entry. Reads the client secret (inline,
    /// `client_secret_file`, or the systemd credential
    /// `<name>.client_secret`: exactly one of them) or the service account
    /// key, and refuses secret, key and existing token files that group or
    /// others can read.
    pub fn resolve(config: &AccountConfig, ctx: &AccountContext) -> Result<Account, AccountError> {
        let name = config.name.clone();
        validate_name(&name)?;
        if config.email.trim().is_empty() || !config.email.contains('@') {
            return Err(AccountError::Invalid {
                account: name,
                reason: format!("email {:?} is not an email address", config.email),
            });
        }
        if config.scopes.is_empty() || config.scopes.iter().any(|s| s.trim().is_empty()) {
            return Err(AccountError::Invalid {
                account: name,
                reason: "scopes must list at least one scope (Gmail SMTP needs \"https://mail.google.com/\")".into(),
            });
        }

        let credentials = match &config.service_account_key_file {
            Some(key_file) => {
                if config.client_id.is_some()
                    || config.client_secret.is_some()
                    || config.client_secret_file.is_some()
                {
                    return Err(AccountError::Invalid {
                        account: name,
                        reason: "service_account_key_file cannot be combined with client_id / client_secret / client_secret_file; a service account needs no OAuth client".into(),
                    });
                }
                let path = ctx.absolute(key_file);
                check_private(&path)?;
                Credentials::ServiceAccount(ServiceAccountKey::load(&path)?)
            }
            None => resolve_client(config, ctx)?,
        };

        let token_file = match &config.token_file {
            Some(p) => ctx.absolute(p),
            None => ctx.state_dir.join("tokens").join(format!("{name}.json")),
        };
        match perms::check_private_file(&token_file) {
            Ok(()) => {}
            Err(PrivateFileError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }

        let ca_file = config.ca_file.as_deref().map(|p| ctx.absolute(p));
        let extra_roots = match &ca_file {
            Some(path) => load_roots(path)?,
            None => Vec::new(),
        };

        Ok(Account {
            name,
            email: config.email.trim().to_string(),
            token_file,
            credentials,
            auth_url: config.auth_url.clone(),
            token_url: config.token_url.clone(),
            scopes: config.scopes.clone(),
            ca_file,
            config: config.clone(),
            extra_roots,
        })
    }

    /// The certificates from `ca_file` (empty without one), to add to the
    /// trusted roots of the SMTP connection as well.
    pub fn extra_roots(&self) -> &[CertificateDer<'static>] {
        &self.extra_roots
    }

    /// Whether this account uses a Workspace service account.
    pub fn is_service_account(&self) -> bool {
        matches!(self.credentials, Credentials::ServiceAccount(_))
    }

    /// The command that gives this account new credentials.
    pub fn fix_command(&self) -> String {
        if self.is_service_account() {
            "fix the service account key or its domain-wide delegation, then run: systemctl reload oauthrelay".into()
        } else {
            format!(
                "oauthrelay authorize --account {0} (or: oauthrelay token import --account {0})",
                self.name
            )
        }
    }
}

/// Resolve every entry; names must be unique.
pub fn resolve_all(
    configs: &[AccountConfig],
    ctx: &AccountContext,
) -> Result<Vec<Account>, AccountError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(configs.len());
    for c in configs {
        if !seen.insert(c.name.clone()) {
            return Err(AccountError::Invalid {
                account: c.name.clone(),
                reason: "two [[accounts]] entries have this name".into(),
            });
        }
        out.push(Account::resolve(c, ctx)?);
    }
    Ok(out)
}

fn validate_name(name: &str) -> Result<(), AccountError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(AccountError::Invalid {
            account: name.to_string(),
            reason: "the name must be 1-64 characters of letters, digits, '.', '_' or '-' (it names the token file and the systemd credential)".into(),
        })
    }
}

fn resolve_client(
    config: &AccountConfig,
    ctx: &AccountContext,
) -> Result<Credentials, AccountError> {
    let name = &config.name;
    let client_id = config
        .client_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| AccountError::Invalid {
            account: name.clone(),
            reason: "client_id is missing (the \"Desktop app\" OAuth client id, or set service_account_key_file for a Workspace service account)".into(),
        })?
        .to_string();

    let credential = ctx
        .credentials_dir
        .as_ref()
        .map(|d| d.join(format!("{name}.client_secret")))
        .filter(|p| p.exists());

    let mut sources = Vec::new();
    if config.client_secret.is_some() {
        sources.push("client_secret");
    }
    if config.client_secret_file.is_some() {
        sources.push("client_secret_file");
    }
    if credential.is_some() {
        sources.push("the systemd credential");
    }
    if sources.len() > 1 {
        return Err(AccountError::Invalid {
            account: name.clone(),
            reason: format!(
                "the client secret is given more than once ({}); keep exactly one",
                sources.join(", ")
            ),
        });
    }

    let (secret, source) = if let Some(s) = &config.client_secret {
        (s.expose_secret().trim().to_string(), SecretSource::Inline)
    } else if let Some(p) = &config.client_secret_file {
        let path = ctx.absolute(p);
        (read_secret_file(&path)?, SecretSource::File(path))
    } else if let Some(path) = credential {
        (read_secret_file(&path)?, SecretSource::Credential(path))
    } else {
        return Err(AccountError::Invalid {
            account: name.clone(),
            reason: format!(
                "no client secret: set client_secret_file, or provide the systemd credential {name}.client_secret (LoadCredential=), or client_secret"
            ),
        });
    };
    if secret.is_empty() {
        return Err(AccountError::Invalid {
            account: name.clone(),
            reason: "the client secret is empty".into(),
        });
    }
    Ok(Credentials::Client {
        client_id,
        client_secret: SecretString::from(secret),
        secret_source: source,
    })
}

fn check_private(path: &Path) -> Result<(), AccountError> {
    perms::check_private_file(path).map_err(AccountError::from)
}

fn read_secret_file(path: &Path) -> Result<String, AccountError> {
    check_private(path)?;
    let raw = std::fs::read_to_string(path).map_err(|source| AccountError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(raw.trim().to_string())
}

fn load_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, AccountError> {
    let bad = |reason: String| AccountError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate found".into()));
    }
    Ok(certs)
}

/// Why an account entry cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("account {account:?}: {reason}")]
    Invalid { account: String, reason: String },
    #[error(transparent)]
    TooOpen(#[from] TooOpen),
    #[error("cannot read '{}': {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    ServiceAccountKey(#[from] KeyError),
    #[error("ca_file '{}': {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
}

impl From<PrivateFileError> for AccountError {
    fn from(e: PrivateFileError) -> AccountError {
        match e {
            PrivateFileError::TooOpen(t) => AccountError::TooOpen(t),
            PrivateFileError::Io { path, source } => AccountError::Read { path, source },
        }
    }
}
