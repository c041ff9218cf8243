//! The wall clock keygate reads: unix milliseconds. Below every other module (telemetry
//! and the store included), so it names none of them; the store re-exports it as
//! `store::now_ms`, where most callers know it from.

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
