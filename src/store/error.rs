//! What a store call fails with: `StoreError`, and `Outage`, the retryable failure that
//! keeps its cause. The backends build them (Redis maps its own errors in one place,
//! `redis/failure.rs`); callers decide what an outage means for them, and print the whole
//! chain (`telemetry::ErrorChain`) when they log one.
//!
//! Nothing here may hold a secret: an outage says which operation failed and a cause
//! already stripped of the command's arguments and the server's reply text.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend could not answer: connection refused, timeout, I/O. Retryable. The
    /// outage says what was being done, and why it failed as its source.
    #[error("store unavailable")]
    Unavailable(#[source] Outage),
    #[error("key id {0} already exists")]
    Conflict(String),
    /// The backend answered with something keygate cannot read. Not retryable.
    #[error("store returned corrupt data: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// An outage of `what` (the operation), because of `cause`.
    pub fn unavailable(
        what: &'static str,
        cause: impl Into<Box<dyn Error + Send + Sync>>,
    ) -> StoreError {
        StoreError::Unavailable(Outage::new(what, cause))
    }
}

/// One failed store operation: which one (`what`, e.g. "reading a key record"), and the
/// failure underneath, if there is one to tell apart from `what` (a connection refused, a
/// timeout, a remote's status). Shared, not copied, by every caller that waited for the
/// same call (`tenant.rs`, `cache.rs`), hence the `Arc`.
#[derive(Clone)]
pub struct Outage {
    what: &'static str,
    cause: Option<Arc<dyn Error + Send + Sync>>,
}

impl Outage {
    pub fn new(what: &'static str, cause: impl Into<Box<dyn Error + Send + Sync>>) -> Outage {
        Outage {
            what,
            cause: Some(Arc::from(cause.into())),
        }
    }

    /// The operation that failed.
    pub fn what(&self) -> &'static str {
        self.what
    }
}

/// An outage told by its description alone: nothing underneath it to name (a switch
/// turned off by a test, a stream that ended).
impl From<&'static str> for Outage {
    fn from(what: &'static str) -> Outage {
        Outage { what, cause: None }
    }
}

/// The operation only: the cause is the source, printed by whoever prints the chain.
impl fmt::Display for Outage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what)
    }
}

impl fmt::Debug for Outage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outage")
            .field("what", &self.what)
            .field("cause", &self.cause.as_ref().map(|c| c.to_string()))
            .finish()
    }
}

impl Error for Outage {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.cause.as_deref().map(|c| c as &(dyn Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_names_its_operation_and_keeps_its_cause_as_source() {
        let e = StoreError::unavailable("reading a key record", "connection refused");
        assert_eq!(e.to_string(), "store unavailable");
        let outage = e.source().expect("the outage");
        assert_eq!(outage.to_string(), "reading a key record");
        let cause = outage.source().expect("the cause");
        assert_eq!(cause.to_string(), "connection refused");
        assert!(cause.source().is_none());
    }

    #[test]
    fn an_outage_without_a_cause_ends_the_chain() {
        let e = StoreError::Unavailable("switched off".into());
        let outage = e.source().expect("the outage");
        assert_eq!(outage.to_string(), "switched off");
        assert!(outage.source().is_none());
    }
}
