//! STARTTLS (RFC 3207).

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::conn::Conn;
use super::reply::Reply;
use super::{Session, SessionEnd, Step, later};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) fn starttls(&mut self) -> Step {
        if self.conn.is_tls() {
            return self.reply(Reply::Sequence("TLS already active"));
        }
        if self.settings.tls.is_none() {
            return self.reply(Reply::TlsUnavailable);
        }
        if self.helo.is_none() {
            return self.reply(Reply::Sequence("send HELO/EHLO first"));
        }
        if self.txn.is_some() {
            return self.reply(Reply::Sequence(
                "STARTTLS not allowed during a mail transaction",
            ));
        }
        let _ = self.reply(Reply::TlsGo);
        Step::StartTls
    }

    /// The `220 2.0.0` is sent: do the handshake (bounded by the command
    /// timeout, the short one for an untrusted client) and start over, forgetting everything the client said in
    /// plain text.
    pub(super) async fn start_tls(&mut self) -> Result<(), SessionEnd> {
        let pending = self.rbuf.len().saturating_sub(self.pos);
        if pending > 0 {
            // Bytes sent before our 220 was seen: a command injection
            // attempt (CVE-2011-0411 and kin). They must not be read as if
            // they came over TLS.
            warn!(client = %self.peer, bytes = pending, "discarding plain-text input pipelined after STARTTLS");
        }
        self.rbuf.clear();
        self.pos = 0;
        self.handshake().await?;
        self.helo = None;
        self.auth_user = None;
        self.reset_transaction();
        self.touch();
        Ok(())
    }

    /// The server side of a TLS handshake on the plain stream (after
    /// STARTTLS, or first thing on an implicit-TLS listener), bounded by the
    /// command timeout (the short one for an untrusted client), and counted
    /// in `oauthrelay_smtp_tls_handshakes_total`.
    pub(super) async fn handshake(&mut self) -> Result<(), SessionEnd> {
        let r = self.try_handshake().await;
        self.shared.metrics.tls_handshake(self.listener, r.is_ok());
        r
    }

    async fn try_handshake(&mut self) -> Result<(), SessionEnd> {
        let Some(acceptor) = self.settings.tls.clone() else {
            return Err(SessionEnd::Tls(std::io::Error::other(
                "TLS is not configured: set [server.tls]",
            )));
        };
        let Some(stream) = self.conn.take_plain() else {
            return Err(SessionEnd::Tls(std::io::Error::other("TLS already active")));
        };
        let deadline = later(Instant::now(), self.command_timeout());
        match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                let (_, conn) = tls.get_ref();
                debug!(
                    client = %self.peer,
                    listener = self.listener.label(),
                    version = ?conn.protocol_version(),
                    cipher = ?conn.negotiated_cipher_suite().map(|c| c.suite()),
                    "TLS started"
                );
                self.conn = Conn::from(tls);
                Ok(())
            }
            Ok(Err(e)) => Err(SessionEnd::Tls(e)),
            Err(_) => Err(SessionEnd::Timeout),
        }
    }
}
