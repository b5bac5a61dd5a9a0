//! Prometheus metrics of the SMTP listener.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::server::ListenerKind;

type Reason = [(&'static str, &'static str); 1];
type ListenerResult = [(&'static str, &'static str); 2];

/// The listener's metrics. Cheap to clone; clones share the values.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    received: Counter,
    received_bytes: Counter,
    accepted: Counter,
    refused: Family<Reason, Counter>,
    active: Gauge,
    auth_failures: Counter,
    rejected: Family<Reason, Counter>,
    tls_handshakes: Family<ListenerResult, Counter>,
}

/// Why a connection was refused (`reason` label of
/// `oauthrelay_smtp_connections_refused_total`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    /// `max_connections` sessions were already open, or every slot not
    /// reserved for `allow_networks` was.
    Limit,
    /// This outside client had `max_connections_per_client` open.
    ClientLimit,
    /// The client is outside `allow_networks` and no AUTH users exist.
    Network,
}

/// Why a message was not taken (`reason` label of
/// `oauthrelay_messages_rejected_total`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rejection {
    /// Over `max_message_size`.
    Size,
    /// RCPT from a client that may not relay.
    Relay,
    /// MAIL with a sender no account accepts.
    Sender,
    /// More than `max_recipients`.
    Recipients,
    /// The spool could not store it (disk full, I/O error).
    Storage,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Limit => "limit",
            Refusal::ClientLimit => "client_limit",
            Refusal::Network => "network",
        }
    }
}

impl Rejection {
    fn label(self) -> &'static str {
        match self {
            Rejection::Size => "size",
            Rejection::Relay => "relay",
            Rejection::Sender => "sender",
            Rejection::Recipients => "recipients",
            Rejection::Storage => "storage",
        }
    }
}

impl Metrics {
    /// Create the metrics and register them in `registry`:
    /// `oauthrelay_messages_received_total`,
    /// `oauthrelay_messages_received_bytes_total`,
    /// `oauthrelay_smtp_connections_accepted_total`,
    /// `oauthrelay_smtp_connections_refused_total{reason="limit"|"client_limit"|"network"}`,
    /// `oauthrelay_smtp_sessions` (gauge),
    /// `oauthrelay_smtp_auth_failures_total`,
    /// `oauthrelay_messages_rejected_total{reason="size"|"relay"|"sender"|"recipients"|"storage"}`,
    /// `oauthrelay_smtp_tls_handshakes_total{listener="smtp"|"smtps",result="ok"|"failed"}`
    /// (`smtp`: STARTTLS on a `listen` port; `smtps`: an implicit-TLS
    /// connection on a `listen_tls` port).
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        // Every reason is exported from the start (at 0), so `increase()`
        // alerts and dashboards see the first event.
        for why in [Refusal::Limit, Refusal::ClientLimit, Refusal::Network] {
            let _ = m.refused.get_or_create(&[("reason", why.label())]);
        }
        for why in [
            Rejection::Size,
            Rejection::Relay,
            Rejection::Sender,
            Rejection::Recipients,
            Rejection::Storage,
        ] {
            let _ = m.rejected.get_or_create(&[("reason", why.label())]);
        }
        for listener in [ListenerKind::Smtp, ListenerKind::Smtps] {
            for result in ["ok", "failed"] {
                let _ = m
                    .tls_handshakes
                    .get_or_create(&[("listener", listener.label()), ("result", result)]);
            }
        }
        registry.register(
            "oauthrelay_messages_received",
            "Messages accepted from SMTP clients and queued",
            m.received.clone(),
        );
        registry.register(
            "oauthrelay_messages_received_bytes",
            "Bytes of messages accepted from SMTP clients",
            m.received_bytes.clone(),
        );
        registry.register(
            "oauthrelay_smtp_connections_accepted",
            "SMTP connections that got a session",
            m.accepted.clone(),
        );
        registry.register(
            "oauthrelay_smtp_connections_refused",
            "SMTP connections refused at connect, by reason",
            m.refused.clone(),
        );
        registry.register(
            "oauthrelay_smtp_sessions",
            "SMTP sessions now open",
            m.active.clone(),
        );
        registry.register(
            "oauthrelay_smtp_auth_failures",
            "Failed SMTP AUTH attempts",
            m.auth_failures.clone(),
        );
        registry.register(
            "oauthrelay_messages_rejected",
            "Messages or recipients refused during SMTP, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "oauthrelay_smtp_tls_handshakes",
            "TLS handshakes with SMTP clients, by listener (smtp: STARTTLS, smtps: implicit TLS) and result",
            m.tls_handshakes.clone(),
        );
        m
    }

    pub(crate) fn tls_handshake(&self, listener: ListenerKind, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.tls_handshakes
            .get_or_create(&[("listener", listener.label()), ("result", result)])
            .inc();
    }

    pub(crate) fn message_received(&self, bytes: u64) {
        self.received.inc();
        self.received_bytes.inc_by(bytes);
    }

    pub(crate) fn accepted(&self) {
        self.accepted.inc();
    }

    pub(crate) fn refused(&self, why: Refusal) {
        self.refused.get_or_create(&[("reason", why.label())]).inc();
    }

    pub(crate) fn session_started(&self) {
        self.active.inc();
    }

    pub(crate) fn session_ended(&self) {
        self.active.dec();
    }

    pub(crate) fn auth_failed(&self) {
        self.auth_failures.inc();
    }

    pub(crate) fn rejected(&self, why: Rejection) {
        self.rejected
            .get_or_create(&[("reason", why.label())])
            .inc();
    }

    /// Messages received so far (for tests and status output).
    pub fn messages_received(&self) -> u64 {
        self.received.get()
    }

    /// Sessions now open.
    pub fn active_sessions(&self) -> i64 {
        self.active.get()
    }
}
