//! The ways of loading a target.
//!
//! - **Closed loop**: `concurrency` requests in flight, each sent as soon as the previous
//!   one of its slot came back. Measures the most the target can do.
//! - **Open loop**: requests are due at fixed intervals (`rate` per second) whatever the
//!   target does, and each latency is measured from when the request was *due*, not from
//!   when it left: a target that stalls is charged for every request it held up (no
//!   coordinated omission). A timerfd in the generator's reactor keeps the schedule
//!   (`timer.rs`); how late each request left is reported as `send_lag`, the instrument's
//!   own floor.
//! - **Burst**: a given number of requests, all sent at once (the single-flight test).
//!
//! Runs last `warmup` (not recorded) and then `duration`, or a fixed count, stop by
//! themselves, and count every outcome. A run whose outcomes are not what was expected is
//! marked invalid.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::client::{Connection, Outcome};
use crate::shape::{Ids, Template};
use crate::timer::Timer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// Every request must be allowed.
    Allow,
    /// Every request must be denied (and none may fail).
    Deny,
    /// Any decision is fine; errors are not.
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Closed {
        concurrency: usize,
    },
    Open {
        rate: f64,
    },
    /// `requests` sent all at once (over the plan's connections), each answer awaited.
    Burst {
        requests: usize,
    },
}

/// The shortest token a run can carry: the request template finds where the token goes
/// by a run of this many marker bytes, which a shorter run could match elsewhere too.
pub const MIN_TOKEN_LEN: usize = 8;

/// The tokens requests carry.
#[derive(Debug, Clone)]
pub struct Tokens {
    list: Arc<Vec<String>>,
    /// Each token is used once (cold keys); the run ends when they run out.
    once: bool,
}

impl Tokens {
    pub fn rotate(list: Vec<String>) -> Tokens {
        assert!(!list.is_empty(), "at least one token");
        Tokens {
            list: Arc::new(list),
            once: false,
        }
    }

    pub fn once(list: Vec<String>) -> Tokens {
        Tokens {
            list: Arc::new(list),
            once: true,
        }
    }

    /// The token of request number `seq`.
    pub fn get(&self, seq: u64) -> Option<&[u8]> {
        let n = self.list.len() as u64;
        if self.once && seq >= n {
            return None;
        }
        self.list
            .get((seq % n.max(1)) as usize)
            .map(String::as_bytes)
    }

    /// All tokens have the same length (the template's hole); `None` if empty.
    pub fn uniform_len(&self) -> anyhow::Result<usize> {
        let first = self.list.first().context("no tokens")?.len();
        anyhow::ensure!(
            first >= MIN_TOKEN_LEN,
            "a token of {first} bytes is too short: the generator needs at least \
             {MIN_TOKEN_LEN} (API keys and JWTs are longer)"
        );
        if let Some(t) = self.list.iter().find(|t| t.len() != first) {
            anyhow::bail!(
                "tokens differ in length ({} and {}); one run needs tokens of one shape",
                first,
                t.len()
            );
        }
        Ok(first)
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub label: String,
    pub target: SocketAddr,
    pub connections: usize,
    pub mode: Mode,
    pub warmup: Duration,
    pub duration: Duration,
    /// Stop after this many measured requests (closed loop).
    pub max_requests: Option<u64>,
    pub grpc_timeout: Option<Duration>,
    pub expect: Expect,
    /// Open loop: requests that may be outstanding before the run counts as overloaded.
    pub max_in_flight: usize,
    /// Whether the run may be repeated (false when it uses up single-use keys).
    pub repeatable: bool,
}

/// The interval between requests at `rate` per second, in whole nanoseconds: the
/// period the kernel's timer keeps.
pub fn period_of(rate: f64) -> Duration {
    Duration::from_nanos(((1e9 / rate).round() as u64).max(1))
}

/// When request `i` of an open-loop run is due, relative to the start: the timer's
/// `i`-th expiry, computed (not accumulated) so that it never drifts from it.
pub fn due_at(i: u64, period: Duration) -> Duration {
    Duration::from_nanos((period.as_nanos() as u64).saturating_mul(i))
}

/// How many requests an open-loop run of `span` at `rate` sends.
pub fn scheduled(span: Duration, rate: f64) -> u64 {
    (span.as_secs_f64() * rate).ceil() as u64
}

/// The latency percentiles of a run, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub label: String,
    pub target: String,
    pub mode: &'static str,
    /// Open loop: the scheduled rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    pub connections: usize,
    /// Closed loop: requests in flight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    pub seconds: f64,
    pub requests: u64,
    pub rps: f64,
    pub latency_us: Percentiles,
    /// Open loop: how late the generator sent requests (its own floor).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_lag_us: Option<Percentiles>,
    pub allow: u64,
    pub deny: u64,
    pub errors: u64,
    /// Every answer received, warm-up included (for CPU per request).
    pub completed_all: u64,
    /// The largest response message (protobuf bytes) received.
    pub response_bytes: u64,
    /// CPU time the target process spent per request over the whole run (warm-up
    /// included), from /proc/<pid>/stat; set when the scenario knows the target's pid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_cpu_us_per_request: Option<f64>,
    /// Cores' worth of CPU other processes on the machine used during the run: the
    /// noise floor of a shared machine (set by the scenarios).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub foreign_cpu_cores: Option<f64>,
    /// Cores' worth of CPU the generator itself used during the run, warm-up included
    /// (set by the scenarios). Near 1 the generator's one thread is saturated, and the
    /// tail it measures is its own queue as much as the target's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generator_cpu_cores: Option<f64>,
    /// Retransmissions and out-of-order segments on the machine's TCP during the run
    /// (set by the scenarios).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_trouble: Option<crate::procs::TcpTrouble>,
    /// How many times the run was made (repeated when the machine was busy).
    pub attempts: u32,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub deny_reasons: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub error_kinds: BTreeMap<String, u64>,
    pub expect: Expect,
    /// Whether the outcomes are what the run expected; `problems` says why not.
    pub valid: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

struct Recorder {
    latency: Histogram<u64>,
    lag: Histogram<u64>,
    allow: u64,
    deny: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    last_done: Option<Instant>,
    completed_all: u64,
    response_bytes: u64,
}

impl Recorder {
    fn new() -> Recorder {
        // 1 µs … 120 s at 3 significant digits, in nanoseconds.
        let h = || Histogram::new_with_bounds(1_000, 120_000_000_000, 3).expect("valid bounds");
        Recorder {
            latency: h(),
            lag: h(),
            allow: 0,
            deny: BTreeMap::new(),
            errors: BTreeMap::new(),
            last_done: None,
            completed_all: 0,
            response_bytes: 0,
        }
    }

    fn record(
        &mut self,
        outcome: Outcome,
        latency: Duration,
        lag: Option<Duration>,
        done: Instant,
    ) {
        self.latency
            .saturating_record(latency.as_nanos().max(1000) as u64);
        if let Some(lag) = lag {
            self.lag.saturating_record(lag.as_nanos().max(1000) as u64);
        }
        match outcome {
            Outcome::Allow => self.allow += 1,
            Outcome::Deny(reason) => *self.deny.entry(reason).or_default() += 1,
            Outcome::Error(kind) => *self.errors.entry(kind).or_default() += 1,
        }
        self.last_done = Some(self.last_done.map_or(done, |d| d.max(done)));
    }

    fn error(&mut self, kind: &str, n: u64) {
        if n > 0 {
            *self.errors.entry(kind.to_owned()).or_default() += n;
        }
    }
}

/// Opens the plan's connections.
pub async fn connect(plan: &Plan) -> anyhow::Result<Vec<Connection>> {
    let mut conns = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections.max(1) {
        conns.push(
            Connection::open(plan.target, plan.grpc_timeout)
                .await
                .with_context(|| format!("cannot connect to {} ({})", plan.target, plan.label))?,
        );
    }
    Ok(conns)
}

/// Runs the plan against its target and reports what happened.
pub async fn run(
    plan: &Plan,
    template: Arc<Template>,
    tokens: Tokens,
) -> anyhow::Result<RunReport> {
    anyhow::ensure!(
        tokens.uniform_len()? == template.token_len(),
        "the template was built for tokens of another length"
    );
    let traffic = Traffic {
        conns: Arc::new(connect(plan).await?),
        template,
        tokens,
        recorder: Arc::new(Mutex::new(Recorder::new())),
        salt: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64,
    };
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let measure_until = measure_from + plan.duration;
    let (scheduled_total, not_sent) = match plan.mode {
        Mode::Closed { concurrency } => {
            closed_loop(plan, concurrency, &traffic, measure_from, measure_until).await;
            (None, 0)
        }
        Mode::Open { rate } => {
            let (total, not_sent) = open_loop(plan, rate, &traffic, start, measure_from).await?;
            (Some(total), not_sent)
        }
        Mode::Burst { requests } => {
            burst(requests, &traffic).await;
            (None, 0)
        }
    };
    let rec = Arc::try_unwrap(traffic.recorder)
        .ok()
        .expect("every request task has finished")
        .into_inner()
        .expect("no request task panicked");
    Ok(report(plan, rec, measure_from, scheduled_total, not_sent))
}

/// What the requests of one run share: the connections they go over, what they carry,
/// where their answers are counted.
#[derive(Clone)]
struct Traffic {
    conns: Arc<Vec<Connection>>,
    template: Arc<Template>,
    tokens: Tokens,
    recorder: Arc<Mutex<Recorder>>,
    /// Makes the ids of this run differ from those of the runs before it.
    salt: u64,
}

impl Traffic {
    /// The connection the `i`-th worker or request uses: the load spread evenly.
    fn conn(&self, i: usize) -> Connection {
        self.conns[i % self.conns.len()].clone()
    }

    /// Request number `n`, carrying `token`.
    fn frame(&self, n: u64, token: &[u8]) -> Bytes {
        self.template.frame(token, &Ids::for_sequence(n, self.salt))
    }
}

/// How a measured request is charged: its latency runs from `from` (when it was sent, or
/// in open loop when it was due); `lag` is how late the generator sent it (open loop).
struct Charge {
    from: Instant,
    lag: Option<Duration>,
}

/// Sends one request and counts its answer; `charge` is `None` for a warm-up request.
async fn send(conn: &Connection, frame: Bytes, recorder: &Mutex<Recorder>, charge: Option<Charge>) {
    let (outcome, size) = conn.check(frame).await;
    let done = Instant::now();
    let mut rec = recorder.lock().expect("recorder");
    rec.completed_all += 1;
    rec.response_bytes = rec.response_bytes.max(size as u64);
    if let Some(c) = charge {
        rec.record(outcome, done - c.from, c.lag, done);
    }
}

async fn closed_loop(
    plan: &Plan,
    concurrency: usize,
    traffic: &Traffic,
    measure_from: Instant,
    measure_until: Instant,
) {
    let seq = Arc::new(AtomicU64::new(0));
    let measured = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cap = plan.max_requests.unwrap_or(u64::MAX);
    let mut workers = Vec::with_capacity(concurrency);
    for w in 0..concurrency.max(1) {
        let (conn, traffic) = (traffic.conn(w), traffic.clone());
        let (seq, measured, stop) = (seq.clone(), measured.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                if sent >= measure_until {
                    break;
                }
                let counted = sent >= measure_from;
                if counted && measured.fetch_add(1, Ordering::Relaxed) >= cap {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let Some(token) = traffic.tokens.get(n) else {
                    stop.store(true, Ordering::Relaxed);
                    break;
                };
                let frame = traffic.frame(n, token);
                let charge = counted.then_some(Charge {
                    from: sent,
                    lag: None,
                });
                send(&conn, frame, &traffic.recorder, charge).await;
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
}

/// Every request built first, then all sent at once: the single-flight test wants them
/// in keygate together, not trickling in behind request construction.
async fn burst(requests: usize, traffic: &Traffic) {
    let frames: Vec<_> = (0..requests as u64)
        .filter_map(|n| Some(traffic.frame(n, traffic.tokens.get(n)?)))
        .collect();
    let start = Arc::new(tokio::sync::Barrier::new(frames.len() + 1));
    let mut tasks = Vec::with_capacity(frames.len());
    for (i, frame) in frames.into_iter().enumerate() {
        let conn = traffic.conn(i);
        let (recorder, start) = (traffic.recorder.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let charge = Charge {
                from: Instant::now(),
                lag: None,
            };
            send(&conn, frame, &recorder, Some(charge)).await;
        }));
    }
    start.wait().await;
    for t in tasks {
        let _ = t.await;
    }
}

async fn open_loop(
    plan: &Plan,
    rate: f64,
    traffic: &Traffic,
    start: Instant,
    measure_from: Instant,
) -> anyhow::Result<(u64, u64)> {
    anyhow::ensure!(rate > 0.0, "rate must be above zero");
    let total = scheduled(plan.warmup + plan.duration, rate);
    let in_flight = Arc::new(Semaphore::new(plan.max_in_flight));
    // The schedule is kept on this thread by a timerfd that expires when each request is
    // due (see timer.rs for why not tokio's timer or a thread of its own).
    let period = period_of(rate);
    let timer = Timer::periodic(start, period).context("cannot create the open loop's timer")?;
    let mut not_sent = 0u64;
    let mut behind = 0u32;
    for i in 0..total {
        let due = start + due_at(i, period);
        if due > Instant::now() {
            behind = 0;
            timer.until(due).await?;
        } else {
            // Late: send at once, but let answers be read between runs of late requests.
            behind += 1;
            if behind.is_multiple_of(16) {
                tokio::task::yield_now().await;
            }
        }
        let Some(token) = traffic.tokens.get(i) else {
            not_sent += total - i;
            break;
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            // The target is so far behind that the generator would have to hold more than
            // max_in_flight requests: an overload, not a result.
            if due >= measure_from {
                not_sent += 1;
            }
            continue;
        };
        let frame = traffic.frame(i, token);
        let conn = traffic.conn(i as usize);
        let recorder = traffic.recorder.clone();
        tokio::spawn(async move {
            let sent = Instant::now();
            let charge = (due >= measure_from).then(|| Charge {
                from: due,
                lag: Some(sent.saturating_duration_since(due)),
            });
            send(&conn, frame, &recorder, charge).await;
            // The recorder first: on a multi-threaded generator the run takes it back as
            // soon as the last permit is returned.
            drop(recorder);
            drop(permit);
        });
    }
    // Wait for the stragglers, as long as the target may take to answer.
    let drain = plan.grpc_timeout.unwrap_or(Duration::from_secs(10)) + Duration::from_secs(5);
    let unanswered = match tokio::time::timeout(
        drain,
        in_flight.acquire_many(plan.max_in_flight as u32),
    )
    .await
    {
        Ok(_) => 0,
        Err(_) => (plan.max_in_flight - in_flight.available_permits()) as u64,
    };
    if unanswered > 0 {
        anyhow::bail!(
            "{}: {unanswered} requests still unanswered {:?} after the schedule ended",
            plan.label,
            drain
        );
    }
    Ok((total, not_sent))
}

fn report(
    plan: &Plan,
    mut rec: Recorder,
    measure_from: Instant,
    scheduled_total: Option<u64>,
    not_sent: u64,
) -> RunReport {
    rec.error(
        "not sent: generator in-flight limit reached (target overloaded)",
        not_sent,
    );
    let requests = rec.latency.len();
    let seconds = match (plan.mode, rec.last_done) {
        // Closed loop and burst: from the start of measurement to the last answer.
        (Mode::Closed { .. } | Mode::Burst { .. }, Some(done)) => {
            done.saturating_duration_since(measure_from).as_secs_f64()
        }
        _ => plan.duration.as_secs_f64(),
    };
    let deny: u64 = rec.deny.values().sum();
    let errors: u64 = rec.errors.values().sum();
    let mut problems = Vec::new();
    if errors > 0 {
        problems.push(format!("{errors} requests failed without a decision"));
    }
    match plan.expect {
        Expect::Allow if deny > 0 => problems.push(format!(
            "expected every request to be allowed, {deny} were denied ({})",
            summary(&rec.deny)
        )),
        Expect::Deny if rec.allow > 0 => problems.push(format!(
            "expected every request to be denied, {} were allowed",
            rec.allow
        )),
        _ => {}
    }
    if requests == 0 {
        problems.push("no request was measured".into());
    }
    if let (Some(total), Mode::Open { rate }) = (scheduled_total, plan.mode) {
        let measured_due = scheduled(plan.duration, rate).min(total);
        if requests + not_sent + 1 < measured_due {
            problems.push(format!(
                "only {requests} of {measured_due} scheduled requests were measured"
            ));
        }
    }
    RunReport {
        label: plan.label.clone(),
        target: plan.target.to_string(),
        mode: match plan.mode {
            Mode::Closed { .. } => "closed",
            Mode::Open { .. } => "open",
            Mode::Burst { .. } => "burst",
        },
        rate: match plan.mode {
            Mode::Open { rate } => Some(rate),
            _ => None,
        },
        connections: plan.connections,
        concurrency: match plan.mode {
            Mode::Closed { concurrency } => Some(concurrency),
            Mode::Burst { requests } => Some(requests),
            Mode::Open { .. } => None,
        },
        seconds,
        requests,
        rps: if seconds > 0.0 {
            requests as f64 / seconds
        } else {
            0.0
        },
        latency_us: Percentiles::of(&rec.latency),
        send_lag_us: matches!(plan.mode, Mode::Open { .. }).then(|| Percentiles::of(&rec.lag)),
        allow: rec.allow,
        deny,
        errors,
        completed_all: rec.completed_all,
        response_bytes: rec.response_bytes,
        target_cpu_us_per_request: None,
        foreign_cpu_cores: None,
        tcp_trouble: None,
        generator_cpu_cores: None,
        attempts: 1,
        deny_reasons: rec.deny,
        error_kinds: rec.errors,
        expect: plan.expect,
        valid: problems.is_empty(),
        problems,
    }
}

fn summary(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_requests_are_due_at_even_intervals() {
        let ms = period_of(1000.0);
        assert_eq!(ms, Duration::from_millis(1));
        assert_eq!(due_at(0, ms), Duration::ZERO);
        assert_eq!(due_at(1, ms), Duration::from_millis(1));
        assert_eq!(due_at(2500, ms), Duration::from_millis(2500));
        assert_eq!(due_at(3, period_of(4.0)), Duration::from_millis(750));
        // Rounded to the nanosecond, the rate kept is the asked one to within 0.01%.
        let rate = 37_561.0;
        let kept = 37_561.0 / due_at(37_561, period_of(rate)).as_secs_f64();
        assert!((kept / rate - 1.0).abs() < 1e-4, "{kept}");
        // No rate so high that the period is zero.
        assert_eq!(period_of(1e12), Duration::from_nanos(1));
    }

    #[test]
    fn an_open_loop_run_sends_rate_times_duration() {
        assert_eq!(scheduled(Duration::from_secs(5), 1000.0), 5000);
        assert_eq!(scheduled(Duration::from_millis(1500), 3.0), 5);
        assert_eq!(scheduled(Duration::ZERO, 1000.0), 0);
    }

    #[test]
    fn rotating_tokens_cycle_and_single_use_tokens_run_out() {
        let r = Tokens::rotate(vec!["a".into(), "b".into()]);
        let seen: Vec<_> = (0..5).map(|i| r.get(i).unwrap()).collect();
        assert_eq!(seen, [b"a", b"b", b"a", b"b", b"a"]);
        let once = Tokens::once(vec!["a".into(), "b".into()]);
        assert_eq!(once.get(1), Some(&b"b"[..]));
        assert_eq!(once.get(2), None);
    }

    #[test]
    fn tokens_too_short_to_template_are_refused() {
        let err = Tokens::rotate(vec!["x".into()]).uniform_len().unwrap_err();
        assert!(err.to_string().contains("too short"), "{err}");
        let ok = Tokens::rotate(vec!["x".repeat(MIN_TOKEN_LEN)]).uniform_len();
        assert_eq!(ok.unwrap(), MIN_TOKEN_LEN);
        // The shortest accepted token is found once in the template.
        let _ = crate::shape::Template::new(&crate::shape::Shape::new("GET", "/"), MIN_TOKEN_LEN);
    }

    #[test]
    fn tokens_of_mixed_length_are_refused() {
        let err = Tokens::rotate(vec!["abcdefgh".into(), "abcdefghi".into()])
            .uniform_len()
            .unwrap_err();
        assert!(err.to_string().contains("differ in length"), "{err}");
        assert_eq!(
            Tokens::rotate(vec!["abcdefgh".into(), "ijklmnop".into()])
                .uniform_len()
                .unwrap(),
            8
        );
    }

    fn plan(expect: Expect) -> Plan {
        Plan {
            label: "t".into(),
            target: "127.0.0.1:1".parse().unwrap(),
            connections: 1,
            mode: Mode::Closed { concurrency: 1 },
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
            max_requests: None,
            grpc_timeout: None,
            expect,
            max_in_flight: 10,
            repeatable: true,
        }
    }

    #[test]
    fn a_run_with_unexpected_outcomes_is_invalid() {
        let at = Instant::now();
        let mut rec = Recorder::new();
        rec.record(Outcome::Allow, Duration::from_micros(100), None, at);
        rec.record(
            Outcome::Deny("invalid_api_key".into()),
            Duration::from_micros(100),
            None,
            at,
        );
        let r = report(&plan(Expect::Allow), rec, at, None, 0);
        assert!(!r.valid);
        assert!(
            r.problems[0].contains("invalid_api_key: 1"),
            "{:?}",
            r.problems
        );

        let mut rec = Recorder::new();
        rec.record(Outcome::Allow, Duration::from_micros(100), None, at);
        assert!(report(&plan(Expect::Allow), rec, at, None, 0).valid);

        let mut rec = Recorder::new();
        rec.record(
            Outcome::Error("grpc-status 14".into()),
            Duration::from_micros(100),
            None,
            at,
        );
        let r = report(&plan(Expect::Any), rec, at, None, 0);
        assert!(!r.valid && r.errors == 1);
    }
}
