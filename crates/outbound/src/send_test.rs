//! `oauthrelay send-test`: one generated message, sent now, every step told.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use oauth::TokenManager;
use oauth::config::AccountConfig;

use crate::DeliveryConfig;
use crate::dsn::rfc5322_date;
use crate::reply::Reply;
use crate::smtp::conn::ConnError;
use crate::smtp::session::{self, AccountCtx, OpenError, OpenParams};

/// What a successful test sent.
#[derive(Debug, Clone)]
pub struct SendTestReport {
    /// `host[ip]:port`.
    pub relay: String,
    /// The `Message-ID` of the test message.
    pub message_id: String,
    /// Gmail's reply to the end of the message.
    pub reply: String,
}

/// Why the test failed (each variant says where).
#[derive(Debug, thiserror::Error)]
pub enum SendTestError {
    #[error("{0}")]
    Open(#[from] OpenError),
    #[error("{0}")]
    Conn(#[from] ConnError),
    #[error("{stage} refused: {reply}")]
    Refused { stage: &'static str, reply: Reply },
    #[error("invalid recipient address {0:?}")]
    BadAddress(String),
    /// The Gmail API could not be reached or refused the message.
    #[error("{0}")]
    Api(String),
}

/// Send one test message from `account` to `to`, synchronously. `progress`
/// gets one line per step: token, connection, TLS, EHLO, AUTH, and the
/// reply to MAIL, RCPT and the message. Tokens are never shown.
pub async fn send_test(
    tokens: &TokenManager,
    account: &AccountConfig,
    config: &DeliveryConfig,
    hostname: &str,
    to: &str,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<SendTestReport, SendTestError> {
    let to = to.trim();
    if to.is_empty() || to.contains(['<', '>', '\r', '\n', ' ']) || !to.contains('@') {
        return Err(SendTestError::BadAddress(to.to_string()));
    }
    if account.transport == oauth::TransportKind::GmailApi {
        return send_test_api(tokens, account, config, hostname, to, progress).await;
    }
    let ctx = AccountCtx::new(account.clone());
    let params = OpenParams {
        hostname,
        connect_timeout: config.connect_timeout,
        command_timeout: config.command_timeout,
    };
    progress(&format!(
        "account {}: {} via {}:{} ({})",
        account.name,
        account.email,
        account.smtp_host,
        account.smtp_port,
        match account.smtp_tls {
            oauth::config::SmtpTls::Implicit => "implicit TLS",
            oauth::config::SmtpTls::Starttls => "STARTTLS",
        }
    ));
    let (mut conn, _token) = session::open(&ctx, tokens, &params, progress).await?;
    let (message_id, message) = test_message(account, hostname, to);
    let ct = config.command_timeout;

    let mail = format!("MAIL FROM:<{}> SIZE={}\r\n", account.email, message.len());
    conn.send(mail.as_bytes(), "sending MAIL FROM").await?;
    let r = conn.read_reply(ct, "after MAIL FROM").await?;
    progress(&format!("MAIL FROM:<{}>: {r}", account.email));
    if !r.is_positive() {
        conn.quit().await;
        return Err(SendTestError::Refused {
            stage: "MAIL FROM",
            reply: r,
        });
    }
    conn.send(format!("RCPT TO:<{to}>\r\n").as_bytes(), "sending RCPT TO")
        .await?;
    let r = conn.read_reply(ct, "after RCPT TO").await?;
    progress(&format!("RCPT TO:<{to}>: {r}"));
    if !r.is_positive() {
        conn.quit().await;
        return Err(SendTestError::Refused {
            stage: "RCPT TO",
            reply: r,
        });
    }
    let r = if conn.caps.chunking {
        let mut bytes = format!("BDAT {} LAST\r\n", message.len()).into_bytes();
        bytes.extend_from_slice(message.as_bytes());
        conn.send(&bytes, "sending the message").await?;
        let r = conn
            .read_reply(config.data_timeout, "after the end of the message")
            .await?;
        progress(&format!("BDAT {} LAST: {r}", message.len()));
        r
    } else {
        conn.send(b"DATA\r\n", "sending DATA").await?;
        let r = conn.read_reply(ct, "after DATA").await?;
        progress(&format!("DATA: {r}"));
        if r.code != 354 {
            conn.quit().await;
            return Err(SendTestError::Refused {
                stage: "DATA",
                reply: r,
            });
        }
        let mut out = Vec::new();
        let mut stuffer = crate::body::DotStuffer::new();
        stuffer.stuff(message.as_bytes(), &mut out);
        stuffer.finish(&mut out);
        conn.send(&out, "sending the message").await?;
        let r = conn
            .read_reply(config.data_timeout, "after the end of the message")
            .await?;
        progress(&format!("end of data: {r}"));
        r
    };
    let relay = conn.relay.clone();
    conn.quit().await;
    if !r.is_positive() {
        return Err(SendTestError::Refused {
            stage: "the message",
            reply: r,
        });
    }
    progress(&format!("sent {message_id} to <{to}> through {relay}"));
    Ok(SendTestReport {
        relay,
        message_id,
        reply: r.to_string(),
    })
}

/// The test message and its `Message-ID`.
fn test_message(account: &AccountConfig, hostname: &str, to: &str) -> (String, String) {
    let now = SystemTime::now();
    let micros = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros();
    let message_id = format!("<send-test.{micros}@{hostname}>");
    let date = rfc5322_date(now);
    let message = format!(
        "From: {email}\r\n\
         To: <{to}>\r\n\
         Subject: oauthrelay test message\r\n\
         Date: {date}\r\n\
         Message-ID: {message_id}\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is a test message sent by `oauthrelay send-test` on {hostname}\r\n\
         through the account {name} ({email}) at {date}.\r\n\
         If you can read it, delivery through Gmail works.\r\n",
        email = account.email,
        name = account.name,
    );
    (message_id, message)
}

/// `send-test` over the Gmail API: token and scope, the request, the HTTP
/// status, Gmail's message id.
async fn send_test_api(
    tokens: &TokenManager,
    account: &AccountConfig,
    config: &DeliveryConfig,
    hostname: &str,
    to: &str,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<SendTestReport, SendTestError> {
    use secrecy::ExposeSecret;

    let base = account.api_url.as_str().trim_end_matches('/').to_string();
    progress(&format!(
        "account {}: {} via the Gmail API at {base} (users.messages.send)",
        account.name, account.email
    ));
    let token = tokens
        .access_token(&account.name)
        .await
        .map_err(|e| SendTestError::Open(OpenError::Token(e)))?;
    let scopes = tokens
        .account_status(&account.name)
        .and_then(|st| oauth::store::load(&st.token_file).ok().flatten())
        .map(|f| f.scopes.join(" "))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    progress(&format!(
        "access token for {}: ok (expires in {}), scope: {scopes}",
        account.name,
        humantime::format_duration(Duration::from_secs(token.expires_in().as_secs()))
    ));
    let tls = crate::smtp::tls::client_config(account.ca_file.as_deref());
    let client =
        crate::gmail_api::client(&tls, config.connect_timeout).map_err(SendTestError::Api)?;
    let (message_id, message) = test_message(account, hostname, to);
    let url = format!("{base}{}?uploadType=media", crate::gmail_api::SEND_PATH);
    progress(&format!(
        "POST {url} ({} bytes, message/rfc822)",
        message.len()
    ));
    let resp = client
        .post(&url)
        .header(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", token.secret().expose_secret()),
        )
        .header(reqwest::header::CONTENT_TYPE, "message/rfc822")
        .body(message)
        .timeout(config.data_timeout)
        .send()
        .await
        .map_err(|e| SendTestError::Api(format!("Gmail API at {base}: {e}")))?;
    let status = resp.status().as_u16();
    let version = format!("{:?}", resp.version());
    let retry = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .bytes()
        .await
        .map_err(|e| SendTestError::Api(format!("reading the answer: {e}")))?;
    progress(&format!("HTTP {status} ({version})"));
    if !(200..300).contains(&status) {
        let e = crate::gmail_api::errors::ApiError::parse(status, retry.as_deref(), &body);
        let (_, signal) = crate::gmail_api::errors::classify(&e, &account.name, SystemTime::now());
        let mut text = e.reply(554, crate::reply::Status::new(5, 0, 0)).text;
        if let Some(crate::classify::AccountSignal::Refused { problem, fix, .. }) = signal {
            text = format!("{text}; {problem}; {fix}");
        }
        return Err(SendTestError::Api(text));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let id = v["id"]
        .as_str()
        .map(crate::reply::escape_controls)
        .unwrap_or_else(|| "unknown".into());
    progress(&format!("Gmail message id: {id}"));
    progress(&format!(
        "sent {message_id} to <{to}> through the Gmail API"
    ));
    Ok(SendTestReport {
        relay: base,
        message_id,
        reply: format!("200 id={id}"),
    })
}
