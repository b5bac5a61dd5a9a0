//! HELO and EHLO.

use tokio::io::{AsyncRead, AsyncWrite};

use super::reply::{EhloReply, Reply};
use super::{Helo, Session, Step};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// HELO (`esmtp` false) or EHLO: forget any transaction, remember the
    /// name, and list the extensions.
    pub(super) fn ehlo(&mut self, name: &str, esmtp: bool) -> Step {
        self.reset_transaction();
        self.helo = Some(Helo {
            name: name.to_string(),
            esmtp,
        });
        if !esmtp {
            return self.reply(Reply::Helo);
        }
        EhloReply {
            host: &self.settings.hostname,
            client_name: name,
            client_ip: self.ip,
            max_size: self.settings.config.max_message_size.0,
            starttls: self.settings.tls.is_some() && !self.conn.is_tls(),
            auth: self.auth_offered(),
        }
        .write(&mut self.out);
        self.touch();
        self.summary.reply(250);
        Step::Again
    }

    /// AUTH is offered when users exist and the channel is good enough:
    /// TLS, or a loopback client, or `require_tls_for_auth = false`.
    pub(super) fn auth_offered(&self) -> bool {
        !self.settings.users.is_empty() && self.auth_channel_ok()
    }

    pub(super) fn auth_channel_ok(&self) -> bool {
        self.conn.is_tls() || !self.settings.config.require_tls_for_auth || self.ip.is_loopback()
    }
}
