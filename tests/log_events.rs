//! Every log line keygate writes carries a stable event name (`event = "store.down"`), and
//! every name an operator may alert on is listed in docs/operations.md ("Log events"):
//! a log call without one, or a name the page does not list, fails here.

use std::collections::BTreeSet;
use std::path::Path;

/// The product's source, without unit tests (a sibling `tests.rs`, or the
/// `#[cfg(test)] mod tests` at the end of a file).
fn product_sources(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).expect("src/ reads") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            product_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            let text = std::fs::read_to_string(&path).expect("source reads");
            let text = match text.find("#[cfg(test)]\nmod tests") {
                Some(at) => text[..at].to_owned(),
                None => text,
            };
            out.push((path.display().to_string(), text));
        }
    }
}

/// Each `info!(…)`, `warn!(…)`, `error!(…)`, `debug!(…)` call: where, and its arguments.
fn log_calls(text: &str) -> Vec<(usize, String)> {
    let mut calls = Vec::new();
    for level in ["info!(", "warn!(", "error!(", "debug!("] {
        let mut from = 0;
        while let Some(at) = text[from..].find(level) {
            let start = from + at + level.len();
            let preceded = text[..from + at].chars().next_back();
            from = start;
            // `tracing::info!(` or `info!(`, not `my_info!(`.
            if preceded.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let mut depth = 1;
            let mut end = start;
            for (i, c) in text[start..].char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = start + i;
                    break;
                }
            }
            let line = text[..start].lines().count();
            calls.push((line, text[start..end].to_owned()));
        }
    }
    calls
}

fn event_name(args: &str) -> Option<String> {
    let at = args.find("event = \"")? + "event = \"".len();
    let len = args[at..].find('"')?;
    Some(args[at..at + len].to_owned())
}

#[test]
fn every_log_line_has_an_event_name_and_the_operations_page_lists_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = Vec::new();
    product_sources(&root.join("src"), &mut sources);
    let mut unnamed = Vec::new();
    let mut names = BTreeSet::new();
    for (file, text) in &sources {
        for (line, args) in log_calls(text) {
            match event_name(&args) {
                Some(name) => {
                    let well_formed = name.split('.').count() == 2
                        && name.chars().all(|c| {
                            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_'
                        });
                    assert!(
                        well_formed,
                        "{file}:{line}: event {name:?} is not `area.what`"
                    );
                    names.insert(name);
                }
                None => unnamed.push(format!("{file}:{line}")),
            }
        }
    }
    assert!(
        unnamed.is_empty(),
        "log calls without `event = \"…\"`: {unnamed:#?}"
    );
    assert!(names.len() > 40, "found only {} event names", names.len());
    let page = std::fs::read_to_string(root.join("docs/operations.md")).expect("page reads");
    let section = page
        .split("## Log events")
        .nth(1)
        .expect("docs/operations.md has a `## Log events` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !section.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "events not listed in docs/operations.md, Log events: {missing:?}"
    );
}
