//! keygate's own log lines in Envoy's log. Inside Envoy nothing else would show keygate's
//! `tracing` events (the revocation follower losing or finding its Watch stream, a
//! flushed cache, an unreadable event): each becomes one line of Envoy's log, at its
//! level, under Envoy's `dynamic_modules` component, which Envoy's own `-l` /
//! `--component-log-level` filter. `RUST_LOG` in Envoy's environment narrows what the
//! module hands Envoy (default: `info`).

use std::io::Write;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Where a line goes: Envoy's log, at a level.
pub type Sink = fn(Level, &str);

/// Installs the module's subscriber, once per process; a subscriber already there (a
/// host that set one) is left as it is.
pub fn install(sink: Sink) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.is_empty())
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(EnvoyLog(sink))
        // Envoy puts its own time and level in front of every line.
        .without_time()
        .with_level(false)
        .with_ansi(false)
        .try_init();
}

struct EnvoyLog(Sink);

/// One event's text, handed to the sink whole when the formatter is done with it.
pub struct Line {
    level: Level,
    text: Vec<u8>,
    sink: Sink,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.text);
        let text = text.trim_end();
        if !text.is_empty() {
            (self.sink)(self.level, text);
        }
    }
}

impl<'a> MakeWriter<'a> for EnvoyLog {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        self.line(Level::INFO)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        self.line(*meta.level())
    }
}

impl EnvoyLog {
    fn line(&self, level: Level) -> Line {
        Line {
            level,
            text: Vec::new(),
            sink: self.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    static LINES: Mutex<Vec<(Level, String)>> = Mutex::new(Vec::new());

    fn keep(level: Level, text: &str) {
        LINES.lock().unwrap().push((level, text.to_owned()));
    }

    #[test]
    fn each_event_is_one_line_at_its_level() {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(EnvoyLog(keep))
            .without_time()
            .with_level(false)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                event = "revocation.stream_lost",
                "lost the revocation stream"
            );
            tracing::info!("following\nthe stream");
        });
        let lines = LINES.lock().unwrap();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0].0, Level::WARN);
        assert!(
            lines[0].1.contains("lost the revocation stream"),
            "{lines:?}"
        );
        assert!(lines[0].1.contains("revocation.stream_lost"), "{lines:?}");
        assert!(!lines[0].1.ends_with('\n'));
        assert_eq!(lines[1].0, Level::INFO);
    }
}
