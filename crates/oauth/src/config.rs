//! `[[accounts]]`: one Google account oauthrelay sends as.
//!
//! The table holds both the OAuth side (client, token file, endpoints) and
//! the SMTP side (host, port, TLS mode, sender routing) of an account, since
//! an account is one thing to the person writing the config.

use std::fmt;
use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Gmail's defaults.
pub const GMAIL_SMTP_HOST: &str = "smtp.gmail.com";
pub const GOOGLE_AUTH_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
pub const GMAIL_SCOPE: &str = "https://mail.google.com/";
/// The Gmail API's send-only scope: `users.messages.send` and nothing else.
pub const GMAIL_SEND_SCOPE: &str = "https://www.googleapis.com/auth/gmail.send";
/// The Gmail API's base URL.
pub const GMAIL_API_URL: &str = "https://gmail.googleapis.com";

/// Microsoft's defaults.
pub const MICROSOFT_SMTP_HOST: &str = "smtp.office365.com";
/// Outlook.com (personal Microsoft accounts, `tenant = "consumers"`).
pub const OUTLOOK_SMTP_HOST: &str = "smtp-mail.outlook.com";
pub const MICROSOFT_LOGIN: &str = "https://login.microsoftonline.com";
/// Delegated permission to send over SMTP AUTH.
pub const MICROSOFT_SMTP_SCOPE: &str = "https://outlook.office.com/SMTP.Send";
/// Asks Microsoft for a refresh token.
pub const OFFLINE_ACCESS: &str = "offline_access";
/// App-only (client credentials) scope for Exchange Online SMTP.
pub const MICROSOFT_APP_SCOPE: &str = "https://outlook.office365.com/.default";
pub const MICROSOFT_DEFAULT_TENANT: &str = "common";
/// Exchange Online's limits per mailbox: 3 concurrent connections, 30
/// messages a minute.
pub const MICROSOFT_MAX_CONCURRENCY: usize = 3;
pub const MICROSOFT_MAX_RATE: f64 = 0.5;

/// One `[[accounts]]` entry, with every default filled in for its
/// `provider` (what `check-config` prints).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawAccountConfig")]
pub struct AccountConfig {
    /// Whose endpoints the defaults are: `google` (Gmail) or `microsoft`
    /// (Microsoft 365 and Outlook.com).
    pub provider: Provider,
    /// Microsoft's tenant: `common`, `organizations`, `consumers`
    /// (Outlook.com) or a tenant id / domain. `None` for Google.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The device authorization endpoint (RFC 8628) for `authorize
    /// --device`. Microsoft's by default; Google accounts have none unless
    /// set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_auth_url: Option<Endpoint>,
    /// Sends per second for this account (a token bucket with a small
    /// burst), so the provider never has to delay or refuse them. `None`:
    /// the provider's and transport's default
    /// ([`AccountConfig::effective_max_rate`]: 0.5 for Microsoft, i.e.
    /// Exchange's 30 messages a minute; 2.5 for the Gmail API; unpaced
    /// Gmail SMTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<f64>,
    /// Simultaneous connections for this account. Default: `[delivery]
    /// concurrency`, at most 3 for Microsoft (Exchange's limit per mailbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// Microsoft app-only: the application's certificate (PEM), whose key
    /// signs the client assertion, instead of a client secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_file: Option<PathBuf>,
    /// The certificate's private key (PEM, PKCS#8 or PKCS#1 RSA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_key_file: Option<PathBuf>,
    /// Short name used on the command line (`--account NAME`), in logs and
    /// metrics labels.
    pub name: String,
    /// The Gmail address: XOAUTH2 `user=`, and the sender when
    /// `rewrite_from` is on.
    pub email: String,
    /// OAuth client id (a "Desktop app" client). Not needed with
    /// `service_account_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Inline client secret. Prefer `client_secret_file` or a systemd
    /// credential named `<name>.client_secret`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_redacted"
    )]
    pub client_secret: Option<SecretString>,
    /// File holding the client secret (must not be group/world-readable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// Where tokens are stored. Default: `<state dir>/tokens/<name>.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Envelope senders routed to this account: `*` matches anything
    /// (including the null sender), `*@example.com` a domain,
    /// `scanner@example.com` one address. Case-insensitive; first account
    /// that matches wins.
    #[serde(default = "default_senders")]
    pub senders: Vec<String>,
    /// Set the envelope sender and `From:` to `email`, keeping the original
    /// in `Reply-To:` when the message has none.
    #[serde(default)]
    pub rewrite_from: bool,
    /// Send all of this account's mail with this envelope sender (the
    /// null sender of bounces excepted), whatever the client gave. `None`:
    /// senders in the local domain and unqualified ones become `email`,
    /// others go as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope_from: Option<String>,
    /// Google Workspace: a service account's JSON key; tokens come from the
    /// JWT bearer grant with `sub = email` (domain-wide delegation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_key_file: Option<PathBuf>,
    #[serde(default = "default_smtp_host")]
    pub smtp_host: String,
    #[serde(default = "default_smtp_port")]
    pub smtp_port: u16,
    #[serde(default)]
    pub smtp_tls: SmtpTls,
    /// Extra trusted root (PEM) for the SMTP and HTTPS endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_auth_url")]
    pub auth_url: Endpoint,
    #[serde(default = "default_token_url")]
    pub token_url: Endpoint,
    /// OAuth scopes to request. Empty (the default): the transport's
    /// ([`TransportKind::default_scopes`]).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// How mail goes upstream: SMTP with XOAUTH2 (scope
    /// `https://mail.google.com/`) or the Gmail API (scope `gmail.send`).
    #[serde(default)]
    pub transport: TransportKind,
    /// The Gmail API's base URL (`transport = "gmail-api"`).
    #[serde(default = "default_api_url")]
    pub api_url: Endpoint,
}

/// `transport`: how an account's mail goes upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    /// SMTP with SASL XOAUTH2 (`smtp_host`): needs the full-mailbox scope
    /// `https://mail.google.com/`.
    #[default]
    Smtp,
    /// The Gmail API's `users.messages.send` (`api_url`): needs only
    /// `https://www.googleapis.com/auth/gmail.send`.
    GmailApi,
}

impl TransportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Smtp => "smtp",
            TransportKind::GmailApi => "gmail-api",
        }
    }

    /// The scopes requested when the config lists none.
    pub fn default_scopes(self) -> Vec<String> {
        match self {
            TransportKind::Smtp => vec![GMAIL_SCOPE.to_string()],
            TransportKind::GmailApi => vec![GMAIL_SEND_SCOPE.to_string()],
        }
    }

    /// Scopes, any one of which lets a token use this transport (Google's
    /// documentation of `users.messages.send`; SMTP takes only the full
    /// scope).
    pub fn serving_scopes(self) -> &'static [&'static str] {
        match self {
            TransportKind::Smtp => &[GMAIL_SCOPE],
            TransportKind::GmailApi => &[
                GMAIL_SEND_SCOPE,
                "https://www.googleapis.com/auth/gmail.compose",
                "https://www.googleapis.com/auth/gmail.modify",
                GMAIL_SCOPE,
            ],
        }
    }

    /// Whether a token granted `scopes` can use this transport.
    pub fn served_by(self, scopes: &[String]) -> bool {
        scopes
            .iter()
            .any(|s| self.serving_scopes().contains(&s.as_str()))
    }

    /// The default `max_rate` (sends per second): Gmail API quota is
    /// 15,000 units per user per minute and a send costs 100, so 2.5 a
    /// second; SMTP is not paced unless `max_rate` says so.
    pub fn default_max_rate(self) -> Option<f64> {
        match self {
            TransportKind::Smtp => None,
            TransportKind::GmailApi => Some(2.5),
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whose service an account uses: sets every endpoint default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Gmail and Google Workspace.
    #[default]
    Google,
    /// Microsoft 365 (Exchange Online) and Outlook.com.
    Microsoft,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Google => "google",
            Provider::Microsoft => "microsoft",
        }
    }

    /// The provider's name for people.
    pub fn display_name(self) -> &'static str {
        match self {
            Provider::Google => "Google",
            Provider::Microsoft => "Microsoft",
        }
    }
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// TLS from the first byte (port 465).
    #[default]
    Implicit,
    /// Plain connection upgraded with STARTTLS (port 587).
    Starttls,
}

/// An OAuth endpoint URL: `https://`, or `http://` for a loopback host only.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint(url::Url);

impl Endpoint {
    pub fn url(&self) -> &url::Url {
        &self.0
    }
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Endpoint, String> {
        let url = url::Url::parse(s).map_err(|e| format!("invalid URL {s:?}: {e}"))?;
        match url.scheme() {
            "https" => Ok(Endpoint(url)),
            "http" => {
                let loopback = match url.host() {
                    Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    None => false,
                };
                if loopback {
                    Ok(Endpoint(url))
                } else {
                    Err(format!(
                        "{s:?}: plain http:// is only allowed for a loopback host; use https://"
                    ))
                }
            }
            other => Err(format!("{s:?}: unsupported scheme {other:?}; use https://")),
        }
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Endpoint, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

fn ser_redacted<S: Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(secret) if !secret.expose_secret().is_empty() => s.serialize_str("<redacted>"),
        _ => s.serialize_str(""),
    }
}

fn default_senders() -> Vec<String> {
    vec!["*".to_string()]
}
fn default_smtp_host() -> String {
    GMAIL_SMTP_HOST.to_string()
}
fn default_smtp_port() -> u16 {
    465
}
fn default_auth_url() -> Endpoint {
    Endpoint(url::Url::parse(GOOGLE_AUTH_URL).expect("constant URL"))
}
fn default_token_url() -> Endpoint {
    Endpoint(url::Url::parse(GOOGLE_TOKEN_URL).expect("constant URL"))
}
fn default_api_url() -> Endpoint {
    Endpoint(url::Url::parse(GMAIL_API_URL).expect("constant URL"))
}
/// A delegated Microsoft account's scopes: SMTP AUTH, and a refresh token.
fn microsoft_default_scopes() -> Vec<String> {
    vec![MICROSOFT_SMTP_SCOPE.to_string(), OFFLINE_ACCESS.to_string()]
}

/// `[[accounts]]` as written: the provider-dependent keys may be absent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccountConfig {
    #[serde(default)]
    provider: Provider,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    device_auth_url: Option<Endpoint>,
    #[serde(default)]
    max_rate: Option<f64>,
    #[serde(default)]
    concurrency: Option<usize>,
    #[serde(default)]
    client_certificate_file: Option<PathBuf>,
    #[serde(default)]
    client_certificate_key_file: Option<PathBuf>,
    name: String,
    email: String,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    client_secret: Option<SecretString>,
    #[serde(default)]
    client_secret_file: Option<PathBuf>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default = "default_senders")]
    senders: Vec<String>,
    #[serde(default)]
    rewrite_from: Option<bool>,
    #[serde(default)]
    envelope_from: Option<String>,
    #[serde(default)]
    service_account_key_file: Option<PathBuf>,
    #[serde(default)]
    smtp_host: Option<String>,
    #[serde(default)]
    smtp_port: Option<u16>,
    #[serde(default)]
    smtp_tls: Option<SmtpTls>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    auth_url: Option<Endpoint>,
    #[serde(default)]
    token_url: Option<Endpoint>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    transport: TransportKind,
    #[serde(default)]
    api_url: Option<Endpoint>,
}

/// A tenant as it may appear in a URL path: `common`, `organizations`,
/// `consumers`, a GUID or a domain.
pub fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 253
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{what}`.
pub fn microsoft_endpoint(tenant: &str, what: &str) -> Result<Endpoint, String> {
    format!("{MICROSOFT_LOGIN}/{tenant}/oauth2/v2.0/{what}").parse()
}

impl TryFrom<RawAccountConfig> for AccountConfig {
    type Error = String;

    /// Fill in the provider's defaults, then what the file says. Values
    /// that do not fit together (a tenant on a Google account, half a
    /// certificate, the Gmail API for Microsoft) are kept as written and
    /// reported by the configuration's checks, which point at the key.
    fn try_from(r: RawAccountConfig) -> Result<AccountConfig, String> {
        let mut c = AccountConfig::with_provider(r.name, r.email, r.provider)?;
        if let Some(t) = r.tenant {
            let t = t.trim().to_string();
            if r.provider == Provider::Microsoft && valid_tenant(&t) {
                c.set_tenant(&t)?;
            } else {
                c.tenant = Some(t);
            }
        }
        c.max_rate = r.max_rate;
        c.concurrency = r.concurrency;
        c.client_certificate_file = r.client_certificate_file;
        c.client_certificate_key_file = r.client_certificate_key_file;
        c.client_id = r.client_id;
        c.client_secret = r.client_secret;
        c.client_secret_file = r.client_secret_file;
        c.token_file = r.token_file;
        c.senders = r.senders;
        if let Some(v) = r.rewrite_from {
            c.rewrite_from = v;
        }
        c.envelope_from = r.envelope_from;
        c.service_account_key_file = r.service_account_key_file;
        if let Some(h) = r.smtp_host {
            c.smtp_host = h;
        }
        if let Some(p) = r.smtp_port {
            c.smtp_port = p;
        }
        if let Some(t) = r.smtp_tls {
            c.smtp_tls = t;
        }
        c.ca_file = r.ca_file;
        if let Some(u) = r.auth_url {
            c.auth_url = u;
        }
        if let Some(u) = r.token_url {
            c.token_url = u;
        }
        if let Some(u) = r.device_auth_url {
            c.device_auth_url = Some(u);
        }
        if let Some(s) = r.scopes {
            c.scopes = s;
        }
        c.transport = r.transport;
        if let Some(u) = r.api_url {
            c.api_url = u;
        }
        Ok(c)
    }
}

impl AccountConfig {
    /// An entry with Gmail's defaults: everything but the name and email
    /// left to be filled in.
    pub fn new(name: impl Into<String>, email: impl Into<String>) -> AccountConfig {
        AccountConfig {
            provider: Provider::Google,
            tenant: None,
            device_auth_url: None,
            max_rate: None,
            concurrency: None,
            client_certificate_file: None,
            client_certificate_key_file: None,
            name: name.into(),
            email: email.into(),
            client_id: None,
            client_secret: None,
            client_secret_file: None,
            token_file: None,
            senders: default_senders(),
            rewrite_from: false,
            envelope_from: None,
            service_account_key_file: None,
            smtp_host: default_smtp_host(),
            smtp_port: default_smtp_port(),
            smtp_tls: SmtpTls::default(),
            ca_file: None,
            auth_url: default_auth_url(),
            token_url: default_token_url(),
            scopes: Vec::new(),
            transport: TransportKind::default(),
            api_url: default_api_url(),
        }
    }

    /// The scopes to request: `scopes`, or the provider's and transport's
    /// default.
    pub fn effective_scopes(&self) -> Vec<String> {
        if !self.scopes.is_empty() {
            self.scopes.clone()
        } else if self.provider == Provider::Microsoft {
            microsoft_default_scopes()
        } else {
            self.transport.default_scopes()
        }
    }

    /// Sends per second for pacing: `max_rate`, else the provider's
    /// default (Microsoft: [`MICROSOFT_MAX_RATE`], Exchange's 30 messages
    /// a minute per mailbox), else the transport's (`None`: unpaced).
    pub fn effective_max_rate(&self) -> Option<f64> {
        self.max_rate.or(match self.provider {
            Provider::Microsoft => Some(MICROSOFT_MAX_RATE),
            Provider::Google => self.transport.default_max_rate(),
        })
    }

    /// Why a token granted `granted` cannot serve this account's
    /// transport, with the fix; `None` when it can (or nothing is known).
    /// (Google's scopes only: a Microsoft token's scopes are Microsoft's
    /// to judge.)
    pub fn scope_problem(&self, granted: &[String]) -> Option<(String, String)> {
        if self.provider != Provider::Google
            || granted.is_empty()
            || self.transport.served_by(granted)
        {
            return None;
        }
        let t = self.transport;
        let name = &self.name;
        let problem = format!(
            "the token's scope ({}) cannot be used with transport = \"{t}\", which needs {}",
            granted.join(" "),
            match t {
                TransportKind::Smtp =>
                    format!("{GMAIL_SCOPE} (Gmail's SMTP server takes no other)"),
                TransportKind::GmailApi => format!("{GMAIL_SEND_SCOPE} (or a wider Gmail scope)"),
            }
        );
        let other = match t {
            TransportKind::Smtp => TransportKind::GmailApi,
            TransportKind::GmailApi => TransportKind::Smtp,
        };
        let switch = if other.served_by(granted) {
            format!("set transport = \"{other}\" (the token serves it), or ")
        } else {
            String::new()
        };
        let fix = if self.service_account_key_file.is_some() {
            format!(
                "{switch}grant the service account's client id the scope {} in the Admin console (Security > API controls > Domain-wide delegation), then reload the daemon",
                t.default_scopes().join(" ")
            )
        } else {
            format!(
                "{switch}set scopes = [\"{}\"] (or remove `scopes`) and run: oauthrelay authorize --account {name}",
                t.default_scopes().join("\", \"")
            )
        };
        Some((problem, fix))
    }

    /// An entry with `provider`'s defaults. For Microsoft: tenant `common`,
    /// `smtp.office365.com:587` STARTTLS, the identity platform's v2.0
    /// endpoints, the delegated `SMTP.Send` scope with `offline_access`,
    /// `rewrite_from` on (Exchange checks send-as on the envelope sender
    /// and `From:`). Pacing at 30 messages a minute comes from
    /// [`AccountConfig::effective_max_rate`].
    pub fn with_provider(
        name: impl Into<String>,
        email: impl Into<String>,
        provider: Provider,
    ) -> Result<AccountConfig, String> {
        let mut c = AccountConfig::new(name, email);
        if provider == Provider::Microsoft {
            c.provider = provider;
            c.smtp_port = 587;
            c.smtp_tls = SmtpTls::Starttls;
            c.scopes = microsoft_default_scopes();
            c.rewrite_from = true;
            c.set_tenant(MICROSOFT_DEFAULT_TENANT)?;
        }
        Ok(c)
    }

    /// Set a Microsoft account's tenant and the endpoints that depend on it
    /// (the SMTP host too: Outlook.com for `consumers`).
    fn set_tenant(&mut self, tenant: &str) -> Result<(), String> {
        self.tenant = Some(tenant.to_string());
        self.auth_url = microsoft_endpoint(tenant, "authorize")?;
        self.token_url = microsoft_endpoint(tenant, "token")?;
        self.device_auth_url = Some(microsoft_endpoint(tenant, "devicecode")?);
        self.smtp_host = if tenant.eq_ignore_ascii_case("consumers") {
            OUTLOOK_SMTP_HOST
        } else {
            MICROSOFT_SMTP_HOST
        }
        .to_string();
        Ok(())
    }

    /// A Microsoft account sending app-only (client credentials): its scope
    /// is a `/.default` one (`https://outlook.office365.com/.default`).
    pub fn is_app_only(&self) -> bool {
        self.provider == Provider::Microsoft && self.scopes.iter().any(|s| s.ends_with("/.default"))
    }

    /// For an app-only account whose tenant is not one directory (`common`,
    /// `organizations`, `consumers`): why Microsoft will refuse it
    /// (AADSTS9001023) and what to set instead.
    pub fn app_only_tenant_problem(&self) -> Option<String> {
        let tenant = self.tenant.as_deref().unwrap_or(MICROSOFT_DEFAULT_TENANT);
        let shared = ["common", "organizations", "consumers"]
            .iter()
            .any(|t| t.eq_ignore_ascii_case(tenant));
        (self.is_app_only() && shared).then(|| crate::explain::app_only_tenant(tenant))
    }

    /// Simultaneous connections for this account, given `[delivery]
    /// concurrency`: the account's own setting, else the global one (for
    /// Microsoft at most [`MICROSOFT_MAX_CONCURRENCY`]).
    pub fn effective_concurrency(&self, global: usize) -> usize {
        match (self.concurrency, self.provider) {
            (Some(n), _) => n,
            (None, Provider::Microsoft) => global.min(MICROSOFT_MAX_CONCURRENCY),
            (None, Provider::Google) => global,
        }
        .max(1)
    }

    /// Whether this account's `senders` patterns accept `sender`
    /// (`""` is the null sender).
    pub fn matches_sender(&self, sender: &str) -> bool {
        self.senders.iter().any(|p| sender_matches(p, sender))
    }
}

/// Case-insensitive glob match where `*` matches any run of characters.
pub fn sender_matches(pattern: &str, sender: &str) -> bool {
    let p = pattern.to_ascii_lowercase();
    let s = sender.to_ascii_lowercase();
    glob(p.as_bytes(), s.as_bytes())
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative wildcard match with single backtrack point.
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_patterns() {
        assert!(sender_matches("*", ""));
        assert!(sender_matches("*", "a@b.c"));
        assert!(sender_matches("*@Example.com", "scanner@example.COM"));
        assert!(!sender_matches("*@example.com", "x@example.org"));
        assert!(sender_matches("scan*@example.com", "scanner2@example.com"));
        assert!(!sender_matches("a@b.c", "aa@b.c"));
    }

    fn parse(text: &str) -> Result<AccountConfig, String> {
        #[derive(Deserialize)]
        struct W {
            a: AccountConfig,
        }
        toml::from_str::<W>(&format!(
            "[a]\nname = \"x\"\nemail = \"x@contoso.com\"\n{text}"
        ))
        .map(|w| w.a)
        .map_err(|e| e.to_string())
    }

    #[test]
    fn microsoft_defaults_follow_the_tenant() {
        let g = parse("").unwrap();
        assert_eq!(
            (g.provider, g.smtp_host.as_str(), g.smtp_port),
            (Provider::Google, "smtp.gmail.com", 465)
        );
        assert!(!g.rewrite_from && g.max_rate.is_none() && g.device_auth_url.is_none());
        let m = parse("provider = \"microsoft\"").unwrap();
        assert_eq!(
            (m.smtp_host.as_str(), m.smtp_port, m.smtp_tls),
            ("smtp.office365.com", 587, SmtpTls::Starttls)
        );
        assert_eq!(
            m.token_url.as_str(),
            "https://login.microsoftonline.com/common/oauth2/v2.0/token"
        );
        assert_eq!(m.scopes, [MICROSOFT_SMTP_SCOPE, OFFLINE_ACCESS]);
        assert!(m.rewrite_from && m.max_rate.is_none());
        assert_eq!(m.effective_max_rate(), Some(0.5), "30 a minute");
        assert_eq!(g.effective_max_rate(), None);
        assert_eq!(m.effective_scopes(), [MICROSOFT_SMTP_SCOPE, OFFLINE_ACCESS]);
        let paced = parse("provider = \"microsoft\"\nmax_rate = 0.25").unwrap();
        assert_eq!(paced.effective_max_rate(), Some(0.25));
        assert_eq!(m.effective_concurrency(8), 3);
        assert_eq!(g.effective_concurrency(8), 8);
        let o = parse("provider = \"microsoft\"\ntenant = \"consumers\"\nrewrite_from = false")
            .unwrap();
        assert_eq!(o.smtp_host, OUTLOOK_SMTP_HOST);
        assert!(!o.rewrite_from);
        assert_eq!(
            o.device_auth_url.unwrap().as_str(),
            "https://login.microsoftonline.com/consumers/oauth2/v2.0/devicecode"
        );
        // Explicit endpoints win over the tenant's.
        let t = parse("provider = \"microsoft\"\ntoken_url = \"http://127.0.0.1:9/t\"\ntenant = \"contoso.onmicrosoft.com\"").unwrap();
        assert_eq!(t.token_url.as_str(), "http://127.0.0.1:9/t");
        assert!(t.auth_url.as_str().contains("/contoso.onmicrosoft.com/"));
        let app = parse(
            "provider = \"microsoft\"\nscopes = [\"https://outlook.office365.com/.default\"]",
        )
        .unwrap();
        assert!(app.is_app_only());
        assert!(
            app.app_only_tenant_problem()
                .unwrap()
                .contains("AADSTS9001023")
        );
        // Keys that do not fit the provider are kept as written, for the
        // configuration's checks to report at the key (oauthrelay's
        // `config::tests::provider_keys_that_do_not_fit_are_errors_at_the_key`);
        // a bad tenant never becomes an endpoint.
        let g_tenant = parse("tenant = \"common\"").unwrap();
        assert_eq!(g_tenant.tenant.as_deref(), Some("common"));
        assert_eq!(g_tenant.token_url.as_str(), GOOGLE_TOKEN_URL);
        let bad = parse("provider = \"microsoft\"\ntenant = \"a/b\"").unwrap();
        assert_eq!(bad.tenant.as_deref(), Some("a/b"));
        assert!(
            bad.token_url.as_str().contains("/common/"),
            "{}",
            bad.token_url.as_str()
        );
        assert!(!valid_tenant("a/b") && valid_tenant("contoso.onmicrosoft.com"));
        assert!(parse("bogus = 1").unwrap_err().contains("bogus"));
    }

    #[test]
    fn endpoints_refuse_plain_http_off_loopback() {
        assert!("http://127.0.0.1:8080/token".parse::<Endpoint>().is_ok());
        assert!("http://localhost/token".parse::<Endpoint>().is_ok());
        assert!("http://[::1]:9/token".parse::<Endpoint>().is_ok());
        assert!("http://example.com/token".parse::<Endpoint>().is_err());
        assert!("ftp://example.com/token".parse::<Endpoint>().is_err());
        assert!(
            "https://oauth2.googleapis.com/token"
                .parse::<Endpoint>()
                .is_ok()
        );
    }
}

#[cfg(test)]
mod transport_tests {
    use super::*;

    /// An entry from the JSON of its keys beyond name and email.
    fn acct(extra: &str) -> AccountConfig {
        serde_json::from_str(&format!("{{\"name\": \"a\", \"email\": \"a@b.c\"{extra}}}")).unwrap()
    }

    #[test]
    fn each_transport_has_its_default_scope_and_rate() {
        let smtp = acct("");
        assert_eq!(smtp.transport, TransportKind::Smtp);
        assert_eq!(smtp.effective_scopes(), [GMAIL_SCOPE]);
        assert_eq!(smtp.effective_max_rate(), None);
        let api = acct(", \"transport\": \"gmail-api\"");
        assert_eq!(api.effective_scopes(), [GMAIL_SEND_SCOPE]);
        assert_eq!(api.effective_max_rate(), Some(2.5));
        assert_eq!(api.api_url.as_str(), "https://gmail.googleapis.com/");
        let paced = acct(
            ", \"transport\": \"gmail-api\", \"max_rate\": 10.0, \"api_url\": \"http://127.0.0.1:9/\"",
        );
        assert_eq!(paced.effective_max_rate(), Some(10.0));
        assert!(
            serde_json::from_str::<AccountConfig>(
                r#"{"name": "a", "email": "a@b.c", "transport": "imap"}"#
            )
            .is_err()
        );
    }

    #[test]
    fn a_scope_that_cannot_serve_the_transport_is_explained() {
        let send = vec![GMAIL_SEND_SCOPE.to_string()];
        let full = vec![GMAIL_SCOPE.to_string()];
        let smtp = acct("");
        let (problem, fix) = smtp.scope_problem(&send).unwrap();
        assert!(
            problem.contains("cannot be used with transport = \"smtp\""),
            "{problem}"
        );
        assert!(fix.contains("set transport = \"gmail-api\""), "{fix}");
        assert!(fix.contains("oauthrelay authorize --account a"), "{fix}");
        assert!(smtp.scope_problem(&full).is_none());
        let api = acct(", \"transport\": \"gmail-api\"");
        assert!(api.scope_problem(&send).is_none());
        assert!(
            api.scope_problem(&full).is_none(),
            "the full scope can send through the API too"
        );
        let ro = vec!["https://www.googleapis.com/auth/gmail.readonly".to_string()];
        let (_, fix) = api.scope_problem(&ro).unwrap();
        assert!(!fix.contains("set transport"), "neither transport: {fix}");
        assert!(
            api.scope_problem(&[]).is_none(),
            "unknown scope: no verdict"
        );
    }
}
