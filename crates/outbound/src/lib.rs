//! oauthrelay's delivery workers.

pub mod config;

pub use config::DeliveryConfig;
