//! SCRAM-SHA-256 server side (RFC 5802, RFC 7677), sans I/O, as Postgres runs it.
//!
//! Postgres specifics kept here: the username inside client-first is ignored
//! (the startup packet named the user; libpq sends `n=` empty), the server
//! nonce is 18 random bytes in base64, authzid (`a=`) is refused, and no
//! channel binding is offered, so `p=` is refused while `n` and `y` are fine.
//!
//! The primitives (HMAC, SHA-256, PBKDF2, base64, constant-time compare) all
//! come from their crates; this file only composes them.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Postgres' wording, kept static: errors never quote client input.
macro_rules! malformed {
    ($detail:literal) => {
        ScramError::Protocol(concat!("malformed SCRAM message: ", $detail))
    };
}

pub const MECHANISM: &str = "SCRAM-SHA-256";

/// Postgres' defaults for verifiers it creates (`SCRAM_DEFAULT_ITERATIONS`,
/// `SCRAM_DEFAULT_SALT_LEN`), used when pgmux derives one from plaintext.
pub const DEFAULT_ITERATIONS: u32 = 4096;
const DEFAULT_SALT_LEN: usize = 16;
/// `SCRAM_RAW_NONCE_LEN` in Postgres.
const SERVER_NONCE_LEN: usize = 18;
const KEY_LEN: usize = 32;

/// What the server stores: enough to check a proof, not enough to log in.
#[derive(Clone)]
pub struct ScramVerifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

// Hand-written so the keys can never reach a log line.
impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramVerifier").field("iterations", &self.iterations).finish_non_exhaustive()
    }
}

impl ScramVerifier {
    /// Parses Postgres' stored form
    /// `SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>`.
    pub fn parse(s: &str) -> Option<ScramVerifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored_key, server_key) = keys.split_once(':')?;
        let iterations: u32 = iterations.parse().ok().filter(|&i| i > 0)?;
        let salt = BASE64.decode(salt).ok().filter(|s| !s.is_empty())?;
        let stored_key = BASE64.decode(stored_key).ok()?.try_into().ok()?;
        let server_key = BASE64.decode(server_key).ok()?.try_into().ok()?;
        Some(ScramVerifier { iterations, salt, stored_key, server_key })
    }

    /// Derives a verifier from a plaintext password with a fresh random salt.
    /// Costs `DEFAULT_ITERATIONS` HMAC rounds: cache the result if that matters.
    pub fn from_password(password: &str) -> ScramVerifier {
        let mut salt = vec![0; DEFAULT_SALT_LEN];
        rand::rng().fill_bytes(&mut salt);
        Self::from_password_with_salt(password, salt, DEFAULT_ITERATIONS)
    }

    pub fn from_password_with_salt(password: &str, salt: Vec<u8>, iterations: u32) -> ScramVerifier {
        // Clients SASLprep the password (RFC 7677); Postgres and libpq fall back
        // to the raw bytes when that fails, so a non-normalisable password
        // still works with both. We must agree with them exactly.
        let prepared = stringprep::saslprep(password).unwrap_or(std::borrow::Cow::Borrowed(password));
        let mut salted = [0u8; KEY_LEN];
        pbkdf2::pbkdf2_hmac::<Sha256>(prepared.as_bytes(), &salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = Sha256::digest(client_key).into();
        let server_key = hmac(&salted, b"Server Key");
        ScramVerifier { iterations, salt, stored_key, server_key }
    }

    /// A verifier no proof matches in practice, for running a full exchange
    /// that must fail (see [`ScramServer::mock`]).
    fn random() -> ScramVerifier {
        let mut v = ScramVerifier {
            iterations: DEFAULT_ITERATIONS,
            salt: vec![0; DEFAULT_SALT_LEN],
            stored_key: [0; KEY_LEN],
            server_key: [0; KEY_LEN],
        };
        let mut rng = rand::rng();
        rng.fill_bytes(&mut v.salt);
        rng.fill_bytes(&mut v.stored_key);
        rng.fill_bytes(&mut v.server_key);
        v
    }
}

/// What logs in to Postgres as a user without the password: the ClientKey
/// recovered from a client's proof (`ClientProof XOR HMAC(StoredKey,
/// AuthMessage)`) and the ServerKey of the verifier it matched. Valid until
/// the role's password changes (PgBouncer's SCRAM pass-through, since 1.14).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    client_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

// Hand-written so the keys can never reach a log line.
impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

/// pgmux logging in to Postgres with [`ScramKeys`]: `new` gives
/// client-first-message, [`client_final`](Self::client_final) answers
/// server-first, [`verify_server`](Self::verify_server) checks server-final.
#[derive(Debug)]
pub struct KeyedScramClient {
    keys: ScramKeys,
    client_first_bare: String,
    nonce: String,
    auth_message: Option<String>,
}

impl KeyedScramClient {
    pub fn new(keys: ScramKeys) -> (KeyedScramClient, Vec<u8>) {
        let mut raw = [0u8; SERVER_NONCE_LEN];
        rand::rng().fill_bytes(&mut raw);
        let nonce = BASE64.encode(raw);
        // Postgres ignores the name here (the startup packet chose the user); libpq sends it empty.
        let client_first_bare = format!("n=,r={nonce}");
        let first = format!("n,,{client_first_bare}").into_bytes();
        (KeyedScramClient { keys, client_first_bare, nonce, auth_message: None }, first)
    }

    /// Takes server-first-message, returns client-final-message. The salt
    /// and iteration count are not needed: the keys are already derived. A
    /// server whose verifier changed since (a new password) rejects the proof.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        if self.auth_message.is_some() {
            return Err(ScramError::Protocol("SCRAM exchange out of order"));
        }
        let msg = std::str::from_utf8(server_first).map_err(|_| malformed!("server-first-message is not UTF-8"))?;
        let nonce = msg.split(',').next().and_then(|a| a.strip_prefix("r=")).ok_or(malformed!("expected nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(malformed!("nonce does not match"));
        }
        // c=biws: base64 of the GS2 header "n,," (no channel binding).
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let stored_key: [u8; KEY_LEN] = Sha256::digest(self.keys.client_key).into();
        let mut proof = hmac(&stored_key, auth_message.as_bytes());
        proof.iter_mut().zip(self.keys.client_key).for_each(|(p, k)| *p ^= k);
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes())
    }

    /// Checks server-final-message: the server proves it knows the ServerKey.
    pub fn verify_server(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let auth_message = self.auth_message.as_ref().ok_or(ScramError::Protocol("SCRAM exchange out of order"))?;
        let msg = std::str::from_utf8(server_final).map_err(|_| malformed!("server-final-message is not UTF-8"))?;
        let signature = msg
            .strip_prefix("v=")
            .and_then(|v| BASE64.decode(v.split(',').next().unwrap_or(v)).ok())
            .ok_or(malformed!("expected server signature"))?;
        let expected = hmac(&self.keys.server_key, auth_message.as_bytes());
        if bool::from(signature.as_slice().ct_eq(&expected)) {
            Ok(())
        } else {
            Err(ScramError::Protocol("invalid server signature"))
        }
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; KEY_LEN] {
    // HMAC takes keys of any length, so `new_from_slice` cannot fail.
    let mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.chain_update(data).finalize().into_bytes().into()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    /// The client broke the protocol (08P01). The text never quotes client
    /// input, which may contain a proof.
    #[error("{0}")]
    Protocol(&'static str),
    /// Well-formed exchange, wrong password (28P01).
    #[error("SCRAM client proof does not match")]
    InvalidProof,
}

#[derive(Debug)]
enum State {
    Initial,
    ServerFirstSent {
        gs2_header: String,
        /// client-first-bare + "," + server-first: the AuthMessage prefix.
        auth_message_prefix: String,
        nonce: String,
    },
    Done,
}

/// One server-side SCRAM-SHA-256 exchange:
/// `new` → [`server_first`](Self::server_first) → [`verify_final`](Self::verify_final).
#[derive(Debug)]
pub struct ScramServer {
    verifier: ScramVerifier,
    state: State,
    /// Run the exchange like a real one, then fail: what Postgres does for a
    /// user it cannot authenticate, so such users look like wrong passwords.
    mock: bool,
    /// After a matching proof: what logs in as this user ([`ScramKeys`]).
    keys: Option<ScramKeys>,
}

impl ScramServer {
    pub fn new(verifier: ScramVerifier) -> ScramServer {
        ScramServer { verifier, state: State::Initial, mock: false, keys: None }
    }

    /// An exchange that always ends in [`ScramError::InvalidProof`].
    pub fn mock() -> ScramServer {
        ScramServer { verifier: ScramVerifier::random(), state: State::Initial, mock: true, keys: None }
    }

    /// The keys recovered from the client's proof, once it matched.
    pub fn keys(&self) -> Option<&ScramKeys> {
        self.keys.as_ref()
    }

    /// Takes client-first-message, returns server-first-message.
    pub fn server_first(&mut self, client_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let mut nonce = [0u8; SERVER_NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        self.server_first_with_nonce(client_first, &BASE64.encode(nonce))
    }

    fn server_first_with_nonce(&mut self, client_first: &[u8], server_nonce: &str) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, State::Initial) {
            return Err(ScramError::Protocol("SCRAM exchange out of order"));
        }
        self.state = State::Done;
        let msg = std::str::from_utf8(client_first).map_err(|_| malformed!("client-first-message is not UTF-8"))?;

        // gs2-header = gs2-cbind-flag "," [ authzid ] ","
        let (flag, rest) = msg.split_once(',').ok_or(malformed!("missing GS2 header"))?;
        match flag {
            "n" | "y" => {}
            _ if flag.starts_with("p=") => {
                return Err(ScramError::Protocol(
                    "The client selected SCRAM-SHA-256 without channel binding, \
                     but the SCRAM message includes channel binding data.",
                ));
            }
            _ => return Err(malformed!("unexpected channel-binding flag")),
        }
        let (authzid, bare) = rest.split_once(',').ok_or(malformed!("missing GS2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Protocol("client uses authorization identity, but it is not supported"));
        }
        let gs2_header = format!("{flag},,");

        // client-first-bare = [reserved-mext ","] username "," nonce ["," extensions]
        let mut attrs = bare.split(',');
        match attrs.next() {
            Some(a) if a.starts_with("m=") => {
                return Err(ScramError::Protocol("client requires an unsupported SCRAM extension"));
            }
            // The user name is ignored: the startup packet already chose the user.
            Some(a) if a.starts_with("n=") => {}
            _ => return Err(malformed!("expected username attribute")),
        }
        let client_nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or(malformed!("expected nonce"))?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(is_printable) {
            return Err(malformed!("invalid nonce"));
        }
        if !attrs.all(is_attribute) {
            return Err(malformed!("invalid extension in client-first-message"));
        }

        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!("r={nonce},s={},i={}", BASE64.encode(&self.verifier.salt), self.verifier.iterations);
        self.state =
            State::ServerFirstSent { gs2_header, auth_message_prefix: format!("{bare},{server_first}"), nonce };
        Ok(server_first.into_bytes())
    }

    /// Takes client-final-message; returns server-final-message (`v=...`)
    /// when the proof matches.
    pub fn verify_final(&mut self, client_final: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::ServerFirstSent { gs2_header, auth_message_prefix, nonce } =
            std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::Protocol("SCRAM exchange out of order"));
        };
        let msg = std::str::from_utf8(client_final).map_err(|_| malformed!("client-final-message is not UTF-8"))?;

        // client-final = "c=" cbind "," "r=" nonce ["," extensions] "," "p=" proof
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(malformed!("missing proof"))?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs.next().and_then(|a| a.strip_prefix("c=")).ok_or(malformed!("expected channel binding"))?;
        // Without channel binding, c= is just the base64 GS2 header echoed back.
        if BASE64.decode(cbind).ok().as_deref() != Some(gs2_header.as_bytes()) {
            return Err(ScramError::Protocol("SCRAM channel binding check failed"));
        }
        let client_nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or(malformed!("expected nonce"))?;
        if client_nonce != nonce {
            return Err(malformed!("nonce does not match"));
        }
        if !attrs.all(is_attribute) {
            return Err(malformed!("invalid extension in client-final-message"));
        }
        let proof: [u8; KEY_LEN] =
            BASE64.decode(proof).ok().and_then(|p| p.try_into().ok()).ok_or(malformed!("invalid proof"))?;

        let auth_message = format!("{auth_message_prefix},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        client_key.iter_mut().zip(client_signature).for_each(|(k, s)| *k ^= s);
        let matches: bool = Sha256::digest(client_key).as_slice().ct_eq(&self.verifier.stored_key).into();
        if !matches || self.mock {
            return Err(ScramError::InvalidProof);
        }
        self.keys = Some(ScramKeys { client_key, server_key: self.verifier.server_key });
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", BASE64.encode(server_signature)).into_bytes())
    }
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E (visible ASCII except ',').
fn is_printable(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}

/// An extension attribute: `<letter>=<value>`.
fn is_attribute(a: &str) -> bool {
    let b = a.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b'='
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs postgres-protocol's client against `server`; returns the server's
    /// verdict, and checks the client accepts the server signature on success.
    fn exchange(server: &mut ScramServer, password: &str) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let server_first = server.server_first(client.message())?;
        client.update(&server_first).expect("client accepts server-first");
        let server_final = server.verify_final(client.message())?;
        client.finish(&server_final).expect("client accepts the server signature");
        Ok(())
    }

    /// The keys recovered from one client's proof log in to a server that
    /// holds the same verifier, and fail against another password's.
    #[test]
    fn recovered_keys_pass_through() {
        let verifier = ScramVerifier::from_password("pw");
        let mut first = ScramServer::new(verifier.clone());
        exchange(&mut first, "pw").unwrap();
        let keys = first.keys().unwrap().clone();
        let mut upstream = ScramServer::new(verifier);
        let (mut client, client_first) = KeyedScramClient::new(keys.clone());
        let server_first = upstream.server_first(&client_first).unwrap();
        let client_final = client.client_final(&server_first).unwrap();
        let server_final = upstream.verify_final(&client_final).unwrap();
        client.verify_server(&server_final).unwrap();
        assert!(client.verify_server(b"v=AAAA").is_err());

        let mut other = ScramServer::new(ScramVerifier::from_password("new-pw"));
        let (mut client, client_first) = KeyedScramClient::new(keys);
        let server_first = other.server_first(&client_first).unwrap();
        let client_final = client.client_final(&server_first).unwrap();
        assert_eq!(other.verify_final(&client_final), Err(ScramError::InvalidProof));
        // A failed exchange recovers nothing.
        assert!(other.keys().is_none());
    }

    #[test]
    fn plaintext_password_round_trip() {
        assert_eq!(exchange(&mut ScramServer::new(ScramVerifier::from_password("s3cret")), "s3cret"), Ok(()));
    }

    #[test]
    fn stored_verifier_round_trip() {
        let stored = postgres_protocol::password::scram_sha_256(b"s3cret");
        let verifier = ScramVerifier::parse(&stored).expect("postgres-protocol verifier parses");
        assert_eq!(exchange(&mut ScramServer::new(verifier.clone()), "s3cret"), Ok(()));
        assert_eq!(exchange(&mut ScramServer::new(verifier), "wrong"), Err(ScramError::InvalidProof));
    }

    #[test]
    fn saslprep_agrees_with_clients() {
        // U+00A0 (no-break space) maps to a space under SASLprep; both the
        // client and postgres-protocol's verifier normalise it, so must we.
        let stored = postgres_protocol::password::scram_sha_256("pass\u{a0}word".as_bytes());
        let from_stored = ScramVerifier::parse(&stored).unwrap();
        assert_eq!(exchange(&mut ScramServer::new(from_stored), "pass word"), Ok(()));
        let ours = ScramVerifier::from_password("pass\u{a0}word");
        assert_eq!(exchange(&mut ScramServer::new(ours), "pass word"), Ok(()));
    }

    #[test]
    fn wrong_password_fails() {
        let mut server = ScramServer::new(ScramVerifier::from_password("right"));
        assert_eq!(exchange(&mut server, "wrong"), Err(ScramError::InvalidProof));
    }

    #[test]
    fn mock_fails_even_for_a_plausible_client() {
        assert_eq!(exchange(&mut ScramServer::mock(), ""), Err(ScramError::InvalidProof));
    }

    /// RFC 7677 section 3: user "user", password "pencil".
    #[test]
    fn rfc7677_test_vector() {
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let mut server = ScramServer::new(ScramVerifier::from_password_with_salt("pencil", salt, 4096));
        let server_first = server
            .server_first_with_nonce(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO", "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
            .unwrap();
        assert_eq!(
            server_first,
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let server_final = server
            .verify_final(
                b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                  p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            )
            .unwrap();
        assert_eq!(server_final, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    fn first(server: &mut ScramServer, client_first: &str) -> Result<String, ScramError> {
        server.server_first(client_first.as_bytes()).map(|m| String::from_utf8(m).unwrap())
    }

    #[test]
    fn client_first_syntax() {
        let new = || ScramServer::new(ScramVerifier::from_password("x"));
        assert!(first(&mut new(), "n,,n=,r=abc").unwrap().starts_with("r=abc"));
        assert!(first(&mut new(), "y,,n=ignored,r=abc,x=ext").is_ok());
        let protocol = |m: &str| matches!(first(&mut new(), m), Err(ScramError::Protocol(_)));
        assert!(protocol("p=tls-server-end-point,,n=,r=abc"), "channel binding demanded");
        assert!(protocol("n,a=admin,n=,r=abc"), "authzid");
        assert!(protocol("n,,m=ext,n=,r=abc"), "mandatory extension");
        assert!(protocol("n,,n=,r="), "empty nonce");
        assert!(protocol("n,,n=,r=a\x01b"), "unprintable nonce");
        assert!(protocol("n,,r=abc"), "no username attribute");
        assert!(protocol("x,,n=,r=abc"), "bad flag");
        assert!(protocol("n,,n=,r=abc,bogus"), "bad extension");
        assert!(protocol(""));
        assert!(matches!(new().server_first(b"n,,n=,r=\xff"), Err(ScramError::Protocol(_))));
    }

    /// A client-final from the real client, then tampered copies of it.
    #[test]
    fn tampered_client_final() {
        let verifier = ScramVerifier::from_password("pw");
        let run = |tamper: &dyn Fn(&str) -> String| {
            let mut server = ScramServer::new(verifier.clone());
            let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
            let server_first = server.server_first(client.message()).unwrap();
            client.update(&server_first).unwrap();
            let good = std::str::from_utf8(client.message()).unwrap().to_owned();
            server.verify_final(tamper(&good).as_bytes())
        };
        assert!(run(&|m| m.to_owned()).is_ok());
        // Drop the last character of the nonce.
        let short_nonce = |m: &str| {
            let (head, proof) = m.rsplit_once(",p=").unwrap();
            format!("{},p={proof}", &head[..head.len() - 1])
        };
        assert_eq!(run(&short_nonce), Err(ScramError::Protocol("malformed SCRAM message: nonce does not match")));
        let flip_proof = |m: &str| {
            let (head, proof) = m.rsplit_once(",p=").unwrap();
            let mut bytes = BASE64.decode(proof).unwrap();
            bytes[0] ^= 1;
            format!("{head},p={}", BASE64.encode(bytes))
        };
        assert_eq!(run(&flip_proof), Err(ScramError::InvalidProof));
        let short_proof = |m: &str| format!("{},p=AAAA", m.rsplit_once(",p=").unwrap().0);
        assert!(matches!(run(&short_proof), Err(ScramError::Protocol(_))));
        let other_cbind = |m: &str| m.replacen("c=biws", "c=eSws", 1);
        assert!(matches!(run(&other_cbind), Err(ScramError::Protocol(_))));
        let no_proof = |m: &str| m.rsplit_once(",p=").unwrap().0.to_owned();
        assert!(matches!(run(&no_proof), Err(ScramError::Protocol(_))));
    }

    #[test]
    fn out_of_order_calls_fail() {
        let mut server = ScramServer::new(ScramVerifier::from_password("x"));
        assert!(matches!(server.verify_final(b"c=biws,r=a,p=AAAA"), Err(ScramError::Protocol(_))));
        let mut server = ScramServer::new(ScramVerifier::from_password("x"));
        server.server_first(b"n,,n=,r=abc").unwrap();
        assert!(matches!(server.server_first(b"n,,n=,r=abc"), Err(ScramError::Protocol(_))));
    }

    #[test]
    fn verifier_parsing_and_debug() {
        let stored = postgres_protocol::password::scram_sha_256(b"pw");
        let v = ScramVerifier::parse(&stored).unwrap();
        assert_eq!(format!("{v:?}"), "ScramVerifier { iterations: 4096, .. }");
        assert!(ScramVerifier::parse("SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA").is_none());
        assert!(ScramVerifier::parse(&stored.replacen("4096", "x", 1)).is_none());
        assert!(ScramVerifier::parse(&stored[..stored.len() - 4]).is_none());
        assert!(ScramVerifier::parse("md5abc").is_none());
    }
}
