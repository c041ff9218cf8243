//! Scenario results: medians over repetitions, keygate next to the baseline with the
//! ratio, the targets met or missed, and the machine it ran on. Printed as Markdown
//! tables (pasted into BENCHMARKS.md as they are) or as one JSON object.

use serde::Serialize;

use crate::load::RunReport;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
}

impl Machine {
    pub fn here() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Machine {
            // The machine's, not this process's share (`--pin` gives the generator one).
            cores: cpuinfo
                .lines()
                .filter(|l| l.starts_with("processor"))
                .count(),
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
                .unwrap_or_else(|| "unknown".into()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
        }
    }
}

/// The command that produced a report (as `scripts/bench` ran it, when it did), without
/// `--out FILE`, which changes nothing measured.
fn command_line() -> String {
    let full = std::env::var("KEYGATE_LOAD_COMMAND")
        .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
    let mut out = Vec::new();
    let mut words = full.split(' ');
    while let Some(w) = words.next() {
        if w == "--out" {
            words.next();
        } else if !w.starts_with("--out=") {
            out.push(w);
        }
    }
    out.join(" ")
}

/// The medians of one target's repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub label: String,
    pub reps: usize,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_request: Option<f64>,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Summary {
    pub fn of(label: &str, runs: &[&RunReport]) -> Summary {
        let m = |f: &dyn Fn(&RunReport) -> f64| median(runs.iter().map(|r| f(r)).collect());
        let cpu: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.target_cpu_us_per_request)
            .collect();
        Summary {
            label: label.into(),
            reps: runs.len(),
            rps: m(&|r| r.rps),
            p50_us: m(&|r| r.latency_us.p50),
            p90_us: m(&|r| r.latency_us.p90),
            p99_us: m(&|r| r.latency_us.p99),
            p999_us: m(&|r| r.latency_us.p999),
            cpu_us_per_request: (!cpu.is_empty()).then(|| median(cpu)),
        }
    }
}

/// One line of a comparison table: the subject, the baseline, their ratio.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub title: String,
    /// The baseline first: the other rows' ratios are taken against it.
    pub rows: Vec<Summary>,
    /// The heading of the last column, what `Summary::cpu_us_per_request` holds.
    pub cost: &'static str,
}

impl Table {
    /// `rows` against the first, their last column the target's CPU µs per request.
    pub fn new(title: impl Into<String>, rows: Vec<Summary>) -> Table {
        Table {
            title: title.into(),
            rows,
            cost: "target CPU µs/req",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub scenario: String,
    pub command: String,
    /// `git describe --always --dirty` of the tree the binaries were built from.
    pub commit: String,
    pub date: String,
    pub machine: Machine,
    pub tables: Vec<Table>,
    /// Facts that are not a table (counts, memory, …) as name → value.
    pub facts: Vec<(String, String)>,
    pub targets: Vec<TargetCheck>,
    pub runs: Vec<RunReport>,
    pub notes: Vec<String>,
    /// Tables of a scenario's own (Markdown), printed after the comparison tables.
    #[serde(skip)]
    pub sections: Vec<String>,
    /// A scenario's phases and what failed in each (the fleet scenarios).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<crate::fleet::PhaseReport>,
}

impl ScenarioReport {
    pub fn new(scenario: &str) -> ScenarioReport {
        ScenarioReport {
            scenario: scenario.into(),
            command: command_line(),
            commit: std::process::Command::new("git")
                .args(["describe", "--always", "--dirty"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_else(|| "unknown".into()),
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            machine: Machine::here(),
            tables: Vec::new(),
            facts: Vec::new(),
            targets: Vec::new(),
            runs: Vec::new(),
            notes: Vec::new(),
            sections: Vec::new(),
            phases: Vec::new(),
        }
    }

    pub fn fact(&mut self, name: &str, value: impl ToString) {
        self.facts.push((name.into(), value.to_string()));
    }

    pub fn target(&mut self, target: &str, measured: impl ToString, met: bool) {
        self.targets.push(TargetCheck {
            target: target.into(),
            measured: measured.to_string(),
            met,
        });
    }

    /// Whether every run was valid (its outcomes were the expected ones).
    pub fn invalid_runs(&self) -> Vec<&RunReport> {
        self.runs.iter().filter(|r| !r.valid).collect()
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        out += &format!("### {}\n\n", self.scenario);
        out += &format!(
            "`{}` — {} — commit {} — {} cores, {}, Linux {}\n\n",
            self.command,
            self.date,
            self.commit,
            self.machine.cores,
            self.machine.cpu,
            self.machine.kernel
        );
        for t in &self.tables {
            out += &table_markdown(t);
            out += "\n";
        }
        for s in &self.sections {
            out += s;
            out += "\n";
        }
        if !self.facts.is_empty() {
            out += "| | |\n|---|---|\n";
            for (k, v) in &self.facts {
                out += &format!("| {k} | {v} |\n");
            }
            out += "\n";
        }
        if !self.targets.is_empty() {
            out += "| target | measured | |\n|---|---|---|\n";
            for t in &self.targets {
                out += &format!(
                    "| {} | {} | {} |\n",
                    t.target,
                    t.measured,
                    if t.met { "met" } else { "**missed**" }
                );
            }
            out += "\n";
        }
        for n in &self.notes {
            out += &format!("- {n}\n");
        }
        let invalid = self.invalid_runs();
        if !invalid.is_empty() {
            out += "\n**INVALID RUNS** (outcomes not as expected):\n";
            for r in invalid {
                out += &format!("- {} ({}): {}\n", r.label, r.mode, r.problems.join("; "));
            }
        }
        out
    }
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.0}")
    }
}

fn table_markdown(t: &Table) -> String {
    let mut out = format!("{}\n\n", t.title);
    out += &format!(
        "| | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | {} |\n",
        t.cost
    );
    out += "|---|---:|---:|---:|---:|---:|---:|\n";
    let cpu = |c: Option<f64>| c.map_or("–".into(), |c| format!("{c:.1}"));
    for r in &t.rows {
        out += &format!(
            "| {} (median of {}) | {} | {} | {} | {} | {} | {} |\n",
            r.label,
            r.reps,
            num(r.rps),
            num(r.p50_us),
            num(r.p90_us),
            num(r.p99_us),
            num(r.p999_us),
            cpu(r.cpu_us_per_request)
        );
    }
    let base = &t.rows[0];
    for r in &t.rows[1..] {
        let ratio = |a: f64, b: f64| {
            if a.is_nan() || b.is_nan() {
                "–".to_owned()
            } else {
                format!("{:.2}×", a / b)
            }
        };
        out += &format!(
            "| {} / {} | {} | {} | {} | {} | {} | {} |\n",
            r.label,
            base.label,
            ratio(r.rps, base.rps),
            ratio(r.p50_us, base.p50_us),
            ratio(r.p90_us, base.p90_us),
            ratio(r.p99_us, base.p99_us),
            ratio(r.p999_us, base.p999_us),
            match (r.cpu_us_per_request, base.cpu_us_per_request) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "–".into(),
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
