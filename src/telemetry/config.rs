//! The settings telemetry consumes, with their validation: `logging` (how log lines are
//! shaped) and `traces` (OpenTelemetry traces over OTLP: off unless an endpoint is
//! configured here or in `OTEL_EXPORTER_OTLP_ENDPOINT`; off, nothing is created or
//! exported per request). `config` places them in the file; they know nothing of it.

use serde::Deserialize;

use crate::settings::{within, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// A tracing filter: `info`, `debug`, `keygate=trace,info`, …
    pub level: String,
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracesConfig {
    /// The OTLP/gRPC collector, e.g. `http://otel-collector:4317`. When left out,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is used if set.
    pub otlp_endpoint: Option<String>,
    /// `service.name` on every span.
    pub service_name: String,
    /// The share of checks traced that arrive without a sampled parent (0.0 to 1.0); a
    /// parent's decision (`traceparent`) is always followed.
    pub sample_ratio: f64,
}

impl Default for TracesConfig {
    fn default() -> Self {
        TracesConfig {
            otlp_endpoint: None,
            service_name: "keygate".into(),
            sample_ratio: 1.0,
        }
    }
}

impl TracesConfig {
    /// The endpoint traces go to, if any: this section's, else the environment's.
    pub fn endpoint(&self, env: impl Fn(&str) -> Option<String>) -> Option<String> {
        self.otlp_endpoint
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .filter(|e| !e.trim().is_empty())
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(e) = &self.otlp_endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(ConfigError::new(
                    "traces.otlp_endpoint",
                    "must be an http:// or https:// URL (OTLP over gRPC)",
                ));
            }
        }
        within(
            "traces.sample_ratio",
            self.sample_ratio,
            0.0..=1.0,
            "must be 0.0 to 1.0",
        )?;
        if self.service_name.trim().is_empty() {
            return Err(ConfigError::new("traces.service_name", "must not be empty"));
        }
        Ok(())
    }
}
