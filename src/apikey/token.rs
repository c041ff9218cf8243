//! The API key token: `<prefix>_<env>_<key_id>_<secret><checksum>`.
//!
//! Parsing is pure and cheap: it decides whether a string *is* a key of this deployment
//! before anything touches Redis or argon2. The checksum (CRC-32 of everything before it,
//! in six base62 characters) rejects typos and random garbage at once, and lets secret
//! scanners recognise real keys.
//!
//! Its random parts (key id, secret) are `secret::random_base62`, re-exported here.

use crate::principal::Environment;
use crate::secret::BASE62;

pub use crate::secret::random_base62;

pub const KEY_ID_LEN: usize = 16;
/// 28 base62 characters carry 166 bits: above the 160 bits a key's secret must have.
pub const SECRET_LEN: usize = 28;
pub const CHECKSUM_LEN: usize = 6;
pub const MAX_PREFIX_LEN: usize = 16;
/// Longest token `parse` will look at; anything longer is rejected unread.
pub const MAX_TOKEN_LEN: usize = MAX_PREFIX_LEN + 6 + KEY_ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;

/// A syntactically valid token, borrowed from the request. `Debug` leaves out the secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ParsedToken<'a> {
    pub prefix: &'a str,
    pub environment: Environment,
    pub key_id: &'a str,
    pub secret: &'a str,
}

impl std::fmt::Debug for ParsedToken<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedToken")
            .field("prefix", &self.prefix)
            .field("environment", &self.environment)
            .field("key_id", &self.key_id)
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// Why a string is not a token. Only for logs and tests: the client always sees
/// `invalid_api_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not shaped like an API key")]
    Malformed,
    #[error("token prefix is not accepted by this deployment")]
    UnknownPrefix,
    #[error("token checksum does not match")]
    BadChecksum,
}

/// Whether `s` could be an API key at all (used to tell keys from JWTs by shape).
pub fn looks_like_api_key(s: &str) -> bool {
    let mut parts = s.splitn(3, '_');
    let prefix = parts.next().unwrap_or("");
    let env = parts.next().unwrap_or("");
    valid_prefix(prefix) && (env == "live" || env == "test") && parts.next().is_some()
}

pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Whether `s` is shaped like a key id: `KEY_ID_LEN` base62 characters.
pub fn valid_key_id(s: &str) -> bool {
    s.len() == KEY_ID_LEN && is_base62(s)
}

fn is_base62(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Parses and checks a token. `accepted_prefix` is the deployment's prefix.
pub fn parse<'a>(token: &'a str, accepted_prefix: &str) -> Result<ParsedToken<'a>, TokenError> {
    if token.len() > MAX_TOKEN_LEN || !token.is_ascii() {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split('_');
    let (Some(prefix), Some(env), Some(key_id), Some(tail), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Malformed);
    };
    if !valid_prefix(prefix) {
        return Err(TokenError::Malformed);
    }
    let environment = match env {
        "live" => Environment::Live,
        "test" => Environment::Test,
        _ => return Err(TokenError::Malformed),
    };
    if key_id.len() != KEY_ID_LEN
        || tail.len() != SECRET_LEN + CHECKSUM_LEN
        || !is_base62(key_id)
        || !is_base62(tail)
    {
        return Err(TokenError::Malformed);
    }
    if prefix != accepted_prefix {
        return Err(TokenError::UnknownPrefix);
    }
    let (secret, checksum) = tail.split_at(SECRET_LEN);
    let body = &token[..token.len() - CHECKSUM_LEN];
    if checksum.as_bytes() != encode_checksum(body) {
        return Err(TokenError::BadChecksum);
    }
    Ok(ParsedToken {
        prefix,
        environment,
        key_id,
        secret,
    })
}

fn encode_checksum(body: &str) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(body.as_bytes()) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

pub fn new_key_id() -> String {
    random_base62(KEY_ID_LEN)
}

/// A freshly generated token. `secret` is what gets hashed; `token` is shown once.
pub struct NewToken {
    pub token: String,
    pub key_id: String,
    pub secret: String,
}

pub fn generate(prefix: &str, environment: Environment) -> NewToken {
    let key_id = new_key_id();
    let secret = random_base62(SECRET_LEN);
    let body = format!("{prefix}_{}_{key_id}_{secret}", environment.as_str());
    let checksum = encode_checksum(&body);
    let mut token = body;
    token.push_str(std::str::from_utf8(&checksum).expect("base62 is ASCII"));
    NewToken {
        token,
        key_id,
        secret,
    }
}

/// The public part of a token, safe to log and display: `<prefix>_<env>_<key_id>`.
pub fn public_prefix(prefix: &str, environment: Environment, key_id: &str) -> String {
    format!("{prefix}_{}_{key_id}", environment.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_a_parsed_token_leaves_out_the_secret() {
        let t = generate("sk", Environment::Live);
        let parsed = parse(&t.token, "sk").unwrap();
        let shown = format!("{parsed:?}");
        assert!(!shown.contains(parsed.secret), "{shown}");
        assert!(shown.contains(parsed.key_id), "{shown}");
    }

    #[test]
    fn generated_tokens_parse_back() {
        for env in [Environment::Live, Environment::Test] {
            let t = generate("sk", env);
            let p = parse(&t.token, "sk").unwrap();
            assert_eq!(p.key_id, t.key_id);
            assert_eq!(p.secret, t.secret);
            assert_eq!(p.environment, env);
            assert!(t.token.starts_with(&format!("sk_{}_", env.as_str())));
        }
    }

    #[test]
    fn secret_carries_at_least_160_bits() {
        assert!((SECRET_LEN as f64) * 62f64.log2() >= 160.0);
    }

    #[test]
    fn any_changed_character_breaks_the_checksum() {
        let t = generate("sk", Environment::Live).token;
        let start = t.len() - CHECKSUM_LEN - SECRET_LEN;
        for i in start..t.len() {
            let mut bytes = t.clone().into_bytes();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let changed = String::from_utf8(bytes).unwrap();
            assert_eq!(
                parse(&changed, "sk"),
                Err(TokenError::BadChecksum),
                "position {i}"
            );
        }
    }

    #[test]
    fn other_prefixes_and_shapes_are_rejected() {
        let t = generate("eng", Environment::Live).token;
        assert_eq!(parse(&t, "sk"), Err(TokenError::UnknownPrefix));
        for bad in [
            "",
            "sk",
            "sk_live",
            "sk_prod_0123456789abcdef_x",
            "SK_live_0123456789abcdef_0123456789012345678901234567890123",
            "sk_live_0123456789abcde_01234567890123456789012345678901234",
            "sk_live_0123456789abcdef_0123456789012345678901234567890123_",
            "sk_live_0123456789abcdéf_012345678901234567890123456789012",
            "a.b.c",
        ] {
            assert_eq!(parse(bad, "sk"), Err(TokenError::Malformed), "{bad:?}");
        }
        let huge = "s".repeat(64 * 1024);
        assert_eq!(parse(&huge, "sk"), Err(TokenError::Malformed));
    }

    #[test]
    fn shape_tells_keys_from_jwts() {
        assert!(looks_like_api_key(&generate("sk", Environment::Test).token));
        assert!(!looks_like_api_key("eyJhbGciOiJIUzI1NiJ9.e30.sig"));
    }
}
