//! Bytes as a request path: `normalize_path` never panics, and a path it returns is one
//! no server reads differently: absolute, without dot segments, empty segments, an
//! encoded `/` or path parameters (`;`, `%3B`), and normal already (normalising it again
//! gives it back). Routing it on a policy with every kind of segment never panics either.

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
    let Ok(path) = normalize_path(raw) else {
        return;
    };
    assert!(path.starts_with('/'), "{raw:?} -> {path:?}");
    for bad in ["/./", "/../", "//", "%2F", "%2f", ";", "%3B", "%3b"] {
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
