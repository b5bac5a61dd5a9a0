//! The access token handed to SMTP code.

use std::fmt;
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};

/// An OAuth2 access token (Google's start with `ya29.`) and its expiry.
///
/// The token itself is a [`SecretString`]: `Debug` shows only the expiry,
/// and there is no `Display`. Use [`AccessToken::secret`] and
/// [`ExposeSecret::expose_secret`] at the one place that needs the bytes
/// (the XOAUTH2 initial response).
#[derive(Clone)]
pub struct AccessToken {
    secret: SecretString,
    expires_at: SystemTime,
}

impl AccessToken {
    pub fn new(secret: SecretString, expires_at: SystemTime) -> AccessToken {
        AccessToken { secret, expires_at }
    }

    /// The token. Never log it.
    pub fn secret(&self) -> &SecretString {
        &self.secret
    }

    /// Wall-clock time at which Google stops accepting the token.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// Time left before expiry (zero once expired).
    pub fn expires_in(&self) -> Duration {
        self.expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }

    /// Whether two handles hold the same token (compares the secret without
    /// exposing it to the caller).
    pub fn same_token(&self, other: &AccessToken) -> bool {
        self.secret.expose_secret() == other.secret.expose_secret()
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"[REDACTED]")
            .field("expires_at", &crate::timefmt::rfc3339(self.expires_at))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_token() {
        let t = AccessToken::new(
            SecretString::from("ya29.very-secret"),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        );
        let s = format!("{t:?}");
        assert!(!s.contains("very-secret"), "{s}");
        assert!(s.contains("2023-11-14T22:13:20Z"), "{s}");
    }
}
