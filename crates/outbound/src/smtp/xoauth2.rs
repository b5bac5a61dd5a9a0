//! SASL XOAUTH2 on our SMTP connection, as Gmail speaks it (`crates/oauth`
//! supplies the token and the initial response; the exchange is here, over
//! the connection's own reply reader).
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
//! The empty line is sent here (some SMTP libraries wrongly re-send the
//! token there). The token line is never logged.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use oauth::AccessToken;
use secrecy::ExposeSecret;
use secrecy::zeroize::Zeroize;

use super::conn::{ConnError, Connection};
use crate::reply::Reply;

/// The JSON Gmail sends in its `334` challenge when it refuses a token.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub(crate) struct Challenge {
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
}

/// Decode a `334` challenge's text; `None` when it is not Gmail's JSON.
pub(crate) fn decode_challenge(text: &str) -> Option<Challenge> {
    let bytes = STANDARD.decode(text.trim()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Why [`authenticate`] failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    /// The server refused the token (a `334` challenge, then `535`, or a
    /// bare `535`): invalidate it, get a new one, reconnect, try once more.
    #[error("the server refused the access token: {reply}")]
    TokenRejected { reply: Reply },
    /// Any other refusal (`454 4.7.0` throttling, `504` no XOAUTH2...).
    #[error("AUTH XOAUTH2 refused: {0}")]
    Refused(Reply),
    #[error("{0}")]
    Conn(#[from] ConnError),
}

/// Authenticate with `AUTH XOAUTH2` (initial response on the command line;
/// if the server refuses the long line with `500`/`555`, once more in the
/// two-step form: `AUTH XOAUTH2`, `334 `, the response on its own line).
/// Each reply within the connection's command timeout.
pub(crate) async fn authenticate(
    conn: &mut Connection,
    user: &str,
    token: &AccessToken,
) -> Result<(), AuthError> {
    let stage = "during AUTH";
    let t = conn.command_timeout;
    let response = oauth::xoauth2::initial_response(user, token);
    let mut line = format!("AUTH XOAUTH2 {}\r\n", response.expose_secret());
    let sent = conn.send(line.as_bytes(), stage).await;
    line.zeroize();
    sent?;
    let mut reply = conn.read_reply(t, stage).await?;
    if matches!(reply.code, 500 | 555) {
        // Access tokens can be 2 KB: some servers refuse so long a command
        // line. Send the response on its own line instead (RFC 4954).
        tracing::info!(user, reply = %reply, "one-line AUTH XOAUTH2 refused; trying the two-step form");
        conn.send(b"AUTH XOAUTH2\r\n", stage).await?;
        let go_ahead = conn.read_reply(t, stage).await?;
        if go_ahead.code != 334 {
            return Err(AuthError::Refused(go_ahead));
        }
        let mut line = format!("{}\r\n", response.expose_secret());
        let sent = conn.send(line.as_bytes(), stage).await;
        line.zeroize();
        sent?;
        reply = conn.read_reply(t, stage).await?;
    }
    match reply.code {
        235 => Ok(()),
        334 => {
            let challenge = decode_challenge(&reply.text).unwrap_or_default();
            tracing::info!(
                user,
                status = challenge.status.as_deref().unwrap_or("?"),
                scope = challenge.scope.as_deref().unwrap_or("?"),
                "XOAUTH2 token refused by the server; ending the exchange"
            );
            conn.send(b"\r\n", stage).await?;
            let last = conn.read_reply(t, stage).await?;
            match last.code {
                200..300 => Ok(()),
                // The verdict on the token (5.7.8, or 5.7.1 in Google's doc).
                535 => Err(AuthError::TokenRejected { reply: last }),
                // Anything else is no verdict on the token: a 454 is a
                // temporary problem, a 501 says our answer to the challenge
                // was wrong. Refreshing the token would not help.
                _ => Err(AuthError::Refused(last)),
            }
        }
        // Exchange's 5.7.139: SMTP AUTH is off for the tenant or mailbox.
        // No new token changes that: an administrator must.
        535 if reply.is_smtp_auth_disabled() => Err(AuthError::Refused(reply)),
        // A bare 535 is the same verdict without the challenge (Exchange
        // Online's `535 5.7.3 Authentication unsuccessful`).
        535 => Err(AuthError::TokenRejected { reply }),
        _ => Err(AuthError::Refused(reply)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    use secrecy::SecretString;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    fn token() -> AccessToken {
        AccessToken::new(SecretString::from("ya29.test-token"), SystemTime::now())
    }

    /// One step of a scripted peer: a check of the client's line, the answer.
    type Step = (fn(&str) -> bool, &'static str);

    /// A peer that plays `script`: for each entry, read one line from the
    /// client (checked with the closure), then write the bytes.
    async fn session(script: Vec<Step>) -> (Connection, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut seen = Vec::new();
            for (check, answer) in script {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap() == 0 {
                    break;
                }
                assert!(check(&line), "unexpected line from the client: {line:?}");
                seen.push(line);
                w.write_all(answer.as_bytes()).await.unwrap();
            }
            seen
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        (Connection::over_plain(tcp, Duration::from_secs(5)), peer)
    }

    fn auth_line(l: &str) -> bool {
        let Some(b64) = l.strip_prefix("AUTH XOAUTH2 ") else {
            return false;
        };
        STANDARD.decode(b64.trim()).unwrap()
            == b"user=me@gmail.com\x01auth=Bearer ya29.test-token\x01\x01"
    }

    #[tokio::test]
    async fn accepted_token() {
        let (mut c, _) = session(vec![(auth_line, "235 2.7.0 Accepted\r\n")]).await;
        authenticate(&mut c, "me@gmail.com", &token())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn refused_token_runs_the_334_dance_with_an_empty_line() {
        let challenge = format!(
            "334 {}\r\n",
            STANDARD.encode(
                r#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#
            )
        );
        let challenge: &'static str = Box::leak(challenge.into_boxed_str());
        let (mut c, peer) = session(vec![
            (auth_line, challenge),
            (|l| l == "\r\n", "535-5.7.8 Username and Password not accepted.\r\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials x - gsmtp\r\n"),
        ])
        .await;
        match authenticate(&mut c, "me@gmail.com", &token()).await {
            Err(e @ AuthError::TokenRejected { .. }) => {
                let shown = format!("{e} {e:?}");
                assert!(shown.contains("535"), "{shown}");
                let b64 =
                    STANDARD.encode("user=me@gmail.com\x01auth=Bearer ya29.test-token\x01\x01");
                assert!(
                    !shown.contains("ya29.test-token") && !shown.contains(&b64),
                    "{shown}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(peer.await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn after_the_challenge_only_a_535_means_the_token_was_rejected() {
        let (mut c, _) = session(vec![
            (auth_line, "334 e30=\r\n"),
            (
                |l| l == "\r\n",
                "454 4.7.0 Cannot authenticate due to a temporary system problem\r\n",
            ),
        ])
        .await;
        assert!(matches!(
            authenticate(&mut c, "me@gmail.com", &token()).await,
            Err(AuthError::Refused(r)) if r.code == 454
        ));
    }

    #[tokio::test]
    async fn a_refused_long_line_falls_back_to_the_two_step_form() {
        let (mut c, _) = session(vec![
            (
                auth_line,
                "555 5.5.2 Syntax error, command line too long\r\n",
            ),
            (|l| l == "AUTH XOAUTH2\r\n", "334 \r\n"),
            (
                |l| {
                    STANDARD
                        .decode(l.trim())
                        .is_ok_and(|b| b.starts_with(b"user=me@gmail.com\x01"))
                },
                "235 2.7.0 Accepted\r\n",
            ),
        ])
        .await;
        authenticate(&mut c, "me@gmail.com", &token())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn throttling_carries_its_reply() {
        let (mut c, _) = session(vec![(
            auth_line,
            "454-4.7.0 Too many login attempts, please try again later.\r\n454 4.7.0  https://x - gsmtp\r\n",
        )])
        .await;
        assert!(matches!(
            authenticate(&mut c, "me@gmail.com", &token()).await,
            Err(AuthError::Refused(r)) if r.is_login_throttle()
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _peer = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(s);
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = Connection::over_plain(tcp, Duration::from_secs(30));
        assert!(matches!(
            authenticate(&mut c, "me@gmail.com", &token()).await,
            Err(AuthError::Conn(ConnError::Timeout { .. }))
        ));
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
}
