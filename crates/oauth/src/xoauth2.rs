//! The SASL XOAUTH2 initial response. The exchange itself runs on the
//! delivery side's SMTP connection (`crates/outbound`); this crate only
//! supplies tokens and the response built from one.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::zeroize::Zeroize;
use secrecy::{ExposeSecret, SecretString};

use crate::token::AccessToken;

/// The XOAUTH2 initial response: base64 of
/// `user=EMAIL\x01auth=Bearer TOKEN\x01\x01`. A secret: never log it.
pub fn initial_response(user: &str, token: &AccessToken) -> SecretString {
    let mut raw = format!(
        "user={user}\x01auth=Bearer {}\x01\x01",
        token.secret().expose_secret()
    );
    let encoded = STANDARD.encode(raw.as_bytes());
    raw.zeroize();
    SecretString::from(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn initial_response_format() {
        let token = AccessToken::new(SecretString::from("ya29.abc"), SystemTime::now());
        let r = initial_response("me@gmail.com", &token);
        let decoded = STANDARD.decode(r.expose_secret()).unwrap();
        assert_eq!(
            decoded,
            b"user=me@gmail.com\x01auth=Bearer ya29.abc\x01\x01"
        );
    }
}
