//! Password hashing: PBKDF2-HMAC-SHA256 (the key derivation SCRAM-SHA-256
//! uses) with a random 16-byte salt, through `ring`, which rustls already
//! brings in. Only the salt and the derived key are stored.

use std::num::NonZeroU32;

use ring::{pbkdf2, rand::SecureRandom};
use runnel_controller::security::UserCredential;

/// The stored mechanism name.
pub const MECHANISM: &str = "PBKDF2-HMAC-SHA256";
/// Iterations for new passwords (SCRAM-SHA-256's minimum is 4096).
pub const ITERATIONS: u32 = 4096;
const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;

/// Hashes `password` with a fresh random salt.
pub fn hash(password: &str) -> UserCredential {
    let mut salt = vec![0u8; SALT_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .expect("the system random source works");
    hash_with_salt(password, salt)
}

/// Hashes `password` with `salt` (the stored one, when a user's password
/// is saved again unchanged: the credential is then the same bytes).
pub fn hash_with_salt(password: &str, salt: Vec<u8>) -> UserCredential {
    let mut out = vec![0u8; HASH_LEN];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(ITERATIONS).expect("non-zero"),
        &salt,
        password.as_bytes(),
        &mut out,
    );
    UserCredential {
        mechanism: MECHANISM.into(),
        iterations: ITERATIONS,
        salt,
        hash: out,
    }
}

/// Whether `password` matches the stored credential (constant time).
pub fn verify(credential: &UserCredential, password: &[u8]) -> bool {
    let Some(iterations) = NonZeroU32::new(credential.iterations) else {
        return false;
    };
    credential.mechanism == MECHANISM
        && pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &credential.salt,
            password,
            &credential.hash,
        )
        .is_ok()
}

/// Burns the time of one verification, so an unknown user takes as long
/// to refuse as a wrong password.
pub fn verify_dummy(password: &[u8]) {
    let mut out = [0u8; HASH_LEN];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(ITERATIONS).expect("non-zero"),
        &[0u8; SALT_LEN],
        password,
        &mut out,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_salted_and_verify() {
        let a = hash("s3cret");
        let b = hash("s3cret");
        assert_ne!(a.salt, b.salt);
        assert_ne!(a.hash, b.hash);
        assert!(verify(&a, b"s3cret"));
        assert!(verify(&b, b"s3cret"));
        assert!(!verify(&a, b"s3cret "));
        assert!(!verify(&a, b""));
        let mut other = a.clone();
        other.mechanism = "plain".into();
        assert!(!verify(&other, b"s3cret"));
    }
}
