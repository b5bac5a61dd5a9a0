//! Client passwords: argon2id PHC strings, never plaintext.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use tokio::sync::Semaphore;

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

/// Password checks that may run at once in the whole listener. Each argon2
/// verification takes about 19 MiB and a core for tens of milliseconds: a
/// hundred connections guessing at once must not take gigabytes and every
/// core.
pub(crate) const MAX_CONCURRENT_VERIFICATIONS: usize = 2;
/// How long an AUTH waits for a free verification slot before it is
/// answered `454 4.7.0 Temporary authentication failure`.
pub(crate) const VERIFY_WAIT: Duration = Duration::from_secs(2);

/// What a password check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accepted,
    Rejected,
    /// No verification slot came free in time: nothing was checked.
    Busy,
}

/// Runs password checks on blocking threads, at most
/// [`MAX_CONCURRENT_VERIFICATIONS`] at once.
#[derive(Debug)]
pub(crate) struct Verifier {
    permits: Arc<Semaphore>,
    wait: Duration,
    verifications: AtomicU64,
}

impl Default for Verifier {
    fn default() -> Verifier {
        Verifier::new(MAX_CONCURRENT_VERIFICATIONS, VERIFY_WAIT)
    }
}

impl Verifier {
    pub(crate) fn new(at_once: usize, wait: Duration) -> Verifier {
        Verifier {
            permits: Arc::new(Semaphore::new(at_once.max(1))),
            wait,
            verifications: AtomicU64::new(0),
        }
    }

    /// Password verifications started so far.
    #[cfg(test)]
    pub(crate) fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    /// Check `name`/`password` against the configured users on a blocking
    /// thread, once a slot is free. An unknown name costs as much as a known
    /// one, so timing does not tell which names exist.
    pub(crate) async fn check(
        &self,
        users: &[(String, String)],
        name: &[u8],
        password: Vec<u8>,
    ) -> Verdict {
        let permit =
            match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => return Verdict::Busy,
            };
        self.verifications.fetch_add(1, Ordering::Relaxed);
        let user = users.iter().find(|(n, _)| n.as_bytes() == name);
        let (hash, known) = match user {
            Some((_, h)) => (h.clone(), true),
            None => (String::new(), false),
        };
        // The permit moves into the blocking task: a session that goes away
        // mid-check does not free the slot before the work is done.
        let r = tokio::task::spawn_blocking(move || {
            let _permit = permit;
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
        if r.unwrap_or(false) {
            Verdict::Accepted
        } else {
            Verdict::Rejected
        }
    }
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

    /// A hash ten times as slow as the default, so the checks below are
    /// still running when the test looks.
    fn slow_hash(password: &str) -> String {
        use argon2::{Algorithm, Params, Version};
        let params = Params::new(19 * 1024, 20, 1, None).unwrap();
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    /// At most `at_once` checks run together; the others wait, and past the
    /// wait they are `Busy` without being checked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verifications_are_bounded() {
        let users = Arc::new(vec![("printer".to_string(), slow_hash("s3cret"))]);
        let v = Arc::new(Verifier::new(2, Duration::from_millis(1)));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let (v, users) = (v.clone(), users.clone());
            set.spawn(async move { v.check(&users, b"printer", b"s3cret".to_vec()).await });
        }
        let verdicts = set.join_all().await;
        let accepted = verdicts.iter().filter(|v| **v == Verdict::Accepted).count();
        let busy = verdicts.iter().filter(|v| **v == Verdict::Busy).count();
        assert_eq!((accepted, busy), (2, 8), "{verdicts:?}");
        assert_eq!(v.verifications(), 2);

        // All slots taken: `Busy` after the wait, nothing checked.
        let held = v.permits.clone().acquire_many_owned(2).await.unwrap();
        assert_eq!(
            v.check(&users, b"printer", b"s3cret".to_vec()).await,
            Verdict::Busy
        );
        assert_eq!(v.verifications(), 2);
        drop(held);

        // A caller that goes away mid-check does not free its slot before
        // the check is over.
        let task = {
            let (v, users) = (v.clone(), users.clone());
            tokio::spawn(async move { v.check(&users, b"printer", b"x".to_vec()).await })
        };
        while v.permits.available_permits() == 2 {
            tokio::task::yield_now().await;
        }
        task.abort();
        let _ = task.await;
        assert_eq!(v.permits.available_permits(), 1, "still checking");
        while v.permits.available_permits() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // Slots come back once the checks end.
        let v = Verifier::new(2, Duration::from_secs(30));
        for _ in 0..3 {
            assert_eq!(
                v.check(&users, b"printer", b"wrong".to_vec()).await,
                Verdict::Rejected
            );
        }
        assert_eq!(v.verifications(), 3);
    }
}
