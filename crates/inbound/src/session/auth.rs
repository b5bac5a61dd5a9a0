//! AUTH PLAIN and LOGIN (RFC 4954) against `[[server.users]]`.
//!
//! Passwords are never logged; failures are counted per client address and
//! refused with `454 4.7.0` past `auth_failure_limit` within
//! `auth_failure_window`.

use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use super::reply::{Clean, Reply};
use super::{Framed, Session, SessionEnd, State, Step, decode_base64, trim_line};
use crate::password;

/// Where an AUTH exchange stands.
pub(crate) enum AuthStep {
    /// `334 ` sent after `AUTH PLAIN`: waiting for the credentials.
    Plain,
    /// `334 VXNlcm5hbWU6` sent: waiting for the user name.
    LoginUser,
    /// `334 UGFzc3dvcmQ6` sent: waiting for the password.
    LoginPass { user: Vec<u8> },
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn auth(&mut self, mechanism: u64, initial: &str) -> Step {
        let cfg = &self.settings.config;
        let refusal = if self.auth_user.is_some() {
            Some(Reply::Sequence("already authenticated"))
        } else if self.helo.is_none() {
            Some(Reply::Sequence("send HELO/EHLO first"))
        } else if self.txn.is_some() {
            Some(Reply::Sequence(
                "AUTH not allowed during a mail transaction",
            ))
        } else if self.settings.users.is_empty() {
            Some(Reply::Sequence("authentication not enabled"))
        } else if !self.auth_channel_ok() {
            Some(Reply::AuthTlsRequired)
        } else if self.shared.limiter.is_limited(
            self.ip,
            cfg.auth_failure_limit,
            cfg.auth_failure_window,
        ) {
            warn!(client = %self.peer, "AUTH refused: too many failed attempts from this address");
            Some(Reply::AuthRateLimited)
        } else {
            None
        };
        if let Some(r) = refusal {
            return self.reply(r);
        }
        // `=` is an empty initial response (RFC 4954 4).
        let initial = initial.trim();
        let has_initial = !initial.is_empty();
        let initial = if initial == "=" { "" } else { initial };
        match mechanism {
            AUTH_PLAIN if !has_initial => {
                self.state = State::Auth(AuthStep::Plain);
                self.reply(Reply::AuthChallenge)
            }
            AUTH_PLAIN => match decode_base64(initial.as_bytes()) {
                Ok(creds) => self.auth_plain(creds).await,
                Err(_) => self.reply(Reply::AuthBadBase64),
            },
            AUTH_LOGIN if !has_initial => {
                self.state = State::Auth(AuthStep::LoginUser);
                self.reply(Reply::AuthUsername)
            }
            AUTH_LOGIN => match decode_base64(initial.as_bytes()) {
                Ok(user) => {
                    self.state = State::Auth(AuthStep::LoginPass { user });
                    self.reply(Reply::AuthPassword)
                }
                Err(_) => self.reply(Reply::AuthBadBase64),
            },
            _ => self.reply(Reply::AuthUnknownMechanism),
        }
    }

    /// A line answering an AUTH challenge.
    pub(super) async fn auth_step(&mut self) -> Result<Step, SessionEnd> {
        match self.frame_line() {
            Framed::NeedMore => Ok(Step::NeedMore),
            Framed::TooLong => {
                self.state = State::Command;
                Ok(self.reply(Reply::LineTooLong))
            }
            Framed::Line(r) => {
                let buf = std::mem::take(&mut self.rbuf);
                let line = trim_line(buf.get(r).unwrap_or_default());
                let step = self.auth_line(line).await;
                self.rbuf = buf;
                Ok(step)
            }
        }
    }

    async fn auth_line(&mut self, line: &[u8]) -> Step {
        let State::Auth(step) = std::mem::replace(&mut self.state, State::Command) else {
            return Step::Again;
        };
        if line == b"*" {
            return self.reply(Reply::AuthCancelled);
        }
        let decoded = match decode_base64(line) {
            Ok(d) => d,
            Err(_) => return self.reply(Reply::AuthBadBase64),
        };
        match step {
            AuthStep::Plain => self.auth_plain(decoded).await,
            AuthStep::LoginUser => {
                self.state = State::Auth(AuthStep::LoginPass { user: decoded });
                self.reply(Reply::AuthPassword)
            }
            AuthStep::LoginPass { user } => self.check_credentials(user, decoded).await,
        }
    }

    /// PLAIN: `authzid NUL authcid NUL password`; the authorization identity
    /// must be empty or the user's own.
    async fn auth_plain(&mut self, creds: Vec<u8>) -> Step {
        let mut parts = creds.splitn(3, |&b| b == 0);
        let (authz, user, pass) = match (parts.next(), parts.next(), parts.next()) {
            (Some(z), Some(u), Some(p)) => (z, u, p),
            _ => return self.auth_failed(b"").await,
        };
        if !authz.is_empty() && authz != user {
            return self.auth_failed(user).await;
        }
        self.check_credentials(user.to_vec(), pass.to_vec()).await
    }

    async fn check_credentials(&mut self, user: Vec<u8>, pass: Vec<u8>) -> Step {
        if user.is_empty() || !password::check(&self.settings.users, &user, pass).await {
            return self.auth_failed(&user).await;
        }
        let name = String::from_utf8_lossy(&user).into_owned();
        info!(client = %self.peer, user = %Clean(&name), "authenticated");
        self.auth_user = Some(name);
        self.reply(Reply::AuthOk)
    }

    async fn auth_failed(&mut self, user: &[u8]) -> Step {
        let cfg = &self.settings.config;
        self.shared.limiter.record_failure(
            self.ip,
            cfg.auth_failure_limit,
            cfg.auth_failure_window,
        );
        self.shared.metrics.auth_failed();
        warn!(
            client = %self.peer,
            user = %Clean(&String::from_utf8_lossy(user)),
            "authentication failed"
        );
        self.reply(Reply::AuthFailed)
    }
}
