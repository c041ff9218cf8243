//! Logging, traces and metrics. Metric names and labels are chosen so that no label can
//! carry a secret or an unbounded value: decisions are labelled by result code, never by
//! key. Traces (OpenTelemetry over OTLP) exist only when an endpoint is configured; then
//! each check is a span parented on the request's `traceparent`, with its stage timings as
//! attributes and never a credential. Without one, no span is created on the request path.
//!
//! Its settings (`logging`, `traces`) are its own, in `config.rs`. Everything records
//! metrics, so this module sits near the bottom: it names only `clock`, `settings` and
//! the deny codes of `decision`, never a module that records.

mod config;
mod error_chain;
mod failures;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub use config::{LogFormat, LoggingConfig, TracesConfig};
pub use error_chain::ErrorChain;
pub(crate) use failures::Failures;

pub struct Metrics {
    pub registry: Registry,
    pub decisions: IntCounterVec,
    /// `decisions` resolved per result once, so the hot path does no label lookup.
    decisions_by_label: Vec<(&'static str, IntCounter)>,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub check_duration: Histogram,
    pub cache: IntCounterVec,
    pub argon2_verifications: IntCounter,
    pub bad_secrets: IntCounter,
    pub store_errors: IntCounter,
    pub keys_created: IntCounter,
    pub keys_revoked: IntCounter,
    pub cache_entries: IntGauge,
    pub revocation_events: IntCounter,
    pub revocation_lag: Histogram,
    pub revocation_reconnects: IntCounter,
    pub revocation_flushes: IntCounter,
    pub revocation_connected: IntGauge,
    pub watch_streams: IntGauge,
    pub jwks_fetches: IntCounterVec,
    pub jwks_keys_skipped: IntCounterVec,
    pub jwt_validations: IntCounterVec,
    pub jwks_fetched_at: prometheus::IntGaugeVec,
    pub argon2_queue_full: IntCounter,
    pub argon2_refused: IntCounter,
    pub revocation_unreadable: IntCounter,
    pub jwt_revocations: IntGauge,
    pub rate_limit_decisions: IntCounterVec,
    pub rate_limit_reservations: IntCounter,
    pub rate_limit_returned: IntCounter,
    pub rate_limit_store_errors: IntCounter,
    pub lease_operations: IntCounterVec,
    pub tls_reloads: IntCounterVec,
    pub config_reloads: IntCounterVec,
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let registry = Registry::new_custom(Some("keygate".into()), None).expect("valid prefix");
        let decisions = counter_vec("decisions_total", "Check decisions by result: allow, a deny code, or unavailable.", &["result"]);
        let check_duration = Histogram::with_opts(
            HistogramOpts::new("check_duration_seconds", "Time to decide one Check.").buckets(
                vec![
                    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01,
                    0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                ],
            ),
        )
        .expect("valid metric");
        let cache = counter_vec("credential_cache_requests_total", "Verified-credential cache lookups by result.", &["result"]);
        let argon2_verifications = counter("argon2_verifications_total", "argon2id verifications run (cache misses that reached a stored key).");
        let bad_secrets = counter("api_key_wrong_secret_total", "Verifications of a known key id with a wrong secret.");
        let store_errors =
            counter("store_errors_total", "Store (Redis) calls that failed.");
        let keys_created =
            counter("keys_created_total", "API keys created.");
        let keys_revoked =
            counter("keys_revoked_total", "API keys revoked.");
        let cache_entries = IntGauge::new(
            "credential_cache_entries",
            "Entries in the verified-credential cache.",
        )
        .expect("valid metric");
        let revocation_events = counter("revocation_events_applied_total", "Revocation events applied to this replica's cache.");
        let revocation_lag = Histogram::with_opts(
            HistogramOpts::new(
                "revocation_lag_seconds",
                "Time from a revocation being written to this replica applying it.",
            )
            .buckets(vec![
                0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
            ]),
        )
        .expect("valid metric");
        let revocation_reconnects = counter("revocation_stream_reconnects_total", "Times the revocation stream was lost and reconnected.");
        let revocation_flushes = counter("revocation_cache_flushes_total", "Whole-cache flushes because revocation events were lost.");
        let revocation_connected = IntGauge::new(
            "revocation_stream_connected",
            "1 while this replica follows the revocation stream, 0 otherwise.",
        )
        .expect("valid metric");
        let watch_streams = IntGauge::new(
            "watch_streams",
            "Open keygate.v1.Revocations/Watch streams.",
        )
        .expect("valid metric");
        let argon2_queue_full = counter("argon2_queue_full_total", "Cold-key verifications answered UNAVAILABLE because the argon2 queue was full.");
        let argon2_refused = counter("api_key_verifications_refused_total", "Unverified tokens denied without argon2: their key id had too many failed verifications in the window.");
        let revocation_unreadable = counter("revocation_events_unreadable_total", "Revocation stream entries this version could not read that named a key, which was dropped (one without a readable key id flushes the cache and counts as a flush).");
        let jwks_fetches = counter_vec("jwks_fetches_total", "JWKS fetches by issuer (its configured name) and result (ok, error).", &["issuer", "result"]);
        let jwks_keys_skipped = counter_vec("jwks_keys_skipped_total", "JWKS keys skipped because they cannot be used (the set's other keys are kept), by issuer (its configured name), counted at every read of the set.", &["issuer"]);
        let jwt_validations = counter_vec("jwt_validations_total", "JWT validations (cache misses) by issuer (its configured name, or unknown) and result (valid, invalid).", &["issuer", "result"]);
        let jwks_fetched_at = prometheus::IntGaugeVec::new(
            Opts::new(
                "jwks_last_success_timestamp_seconds",
                "Unix time of each JWKS URL's last successful fetch, by issuer (age: time() minus this).",
            ),
            &["issuer"],
        )
        .expect("valid metric");
        let jwt_revocations = IntGauge::new(
            "jwt_revocations",
            "JWT revocations (by jti or subject) this replica holds and checks every JWT against.",
        )
        .expect("valid metric");
        let rate_limit_decisions = counter_vec("rate_limit_decisions_total", "Rate-limited requests by plan (its configured name) and result (admitted, limited).", &["plan", "result"]);
        let rate_limit_reservations = counter("rate_limit_reservations_total", "Budgets of admissions reserved from the store (one store call each).");
        let rate_limit_returned = counter("rate_limit_budget_returned_total", "Reserved admissions given back unspent.");
        let rate_limit_store_errors = counter("rate_limit_store_errors_total", "Limit checks the store could not answer (answered as rate_limits.on_store_error says).");
        let lease_operations = counter_vec("lease_operations_total", "Concurrent-session lease operations by result (acquired, refused, renewed, released).", &["result"]);
        let tls_reloads = counter_vec("tls_reloads_total", "Re-reads of a listener's TLS files after they changed, by listener (its configuration field) and result (ok; error: the last good certificate and client CA are kept).", &["listener", "result"]);
        let config_reloads = counter_vec("config_reloads_total", "Reloads of the configuration file (on change or SIGHUP) by result: applied; unchanged; invalid (the file does not load: the running rules are kept); refused (it changes a setting that needs a restart: the running rules are kept).", &["result"]);
        for c in [
            Box::new(decisions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(config_reloads.clone()),
            Box::new(check_duration.clone()),
            Box::new(cache.clone()),
            Box::new(argon2_verifications.clone()),
            Box::new(bad_secrets.clone()),
            Box::new(store_errors.clone()),
            Box::new(keys_created.clone()),
            Box::new(keys_revoked.clone()),
            Box::new(cache_entries.clone()),
            Box::new(revocation_events.clone()),
            Box::new(revocation_lag.clone()),
            Box::new(revocation_reconnects.clone()),
            Box::new(revocation_flushes.clone()),
            Box::new(revocation_connected.clone()),
            Box::new(watch_streams.clone()),
            Box::new(jwks_fetches.clone()),
            Box::new(jwks_keys_skipped.clone()),
            Box::new(jwt_validations.clone()),
            Box::new(jwks_fetched_at.clone()),
            Box::new(argon2_queue_full.clone()),
            Box::new(argon2_refused.clone()),
            Box::new(revocation_unreadable.clone()),
            Box::new(jwt_revocations.clone()),
            Box::new(rate_limit_decisions.clone()),
            Box::new(rate_limit_reservations.clone()),
            Box::new(rate_limit_returned.clone()),
            Box::new(rate_limit_store_errors.clone()),
            Box::new(lease_operations.clone()),
            Box::new(tls_reloads.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        let decisions_by_label = ["allow", "unavailable"]
            .into_iter()
            .chain(crate::decision::DenyReason::ALL.iter().map(|r| r.code()))
            .map(|label| (label, decisions.with_label_values(&[label])))
            .collect();
        let cache_hits = cache.with_label_values(&["hit"]);
        let cache_misses = cache.with_label_values(&["miss"]);
        Metrics {
            registry,
            decisions,
            decisions_by_label,
            cache_hits,
            cache_misses,
            check_duration,
            cache,
            argon2_verifications,
            bad_secrets,
            store_errors,
            keys_created,
            keys_revoked,
            cache_entries,
            revocation_events,
            revocation_lag,
            revocation_reconnects,
            revocation_flushes,
            revocation_connected,
            watch_streams,
            jwks_fetches,
            jwks_keys_skipped,
            jwt_validations,
            jwks_fetched_at,
            argon2_queue_full,
            argon2_refused,
            revocation_unreadable,
            jwt_revocations,
            rate_limit_decisions,
            rate_limit_reservations,
            rate_limit_returned,
            rate_limit_store_errors,
            lease_operations,
            tls_reloads,
            config_reloads,
        }
    })
}

impl Metrics {
    /// Counts one decision under its label (`Decision::label`).
    pub fn count_decision(&self, label: &'static str) {
        match self.decisions_by_label.iter().find(|(l, _)| *l == label) {
            Some((_, counter)) => counter.inc(),
            None => self.decisions.with_label_values(&[label]).inc(),
        }
    }
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&metrics().registry.gather(), &mut buf)
        .expect("text encoding cannot fail");
    String::from_utf8(buf).expect("prometheus text is UTF-8")
}

/// Installs the global tracing subscriber (logs to stderr). `RUST_LOG` wins over the
/// configured level when set.
pub fn init_logging(cfg: &LoggingConfig, traces: &TracesConfig) -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => f,
        _ => cfg.level.clone(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| format!("invalid configuration: logging.level: {e}"))?;
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = match cfg.format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let otel = traces
        .endpoint(|var| std::env::var(var).ok())
        .map(|endpoint| otel_layer(traces, &endpoint))
        .transpose()?;
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .map_err(|e| e.to_string())
}

/// Whether checks are traced (an OTLP endpoint is configured).
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

static TRACING: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();

/// The layer that turns keygate's spans into OpenTelemetry spans sent to `endpoint` in
/// batches. Only keygate's own spans are exported, whatever `logging.level` says.
fn otel_layer<S>(
    traces: &TracesConfig,
    endpoint: &str,
) -> Result<impl tracing_subscriber::Layer<S>, String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::Sampler;
    use tracing_subscriber::Layer;

    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("invalid configuration: traces.otlp_endpoint: {e}"))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            traces.sample_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(traces.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("keygate");
    let _ = PROVIDER.set(provider);
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    TRACING.store(true, Ordering::Relaxed);
    let only_keygate =
        tracing_subscriber::filter::Targets::new().with_target("keygate", tracing::Level::INFO);
    Ok(tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(only_keygate))
}

/// Sends the spans not yet exported (at exit).
pub fn flush_traces() {
    if let Some(p) = PROVIDER.get() {
        if let Err(e) = p.shutdown() {
            tracing::warn!(event = "traces.export_failed", error = %e, "traces could not all be exported at exit");
        }
    }
}

/// The span of one check, parented on the request's trace context (`traceparent`,
/// `tracestate` in `headers`), or a disabled span when checks are not traced. `api` says
/// which adapter asked (`envoy`, `keygate.v1`). Its fields are filled in by the stages
/// and the adapter; the trace id is one of them, so JSON log lines written inside it
/// carry it.
pub fn check_span(
    headers: &std::collections::HashMap<String, String>,
    api: &'static str,
) -> tracing::Span {
    if !tracing_enabled() {
        return tracing::Span::none();
    }
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    struct Headers<'a>(&'a std::collections::HashMap<String, String>);
    impl opentelemetry::propagation::Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).map(String::as_str)
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(String::as_str).collect()
        }
    }
    let span = tracing::info_span!(
        "ext_authz.check",
        otel.kind = "server",
        keygate.api = api,
        trace_id = tracing::field::Empty,
        keygate.decision = tracing::field::Empty,
        keygate.route = tracing::field::Empty,
        keygate.authn_us = tracing::field::Empty,
        keygate.authorize_us = tracing::field::Empty,
        keygate.check_us = tracing::field::Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    let _ = span.set_parent(parent);
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
    span
}

/// The trace-context headers a traced check reads.
pub const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// A bound on the log lines of one kind of per-request event (denials, undecidable
/// requests): a flood of bad credentials or requests over a limit must not turn into a
/// flood of log lines. At most `per_second` lines each second; the rest are counted and
/// the next line logged says how many were left out. Metrics count every one.
pub struct LogBudget {
    per_second: u32,
    /// The current second (high 32 bits) and the lines logged in it (low 32 bits).
    window: std::sync::atomic::AtomicU64,
    left_out: std::sync::atomic::AtomicU64,
}

impl LogBudget {
    pub const fn new(per_second: u32) -> Self {
        LogBudget {
            per_second,
            window: std::sync::atomic::AtomicU64::new(0),
            left_out: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log this one, and say that `n` were left out before it; `None`: leave it
    /// out.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(crate::clock::now_ms() / 1000)
    }

    fn admit_at(&self, second: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let second = second & 0xffff_ffff;
        let mut current = self.window.load(Relaxed);
        loop {
            let next = if current >> 32 == second {
                if current & 0xffff_ffff >= u64::from(self.per_second) {
                    self.left_out.fetch_add(1, Relaxed);
                    return None;
                }
                current + 1
            } else {
                (second << 32) | 1
            };
            match self
                .window
                .compare_exchange_weak(current, next, Relaxed, Relaxed)
            {
                Ok(_) => return Some(self.left_out.swap(0, Relaxed)),
                Err(seen) => current = seen,
            }
        }
    }
}

#[cfg(test)]
mod log_budget_tests {
    use super::LogBudget;

    #[test]
    fn a_budget_logs_at_most_its_lines_a_second_and_says_how_many_it_left_out() {
        let budget = LogBudget::new(3);
        let first: Vec<_> = (0..10).map(|_| budget.admit_at(100)).collect();
        assert_eq!(first[..3], [Some(0), Some(0), Some(0)]);
        assert!(first[3..].iter().all(Option::is_none), "{first:?}");
        // The next second: the first line tells of the seven left out.
        assert_eq!(budget.admit_at(101), Some(7));
        assert_eq!(budget.admit_at(101), Some(0));
        // A second with nothing left out says nothing left out.
        assert_eq!(budget.admit_at(205), Some(0));
    }
}
