//! `ErrorChain`: an error and every `source()` under it, on one line, for logs and
//! statuses. keygate's error types do not repeat their source in their own message (a
//! store outage says "store unavailable", its source which operation failed, that one's
//! why), so printing only the top one would drop the cause.

use std::error::Error;
use std::fmt;

/// Displays `err` and its sources, joined by ": " (e.g. "store unavailable: reading a key
/// record: connection refused").
pub struct ErrorChain<'a, E: ?Sized>(pub &'a E);

impl<E: Error + ?Sized> fmt::Display for ErrorChain<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.0, f)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn every_source_is_printed_in_order() {
        let e = Outer(Inner(std::io::ErrorKind::ConnectionRefused.into()));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "outer: inner: connection refused"
        );
    }

    #[test]
    fn an_error_without_a_source_is_printed_alone() {
        let e = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert_eq!(ErrorChain(&e).to_string(), "timed out");
    }
}
