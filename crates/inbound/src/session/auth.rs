//! AUTH PLAIN and LOGIN (RFC 4954) against `[[server.users]]`.
//!
//! Passwords are never logged. Attempts are counted per client (IPv4
//! address, IPv6 /64) when the password is about to be checked, and given
//! back on success: past `auth_failure_limit` failures within
//! `auth_failure_window` AUTH is refused with `454 4.7.0`. At most
//! `max_password_checks` checks run at once; an attempt that finds no free
//! slot within
//! [`VERIFY_WAIT`](crate::password::VERIFY_WAIT) gets
//! `454 4.7.0 Temporary authentication failure` and is not counted.

use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use super::reply::{Clean, Reply};
use super::{Framed, Session, SessionEnd, State, Step, decode_base64, trim_line};
use crate::password::Verdict;
use crate::ratelimit::{Attempt, Limited};

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
            let ip = self.ip;
            warn!(client = %self.peer, "AUTH refused from unknown[{ip}]: STARTTLS first ([server] require_tls_for_auth)");
            Some(Reply::AuthTlsRequired)
        } else if self.shared.limiter.is_limited(
            self.ip,
            cfg.auth_failure_limit,
            cfg.auth_failure_window,
        ) {
            let ip = self.ip;
            warn!(client = %self.peer, "AUTH refused from unknown[{ip}]: too many failed attempts from this address");
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
            AuthStep::LoginPass { user } => self.check_credentials("LOGIN", user, decoded).await,
        }
    }

    /// PLAIN: `authzid NUL authcid NUL password`; the authorization identity
    /// must be empty or the user's own.
    async fn auth_plain(&mut self, creds: Vec<u8>) -> Step {
        let mut parts = creds.splitn(3, |&b| b == 0);
        let (authz, user, pass) = match (parts.next(), parts.next(), parts.next()) {
            (Some(z), Some(u), Some(p)) => (z, u, p),
            _ => return self.refuse_credentials("PLAIN", b""),
        };
        if !authz.is_empty() && authz != user {
            return self.refuse_credentials("PLAIN", user);
        }
        self.check_credentials("PLAIN", user.to_vec(), pass.to_vec())
            .await
    }

    /// Count an attempt before anything is checked, so that concurrent
    /// sessions cannot all pass the limit before the first failure is
    /// recorded. `Err` is the step after a `454` refusal.
    fn count_attempt(&mut self) -> Result<Attempt, Step> {
        let cfg = &self.settings.config;
        match self
            .shared
            .limiter
            .reserve(self.ip, cfg.auth_failure_limit, cfg.auth_failure_window)
        {
            Ok(a) => Ok(a),
            Err(Limited::Client) => {
                let ip = self.ip;
                warn!(client = %self.peer, "AUTH refused from unknown[{ip}]: too many failed attempts from this address");
                Err(self.reply(Reply::AuthRateLimited))
            }
            Err(Limited::Everyone) => {
                // Not this client's fault alone: not worded for fail2ban.
                warn!(client = %self.peer, "AUTH refused: too many clients are failing to authenticate");
                Err(self.reply(Reply::AuthRateLimited))
            }
        }
    }

    async fn check_credentials(&mut self, mech: &str, user: Vec<u8>, pass: Vec<u8>) -> Step {
        if user.is_empty() {
            return self.refuse_credentials(mech, &user);
        }
        let attempt = match self.count_attempt() {
            Ok(a) => a,
            Err(step) => return step,
        };
        let verdict = self
            .shared
            .verifier
            .check(&self.settings.users, &user, pass)
            .await;
        match verdict {
            Verdict::Accepted => {
                self.shared.limiter.refund(attempt);
                let name = String::from_utf8_lossy(&user).into_owned();
                info!(client = %self.peer, user = %Clean(&name), "authenticated");
                self.auth_user = Some(name);
                self.reply(Reply::AuthOk)
            }
            // The attempt stays counted: it was a failed guess.
            Verdict::Rejected => self.auth_failed(mech, &user),
            Verdict::Busy => {
                self.shared.limiter.refund(attempt);
                warn!(client = %self.peer, "AUTH refused: too many password checks at once");
                self.reply(Reply::AuthBusy)
            }
        }
    }

    /// Malformed credentials: refused without a password check, and not
    /// counted against the client, as they guess nothing (counting them
    /// would let a flood fill the limiter's table for free).
    fn refuse_credentials(&mut self, mech: &str, user: &[u8]) -> Step {
        self.auth_failed(mech, user)
    }

    /// Logged as Postfix does, with the address first and nothing the
    /// client chose before it, so a fail2ban filter can anchor on it
    /// (contrib/fail2ban).
    fn auth_failed(&mut self, mech: &str, user: &[u8]) -> Step {
        self.shared.metrics.auth_failed();
        let ip = self.ip;
        warn!(
            client = %self.peer,
            user = %Clean(&String::from_utf8_lossy(user)),
            "SASL {mech} authentication failed from unknown[{ip}]"
        );
        self.reply(Reply::AuthFailed)
    }
}
