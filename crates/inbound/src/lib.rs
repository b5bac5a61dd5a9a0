//! oauthrelay's SMTP listener and session state machine.
//!
//! Plain SMTP in (printers, scanners, cron, legacy applications), durable
//! spool out: a message is answered `250` only once
//! [`spool::MessageWriter::commit`] has made it durable.
//!
//! ```no_run
//! # async fn demo(spool: spool::Spool) -> Result<(), Box<dyn std::error::Error>> {
//! use inbound::{Inbound, Metrics, ServerConfig, Settings};
//! let mut registry = prometheus_client::registry::Registry::default();
//! let config = ServerConfig::default();
//! let listeners = vec![tokio::net::TcpListener::bind(config.listen[0]).await?];
//! let settings = Settings::new(config, inbound::system_hostname(), inbound::accept_all_senders())?;
//! let server = Inbound::new(settings, spool, Metrics::new(&mut registry));
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! server.serve(listeners, shutdown).await;
//! # Ok(()) }
//! ```

pub mod config;
pub mod dot;
mod message;
mod metrics;
mod password;
mod path;
mod ratelimit;
mod received;
mod refusals;
mod server;
mod session;
mod settings;
mod slots;

pub use config::{ByteSize, Network, ServerConfig, TlsConfig, UserConfig, parse_listen_address};
pub use metrics::Metrics;
pub use password::{hash_password, verify_password};
pub use server::{Inbound, Listener, ListenerKind};
pub use settings::{
    LocalNames, SenderPolicy, Settings, SettingsError, accept_all_senders, system_hostname,
};
