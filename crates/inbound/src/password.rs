//! Client passwords: argon2id PHC strings, never plaintext.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
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
/// matches. The hash's memory (19 MiB with the default cost) is mapped for
/// this check alone and given back to the system when it ends.
pub fn verify_password(password: &[u8], hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| matches(password, &parsed))
}

fn matches(password: &[u8], hash: &PasswordHash<'_>) -> bool {
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(hash.algorithm) else {
        return false;
    };
    let version = match hash.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let Ok(params) = Params::try_from(hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let Some(mut memory) = Blocks::map(params.block_count()) else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    let computed = Argon2::new(algorithm, version, params).hash_password_into_with_memory(
        password,
        salt,
        &mut out,
        memory.as_mut(),
    );
    drop(memory);
    // `Output`'s comparison takes constant time.
    computed.is_ok() && Output::new(&out).is_ok_and(|o| o == expected)
}

/// Argon2's working memory for one check, mapped from the system and
/// unmapped when dropped. Going through the allocator instead would keep
/// it: glibc raises its mmap threshold to the size of the first such block
/// freed, after which every check's 19 MiB comes from (and stays in) a
/// per-thread heap, hundreds of MB after a few parallel guesses. The
/// kernel zeroes unmapped pages before anyone else gets them, so no trace
/// of a password is left behind either.
struct Blocks {
    ptr: std::ptr::NonNull<Block>,
    len: usize,
}

// SAFETY: `Blocks` owns its mapping exclusively (like a `Box<[Block]>`).
unsafe impl Send for Blocks {}

impl Blocks {
    /// `len` blocks, initialised; `None` if the system refuses the memory.
    fn map(len: usize) -> Option<Blocks> {
        const {
            assert!(
                std::mem::align_of::<Block>() <= 4096,
                "a page holds a block's alignment"
            );
        }
        let bytes = len.checked_mul(std::mem::size_of::<Block>())?.max(1);
        // SAFETY: an anonymous private mapping at an address of the
        // kernel's choice; no existing memory is touched. Populated at once:
        // one call instead of a page fault per 4 KiB (a check then costs
        // within a few percent of one on reused heap memory).
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return None;
        }
        let ptr = std::ptr::NonNull::new(addr.cast::<Block>())?;
        for i in 0..len {
            // SAFETY: the mapping is page-aligned (at least `Block`'s
            // alignment) and `len` blocks long; each block is initialised
            // once before any reference to it exists.
            unsafe { ptr.as_ptr().add(i).write(Block::new()) };
        }
        Some(Blocks { ptr, len })
    }
}

impl AsMut<[Block]> for Blocks {
    fn as_mut(&mut self) -> &mut [Block] {
        // SAFETY: `len` initialised blocks, owned by `self`, borrowed
        // mutably through `&mut self` only.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Blocks {
    fn drop(&mut self) {
        let bytes = (self.len * std::mem::size_of::<Block>()).max(1);
        // SAFETY: the mapping made in `map`, of this length, unmapped once;
        // `Block` has no destructor to run.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), bytes);
        }
    }
}

/// Password checks that may run at once by default (`[server]
/// max_password_checks`). Each argon2 verification takes about 19 MiB and
/// a core for tens of milliseconds: a hundred connections guessing at once
/// must not take gigabytes and every core.
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

/// Runs password checks on blocking threads, at most `at_once` at a time.
#[derive(Debug)]
pub(crate) struct Verifier {
    /// Replaced (not resized) when the limit changes: checks running under
    /// the old one finish there.
    permits: RwLock<(usize, Arc<Semaphore>)>,
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
        let at_once = at_once.max(1);
        Verifier {
            permits: RwLock::new((at_once, Arc::new(Semaphore::new(at_once)))),
            wait,
            verifications: AtomicU64::new(0),
        }
    }

    /// Allow `at_once` checks at a time from now on.
    pub(crate) fn resize(&self, at_once: usize) {
        let at_once = at_once.max(1);
        let mut p = self.permits.write().unwrap_or_else(|p| p.into_inner());
        if p.0 != at_once {
            *p = (at_once, Arc::new(Semaphore::new(at_once)));
        }
    }

    fn semaphore(&self) -> Arc<Semaphore> {
        self.permits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Password verifications started so far.
    #[cfg(test)]
    pub(crate) fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    /// Check `name`/`password` against the configured users on a blocking
    /// thread, once a slot is free. An unknown name costs as much as a known
    /// one (it is checked against the first user's hash, and refused
    /// whatever that says), so timing does not tell which names exist.
    pub(crate) async fn check(
        &self,
        users: &[(String, String)],
        name: &[u8],
        password: Vec<u8>,
    ) -> Verdict {
        let permit = match tokio::time::timeout(self.wait, self.semaphore().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => return Verdict::Busy,
        };
        self.verifications.fetch_add(1, Ordering::Relaxed);
        let user = users.iter().find(|(n, _)| n.as_bytes() == name);
        let (hash, known) = match (user, users.first()) {
            (Some((_, h)), _) => (h.clone(), true),
            (None, Some((_, h))) => (h.clone(), false),
            (None, None) => return Verdict::Rejected,
        };
        // The permit moves into the blocking task: a session that goes away
        // mid-check does not free the slot before the work is done.
        let r = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            verify_password(&password, &hash) && known
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

    /// Our check (memory mapped per check) agrees with the argon2 crate's
    /// own on every variant, version and shape of hash, and refuses
    /// malformed ones.
    #[test]
    fn checks_agree_with_the_argon2_crate() {
        use argon2::PasswordVerifier;
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        for (algorithm, version, m, t, p, out) in [
            (Algorithm::Argon2id, Version::V0x13, 19 * 1024, 2, 1, 32),
            (Algorithm::Argon2i, Version::V0x13, 64, 3, 1, 32),
            (Algorithm::Argon2d, Version::V0x10, 64, 1, 1, 16),
            (Algorithm::Argon2id, Version::V0x13, 256, 1, 4, 64),
        ] {
            let params = Params::new(m, t, p, Some(out)).unwrap();
            let h = Argon2::new(algorithm, version, params)
                .hash_password(b"s3cret", &salt)
                .unwrap()
                .to_string();
            let parsed = PasswordHash::new(&h).unwrap();
            for guess in [b"s3cret".as_slice(), b"s3cre", b"", b"s3cret\0"] {
                assert_eq!(
                    verify_password(guess, &h),
                    Argon2::default().verify_password(guess, &parsed).is_ok(),
                    "{h} with {guess:?}"
                );
            }
            assert!(verify_password(b"s3cret", &h), "{h}");
        }
        let good = hash_password("s3cret");
        for bad in [
            "",
            "$argon2id$v=19$m=19456,t=2,p=1",
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ",
            "$scrypt$ln=16,r=8,p=1$aM15713r3Xsvxbi31lqr1Q$nFNh2CVHVjNldFVKDHDlm4CbdRSCdEBsjjJxD+iCs5E",
            "$argon2id$v=19$m=1,t=2,p=1$c2FsdHNhbHQ$ZmFrZQ",
        ] {
            assert!(!verify_password(b"s3cret", bad), "{bad}");
        }
        // A wrong output byte is a mismatch.
        let at = good.rfind('$').unwrap() + 1;
        let first = &good[at..=at];
        let other = if first == "A" { "B" } else { "A" };
        let tampered = format!("{}{other}{}", &good[..at], &good[at + 1..]);
        assert!(PasswordHash::new(&tampered).is_ok());
        assert!(verify_password(b"s3cret", &good));
        assert!(!verify_password(b"s3cret", &tampered));
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
        let held = v.semaphore().acquire_many_owned(2).await.unwrap();
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
        while v.semaphore().available_permits() == 2 {
            tokio::task::yield_now().await;
        }
        task.abort();
        let _ = task.await;
        assert_eq!(v.semaphore().available_permits(), 1, "still checking");
        while v.semaphore().available_permits() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // A new limit applies to the checks that start afterwards.
        v.resize(1);
        assert_eq!(v.semaphore().available_permits(), 1);
        v.resize(1);
        let one = v.semaphore().acquire_owned().await.unwrap();
        assert_eq!(
            v.check(&users, b"printer", b"s3cret".to_vec()).await,
            Verdict::Busy
        );
        drop(one);

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
