//! The configuration and secrets every test runs on, and the keys it creates.

use keygate::config::{Config, Secrets};
use keygate::keys::NewKey;
use keygate::secret::Secret;

use crate::{RedisCluster, RedisServer, TENANT};

/// Where a test keeps its keys.
#[derive(Clone, Copy)]
pub enum Backend<'a> {
    Memory,
    Redis(&'a RedisServer),
    /// A Redis Cluster, in the namespace given (replicas of one deployment share it).
    Cluster(&'a RedisCluster, &'a str),
}

/// How every test policy takes credentials: a Bearer token in `authorization` or a bare
/// one in `x-api-key`, both removed before the upstream; a request no route matches is
/// denied. The `policy` section of `config_with_policy` goes on after it.
const CREDENTIALS: &str = r#"
policy:
  credential_headers:
    - { header: authorization, scheme: Bearer }
    - { header: x-api-key }
  strip_credential_headers: true
  unmatched: deny
"#;

/// The rest of the policy every test runs on: a public family, a read family, a write
/// family that requires the tenant header.
const POLICY: &str = r#"
  opt_in_scopes: ["billing:partner:allocate"]
  routes:
    - { name: public, methods: [GET], path: "/public/**", public: true }
    - { name: contacts-read, methods: [GET, HEAD], path: "/v1/contacts/**", scope: "contacts:read" }
    - { name: contacts-write, methods: [POST, PUT, PATCH, DELETE], path: "/v1/contacts/**", scope: "contacts:write", tenant: required }
"#;

/// A configuration for one test: listeners on ephemeral loopback ports, cheap argon2
/// (the tests measure keygate, not argon2; set `api_keys.argon2` back to the default where
/// the cost matters), and the small policy above.
pub fn config(backend: Backend<'_>) -> Config {
    config_with_policy(backend, POLICY)
}

/// As `config`, with a policy of the test's own: the `CREDENTIALS` above, then `policy`,
/// the rest of the `policy` section (plans, routes, ...), indented by two spaces.
pub fn config_with_policy(backend: Backend<'_>, policy: &str) -> Config {
    let store = format!("store: {}\n", store_yaml(backend));
    let yaml = format!(
        "listen: {{ grpc: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", http: \"127.0.0.1:0\" }}\n\
         {store}\
         api_keys:\n  prefix: sk\n  argon2: {{ memory_kib: 64, iterations: 1, parallelism: 1 }}\n\
         {CREDENTIALS}{}",
        policy.trim_start_matches('\n')
    );
    Config::load(Some(&yaml), Vec::new()).expect("the test configuration is valid")
}

/// The `store` section for `backend`, as a YAML flow mapping.
pub fn store_yaml(backend: Backend<'_>) -> String {
    match backend {
        Backend::Memory => "{ backend: memory }".to_owned(),
        Backend::Redis(r) => format!(
            "{{ backend: redis, redis_url: \"{}\", namespace: kgtest, timeout: 300ms }}",
            r.url()
        ),
        // Six Redis servers and the replicas share two cores while the suite runs: a
        // longer bound keeps a busy moment from reading as an outage.
        Backend::Cluster(c, ns) => format!(
            "{{ backend: redis, cluster_nodes: [{}], namespace: {ns}, timeout: 2s }}",
            c.urls().join(", ")
        ),
    }
}

/// Fresh random secrets, distinct per test so that a leak can be searched for.
pub fn secrets() -> Secrets {
    Secrets {
        pepper: Secret::random(43),
        admin_token: Secret::random(32),
        redis_password: None,
        watch_token: Some(Secret::random(32)),
        named: Default::default(),
    }
}

/// A fresh Ed25519 private key in PKCS#8 PEM (what `openssl genpkey -algorithm ed25519`
/// writes): the RFC 8410 prefix and a random seed. For `sessions.signing_keys`.
pub fn ed25519_pem() -> String {
    use base64::Engine;
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend(rand::random::<[u8; 32]>());
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")
}

/// A key of `TENANT` that may read contacts.
pub fn reader_key() -> NewKey {
    NewKey {
        tenant_id: TENANT.into(),
        name: "test reader".into(),
        scopes: vec!["contacts:read".into()],
        ..NewKey::default()
    }
}
