//! SASL XOAUTH2, client side, as Gmail speaks it.
//!
//! ```text
//! C: AUTH XOAUTH2 dXNlcj1tZUBnbWFpbC5jb20BYXV0aD1CZWFyZXIgeWEyOS4uLgEB
//! S: 235 2.7.0 Accepted
//! ```
//!
//! or, when Gmail refuses the token:
//!
//! ```text
//! S: 334 eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==
//! C: (empty line)
//! S: 535-5.7.8 Username and Password not accepted. For more information, go to
//! S: 535 5.7.8  https://support.google.com/mail/?p=BadCredentials ... - gsmtp
//! ```
//!
//! [`authenticate`] does the whole dance over anything implementing
//! [`SmtpTransport`] and returns [`Xoauth2Error::TokenRejected`] for the
//! second case, so the caller can [`invalidate`](crate::TokenManager::invalidate),
//! get a fresh token, reconnect and try once more. It sends the empty line
//! itself (some SMTP libraries wrongly re-send the token there).

use std::future::Future;
use std::io;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::zeroize::Zeroize;
use secrecy::{ExposeSecret, SecretString};
use smtp_proto::Response;
use smtp_proto::response::parser::ResponseReceiver;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::token::AccessToken;

/// The two things XOAUTH2 needs from an SMTP connection. Implement it for
/// your connection type, or wrap a stream in [`StreamTransport`].
///
/// `send` receives the AUTH line, which contains the access token: an
/// implementation must not log what it sends.
pub trait SmtpTransport: Send {
    /// Write `bytes` (complete lines, CRLF included) and flush.
    fn send(&mut self, bytes: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Read one complete (possibly multi-line) reply.
    fn read_reply(&mut self) -> impl Future<Output = io::Result<Response<String>>> + Send;
}

/// [`SmtpTransport`] for any `AsyncRead + AsyncWrite` stream. Bytes read
/// past the end of a reply are kept for the next one, and handed back by
/// [`StreamTransport::into_parts`], so the same connection can be used for
/// the rest of the session (pipelined replies are not lost).
pub struct StreamTransport<S> {
    stream: S,
    buf: Vec<u8>,
    receiver: ResponseReceiver,
}

impl<S> StreamTransport<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    pub fn new(stream: S) -> StreamTransport<S> {
        StreamTransport::with_buffered(stream, Vec::new())
    }

    /// Continue on a stream whose reader already buffered `leftover` bytes.
    pub fn with_buffered(stream: S, leftover: Vec<u8>) -> StreamTransport<S> {
        StreamTransport {
            stream,
            buf: leftover,
            receiver: ResponseReceiver::default(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Bytes received but not yet parsed as a reply.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// The stream and the bytes already read from it but not consumed.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }
}

impl<S> SmtpTransport for StreamTransport<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    async fn read_reply(&mut self) -> io::Result<Response<String>> {
        loop {
            if !self.buf.is_empty() {
                let mut iter = self.buf.iter();
                let parsed = self.receiver.parse(&mut iter);
                let consumed = self.buf.len() - iter.as_slice().len();
                self.buf.drain(..consumed);
                match parsed {
                    Ok(reply) => {
                        self.receiver.reset();
                        return Ok(reply);
                    }
                    Err(smtp_proto::Error::NeedsMoreData { .. }) => {}
                    Err(e) => {
                        self.receiver.reset();
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("malformed SMTP reply: {e:?}"),
                        ));
                    }
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The JSON Gmail sends in its `334` challenge when it refuses a token.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Challenge {
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub schemes: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
}

/// Why [`authenticate`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Xoauth2Error {
    /// The server refused the token (a `334` challenge, then `535 5.7.8`).
    /// Invalidate it, get a new one, reconnect and try once more; if that
    /// fails too the account needs attention (never bounce mail for this).
    #[error(
        "the server refused the access token (status {}, scope {}): {}",
        status.as_deref().unwrap_or("?"),
        scope.as_deref().unwrap_or("?"),
        reply_text(reply)
    )]
    TokenRejected {
        status: Option<String>,
        scope: Option<String>,
        reply: Response<String>,
    },
    /// Any other refusal, e.g. `454 4.7.0 Too many login attempts` (back off
    /// the account), `535 5.7.8` without a challenge, `504` (XOAUTH2 not
    /// offered). Classify by `reply.code` and `reply.esc`.
    #[error("AUTH XOAUTH2 refused: {}", reply_text(reply))]
    Refused { reply: Response<String> },
    #[error("no answer to AUTH XOAUTH2 within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("connection failed during AUTH XOAUTH2: {0}")]
    Io(#[from] io::Error),
}

impl Xoauth2Error {
    /// The reply that ended the exchange, if any.
    pub fn reply(&self) -> Option<&Response<String>> {
        match self {
            Xoauth2Error::TokenRejected { reply, .. } | Xoauth2Error::Refused { reply } => {
                Some(reply)
            }
            _ => None,
        }
    }
}

/// `code esc message` on one line (multi-line texts joined by spaces).
pub fn reply_text(reply: &Response<String>) -> String {
    let [a, b, c] = reply.esc;
    let message = reply
        .message
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if a == 0 {
        format!("{} {}", reply.code, message)
    } else {
        format!("{} {a}.{b}.{c} {}", reply.code, message)
    }
}

/// The XOAUTH2 initial response: base64 of
/// `user=EMAIL\x01auth=Bearer TOKEN\x01\x01`.
pub fn initial_response(user: &str, token: &AccessToken) -> SecretString {
    let mut raw = format!(
        "user={user}\x01auth=Bearer {}\x01\x01",
        token.secret().expose_secret()
    );
    let encoded = STANDARD.encode(raw.as_bytes());
    raw.zeroize();
    SecretString::from(encoded)
}

/// Decode a `334` challenge's text; `None` when it is not Gmail's JSON.
pub fn decode_challenge(text: &str) -> Option<Challenge> {
    let bytes = STANDARD.decode(text.trim()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Authenticate with `AUTH XOAUTH2` (initial response on the command line;
/// if the server refuses the long line with `500`/`555`, once more in the
/// two-step form: `AUTH XOAUTH2`, `334 `, the response on its own line).
/// The whole exchange is bounded by `timeout`. The token is never logged.
pub async fn authenticate<T>(
    transport: &mut T,
    user: &str,
    token: &AccessToken,
    timeout: Duration,
) -> Result<(), Xoauth2Error>
where
    T: SmtpTransport + ?Sized,
{
    match tokio::time::timeout(timeout, dance(transport, user, token)).await {
        Ok(result) => result,
        Err(_) => Err(Xoauth2Error::Timeout(timeout)),
    }
}

async fn dance<T>(transport: &mut T, user: &str, token: &AccessToken) -> Result<(), Xoauth2Error>
where
    T: SmtpTransport + ?Sized,
{
    let response = initial_response(user, token);
    let mut line = format!("AUTH XOAUTH2 {}\r\n", response.expose_secret());
    let sent = transport.send(line.as_bytes()).await;
    line.zeroize();
    sent?;

    let mut reply = transport.read_reply().await?;
    if matches!(reply.code, 500 | 555) {
        // Access tokens can be 2 KB: some servers refuse so long a command
        // line. Send the response on its own line instead (RFC 4954).
        tracing::info!(
            user,
            reply = %reply_text(&reply),
            "one-line AUTH XOAUTH2 refused; trying the two-step form"
        );
        transport.send(b"AUTH XOAUTH2\r\n").await?;
        let go_ahead = transport.read_reply().await?;
        if go_ahead.code != 334 {
            return Err(Xoauth2Error::Refused { reply: go_ahead });
        }
        let mut line = format!("{}\r\n", response.expose_secret());
        let sent = transport.send(line.as_bytes()).await;
        line.zeroize();
        sent?;
        reply = transport.read_reply().await?;
    }
    match reply.code {
        235 => {
            tracing::debug!(user, "XOAUTH2 accepted");
            Ok(())
        }
        334 => {
            let challenge = decode_challenge(&reply.message).unwrap_or_default();
            tracing::info!(
                user,
                status = challenge.status.as_deref().unwrap_or("?"),
                schemes = challenge.schemes.as_deref().unwrap_or("?"),
                scope = challenge.scope.as_deref().unwrap_or("?"),
                "XOAUTH2 token refused by the server; ending the exchange"
            );
            transport.send(b"\r\n").await?;
            let last = transport.read_reply().await?;
            match last.code {
                200..300 => Ok(()),
                // Gmail's verdict on the token (5.7.8, or 5.7.1 in its doc).
                535 => Err(Xoauth2Error::TokenRejected {
                    status: challenge.status,
                    scope: challenge.scope,
                    reply: last,
                }),
                // Anything else is no verdict on the token: a 454 is a
                // temporary problem, a 501 says our answer to the challenge
                // was wrong. Refreshing the token would not help.
                _ => Err(Xoauth2Error::Refused { reply: last }),
            }
        }
        _ => Err(Xoauth2Error::Refused { reply }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn initial_response_format() {
        let token = AccessToken::new(SecretString::from("ya29.abc"), SystemTime::now());
        let r = initial_response("me@gmail.com", &token);
        let decoded = STANDARD.decode(r.expose_secret()).unwrap();
        assert_eq!(
            decoded,
            b"user=me@gmail.com\x01auth=Bearer ya29.abc\x01\x01"
        );
    }

    #[test]
    fn decodes_gmail_challenge() {
        let b64 = STANDARD
            .encode(r#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#);
        let c = decode_challenge(&b64).unwrap();
        assert_eq!(c.status.as_deref(), Some("400"));
        assert_eq!(c.scope.as_deref(), Some("https://mail.google.com/"));
        assert!(decode_challenge("not base64!").is_none());
    }

    #[tokio::test]
    async fn keeps_bytes_after_a_reply() {
        let (client, mut server) = tokio::io::duplex(1024);
        server
            .write_all(b"250-first\r\n250 2.0.0 done\r\n220 next")
            .await
            .unwrap();
        let mut t = StreamTransport::new(client);
        let r = t.read_reply().await.unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(r.esc, [2, 0, 0]);
        assert_eq!(t.buffered(), b"220 next");
        server.write_all(b" one\r\n").await.unwrap();
        let r = t.read_reply().await.unwrap();
        assert_eq!(r.code, 220);
        assert_eq!(r.message.trim(), "next one");
        assert!(t.buffered().is_empty());
    }
}
