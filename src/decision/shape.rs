//! The deployment's error answers (`errors`), compiled once at startup: for each public
//! code its status, message and JSON body, rendered from the configured template. A
//! denial formats nothing at request time and so can echo nothing from the request.

use std::sync::Arc;

use serde_yaml_ng::Value;

use super::{Denial, DenyReason, ErrorsConfig};
use crate::request::PathError;
use crate::settings::{within, ConfigError};

/// What a client is shown for one denial: every part fixed at startup, so a denial
/// formats nothing and can echo nothing from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicError {
    /// The code shown: keygate's own, the one `errors.codes.<code>.code` names instead, or
    /// `unauthorized` for every authentication failure when opaque.
    pub code: String,
    pub message: Arc<str>,
    pub status: u16,
    /// The whole JSON body.
    pub body: Arc<str>,
}

/// The deployment's error answers (`errors`), compiled once: for each public code its
/// status, message and body.
#[derive(Debug, Clone)]
pub struct ErrorShape {
    answers: Vec<PublicError>,
    /// `invalid_path`'s answer for each `PathError`, its message naming what was refused
    /// (unless the deployment set `invalid_path`'s message).
    path_answers: Vec<PublicError>,
    www_authenticate: Option<Arc<str>>,
}

/// The code every authentication failure shows with `errors.opaque`.
pub const OPAQUE_CODE: &str = "unauthorized";

const PLACEHOLDERS: [&str; 3] = ["code", "message", "status"];

impl ErrorShape {
    /// The answer to `reason`.
    pub fn answer(&self, reason: DenyReason) -> &PublicError {
        &self.answers[reason.index()]
    }

    /// The answer to a denial: its reason's, or for a refused path the one naming what
    /// was refused.
    pub fn answer_to(&self, denial: &Denial) -> &PublicError {
        match denial.path {
            Some(refused) if denial.reason == DenyReason::InvalidPath => {
                &self.path_answers[refused.index()]
            }
            _ => self.answer(denial.reason),
        }
    }

    /// The `www-authenticate` value for a 401, if one is sent.
    pub fn www_authenticate(&self, error: &PublicError) -> Option<&str> {
        (error.status == 401)
            .then_some(self.www_authenticate.as_deref())
            .flatten()
    }

    /// Compiles `errors`; any mistake names its field.
    pub fn compile(cfg: &ErrorsConfig) -> Result<ErrorShape, ConfigError> {
        let template = match &cfg.body {
            Value::String(text) => serde_yaml_ng::from_str(text)
                .map_err(|e| ConfigError::new("errors.body", format!("not JSON: {e}")))?,
            other => other.clone(),
        };
        if !matches!(template, Value::Mapping(_)) {
            return Err(ConfigError::new("errors.body", "must be a JSON object"));
        }
        check_placeholders(&template)?;
        for (code, over) in &cfg.codes {
            let field = |f: &str| format!("errors.codes.{code}{f}");
            let reason = DenyReason::from_code(code).ok_or_else(|| {
                let known: Vec<_> = DenyReason::ALL.iter().map(|r| r.code()).collect();
                ConfigError::new(
                    field(""),
                    format!("not a public error code; one of {}", known.join(", ")),
                )
            })?;
            if let Some(public) = &over.code {
                if !is_public_code(public) {
                    return Err(ConfigError::new(
                        field(".code"),
                        "must be 1 to 64 of [a-z0-9_.-] (the code the client is shown)",
                    ));
                }
            }
            if let Some(status) = over.status {
                within(
                    field(".status"),
                    status,
                    400..=499,
                    "must be a 4xx status (a backend failure is never a denial)",
                )?;
            }
            if let Some(m) = &over.message {
                if m.trim().is_empty() || m.len() > 1024 {
                    return Err(ConfigError::new(
                        field(".message"),
                        "must be 1 to 1024 bytes",
                    ));
                }
            }
            if cfg.opaque && reason.is_unauthenticated() {
                return Err(ConfigError::new(
                    field(""),
                    "has no effect with errors.opaque: every authentication failure \
                     answers with errors.opaque_message",
                ));
            }
        }
        if cfg.opaque_message.trim().is_empty() || cfg.opaque_message.len() > 1024 {
            return Err(ConfigError::new(
                "errors.opaque_message",
                "must be 1 to 1024 bytes",
            ));
        }
        if cfg
            .www_authenticate
            .bytes()
            .any(|b| !(b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b)))
        {
            return Err(ConfigError::new(
                "errors.www_authenticate",
                "is not a valid header value",
            ));
        }
        let public = |code: String, message: String, status: u16| {
            let body = render(&template, &code, &message, status);
            let body = serde_json::to_string(&body).map_err(|e| {
                ConfigError::new("errors.body", format!("cannot be written as JSON: {e}"))
            })?;
            Ok::<_, ConfigError>(PublicError {
                code,
                message: message.into(),
                status,
                body: body.into(),
            })
        };
        let answers = DenyReason::ALL
            .into_iter()
            .map(|reason| {
                let over = cfg.codes.get(reason.code()).cloned().unwrap_or_default();
                if cfg.opaque && reason.is_unauthenticated() {
                    return public(OPAQUE_CODE.to_owned(), cfg.opaque_message.clone(), 401);
                }
                public(
                    over.code.unwrap_or_else(|| reason.code().to_owned()),
                    over.message.unwrap_or_else(|| reason.message().to_owned()),
                    over.status.unwrap_or(reason.http_status()),
                )
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let invalid_path = &answers[DenyReason::InvalidPath.index()];
        let own_message = cfg
            .codes
            .get(DenyReason::InvalidPath.code())
            .is_some_and(|o| o.message.is_some());
        let path_answers = PathError::ALL
            .into_iter()
            .map(|refused| {
                if own_message {
                    return Ok(invalid_path.clone());
                }
                // Fixed per reason, no request data: "… safely: the path holds a backslash."
                let base = DenyReason::InvalidPath.message().trim_end_matches('.');
                let message = format!("{base}: {refused}.");
                public(invalid_path.code.clone(), message, invalid_path.status)
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(ErrorShape {
            answers,
            path_answers,
            www_authenticate: (!cfg.www_authenticate.is_empty())
                .then(|| cfg.www_authenticate.as_str().into()),
        })
    }
}

/// A code a client may be shown: 1 to 64 of `[a-z0-9_.-]`, so that it needs no escaping
/// in a body, a header or a log line.
fn is_public_code(code: &str) -> bool {
    (1..=64).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

impl Default for ErrorShape {
    fn default() -> Self {
        ErrorShape::compile(&ErrorsConfig::default()).expect("the default shape compiles")
    }
}

/// Refuses a `{name}` in a string of the template that is not a placeholder: a typo would
/// otherwise reach every client verbatim.
fn check_placeholders(v: &Value) -> Result<(), ConfigError> {
    match v {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(open) = rest.find('{') {
                let after = &rest[open + 1..];
                if let Some(close) = after.find('}') {
                    let name = &after[..close];
                    let looks_like_one = !name.is_empty()
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                    if looks_like_one && !PLACEHOLDERS.contains(&name) {
                        return Err(ConfigError::new(
                            "errors.body",
                            format!("unknown placeholder {{{name}}}; use {{code}}, {{message}} or {{status}}"),
                        ));
                    }
                }
                rest = after;
            }
            Ok(())
        }
        Value::Mapping(m) => {
            for (k, v) in m {
                if !k.is_string() {
                    return Err(ConfigError::new(
                        "errors.body",
                        "object keys must be strings",
                    ));
                }
                check_placeholders(v)?;
            }
            Ok(())
        }
        Value::Sequence(items) => items.iter().try_for_each(check_placeholders),
        Value::Tagged(_) => Err(ConfigError::new("errors.body", "YAML tags are not JSON")),
        _ => Ok(()),
    }
}

/// The template with its placeholders filled: a string that is exactly `{status}` becomes
/// the number.
fn render(v: &Value, code: &str, message: &str, status: u16) -> Value {
    match v {
        Value::String(s) if s == "{status}" => Value::Number(status.into()),
        Value::String(s) => Value::String(
            s.replace("{code}", code)
                .replace("{message}", message)
                .replace("{status}", &status.to_string()),
        ),
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .map(|(k, v)| (k.clone(), render(v, code, message, status)))
                .collect(),
        ),
        Value::Sequence(items) => Value::Sequence(
            items
                .iter()
                .map(|v| render(v, code, message, status))
                .collect(),
        ),
        other => other.clone(),
    }
}
