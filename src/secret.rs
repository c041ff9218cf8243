//! A string that must never be printed: pepper, admin token, Redis password, plaintext
//! secrets in flight. Its `Debug` and `Display` say `[redacted]`, so a stray `{:?}` in a
//! log line cannot leak it.
//!
//! Also where random secret text comes from (`random_base62`: key secrets and ids, `jti`s,
//! lease and reservation ids). It names no other keygate module: everything above may
//! use it.

use std::fmt;
use std::sync::Arc;

use rand::{Rng, TryRngCore};

#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Arc::from(value.into()))
    }

    /// The value itself. Every call site is a place a secret leaves this wrapper.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison, for credentials presented by callers.
    pub fn matches(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }

    pub fn random(len: usize) -> Self {
        Secret::new(random_base62(len))
    }
}

/// For command-line arguments (`--admin-token`, `--token`), so the parsed arguments'
/// `Debug` cannot show them.
impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret::new(s))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The 62 characters random secret text is drawn from (and an API key's checksum is
/// written in).
pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `len` characters of `BASE62`, each drawn from the operating system's generator.
pub fn random_base62(len: usize) -> String {
    // Panics if the operating system cannot give randomness: no secret is better than a
    // guessable one.
    let mut rng = rand::rngs::OsRng.unwrap_err();
    (0..len)
        .map(|_| BASE62[rng.random_range(0..62)] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s: Secret = "sk_live_abc_def".parse().unwrap();
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "sk_live_abc_def");
    }
}
