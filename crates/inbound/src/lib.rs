//! oauthrelay's SMTP listener and session state machine.

pub mod config;

pub use config::{ByteSize, Network, ServerConfig, TlsConfig, UserConfig};
