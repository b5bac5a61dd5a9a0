//! The transport an account's `transport` setting picks, as one type the
//! worker holds.

use std::sync::Arc;
use std::time::Duration;

use oauth::{TokenManager, TransportKind};

use crate::clock::Clock;
use crate::gmail_api::GmailApiTransport;
use crate::smtp::SmtpTransport;
use crate::smtp::session::AccountCtx;
use crate::transport::{Attempt, Outgoing, ProbeReport, Transport};

// One per worker, made once: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum AnyTransport {
    Smtp(SmtpTransport),
    GmailApi(GmailApiTransport),
}

impl AnyTransport {
    pub(crate) fn new(
        ctx: Arc<AccountCtx>,
        tokens: TokenManager,
        hostname: Arc<str>,
        connect_timeout: Duration,
        command_timeout: Duration,
        clock: Clock,
    ) -> AnyTransport {
        match ctx.config.transport {
            TransportKind::Smtp => AnyTransport::Smtp(SmtpTransport::new(
                ctx,
                tokens,
                hostname,
                connect_timeout,
                command_timeout,
            )),
            TransportKind::GmailApi => {
                AnyTransport::GmailApi(GmailApiTransport::new(ctx, tokens, clock))
            }
        }
    }

    /// Whether this transport was made for `ctx` (a reload replaces it).
    pub(crate) fn serves(&self, ctx: &Arc<AccountCtx>) -> bool {
        match self {
            AnyTransport::Smtp(t) => t.serves(ctx),
            AnyTransport::GmailApi(t) => t.serves(ctx),
        }
    }
}

impl Transport for AnyTransport {
    async fn deliver(&mut self, msg: &Outgoing<'_>) -> Attempt {
        match self {
            AnyTransport::Smtp(t) => t.deliver(msg).await,
            AnyTransport::GmailApi(t) => t.deliver(msg).await,
        }
    }

    async fn probe(&mut self) -> ProbeReport {
        match self {
            AnyTransport::Smtp(t) => t.probe().await,
            AnyTransport::GmailApi(t) => t.probe().await,
        }
    }

    async fn idle_closed(&mut self) {
        match self {
            AnyTransport::Smtp(t) => t.idle_closed().await,
            AnyTransport::GmailApi(t) => t.idle_closed().await,
        }
    }

    fn is_open(&self) -> bool {
        match self {
            AnyTransport::Smtp(t) => t.is_open(),
            AnyTransport::GmailApi(t) => t.is_open(),
        }
    }

    async fn close(&mut self) {
        match self {
            AnyTransport::Smtp(t) => t.close().await,
            AnyTransport::GmailApi(t) => t.close().await,
        }
    }

    fn drop_channel(&mut self) {
        match self {
            AnyTransport::Smtp(t) => t.drop_channel(),
            AnyTransport::GmailApi(t) => t.drop_channel(),
        }
    }
}
