//! Postgres' md5 password scheme, both directions.
//!
//! Postgres stores `"md5" + hex(md5(password + user))`; on the wire the client
//! answers an AuthenticationMD5Password salt with
//! `"md5" + hex(md5(hex_part_of_stored + salt))`, so the server never needs the
//! plaintext. The hashing is the `md-5` crate's; this file only composes it.

use md5::{Digest, Md5};
use rand::Rng;
use subtle::ConstantTimeEq;

/// The form Postgres stores an md5 password in: `md5` + 32 lowercase hex digits.
pub fn stored_hash(password: &str, user: &str) -> String {
    let digest = Md5::new().chain_update(password.as_bytes()).chain_update(user.as_bytes()).finalize();
    format!("md5{}", hex(&digest))
}

/// What a client sends for `salt`, given the stored hash (`md5<32 hex>`).
/// The hex is lowercased first: Postgres hashes its stored string as-is, and
/// it always stores lowercase, so that is what every client computes with.
pub fn salted_response(stored_hash: &str, salt: [u8; 4]) -> String {
    let hex_part = stored_hash.strip_prefix("md5").unwrap_or(stored_hash).to_ascii_lowercase();
    let digest = Md5::new().chain_update(hex_part.as_bytes()).chain_update(salt).finalize();
    format!("md5{}", hex(&digest))
}

/// Checks a client's response (the PasswordMessage body without its NUL) in
/// constant time, so the comparison leaks nothing about the expected value.
pub fn verify_response(stored_hash: &str, salt: [u8; 4], response: &[u8]) -> bool {
    salted_response(stored_hash, salt).as_bytes().ct_eq(response).into()
}

/// A fresh salt for AuthenticationMD5Password, from the thread-local CSPRNG.
pub fn random_salt() -> [u8; 4] {
    let mut salt = [0; 4];
    rand::rng().fill_bytes(&mut salt);
    salt
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes.iter().flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]]).map(char::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Computed independently with Python's hashlib:
    //   inner = hashlib.md5(b"secretalice").hexdigest()
    //   "md5" + inner
    //   "md5" + hashlib.md5(inner.encode() + bytes([1, 2, 3, 4])).hexdigest()
    const STORED: &str = "md54a0a68b43b6cd5cf266fa02f196e2371";
    const RESPONSE: &str = "md598a0412b9c31436fc53776e863350083";
    const SALT: [u8; 4] = [1, 2, 3, 4];

    #[test]
    fn matches_independently_computed_values() {
        assert_eq!(stored_hash("secret", "alice"), STORED);
        assert_eq!(salted_response(STORED, SALT), RESPONSE);
    }

    #[test]
    fn matches_postgres_protocol_client() {
        let client = postgres_protocol::authentication::md5_hash(b"alice", b"secret", SALT);
        assert_eq!(client, RESPONSE);
    }

    #[test]
    fn verify_accepts_only_the_right_response() {
        assert!(verify_response(STORED, SALT, RESPONSE.as_bytes()));
        assert!(verify_response(&STORED.to_ascii_uppercase().replacen("MD5", "md5", 1), SALT, RESPONSE.as_bytes()));
        assert!(!verify_response(STORED, [1, 2, 3, 5], RESPONSE.as_bytes()));
        assert!(!verify_response(STORED, SALT, &RESPONSE.as_bytes()[..34]));
        assert!(!verify_response(STORED, SALT, b""));
    }
}
