//! Test support for oauthrelay. Not part of the product.
//!
//! - [`ca`]: a generated certificate authority and loopback server certificates.
//! - `google`: fake OAuth endpoints (token, consent) that behave as
//!   `docs/gmail-replies.md` describes, faults included.
//! - `gmail`: a fake `smtp.gmail.com` (implicit TLS or STARTTLS, XOAUTH2 checked
//!   against the fake token endpoint's tokens, scripted faults).
//! - [`daemon`]: the real `oauthrelay` binary under test (end-to-end tests
//!   and the benchmark).

pub mod ca;
pub mod daemon;
pub mod gmail;
pub mod gmail_api;
pub mod google;
pub mod microsoft;
