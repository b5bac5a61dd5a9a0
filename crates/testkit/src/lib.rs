//! Test support for oauthrelay. Not part of the product.
//!
//! - [`ca`]: a generated certificate authority and loopback server certificates.
//! - `google`: fake OAuth endpoints (token, consent) that behave as
//!   `docs/gmail-replies.md` describes, faults included.
//! - `gmail`: a fake `smtp.gmail.com` (implicit TLS or STARTTLS, XOAUTH2 checked
//!   against the fake token endpoint's tokens, scripted faults), with an
//!   Exchange Online dialect (its replies, 3 connections and 30 messages a
//!   minute per mailbox).
//! - `gmail_api`: a fake Gmail API (`messages.send`, simple and resumable
//!   uploads, scope checks, Google's error bodies, a per-user rate limit).
//! - `microsoft`: a fake Microsoft identity platform (authorization code with
//!   PKCE, device code, rotating refresh tokens, client credentials with a
//!   secret or a certificate, AADSTS errors).
//! - [`daemon`]: the real `oauthrelay` binary under test (end-to-end tests
//!   and the benchmark).

pub mod ca;
pub mod daemon;
pub mod gmail;
pub mod gmail_api;
pub mod google;
pub mod microsoft;
mod notify;
