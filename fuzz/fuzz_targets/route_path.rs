//! Bytes as a request path: `normalize_path` never panics, and a path it returns is one
//! no server reads differently: absolute, printable ASCII only, without dot segments,
//! empty segments, `#`, `\`, an encoded `/`, `\` or `%` before two hex digits, or path
//! parameters (`;`, `%3B`), and normal already (normalising it again gives it back).
//! Routing it on a policy with every kind of segment never panics either, and neither
//! does `Policy::route_of` on the raw bytes (with a route that takes every relaxation),
//! which puts a path it normalises on the route of its normal form.

#![no_main]

use std::sync::OnceLock;

use keygate::config::Config;
use keygate::policy::Policy;
use keygate::request::normalize_path;
use libfuzzer_sys::fuzz_target;

/// The integration tests' policy (tests/support), with a `*` and a `{name}` segment and
/// the authenticated fallback, so that every matcher branch is reached.
const CONFIG: &str = r#"
policy:
  credential_headers:
    - { header: authorization, scheme: Bearer }
    - { header: x-api-key }
  unmatched: authenticated
  opt_in_scopes: ["billing:partner:allocate"]
  routes:
    - { name: public, methods: [GET], path: "/public/**", public: true }
    - { name: contacts-read, methods: [GET, HEAD], path: "/v1/contacts/**", scope: "contacts:read" }
    - { name: contacts-write, methods: [POST, PUT, PATCH, DELETE], path: "/v1/contacts/**", scope: "contacts:write", tenant: required }
    - { name: notes, methods: [GET], path: "/v1/{tenant}/notes/*", scope: "notes:read" }
    - { name: root, path: "/", public: true }
    - { name: files, path: "/files/**", scope: "files:read", path_relaxations: [encoded_slash, encoded_backslash, encoded_percent, empty_segments] }
    - { name: Upper, path: "/v1/Me/*", scope: "me:read" }
"#;

fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let config = Config::load(Some(CONFIG), Vec::new()).expect("the fuzz policy is valid");
        Policy::compile(&config.policy).expect("the fuzz policy compiles")
    })
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(raw) = std::str::from_utf8(bytes) else {
        return;
    };
    for method in ["GET", "POST"] {
        if let Ok(route) = policy().route_of(method, raw) {
            if let Ok(normal) = normalize_path(raw) {
                let plain = policy().route(method, &normal);
                assert_eq!(
                    route.map(|r| &r.name),
                    plain.map(|r| &r.name),
                    "{raw:?}: route_of and the route of its normal form differ"
                );
            }
        }
    }
    let Ok(path) = normalize_path(raw) else {
        return;
    };
    assert!(path.starts_with('/'), "{raw:?} -> {path:?}");
    assert!(
        path.bytes().all(|b| (0x21..=0x7e).contains(&b)),
        "{raw:?} -> {path:?} holds a byte that is not printable ASCII"
    );
    for bad in [
        "/./", "/../", "//", "%2F", "%2f", "%5C", "%5c", ";", "%3B", "%3b", "#", "\\",
    ] {
        assert!(!path.contains(bad), "{raw:?} -> {path:?} holds {bad:?}");
    }
    // Nor at the end, where the patterns above have no slash to end on.
    assert!(
        path.split('/').all(|seg| seg != "." && seg != ".."),
        "{raw:?} -> {path:?} keeps a dot segment"
    );
    let again = normalize_path(&path);
    assert_eq!(
        again.as_deref(),
        Ok(&*path),
        "{raw:?} is not normal once normalised"
    );
    for method in ["GET", "POST", "get", ""] {
        let _ = policy().route(method, &path);
    }
});
