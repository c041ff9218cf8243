//! Redis's failures as the store reports them, in one place: `outage` builds every
//! `StoreError::Unavailable` the Redis store returns and counts it in
//! `keygate_store_errors_total`, and `RedisFailure` is all that is told of a
//! `redis::RedisError`.
//!
//! Why a redis error is not passed on as it is: its text can carry what was sent or
//! answered. A type error quotes the reply (a key record, with its secret's hash), a
//! script error quotes the script's arguments, a URL that does not parse is quoted with
//! its password. So only the kind of failure is kept (connection refused, timed out,
//! cluster down, …) with Redis's own error code, never a message or a value.

use std::error::Error;
use std::time::Duration;

use crate::store::StoreError;

/// Why a Redis call failed, as far as it may be told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisFailure {
    /// The connection failed: in the words of `std::io::ErrorKind` ("connection
    /// refused", "connection reset", "timed out", …).
    #[error("{0}")]
    Io(std::io::ErrorKind),
    /// Redis (or the client) refused the call: the category of the error, and the code
    /// Redis answered with where it is one (`ERR`, `CLUSTERDOWN`, `NOPERM`, `OOM`, …).
    #[error("{category}{}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Refused {
        category: String,
        code: Option<String>,
    },
    /// No answer within the store's timeout (or the call's own bound).
    #[error("timed out: no answer within {0:?}")]
    TimedOut(Duration),
    /// Not sent: Redis refused a connection and no probe has reached it since
    /// (`health.rs`).
    #[error("marked down (Redis refused a connection); calls fail at once until a probe reaches it again")]
    MarkedDown,
}

impl From<&redis::RedisError> for RedisFailure {
    fn from(e: &redis::RedisError) -> Self {
        if let Some(io) = e.source().and_then(|s| s.downcast_ref::<std::io::Error>()) {
            return RedisFailure::Io(io.kind());
        }
        RedisFailure::Refused {
            // A fixed phrase per kind, never the error's detail.
            category: e.category().to_owned(),
            code: e.code().filter(|c| is_error_code(c)).map(str::to_owned),
        }
    }
}

/// Whether `code` looks like one of Redis's error codes (a short word in capitals), not
/// the start of a free-form message: an error that is not Redis's own (a module's, a
/// script's) may begin with anything.
fn is_error_code(code: &str) -> bool {
    (1..=24).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// The store could not do `what` because of `cause`: counted in
/// `keygate_store_errors_total`, whatever the cause (an error from Redis or the client, a
/// timeout, the store marked down, too few replicas, a client that cannot be built).
pub(super) fn outage(
    what: &'static str,
    cause: impl Into<Box<dyn Error + Send + Sync>>,
) -> StoreError {
    crate::telemetry::metrics().store_errors.inc();
    StoreError::unavailable(what, cause)
}

/// `outage`, of a redis error: told by its kind only.
pub(super) fn redis_outage(what: &'static str, e: &redis::RedisError) -> StoreError {
    outage(what, RedisFailure::from(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::ErrorChain;
    use redis::ErrorKind;

    const SECRET: &str = "hunter2-argon2id$v=19$m=19456";

    fn told(e: redis::RedisError) -> String {
        ErrorChain(&redis_outage("reading a key record", &e)).to_string()
    }

    #[test]
    fn a_reply_quoted_in_a_type_error_is_not_told() {
        let e = redis::RedisError::from((
            ErrorKind::TypeError,
            "Response was of incompatible type",
            format!("(response was bulk-string(\"{SECRET}\"))"),
        ));
        assert!(
            e.to_string().contains(SECRET),
            "the premise: redis quotes it"
        );
        let told = told(e);
        assert!(!told.contains(SECRET), "{told}");
        assert_eq!(told, "store unavailable: reading a key record: type error");
    }

    #[test]
    fn a_part_of_a_url_quoted_in_a_client_error_is_not_told() {
        let e = "redis://:pw@localhost/0?protocol=hunter2"
            .parse::<redis::ConnectionInfo>()
            .expect_err("no such protocol");
        assert!(
            e.to_string().contains("hunter2"),
            "the premise: redis quotes it"
        );
        let told = told(e);
        assert!(!told.contains("hunter2"), "{told}");
        assert!(told.contains("invalid client config"), "{told}");
    }

    #[test]
    fn a_server_error_is_told_by_its_code_not_its_message() {
        let e = redis::RedisError::from((
            ErrorKind::ResponseError,
            "An error was signalled by the server",
            format!(
                "user_script:1: Script attempted to access nonexistent global variable '{SECRET}'"
            ),
        ));
        let told = told(e);
        assert!(!told.contains(SECRET), "{told}");
        assert_eq!(
            told,
            "store unavailable: reading a key record: response error (ERR)"
        );
    }

    #[test]
    fn an_io_error_is_told_by_its_kind_not_its_message() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, SECRET);
        let told = told(redis::RedisError::from(refused));
        assert!(!told.contains(SECRET), "{told}");
        assert_eq!(
            told,
            "store unavailable: reading a key record: connection refused"
        );
    }

    #[test]
    fn only_a_word_in_capitals_is_taken_for_an_error_code() {
        assert!(is_error_code("CLUSTERDOWN"));
        assert!(is_error_code("NOPERM"));
        assert!(!is_error_code("hunter2"));
        assert!(!is_error_code("ERR value is hunter2"));
        assert!(!is_error_code(""));
    }

    #[test]
    fn every_outage_is_counted() {
        let before = crate::telemetry::metrics().store_errors.get();
        let _ = outage(
            "connecting to Redis",
            RedisFailure::TimedOut(Duration::from_millis(300)),
        );
        let _ = redis_outage(
            "building the Redis client",
            &redis::RedisError::from((ErrorKind::InvalidClientConfig, "bad")),
        );
        assert!(crate::telemetry::metrics().store_errors.get() >= before + 2);
    }
}
