//! Tokens that prove a client may use an id, and the keys that check them.
//!
//! Two token formats, both checked without any database:
//!
//! ```text
//! expiring:  <expiry>.<hex HMAC-SHA256(secret, "<id>.<expiry>")>   expiry: unix seconds
//! plain:     <hex HMAC-SHA256(secret, "<id>")>                      valid until the secret goes
//! ```
//!
//! The expiry is inside the signed part, so it cannot be changed without the secret.
//! A server holds one or more secrets ([`Keys`]): the first mints, every one verifies,
//! which is how secrets rotate without logging everybody out. [`Auth`] is what a running
//! server checks with; its keys can be replaced (on SIGHUP) while connections stay.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// One shared secret. Its `Debug` output never shows it, so it cannot leak into logs.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// Trailing newlines are dropped, so a secret file written by `echo` works.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Secret, AuthError> {
        let mut bytes = bytes.into();
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(AuthError::EmptySecret);
        }
        Ok(Secret(bytes))
    }

    fn mac(&self, message: &str) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(message.as_bytes());
        mac
    }

    /// The plain (non-expiring) token for `id`.
    pub fn token(&self, id: u32) -> String {
        hex(&self.mac(&id.to_string()).finalize().into_bytes())
    }

    /// A token for `id` that stops working at `expiry` (unix seconds).
    pub fn token_until(&self, id: u32, expiry: u64) -> String {
        let mac = self.mac(&format!("{id}.{expiry}")).finalize().into_bytes();
        format!("{expiry}.{}", hex(&mac))
    }

    /// Checks a plain token in constant time.
    pub fn verify(&self, id: u32, token: &[u8]) -> bool {
        decode_hex(token).is_some_and(|raw| self.mac(&id.to_string()).verify_slice(&raw).is_ok())
    }
}

/// Why a token was refused; the text goes to the client in `auth-failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Not a token any current secret made for this id.
    Invalid,
    /// Genuine, but past its expiry (unix seconds).
    Expired { at: u64 },
    /// Genuine, but without an expiry, and the server requires one.
    NoExpiry,
}

impl Refused {
    /// The `auth-failed` detail for a hello for `id`.
    pub fn detail(&self, id: u32) -> String {
        match self {
            Refused::Invalid => format!("no valid token for id {id}"),
            Refused::Expired { at } => {
                format!("the token for id {id} expired at {at} (unix time); ask for a new one")
            }
            Refused::NoExpiry => {
                format!("the token for id {id} has no expiry, and this server requires one")
            }
        }
    }
}

/// The secrets a server knows: the first mints, every one verifies.
#[derive(Debug, Clone)]
pub struct Keys(Vec<Secret>);

impl From<Secret> for Keys {
    fn from(secret: Secret) -> Keys {
        Keys(vec![secret])
    }
}

impl Keys {
    /// One secret per line; blank lines are skipped, `\r` and trailing spaces dropped.
    pub fn parse(text: &[u8]) -> Result<Keys, AuthError> {
        let secrets = text
            .split(|b| *b == b'\n')
            .map(|line| line.trim_ascii_end())
            .filter(|line| !line.is_empty())
            .map(Secret::new)
            .collect::<Result<Vec<_>, _>>()?;
        if secrets.is_empty() {
            return Err(AuthError::NoSecret);
        }
        Ok(Keys(secrets))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A token for `id` from the first secret; with `ttl`, one that expires.
    pub fn mint(&self, id: u32, ttl: Option<Duration>) -> String {
        let first = &self.0[0];
        match ttl {
            None => first.token(id),
            Some(ttl) => first.token_until(id, now().saturating_add(ttl.as_secs().max(1))),
        }
    }

    /// Checks `token` for `id` at unix time `now`.
    pub fn check(
        &self,
        id: u32,
        token: &[u8],
        now: u64,
        require_expiry: bool,
    ) -> Result<(), Refused> {
        let Some(dot) = token.iter().position(|b| *b == b'.') else {
            if !self.0.iter().any(|s| s.verify(id, token)) {
                return Err(Refused::Invalid);
            }
            return if require_expiry {
                Err(Refused::NoExpiry)
            } else {
                Ok(())
            };
        };
        let (digits, mac) = (&token[..dot], &token[dot + 1..]);
        let expiry = std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.is_empty() && d.len() <= 20 && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u64>().ok())
            .ok_or(Refused::Invalid)?;
        let raw = decode_hex(mac).ok_or(Refused::Invalid)?;
        let message = format!("{id}.{expiry}");
        if !self
            .0
            .iter()
            .any(|s| s.mac(&message).verify_slice(&raw).is_ok())
        {
            return Err(Refused::Invalid);
        }
        if now >= expiry {
            return Err(Refused::Expired { at: expiry });
        }
        Ok(())
    }
}

/// What a running server checks tokens with. The keys can be replaced while it runs;
/// connections already authenticated keep going (their tokens were checked at hello).
#[derive(Debug)]
pub struct Auth {
    keys: RwLock<Keys>,
    /// `--auth-require-expiry`: plain tokens are refused.
    pub require_expiry: bool,
}

impl Auth {
    pub fn new(keys: Keys, require_expiry: bool) -> Arc<Auth> {
        Arc::new(Auth {
            keys: RwLock::new(keys),
            require_expiry,
        })
    }

    pub fn check(&self, id: u32, token: &[u8]) -> Result<(), Refused> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.check(id, token, now(), self.require_expiry)
    }

    /// Swaps in new keys (a reload); returns how many there are.
    pub fn replace(&self, keys: Keys) -> usize {
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        n
    }
}

/// Unix time in seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Parses a token lifetime: `30s`, `15m`, `12h`, `90d`, or plain seconds.
pub fn parse_ttl(text: &str) -> Result<Duration, AuthError> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| AuthError::NotADuration(text.to_string()))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(AuthError::BadUnit(text.to_string())),
    };
    if n == 0 {
        return Err(AuthError::ZeroTtl);
    }
    n.checked_mul(unit)
        .map(Duration::from_secs)
        .ok_or_else(|| AuthError::TooLong(text.to_string()))
}

/// Why a secret or a token lifetime was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the auth secret is empty")]
    EmptySecret,
    #[error("the auth secret file holds no secret")]
    NoSecret,
    #[error("`{0}` is not a duration such as 30s, 15m, 12h or 90d")]
    NotADuration(String),
    #[error("`{0}`: the unit must be s, m, h or d")]
    BadUnit(String),
    #[error("a token lifetime must be more than zero")]
    ZeroTtl,
    #[error("`{0}` is too long")]
    TooLong(String),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
        // python3 -c 'import hmac,hashlib;print(hmac.new(b"key",b"7.2000000000",hashlib.sha256).hexdigest())'
        assert_eq!(
            secret.token_until(7, 2_000_000_000),
            "2000000000.75ff5d8b86d78c0ca5e2110a817341aeef73914934e9a14fd9cdf730f11b16c8"
        );
    }

    #[test]
    fn expiring_tokens_work_until_their_expiry_and_cannot_be_extended() {
        let keys = Keys::from(Secret::new("key").unwrap());
        let token = keys.0[0].token_until(7, 1000);
        assert_eq!(keys.check(7, token.as_bytes(), 999, true), Ok(()));
        assert_eq!(
            keys.check(7, token.as_bytes(), 1000, false),
            Err(Refused::Expired { at: 1000 })
        );
        assert_eq!(
            keys.check(8, token.as_bytes(), 999, false),
            Err(Refused::Invalid)
        );
        let extended = token.replacen("1000.", "9999.", 1);
        assert_eq!(
            keys.check(7, extended.as_bytes(), 999, false),
            Err(Refused::Invalid)
        );
        for junk in [
            "",
            ".",
            "1000.",
            ".abc",
            "x.y",
            "99999999999999999999999.00",
        ] {
            assert_eq!(
                keys.check(7, junk.as_bytes(), 0, false),
                Err(Refused::Invalid),
                "{junk}"
            );
        }
    }

    #[test]
    fn plain_tokens_are_refused_when_an_expiry_is_required() {
        let keys = Keys::from(Secret::new("key").unwrap());
        let token = keys.mint(7, None);
        assert_eq!(keys.check(7, token.as_bytes(), 0, false), Ok(()));
        assert_eq!(
            keys.check(7, token.as_bytes(), 0, true),
            Err(Refused::NoExpiry)
        );
    }

    #[test]
    fn the_first_secret_mints_and_every_one_verifies() {
        let keys = Keys::parse(b"new\r\n\nold  \n").unwrap();
        assert_eq!(keys.len(), 2);
        let old = Keys::parse(b"old").unwrap();
        let minted = keys.mint(5, Some(Duration::from_secs(60)));
        assert_eq!(keys.check(5, minted.as_bytes(), now(), true), Ok(()));
        assert_eq!(
            old.check(5, minted.as_bytes(), now(), true),
            Err(Refused::Invalid)
        );
        let by_old = old.mint(5, None);
        assert_eq!(keys.check(5, by_old.as_bytes(), now(), false), Ok(()));
        assert!(Keys::parse(b"\n\n").is_err());
    }

    #[test]
    fn ttls_parse_with_units() {
        assert_eq!(parse_ttl("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_ttl("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_ttl("90d"), Ok(Duration::from_secs(7_776_000)));
        assert_eq!(parse_ttl("45"), Ok(Duration::from_secs(45)));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("5y").is_err());
        assert!(parse_ttl("h").is_err());
    }

    #[test]
    fn debug_hides_the_secret() {
        assert!(!format!("{:?}", Secret::new("hunter2").unwrap()).contains("hunter2"));
        let auth = Auth::new(Keys::parse(b"hunter2").unwrap(), false);
        assert!(!format!("{auth:?}").contains("hunter2"));
    }
}
