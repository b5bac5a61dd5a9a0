//! Client passwords: argon2id PHC strings, never plaintext.

use std::sync::OnceLock;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// Hash `password` for `[[server.users]] password_hash` (argon2id with the
/// crate's default cost: 19 MiB, 2 passes), as a PHC string
/// (`$argon2id$v=19$m=19456,t=2,p=1$...`).
pub fn hash_password(password: &str) -> String {
    let mut salt = [0u8; 16];
    // The system random generator does not fail on a working Linux system;
    // if it ever did, a hash with a predictable salt would be worse than
    // stopping the `hash-password` command.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .expect("the system random number generator failed");
    let salt = SaltString::encode_b64(&salt).expect("16 bytes is a valid salt length");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 default parameters are valid")
        .to_string()
}

/// Whether `password` matches the PHC string `hash`. CPU-heavy (tens of
/// milliseconds): call it from a blocking thread. A malformed hash never
/// matches.
pub fn verify_password(password: &[u8], hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

/// Check `name`/`password` against the configured users on a blocking
/// thread. An unknown name costs as much as a known one, so timing does not
/// tell which names exist.
pub(crate) async fn check(users: &[(String, String)], name: &[u8], password: Vec<u8>) -> bool {
    let user = users.iter().find(|(n, _)| n.as_bytes() == name);
    let (hash, known) = match user {
        Some((_, h)) => (h.clone(), true),
        None => (String::new(), false),
    };
    let r = tokio::task::spawn_blocking(move || {
        if known {
            verify_password(&password, &hash)
        } else {
            static DUMMY: OnceLock<String> = OnceLock::new();
            let dummy = DUMMY.get_or_init(|| hash_password("not a password of anyone"));
            let _ = verify_password(&password, dummy);
            false
        }
    })
    .await;
    r.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify() {
        let h = hash_password("s3cret");
        assert!(h.starts_with("$argon2id$v=19$"), "{h}");
        assert!(verify_password(b"s3cret", &h));
        assert!(!verify_password(b"S3cret", &h));
        assert!(!verify_password(b"s3cret", "not a hash"));
        assert_ne!(hash_password("s3cret"), h, "salted");
    }
}
