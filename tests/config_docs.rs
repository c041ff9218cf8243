//! `docs/configuration.md` names every field of the configuration. The fields are not
//! listed here by hand: they are discovered from the configuration types themselves,
//! by asking the loader about an unknown field in each section (it refuses it and names
//! the fields it expects), so a field added to the types without its line in the docs
//! fails this test.

use keygate::config::Config;

const PROBE: &str = "zz_probe";

/// The YAML that sets `PROBE` inside the section at `path` (`["policy", "routes[]"]`).
fn probe_yaml(path: &[String]) -> String {
    let mut yaml = format!("{{{PROBE}: 1}}");
    for part in path.iter().rev() {
        yaml = match part.strip_suffix("[]") {
            Some(list) => format!("{{{list}: [{yaml}]}}"),
            None => format!("{{{part}: {yaml}}}"),
        };
    }
    yaml
}

/// The fields of the section at `path`, if it is a section (a struct that refuses
/// unknown fields).
fn fields_of(path: &[String]) -> Option<Vec<String>> {
    let err = Config::load(Some(&probe_yaml(path)), Vec::new()).err()?;
    let message = err.message;
    let rest = message.strip_prefix(&format!("unknown field `{PROBE}`"))?;
    let names = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    Some(names)
}

/// Every field path of the configuration, sections first: `listen`, `listen.grpc`, …,
/// `policy.routes[].name`.
fn all_fields() -> Vec<String> {
    let mut out = Vec::new();
    let mut sections = vec![Vec::<String>::new()];
    while let Some(section) = sections.pop() {
        let fields = fields_of(&section)
            .unwrap_or_else(|| panic!("{section:?} is a section of the configuration"));
        for f in fields {
            let mut path = section.clone();
            path.push(f.clone());
            out.push(path.join("."));
            if fields_of(&path).is_some() {
                sections.push(path);
                continue;
            }
            let mut list = section.clone();
            list.push(format!("{f}[]"));
            if fields_of(&list).is_some() {
                sections.push(list);
            }
        }
    }
    out
}

#[test]
fn every_configuration_field_is_documented() {
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .expect("docs/configuration.md exists");
    let fields = all_fields();
    // The discovery itself must find the sections and their nested parts, or this test
    // would pass on nothing.
    for expected in [
        "listen.grpc",
        "api_keys.argon2.queue_depth",
        "policy.routes[].scope",
        "policy.credential_headers[].scheme",
        "revocation.watch_url",
    ] {
        assert!(
            fields.iter().any(|f| f == expected),
            "discovered {expected}: {fields:?}"
        );
    }
    let missing: Vec<&String> = fields
        .iter()
        .filter(|f| !docs.contains(&format!("`{f}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "fields missing from docs/configuration.md: {missing:?}"
    );
}

#[test]
fn the_probe_of_a_section_names_the_field_it_is_refused_at() {
    let err = Config::load(Some("{api_keys: {argon2: {zz_probe: 1}}}"), Vec::new()).unwrap_err();
    assert_eq!(err.field, "api_keys.argon2.zz_probe");
}

/// The table of public error codes in docs/configuration.md is the code's own: each code
/// with its default status and message.
#[test]
fn the_error_code_table_is_the_codes_defaults() {
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .expect("docs/configuration.md exists");
    for reason in keygate::decision::DenyReason::ALL {
        let row = format!(
            "| `{}` | {} | {} |",
            reason.code(),
            reason.http_status(),
            reason.message()
        );
        assert!(
            docs.contains(&row),
            "docs/configuration.md lacks the row {row}"
        );
    }
}
