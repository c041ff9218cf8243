//! Every log line and span of a test binary, at TRACE, in the text and the JSON format,
//! in one buffer: for tests of what is logged (and what never is).

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Appends to `LOGS`.
struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber once for the whole test binary (every thread,
/// including the blocking pool and the servers' tasks, logs into it).
pub fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_span_events(FmtSpan::NEW | FmtSpan::CLOSE)
                    .with_writer(|| Capture)
                    .with_filter(tracing_subscriber::filter::LevelFilter::TRACE),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(|| Capture)
                    .with_filter(tracing_subscriber::filter::LevelFilter::TRACE),
            )
            .try_init()
            .expect("no other subscriber in this test binary");
    });
}

/// What was logged so far.
pub fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}
