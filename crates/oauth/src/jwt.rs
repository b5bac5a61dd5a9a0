//! Signed JSON Web Tokens (RFC 7515) for the client assertions of RFC 7523:
//! a Google service account's RS256 grant and a Microsoft client
//! certificate's PS256 assertion. Signed by ring; the caller owns the key
//! and says which claims go in.

use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RSA_PSS_SHA256, RsaEncoding, RsaKeyPair};
use serde_json::Value;

/// The signature algorithm, named as the JWT header's `alg`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (Google's service accounts).
    Rs256,
    /// RSASSA-PSS with SHA-256 (Microsoft's certificate credentials).
    Ps256,
}

/// Seconds since the epoch, for `iat`, `nbf` and `exp`.
pub(crate) fn unix_seconds(now: SystemTime) -> u64 {
    now.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `header.claims.signature`, each base64url without padding. `header`
/// gets `alg` and `typ` here, besides what the caller put in (`kid`,
/// `x5t#S256`). `None` only when ring refuses to sign.
pub(crate) fn sign(
    key: &RsaKeyPair,
    alg: Alg,
    header: Value,
    claims: &Value,
    rng: &SystemRandom,
) -> Option<String> {
    let (name, encoding): (&str, &'static dyn RsaEncoding) = match alg {
        Alg::Rs256 => ("RS256", &RSA_PKCS1_SHA256),
        Alg::Ps256 => ("PS256", &RSA_PSS_SHA256),
    };
    let mut header = header;
    if let Some(h) = header.as_object_mut() {
        h.insert("alg".into(), name.into());
        h.insert("typ".into(), "JWT".into());
    }
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0u8; key.public().modulus_len()];
    key.sign(encoding, rng, signing_input.as_bytes(), &mut signature)
        .ok()?;
    Some(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(&signature)
    ))
}
