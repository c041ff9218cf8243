//! `errors`: how a denial looks to the client — per code its HTTP status and message, the
//! body as a JSON template, and whether authentication failures are told apart.
//! Compiled once into a `decision::ErrorShape`; validation is that compilation. The
//! decision's own setting: `config` places it in the file, and it knows nothing of that.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::decision::ErrorShape;
use crate::settings::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorsConfig {
    /// Every authentication failure answers alike (401 `unauthorized`, `opaque_message`),
    /// so a client cannot tell an unknown key from a revoked or expired one.
    pub opaque: bool,
    pub opaque_message: String,
    /// The body of every denial: JSON (written as YAML, or as JSON text in a string) whose
    /// string values may hold `{code}`, `{message}` and `{status}`.
    pub body: Value,
    /// The `www-authenticate` value sent with 401s; empty sends none.
    pub www_authenticate: String,
    /// Per keygate error code: its status, message, and the code the client is shown.
    pub codes: BTreeMap<String, CodeConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeConfig {
    /// The code the client is shown instead of keygate's own (`{code}` in the body, the
    /// keygate.v1 denial): the one the API documents. Metrics and logs keep keygate's.
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub message: Option<String>,
}

/// keygate's own shape: `{"error":{"code":…,"message":…}}`.
pub const DEFAULT_BODY: &str = r#"{"error": {"code": "{code}", "message": "{message}"}}"#;

impl Default for ErrorsConfig {
    fn default() -> Self {
        ErrorsConfig {
            opaque: false,
            opaque_message: "The request could not be authenticated.".into(),
            body: serde_yaml_ng::from_str(DEFAULT_BODY).expect("the default body is YAML"),
            www_authenticate: "Bearer".into(),
            codes: BTreeMap::new(),
        }
    }
}

impl ErrorsConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        ErrorShape::compile(self).map(drop)
    }
}
