//! Resolving an `[[accounts]]` entry into something ready to use: paths made
//! absolute, the client secret read from wherever it lives, files checked.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use secrecy::{ExposeSecret, SecretString};

use crate::client_cert::{CertError, ClientCertificate};
use crate::config::{AccountConfig, Endpoint, Provider};
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
    /// `<name>.client_secret` supplies the client secret (and
    /// `<name>.service_account_key` a service account's key), in place of
    /// `client_secret_file` (`service_account_key_file`).
    pub credentials_dir: Option<PathBuf>,
    /// Resolve without reading the client secret or the service account
    /// key (`token status`, `token import`: they need neither). The
    /// accounts get [`Credentials::NotLoaded`].
    pub skip_secrets: bool,
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
            skip_secrets: false,
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

    /// Do not read client secrets and service account keys (see
    /// [`AccountContext::skip_secrets`]).
    pub fn without_secrets(mut self) -> AccountContext {
        self.skip_secrets = true;
        self
    }

    /// `$CREDENTIALS_DIRECTORY/<account>.<what>`, when it exists.
    fn credential(&self, account: &str, what: &str) -> Option<PathBuf> {
        self.credentials_dir
            .as_ref()
            .map(|d| d.join(format!("{account}.{what}")))
            .filter(|p| p.exists())
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
    /// `$CREDENTIALS_DIRECTORY` at resolution: files in it are checked as
    /// systemd credentials when reloaded.
    pub(crate) credentials_dir: Option<PathBuf>,
}

/// How an account gets access tokens.
#[derive(Clone)]
pub enum Credentials {
    /// An installed-app ("Desktop app") OAuth client: a refresh token from
    /// `authorize` or `token import` is exchanged for access tokens.
    Client {
        client_id: String,
        /// `None`: a public client (Microsoft "Mobile and desktop
        /// applications" platform), which proves nothing but PKCE.
        client_secret: Option<SecretString>,
        /// Where the secret came from (for messages).
        secret_source: SecretSource,
    },
    /// A Microsoft 365 application sending as a mailbox without a user
    /// (client credentials grant, `.default` scope): no refresh token.
    AppOnly { client_id: String, auth: AppAuth },
    /// A Workspace service account with domain-wide delegation: JWT bearer
    /// grant, no refresh token.
    ServiceAccount(ServiceAccountKey),
    /// Resolved with [`AccountContext::without_secrets`]: the client secret
    /// or key was not read. Enough for `token status` and `token import`;
    /// the token manager and `authorize` refuse such an account.
    NotLoaded {
        /// The account uses `service_account_key_file`.
        service_account: bool,
    },
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
            Credentials::AppOnly { client_id, auth } => f
                .debug_struct("AppOnly")
                .field("client_id", client_id)
                .field("auth", auth)
                .finish(),
            Credentials::ServiceAccount(key) => f.debug_tuple("ServiceAccount").field(key).finish(),
            Credentials::NotLoaded { service_account } => f
                .debug_struct("NotLoaded")
                .field("service_account", service_account)
                .finish(),
        }
    }
}

/// How an app-only application proves who it is.
#[derive(Clone)]
pub enum AppAuth {
    /// A client secret from the app registration.
    Secret {
        secret: SecretString,
        source: SecretSource,
    },
    /// A certificate uploaded to the app registration; its key signs a
    /// client assertion.
    Certificate(ClientCertificate),
}

impl fmt::Debug for AppAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppAuth::Secret { source, .. } => f
                .debug_struct("Secret")
                .field("secret", &"[REDACTED]")
                .field("source", source)
                .finish(),
            AppAuth::Certificate(c) => f.debug_tuple("Certificate").field(c).finish(),
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
    /// `$CREDENTIALS_DIRECTORY/<name>.client_secret` (it wins over
    /// `client_secret_file`).
    Credential(PathBuf),
}

impl Account {
    /// Resolve one config entry. Reads the client secret or the service
    /// account key (unless [`AccountContext::skip_secrets`]), and refuses
    /// secret, key and existing token files that group or others can read,
    /// and an existing token directory they can write to.
    ///
    /// The client secret comes from the systemd credential
    /// `<name>.client_secret` when `$CREDENTIALS_DIRECTORY` has it, else
    /// from `client_secret_file`, else from `client_secret`. A credential
    /// and `client_secret_file` may both be set: the unit loads the file as
    /// the credential (`LoadCredential=NAME.client_secret:FILE`) for its
    /// service user, and the commands run as root outside the unit (no
    /// `$CREDENTIALS_DIRECTORY`) read the file itself. The same goes for a
    /// service account's key: the credential `<name>.service_account_key`
    /// wins over `service_account_key_file`.
    pub fn resolve(config: &AccountConfig, ctx: &AccountContext) -> Result<Account, AccountError> {
        let name = config.name.clone();
        validate_name(&name)?;
        if config.email.trim().is_empty() || !config.email.contains('@') {
            return Err(AccountError::Invalid {
                account: name,
                reason: format!("email {:?} is not an email address", config.email),
            });
        }
        if config.scopes.iter().any(|s| s.trim().is_empty()) {
            return Err(AccountError::Invalid {
                account: name,
                reason: "scopes must not contain an empty scope (Gmail SMTP needs \"https://mail.google.com/\", the Gmail API \"https://www.googleapis.com/auth/gmail.send\")".into(),
            });
        }
        let scopes = config.effective_scopes();
        if let Some((problem, fix)) = config.scope_problem(&scopes) {
            return Err(AccountError::Invalid {
                account: name,
                reason: format!("scopes: {problem}; {fix}"),
            });
        }
        if config.provider == Provider::Microsoft && config.service_account_key_file.is_some() {
            return Err(AccountError::Invalid {
                account: name,
                reason: "service_account_key_file is Google's; a Microsoft 365 application sends app-only with scopes = [\"https://outlook.office365.com/.default\"] and a client secret or certificate".into(),
            });
        }
        if config.client_certificate_file.is_some() && !config.is_app_only() {
            return Err(AccountError::Invalid {
                account: name,
                reason: "client_certificate_file is for app-only sending: set scopes = [\"https://outlook.office365.com/.default\"] and a tenant id".into(),
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
                if ctx.skip_secrets {
                    Credentials::NotLoaded {
                        service_account: true,
                    }
                } else {
                    let path = ctx
                        .credential(&name, "service_account_key")
                        .unwrap_or_else(|| ctx.absolute(key_file));
                    perms::check_secret_file(&path, ctx.credentials_dir.as_deref())
                        .map_err(|e| unreadable(e, &name, "service_account_key"))?;
                    Credentials::ServiceAccount(ServiceAccountKey::load(&path)?)
                }
            }
            None if config.is_app_only() => resolve_app_only(config, ctx)?,
            None => resolve_client(config, ctx)?,
        };

        let token_file = match &config.token_file {
            Some(p) => ctx.absolute(p),
            None => ctx.state_dir.join("tokens").join(format!("{name}.json")),
        };
        if perms::check_token_dir(&token_file)? && !ctx.skip_secrets {
            // (`token status` reports a readable token file itself, and
            // `token import` refuses to write into it.)
            match perms::check_private_file(&token_file) {
                Ok(()) => {}
                Err(PrivateFileError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
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
            scopes,
            ca_file,
            config: config.clone(),
            extra_roots,
            credentials_dir: ctx.credentials_dir.clone(),
        })
    }

    /// The certificates from `ca_file` (empty without one), to add to the
    /// trusted roots of the SMTP connection as well.
    pub fn extra_roots(&self) -> &[CertificateDer<'static>] {
        &self.extra_roots
    }

    /// Whether this account gets tokens without a refresh token: a
    /// Workspace service account, or a Microsoft app-only application.
    pub fn is_service_account(&self) -> bool {
        matches!(
            self.credentials,
            Credentials::ServiceAccount(_)
                | Credentials::AppOnly { .. }
                | Credentials::NotLoaded {
                    service_account: true
                }
        )
    }

    /// A Microsoft app-only account (client credentials).
    pub fn is_app_only(&self) -> bool {
        self.config.is_app_only()
    }

    /// The provider's name for people (`Google`, `Microsoft`).
    pub fn provider_name(&self) -> &'static str {
        self.config.provider.display_name()
    }

    /// The command that gives this account new credentials.
    pub fn fix_command(&self) -> String {
        if self.is_app_only() {
            "fix the application's client secret or certificate, its Exchange service principal or mailbox permission, then run: systemctl reload oauthrelay".into()
        } else if self.is_service_account() {
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

fn required_client_id(config: &AccountConfig) -> Result<String, AccountError> {
    let hint = match config.provider {
        Provider::Google => {
            "the \"Desktop app\" OAuth client id, or set service_account_key_file for a Workspace service account"
        }
        Provider::Microsoft => {
            "the Application (client) ID of the app registration in Microsoft Entra"
        }
    };
    config
        .client_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| AccountError::Invalid {
            account: config.name.clone(),
            reason: format!("client_id is missing ({hint})"),
        })
}

fn resolve_client(
    config: &AccountConfig,
    ctx: &AccountContext,
) -> Result<Credentials, AccountError> {
    let name = &config.name;
    let client_id = required_client_id(config)?;
    if ctx.skip_secrets {
        return Ok(Credentials::NotLoaded {
            service_account: false,
        });
    }
    match read_client_secret(config, ctx)? {
        Some((secret, source)) => Ok(Credentials::Client {
            client_id,
            client_secret: Some(secret),
            secret_source: source,
        }),
        // Microsoft's public clients ("Allow public client flows", the
        // "Mobile and desktop applications" platform) have no secret: PKCE
        // alone protects the code.
        None if config.provider == Provider::Microsoft => Ok(Credentials::Client {
            client_id,
            client_secret: None,
            secret_source: SecretSource::Inline,
        }),
        None => Err(no_secret(name, ctx)),
    }
}

/// Microsoft app-only: a tenant id, and a secret or a certificate.
fn resolve_app_only(
    config: &AccountConfig,
    ctx: &AccountContext,
) -> Result<Credentials, AccountError> {
    let name = &config.name;
    let client_id = required_client_id(config)?;
    if let Some(reason) = config.app_only_tenant_problem() {
        return Err(AccountError::Invalid {
            account: name.clone(),
            reason,
        });
    }
    if ctx.skip_secrets {
        return Ok(Credentials::NotLoaded {
            service_account: true,
        });
    }
    if let (Some(cert), Some(key)) = (
        &config.client_certificate_file,
        &config.client_certificate_key_file,
    ) {
        if config.client_secret.is_some() || config.client_secret_file.is_some() {
            return Err(AccountError::Invalid {
                account: name.clone(),
                reason: "give the application a client secret or a certificate, not both (remove client_secret / client_secret_file or the client_certificate_* keys)".into(),
            });
        }
        let cert = ctx
            .credential(name, "client_certificate")
            .unwrap_or_else(|| ctx.absolute(cert));
        let key = ctx
            .credential(name, "client_certificate_key")
            .unwrap_or_else(|| ctx.absolute(key));
        perms::check_secret_file(&key, ctx.credentials_dir.as_deref())
            .map_err(|e| unreadable(e, name, "client_certificate_key"))?;
        let loaded = ClientCertificate::load(&cert, &key)?;
        return Ok(Credentials::AppOnly {
            client_id,
            auth: AppAuth::Certificate(loaded),
        });
    }
    match read_client_secret(config, ctx)? {
        Some((secret, source)) => Ok(Credentials::AppOnly {
            client_id,
            auth: AppAuth::Secret { secret, source },
        }),
        None => Err(AccountError::Invalid {
            account: name.clone(),
            reason: "app-only sending needs the application's client secret (client_secret_file, client_secret or the systemd credential NAME.client_secret) or its certificate (client_certificate_file + client_certificate_key_file)".into(),
        }),
    }
}

fn no_secret(name: &str, ctx: &AccountContext) -> AccountError {
    let credential = format!("{name}.client_secret");
    let reason = match &ctx.credentials_dir {
        Some(dir) => format!(
            "no client secret: set client_secret_file, or provide the systemd credential {credential} (LoadCredential=; {} has no such file), or client_secret",
            dir.display()
        ),
        None => format!(
            "no client secret: set client_secret_file, or provide the systemd credential {credential} (LoadCredential=), or client_secret. $CREDENTIALS_DIRECTORY is not set here (as for every command run outside the systemd unit): with a credential, also set client_secret_file to the file the unit loads (LoadCredential={credential}:FILE) so these commands can read it"
        ),
    };
    AccountError::Invalid {
        account: name.to_string(),
        reason,
    }
}

/// The client secret from the systemd credential, `client_secret_file` or
/// `client_secret`; `None` when none is given.
fn read_client_secret(
    config: &AccountConfig,
    ctx: &AccountContext,
) -> Result<Option<(SecretString, SecretSource)>, AccountError> {
    let name = &config.name;
    let credential = ctx.credential(name, "client_secret");
    // An inline secret next to another source is a mistake: which one is
    // meant? A credential next to client_secret_file is the documented
    // systemd setup (the unit loads that file as the credential).
    if config.client_secret.is_some() {
        let mut others = Vec::new();
        if config.client_secret_file.is_some() {
            others.push("client_secret_file");
        }
        if credential.is_some() {
            others.push("the systemd credential");
        }
        if !others.is_empty() {
            return Err(AccountError::Invalid {
                account: name.clone(),
                reason: format!(
                    "the client secret is given more than once (client_secret, {}); remove client_secret",
                    others.join(", ")
                ),
            });
        }
    }

    let (secret, source) = if let Some(path) = credential {
        // The service user usually cannot read client_secret_file: it is
        // not even looked at.
        (
            read_secret_file(&path, ctx, name)?,
            SecretSource::Credential(path),
        )
    } else if let Some(p) = &config.client_secret_file {
        let path = ctx.absolute(p);
        (
            read_secret_file(&path, ctx, name)?,
            SecretSource::File(path),
        )
    } else if let Some(s) = &config.client_secret {
        (s.expose_secret().trim().to_string(), SecretSource::Inline)
    } else {
        return Ok(None);
    };
    if secret.is_empty() {
        return Err(AccountError::Invalid {
            account: name.clone(),
            reason: "the client secret is empty".into(),
        });
    }
    Ok(Some((SecretString::from(secret), source)))
}

fn read_secret_file(
    path: &Path,
    ctx: &AccountContext,
    account: &str,
) -> Result<String, AccountError> {
    let unreadable = |e| unreadable(e, account, "client_secret");
    perms::check_secret_file(path, ctx.credentials_dir.as_deref()).map_err(unreadable)?;
    let raw = std::fs::read_to_string(path).map_err(|source| {
        unreadable(PrivateFileError::Io {
            path: path.to_path_buf(),
            source,
        })
    })?;
    Ok(raw.trim().to_string())
}

/// A secret file that cannot be read because of its permissions most
/// likely belongs to root while the daemon runs as the unit's service
/// user: say how to hand it over as a credential.
fn unreadable(e: PrivateFileError, account: &str, credential: &str) -> AccountError {
    match e {
        PrivateFileError::Io { path, source }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            AccountError::Unreadable {
                hint: format!(
                    "under the systemd unit the service user cannot read root's files: keep the setting and add LoadCredential={account}.{credential}:{} to the unit (systemctl edit oauthrelay); run the oauthrelay commands as root",
                    path.display()
                ),
                path,
                source,
            }
        }
        other => other.into(),
    }
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
    /// A secret file the process may not read, with what probably fixes it.
    #[error("cannot read '{}': {source}; {hint}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
        hint: String,
    },
    #[error(transparent)]
    ServiceAccountKey(#[from] KeyError),
    #[error(transparent)]
    ClientCertificate(#[from] CertError),
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
