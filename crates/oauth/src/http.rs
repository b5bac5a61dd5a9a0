//! HTTPS to Google's token endpoint: a reqwest client on rustls with the
//! ring provider, and one form POST with its outcome classified.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use secrecy::SecretString;
use serde::Deserialize;

/// Build the HTTP client: rustls with ring, Mozilla's roots plus any extra
/// root from `ca_file`, a timeout on connect and on the whole request, and
/// no redirects (a token endpoint never redirects; following one would leak
/// the form to another host).
pub(crate) fn client(
    extra_roots: &[CertificateDer<'static>],
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots
            .add(cert.clone())
            .map_err(|e| format!("ca_file certificate refused: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(timeout)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("oauthrelay/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("HTTP client setup: {e}"))
}

/// A successful token response.
pub(crate) struct Grant {
    pub access_token: SecretString,
    pub expires_in: Duration,
    pub refresh_token: Option<SecretString>,
    pub scope: Option<String>,
}

/// Why a token request failed.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// Google answered with an OAuth error (`invalid_grant`...): retrying
    /// the same request will not help.
    Rejected {
        status: u16,
        code: String,
        description: Option<String>,
    },
    /// 5xx, 408, 429, a timeout, a network or TLS error, or an answer that
    /// makes no sense: worth retrying.
    Temporary(String),
}

#[derive(Deserialize)]
struct SuccessJson {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
    scope: Option<String>,
}

#[derive(Deserialize)]
struct ErrorJson {
    error: String,
    error_description: Option<String>,
}

/// Google's default lifetime, used when a response omits `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3599);
/// Longest lifetime believed (a broken endpoint must not make a token live
/// forever, or overflow a clock).
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// POST `form` to `url` and classify the answer. `timeout` bounds the whole
/// exchange (on top of the client's own timeouts).
pub(crate) async fn post_token(
    client: &reqwest::Client,
    url: &url::Url,
    form: &[(&str, &str)],
    timeout: Duration,
) -> Result<Grant, Failure> {
    let request = async {
        let response = client
            .post(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(form)
            .send()
            .await?;
        let status = response.status();
        let body = response.bytes().await?;
        Ok::<_, reqwest::Error>((status, body))
    };
    let (status, body) = match tokio::time::timeout(timeout, request).await {
        Err(_) => {
            return Err(Failure::Temporary(format!(
                "no answer from {url} within {}",
                humantime::format_duration(timeout)
            )));
        }
        Ok(Err(e)) => return Err(Failure::Temporary(describe_reqwest(&e))),
        Ok(Ok(r)) => r,
    };
    classify(status.as_u16(), &body, url)
}

fn classify(status: u16, body: &[u8], url: &url::Url) -> Result<Grant, Failure> {
    if status == 200 {
        let parsed: SuccessJson = serde_json::from_slice(body).map_err(|_| {
            Failure::Temporary(format!(
                "the token endpoint {url} sent a 200 that is not a token response"
            ))
        })?;
        let access_token = parsed
            .access_token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Failure::Temporary(format!("the token endpoint {url} sent no access_token"))
            })?;
        let expires_in = match parsed.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(Duration::from_secs),
            Some(serde_json::Value::String(s)) => s.trim().parse().ok().map(Duration::from_secs),
            _ => None,
        }
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_LIFETIME)
        .min(MAX_LIFETIME);
        return Ok(Grant {
            access_token: SecretString::from(access_token),
            expires_in,
            refresh_token: parsed
                .refresh_token
                .filter(|t| !t.is_empty())
                .map(SecretString::from),
            scope: parsed.scope,
        });
    }
    let temporary_status = status >= 500 || status == 408 || status == 429;
    if !temporary_status
        && (400..500).contains(&status)
        && let Ok(err) = serde_json::from_slice::<ErrorJson>(body)
        && !err.error.is_empty()
    {
        return Err(Failure::Rejected {
            status,
            code: err.error,
            description: err.error_description,
        });
    }
    Err(Failure::Temporary(format!(
        "the token endpoint {url} answered HTTP {status}{}",
        match serde_json::from_slice::<ErrorJson>(body) {
            Ok(e) => format!(" ({})", e.error),
            Err(_) => String::new(),
        }
    )))
}

/// A reqwest error with its causes, without request data.
pub(crate) fn describe_reqwest(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "could not connect".to_string()
    } else {
        "request failed".to_string()
    };
    if let Some(url) = e.url() {
        out.push_str(&format!(" ({url})"));
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> url::Url {
        url::Url::parse("https://oauth2.googleapis.com/token").unwrap()
    }

    #[test]
    fn classifies_google_answers() {
        let ok = classify(
            200,
            br#"{"access_token":"ya29.x","expires_in":3599,"scope":"https://mail.google.com/","token_type":"Bearer"}"#,
            &url(),
        )
        .ok()
        .unwrap();
        assert_eq!(ok.expires_in, Duration::from_secs(3599));
        assert!(ok.refresh_token.is_none());

        match classify(
            400,
            br#"{"error":"invalid_grant","error_description":"Token has been expired or revoked."}"#,
            &url(),
        ) {
            Err(Failure::Rejected { code, status, .. }) => {
                assert_eq!(code, "invalid_grant");
                assert_eq!(status, 400);
            }
            _ => panic!("expected rejection"),
        }
        assert!(matches!(
            classify(
                401,
                br#"{"error":"invalid_client","error_description":"Unauthorized"}"#,
                &url()
            ),
            Err(Failure::Rejected { .. })
        ));
        assert!(matches!(
            classify(503, b"<html>Service Unavailable</html>", &url()),
            Err(Failure::Temporary(_))
        ));
        assert!(matches!(
            classify(500, br#"{"error":"internal_failure"}"#, &url()),
            Err(Failure::Temporary(_))
        ));
        assert!(matches!(
            classify(429, br#"{"error":"rate_limit_exceeded"}"#, &url()),
            Err(Failure::Temporary(_))
        ));
        assert!(matches!(
            classify(404, b"Not Found", &url()),
            Err(Failure::Temporary(_))
        ));
        let huge = classify(
            200,
            br#"{"access_token":"ya29.x","expires_in":18446744073709551615}"#,
            &url(),
        )
        .ok()
        .unwrap();
        assert_eq!(huge.expires_in, MAX_LIFETIME);
        assert!(matches!(
            classify(200, b"<html>captive portal</html>", &url()),
            Err(Failure::Temporary(_))
        ));
    }
}
