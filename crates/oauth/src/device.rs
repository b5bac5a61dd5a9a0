//! Device-code sign-in (RFC 8628, `oauthrelay authorize --device`) for
//! machines without a browser: the relay asks the device authorization
//! endpoint for a code, prints it with the address to enter it at, and
//! polls the token endpoint at the server's interval until the user
//! signed in on any other device (or declined, or the code expired).
//!
//! Polling answers (RFC 8628 3.5): `authorization_pending` (keep waiting),
//! `slow_down` (wait 5 seconds longer from now on), `authorization_declined`
//! / `access_denied` (the user said no), `bad_verification_code`,
//! `expired_token` (the code timed out: start again). Network trouble and
//! 5xx answers are retried until the code expires.

use std::fmt;
use std::io::Write;
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::account::{Account, Credentials};
use crate::authorize::{Summary, Via, store_authorized};
use crate::http::{self, Failure};
use crate::store::StoreError;

/// The device code grant type.
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// RFC 8628 3.2: the default polling interval.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// RFC 8628 3.5: `slow_down` adds 5 seconds to the interval.
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

/// How to run the flow.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bound on each HTTP request. Default 30 s.
    pub request_timeout: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Why device sign-in failed. Every variant says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "account {0:?} has no device authorization endpoint: set device_auth_url (Microsoft accounts have one by default), or use oauthrelay authorize without --device"
    )]
    NoEndpoint(String),
    #[error(
        "account {0:?} gets its tokens without a user (service account or app-only): there is nothing to sign in"
    )]
    NoUser(String),
    #[error("{0}")]
    Setup(String),
    #[error(
        "the sign-in was declined at {uri}: run oauthrelay authorize --device again and approve, signed in as the mailbox's user"
    )]
    Declined { uri: String },
    #[error(
        "the code {user_code} was not entered within {}: it expired; run oauthrelay authorize --device again for a new code",
        humantime::format_duration(*lifetime)
    )]
    Expired {
        user_code: String,
        lifetime: Duration,
    },
    #[error(
        "the provider does not recognise the device code (bad_verification_code); run oauthrelay authorize --device again"
    )]
    BadCode,
    #[error("{provider} refused: {reason}")]
    Refused { provider: String, reason: String },
    #[error("the device authorization endpoint {url} failed: {reason}")]
    Endpoint { url: String, reason: String },
    #[error(
        "{provider} returned no refresh token: the scopes must include offline_access (Microsoft); check `scopes`"
    )]
    NoRefreshToken { provider: String },
    #[error("could not store the tokens: {0}")]
    Store(#[from] StoreError),
}

/// The device authorization response (RFC 8628 3.2; Microsoft's field
/// names, and Google's `verification_url`).
#[derive(Deserialize)]
struct DeviceAuth {
    device_code: String,
    user_code: String,
    #[serde(alias = "verification_url")]
    verification_uri: String,
    verification_uri_complete: Option<String>,
    expires_in: Option<u64>,
    interval: Option<u64>,
}

/// What the user must do, printed by [`run`].
#[derive(Debug, Clone)]
pub struct Prompt {
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: Duration,
    pub interval: Duration,
}

impl fmt::Display for Prompt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "On any device with a browser, open:\n\n    {}\n\nand enter the code:\n\n    {}\n",
            self.verification_uri, self.user_code
        )?;
        if let Some(c) = &self.verification_uri_complete {
            writeln!(f, "(or open {c}, which carries the code)\n")?;
        }
        write!(
            f,
            "Sign in as the mailbox's user and approve. Waiting up to {} (checking every {})...",
            humantime::format_duration(self.expires_in),
            humantime::format_duration(self.interval)
        )
    }
}

/// The whole flow: request a code, print it to `out`, poll until the user
/// approved, store the tokens.
pub async fn run(
    account: &Account,
    options: &Options,
    out: &mut (dyn Write + Send),
) -> Result<Summary, DeviceError> {
    let (client_id, client_secret) = match &account.credentials {
        Credentials::Client {
            client_id,
            client_secret,
            ..
        } => (client_id.clone(), client_secret.clone()),
        Credentials::AppOnly { .. }
        | Credentials::ServiceAccount(_)
        | Credentials::NotLoaded {
            service_account: true,
        } => return Err(DeviceError::NoUser(account.name.clone())),
        Credentials::NotLoaded { .. } => {
            return Err(DeviceError::Setup(format!(
                "account {:?} was resolved without its client secret",
                account.name
            )));
        }
    };
    let Some(endpoint) = account.config.device_auth_url.clone() else {
        return Err(DeviceError::NoEndpoint(account.name.clone()));
    };
    let provider = account.provider_name().to_string();
    let client =
        http::client(&account.extra_roots, options.request_timeout).map_err(DeviceError::Setup)?;
    let scope = account.scopes.join(" ");

    let mut form = vec![("client_id", client_id.as_str()), ("scope", scope.as_str())];
    if let Some(s) = &client_secret {
        form.push(("client_secret", s.expose_secret()));
    }
    let auth = request_code(&client, endpoint.url(), &form, options.request_timeout).await?;
    let prompt = Prompt {
        user_code: auth.user_code.clone(),
        verification_uri: auth.verification_uri.clone(),
        verification_uri_complete: auth.verification_uri_complete.clone(),
        expires_in: Duration::from_secs(auth.expires_in.unwrap_or(900).clamp(1, 3600)),
        interval: auth
            .interval
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_INTERVAL)
            .max(Duration::from_secs(1)),
    };
    let _ = writeln!(
        out,
        "Sign in to {provider} for oauthrelay as {} (account '{}').\n",
        account.email, account.name
    );
    let _ = writeln!(out, "{prompt}");
    let _ = out.flush();
    tracing::info!(account = %account.name, uri = %prompt.verification_uri, "device code issued; waiting for the user");

    let device_code = SecretString::from(auth.device_code);
    let deadline = tokio::time::Instant::now() + prompt.expires_in;
    let mut interval = prompt.interval;
    let mut pending_said = false;
    loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() >= deadline {
            return Err(DeviceError::Expired {
                user_code: prompt.user_code,
                lifetime: prompt.expires_in,
            });
        }
        let mut form = vec![
            ("grant_type", DEVICE_CODE_GRANT),
            ("client_id", client_id.as_str()),
            ("device_code", device_code.expose_secret()),
        ];
        if let Some(s) = &client_secret {
            form.push(("client_secret", s.expose_secret()));
        }
        match http::post_token(
            &client,
            account.token_url.url(),
            &form,
            options.request_timeout,
        )
        .await
        {
            Ok(grant) => {
                let Some(refresh) = grant.refresh_token else {
                    return Err(DeviceError::NoRefreshToken { provider });
                };
                let expires_at = SystemTime::now() + grant.expires_in;
                let scopes = match grant.scope {
                    Some(s) if !s.trim().is_empty() => {
                        s.split_whitespace().map(str::to_string).collect()
                    }
                    _ => account.scopes.clone(),
                };
                store_authorized(
                    account,
                    refresh,
                    grant.access_token,
                    expires_at,
                    scopes.clone(),
                )?;
                tracing::info!(account = %account.name, file = %account.token_file.display(), "authorized with a device code; refresh token stored");
                let _ = writeln!(out, "Approved.");
                return Ok(Summary {
                    account: account.name.clone(),
                    email: account.email.clone(),
                    token_file: account.token_file.clone(),
                    scopes,
                    access_token_expires_at: expires_at,
                    via: Via::Device,
                });
            }
            Err(Failure::Rejected {
                code, description, ..
            }) => match code.as_str() {
                "authorization_pending" => {
                    if !pending_said {
                        let _ = writeln!(out, "Waiting for you to enter the code...");
                        let _ = out.flush();
                        pending_said = true;
                    }
                }
                "slow_down" => {
                    interval += SLOW_DOWN_STEP;
                    let _ = writeln!(
                        out,
                        "{provider} asks to poll less often: now every {}.",
                        humantime::format_duration(interval)
                    );
                }
                "authorization_declined" | "access_denied" => {
                    return Err(DeviceError::Declined {
                        uri: prompt.verification_uri,
                    });
                }
                "expired_token" => {
                    return Err(DeviceError::Expired {
                        user_code: prompt.user_code,
                        lifetime: prompt.expires_in,
                    });
                }
                "bad_verification_code" => return Err(DeviceError::BadCode),
                _ => {
                    let reason = if account.config.provider == crate::config::Provider::Microsoft {
                        crate::explain::describe_microsoft(&code, description.as_deref())
                    } else {
                        crate::explain::describe(&code, description.as_deref())
                    };
                    return Err(DeviceError::Refused { provider, reason });
                }
            },
            Err(Failure::Temporary(reason)) => {
                tracing::warn!(account = %account.name, "polling the token endpoint failed, trying again: {reason}");
            }
        }
    }
}

async fn request_code(
    client: &reqwest::Client,
    url: &url::Url,
    form: &[(&str, &str)],
    timeout: Duration,
) -> Result<DeviceAuth, DeviceError> {
    let failed = |reason: String| DeviceError::Endpoint {
        url: url.to_string(),
        reason,
    };
    let request = async {
        let r = client
            .post(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(form)
            .send()
            .await?;
        let status = r.status();
        let body = r.bytes().await?;
        Ok::<_, reqwest::Error>((status, body))
    };
    let (status, body) = match tokio::time::timeout(timeout, request).await {
        Err(_) => return Err(failed("no answer in time".into())),
        Ok(Err(e)) => return Err(failed(http::describe_reqwest(&e))),
        Ok(Ok(r)) => r,
    };
    if status.is_success() {
        return serde_json::from_slice::<DeviceAuth>(&body).map_err(|_| {
            failed(format!(
                "HTTP {status}, but not a device authorization response"
            ))
        });
    }
    #[derive(Deserialize)]
    struct Err {
        error: String,
        error_description: Option<String>,
    }
    match serde_json::from_slice::<Err>(&body) {
        Ok(e) => Err(DeviceError::Refused {
            provider: "the device authorization endpoint".into(),
            reason: crate::explain::describe_microsoft(&e.error, e.error_description.as_deref()),
        }),
        Err(_) => Err(failed(format!("HTTP {status}"))),
    }
}
