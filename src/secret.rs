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
