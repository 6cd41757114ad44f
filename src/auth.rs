//! Tokens that prove a client may use an id.
//!
//! token = lowercase hex of HMAC-SHA256(secret, id in decimal). The server holds only
//! the secret; whoever mints tokens (`chat-server token --id N`) needs the same secret.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The shared secret. Its `Debug` output never shows it, so it cannot leak into logs.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// Trailing newlines are dropped, so a secret file written by `echo` works.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Secret, String> {
        let mut bytes = bytes.into();
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err("the auth secret is empty".into());
        }
        Ok(Secret(bytes))
    }

    fn mac(&self, id: u32) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(id.to_string().as_bytes());
        mac
    }

    /// The token for `id`.
    pub fn token(&self, id: u32) -> String {
        self.mac(id)
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Checks a presented token in constant time.
    pub fn verify(&self, id: u32, token: &[u8]) -> bool {
        let Some(raw) = decode_hex(token) else {
            return false;
        };
        self.mac(id).verify_slice(&raw).is_ok()
    }
}

fn decode_hex(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    text.chunks(2)
        .map(|pair| {
            let digit = |c: u8| (c as char).to_digit(16);
            Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_for_their_id() {
        let secret = Secret::new("s3cret\n").unwrap();
        let token = secret.token(42);
        assert_eq!(token.len(), 64);
        assert!(secret.verify(42, token.as_bytes()));
        assert!(!secret.verify(43, token.as_bytes()));
        assert!(!secret.verify(42, b"zz"));
        assert!(!Secret::new("other").unwrap().verify(42, token.as_bytes()));
    }

    #[test]
    fn known_vector() {
        // python3 -c 'import hmac,hashlib;print(hmac.new(b"key",b"7",hashlib.sha256).hexdigest())'
        let secret = Secret::new("key").unwrap();
        assert_eq!(
            secret.token(7),
            "01235b0d2aa4a5daba7243a9228194c8eff913ac5e56e967301210270380bc42"
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        assert!(!format!("{:?}", Secret::new("hunter2").unwrap()).contains("hunter2"));
    }
}
