//! A string that must never be printed: pepper, admin token, Redis password, plaintext
//! secrets in flight. Its `Debug` and `Display` say `[redacted]`, so a stray `{:?}` in a
//! log line cannot leak it.

use std::fmt;
use std::sync::Arc;

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
        Secret::new(crate::apikey::token::random_base62(len))
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
