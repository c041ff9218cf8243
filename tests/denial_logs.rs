//! A flood of denials is counted in full but logged at a bounded rate: each logged line
//! says how many were left out before it.

use keygate::server::App;
use keygate_test_support as support;
use keygate_test_support::logs::{capture_logs, logs};
use keygate_test_support::{config, secrets, Backend, Outcome};

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
    let logs = logs();
    // The text lines at INFO (the ones left out are at DEBUG).
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(" INFO ") && l.contains("request denied"))
        .collect();
    // Ten a second, over the seconds the flood touched (the first and last may be partial).
    assert!(!lines.is_empty(), "denials are logged");
    assert!(
        lines.len() as u64 <= 10 * (seconds + 1),
        "{} lines for {FLOOD} denials in at most {seconds} s",
        lines.len()
    );
}
