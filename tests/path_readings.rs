//! One request, one meaning: for random paths built from segments, dots, slashes and
//! encodings, if keygate puts a request on route R, then every reading a common upstream
//! could take of the same bytes lands on R too, or keygate refused the path. The upstream
//! readings are written here from what those servers do, not with keygate's code: decode
//! once, decode twice, keep `%2F` encoded, cut `;` parameters, cut at `#`, read `\` as
//! `/`, fold case, merge slashes, accept overlong UTF-8, drop trailing dots and spaces.

use keygate::config::Config;
use keygate::policy::Policy;
use keygate::request::PathError;
use proptest::prelude::*;

/// A public catch-all behind protected families, the shape where a reading that leaves a
/// family for the catch-all (or the other way) matters most.
const ROUTES: &[(&str, &str)] = &[
    ("public", "/public/**"),
    ("admin", "/admin/**"),
    ("contacts", "/v1/contacts/**"),
    ("files", "/files/**"),
    ("one", "/v1/*/notes"),
    ("everything", "/**"),
];

fn policy(relaxed_files: bool) -> Policy {
    let files_relaxations = if relaxed_files {
        ", path_relaxations: [encoded_slash, encoded_backslash, encoded_percent, empty_segments]"
    } else {
        ""
    };
    let routes: Vec<String> = ROUTES
        .iter()
        .map(|(name, path)| {
            let extra = if *name == "files" {
                files_relaxations
            } else {
                ""
            };
            let access = if *name == "public" || *name == "everything" {
                "public: true".to_owned()
            } else {
                format!("scope: \"{name}:read\"")
            };
            format!("    - {{ name: {name}, path: \"{path}\", {access}{extra} }}\n")
        })
        .collect();
    let yaml = format!("policy:\n  routes:\n{}", routes.concat());
    let config = Config::load(Some(&yaml), Vec::new()).expect("the test policy is valid");
    Policy::compile(&config.policy).expect("the test policy compiles")
}

// ------------------------------------------------------------------ upstream readings

/// Percent-decodes `s` as most servers do: a `%` without two hex digits stays as it is.
/// `keep` lists bytes whose escapes stay encoded (Apache's `AllowEncodedSlashes NoDecode`).
fn percent_decode(s: &[u8], keep: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                let c = h * 16 + l;
                if keep.contains(&c) {
                    out.extend_from_slice(&s[i..i + 3]);
                } else {
                    out.push(c);
                }
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// UTF-8 the way a lenient decoder reads it: a two-byte overlong form of an ASCII
/// character is that character (`%c0%ae` is `.`).
fn overlong_ascii(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if i + 1 < bytes.len() && (bytes[i] == 0xc0 || bytes[i] == 0xc1) {
            out.push(((bytes[i] & 0x1f) << 6) | (bytes[i + 1] & 0x3f));
            i += 2;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// RFC 3986 5.2.4 on `/`-separated segments, empty ones kept.
fn remove_dots(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// The route a server with `ROUTES` as its routing table serves `path` on.
fn served_on(path: &str, case_blind: bool) -> Option<&'static str> {
    let parts: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    ROUTES.iter().find_map(|(name, pattern)| {
        let pattern: Vec<&str> = pattern[1..].split('/').collect();
        let mut i = 0;
        for p in &pattern {
            match *p {
                "**" => return Some(*name),
                "*" => match parts.get(i) {
                    Some(s) if !s.is_empty() => {}
                    _ => return None,
                },
                lit => match parts.get(i) {
                    Some(s) if *s == lit || (case_blind && s.eq_ignore_ascii_case(lit)) => {}
                    _ => return None,
                },
            }
            i += 1;
        }
        // A trailing slash is the same route.
        let rest = &parts[i.min(parts.len())..];
        (rest.is_empty() || rest == [""]).then_some(*name)
    })
}

/// The ways an upstream reads the raw target; each gives the route it serves, or `None`
/// where that upstream refuses the request itself (bytes that are not UTF-8).
fn upstream_readings(raw: &str) -> Vec<(&'static str, Option<&'static str>)> {
    let until = |s: &str, c: char| s.split(c).next().unwrap_or("").to_owned();
    let path = until(raw, '?');
    let text = |b: Vec<u8>| String::from_utf8(b).ok();
    let route = |p: Option<String>, blind: bool| p.and_then(|p| served_on(&remove_dots(&p), blind));
    let once = text(percent_decode(path.as_bytes(), &[]));
    let twice = text(percent_decode(&percent_decode(path.as_bytes(), &[]), &[]));
    let no_params = path
        .split('/')
        .map(|seg| until(seg, ';'))
        .collect::<Vec<_>>()
        .join("/");
    let merged = once.clone().map(|p| {
        let mut m = p.clone();
        while m.contains("//") {
            m = m.replace("//", "/");
        }
        m
    });
    let trimmed = once.clone().map(|p| {
        remove_dots(&p)
            .split('/')
            .map(|s| s.trim_end_matches(['.', ' ']))
            .collect::<Vec<_>>()
            .join("/")
    });
    vec![
        ("decode once", route(once.clone(), false)),
        ("decode twice", route(twice, false)),
        (
            "keep %2F and %5C",
            route(text(percent_decode(path.as_bytes(), b"/\\")), false),
        ),
        (
            "cut ; parameters",
            route(text(percent_decode(no_params.as_bytes(), &[])), false),
        ),
        (
            "cut at #",
            route(
                text(percent_decode(until(&until(raw, '#'), '?').as_bytes(), &[])),
                false,
            ),
        ),
        (
            "\\ as /",
            route(once.clone().map(|p| p.replace('\\', "/")), false),
        ),
        ("case-blind", route(once.clone(), true)),
        ("merge slashes", route(merged, false)),
        (
            "overlong UTF-8",
            route(
                text(overlong_ascii(&percent_decode(path.as_bytes(), &[]))),
                false,
            ),
        ),
        (
            "trailing dots and spaces dropped",
            trimmed.and_then(|p| served_on(&p, false)),
        ),
    ]
}

// ------------------------------------------------------------------ the property

/// Pieces of a path: names (some in other case), dot segments in every spelling,
/// separators raw and encoded, and what servers disagree on.
const PIECES: &[&str] = &[
    "public",
    "admin",
    "Admin",
    "ADMIN",
    "v1",
    "contacts",
    "files",
    "notes",
    "x",
    "42",
    "/",
    "/",
    "/",
    "/",
    "//",
    "\\",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    ".",
    "..",
    "%2e",
    "%2E",
    "%2e%2e",
    "%2E%2e",
    ".%2e",
    "%2e.",
    "...",
    "..%20",
    "%252e",
    "%252E",
    "%252f",
    "%255c",
    "%25",
    "%2541",
    "%2525",
    "%25%32%65",
    ";",
    ";x",
    "%3b",
    "..;",
    "#",
    "%23",
    "?",
    "%3f",
    "?a=/../admin",
    "%c0%ae",
    "%c0%af",
    "%e0%80%ae",
    "%ef%bc%8f",
    "%c4%b1",
    "%61dmin",
    "%41dmin",
    "admin.",
    "a%20",
    "%00",
    "%0a",
    "%7f",
    "%zz",
    "%",
    " ",
];

fn raw_path() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(PIECES), 1..10)
        .prop_map(|pieces| format!("/{}", pieces.concat()))
}

fn check(policy: &Policy, raw: &str) -> Result<(), TestCaseError> {
    let decided = policy.route_of("GET", raw);
    if let Ok(Some(route)) = decided {
        for (how, served) in upstream_readings(raw) {
            if let Some(served) = served {
                prop_assert_eq!(
                    served,
                    &*route.name,
                    "{:?}: keygate decides on {}, an upstream that reads it by `{}` serves {}",
                    raw,
                    route.name,
                    how,
                    served
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn every_upstream_reading_of_an_allowed_path_lands_on_its_route(raw in raw_path()) {
        check(&policy(false), &raw)?;
    }

    #[test]
    fn relaxed_paths_too_land_on_their_route_in_every_reading(
        raw in raw_path().prop_map(|p| format!("/files{p}")),
    ) {
        check(&policy(true), &raw)?;
    }
}

/// The property can fail: on each row, the route keygate decided on before issue 33 and
/// the route one of the readings serves differ; keygate now refuses the path.
#[test]
fn the_readings_see_a_path_that_leaves_its_route() {
    for (raw, keygate_said, how, served) in [
        ("/public/x#/../../admin/x", "public", "decode once", "admin"),
        (
            "/public/%252e%252e/admin/x",
            "public",
            "decode twice",
            "admin",
        ),
        (
            "/public/%c0%ae%c0%ae/admin/x",
            "public",
            "overlong UTF-8",
            "admin",
        ),
        ("/public/..%5cadmin/x", "public", "\\ as /", "admin"),
        ("/public/..;/admin/x", "public", "cut ; parameters", "admin"),
        ("/ADMIN/x", "everything", "case-blind", "admin"),
        (
            "/admin./x",
            "everything",
            "trailing dots and spaces dropped",
            "admin",
        ),
        ("/admin//../public/x", "public", "decode once", "admin"),
    ] {
        let readings = upstream_readings(raw);
        let seen = readings.iter().find(|(h, _)| *h == how).expect("a reading");
        assert_eq!(seen.1, Some(served), "{raw}: {how}");
        assert_ne!(keygate_said, served, "{raw}");
        // And keygate refuses it now.
        let now: Result<_, PathError> = policy(false).route_of("GET", raw).map(|_| ());
        assert!(now.is_err(), "{raw}");
    }
}
