//! A flood of denials is counted in full but logged at a bounded rate: each logged line
//! says how many were left out before it.

mod support;

use std::sync::{Mutex, OnceLock};

use keygate::server::App;
use support::{config, secrets, Backend, Outcome};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(|| Capture)
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            )
            .init();
    });
}

fn denials_counted() -> u64 {
    let text = keygate::telemetry::render();
    text.lines()
        .find(|l| l.starts_with("keygate_decisions_total{result=\"missing_credentials\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |n| n.parse().expect("a count"))
}

#[tokio::test]
async fn a_flood_of_denials_is_counted_in_full_and_logged_at_a_bounded_rate() {
    capture_logs();
    let app = App::build(config(Backend::Memory), secrets()).unwrap();
    let envoy = app.envoy_service();
    let before = denials_counted();
    const FLOOD: u64 = 2_000;
    let started = std::time::Instant::now();
    for _ in 0..FLOOD {
        let denied =
            support::outcome_of(&envoy, support::check_request("GET", "/v1/contacts/1", &[])).await;
        assert_eq!(denied, Outcome::denied("missing_credentials", 401));
    }
    let seconds = started.elapsed().as_secs() + 1;
    assert_eq!(denials_counted() - before, FLOOD, "every denial is counted");
    let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("request denied"))
        .collect();
    // Ten a second, over the seconds the flood touched (the first and last may be partial).
    assert!(!lines.is_empty(), "denials are logged");
    assert!(
        lines.len() as u64 <= 10 * (seconds + 1),
        "{} lines for {FLOOD} denials in at most {seconds} s",
        lines.len()
    );
}
