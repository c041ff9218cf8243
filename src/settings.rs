//! What every settings section shares, below all of them: `ConfigError`, which names
//! the field at fault, and the forms fields are written in (durations, header names).
//! Each section's type lives in the module that consumes it, beside its validation;
//! `config` reads the file and assembles the sections. This module names no other keygate
//! module, so any of them may use it.
//!
//! Durations are read by the few lines of `duration` rather than `humantime-serde`, whose
//! error drops humantime's reason (`unknown time unit "x"`) and our examples, and which
//! does not trim; `parse_duration` would stay for the command line anyway.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An error naming `field` unless `value` lies in `range`; `message` says what it must be.
pub fn within<T: PartialOrd>(
    field: impl Into<String>,
    value: T,
    range: std::ops::RangeInclusive<T>,
    message: impl Into<String>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::new(field, message))
    }
}

pub(crate) fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(':')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Parses `90d`, `500ms`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (e.g. 500ms, 60s, 90d)"))
}

pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// `duration` for a field that may be left out.
pub(crate) fn optional_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}
