//! What a running keygate can take from a changed configuration file, and what needs a
//! restart. The decision sections (`policy`, `errors`, `jwt`, `sessions`, `rate_limits`
//! and `api_keys` but its `prefix` and `argon2`) are rebuilt live; the rest shapes
//! listeners, the store, the caches and the process itself, and a change to it is refused
//! until a restart. Restart-only settings are compared by what they mean, not as written:
//! a section spelled out with its default values, or `30s` written `30000ms`, is no
//! change.

use serde_yaml_ng::Value;
use sha2::{Digest, Sha256};

use super::Config;

/// The settings that decide a request whose principal is known: what a module inside
/// Envoy must share with the service it learns from to answer as it would.
const DECIDING: [&[&str]; 7] = [
    &["policy"],
    &["errors"],
    &["jwt"],
    &["sessions"],
    &["rate_limits"],
    &["api_keys", "prefix"],
    &["api_keys", "accept_test_keys"],
];

/// Names the settings that decide a request (`DECIDING`), as loaded: the file with the
/// environment's overrides over it. Two configurations with the same id decide alike;
/// the same settings written otherwise (a default spelled out, another order) get
/// another id, which only ever makes keygate's module hand requests over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RulesId([u8; 16]);

impl std::fmt::Display for RulesId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The settings a running keygate keeps until it restarts, dotted, with whether they
/// differ between two configurations.
fn restart_only(running: &Config, next: &Config) -> [(&'static str, bool); 8] {
    [
        ("listen", running.listen != next.listen),
        ("store", running.store != next.store),
        ("revocation", running.revocation != next.revocation),
        ("cache", running.cache != next.cache),
        ("logging", running.logging != next.logging),
        ("traces", running.traces != next.traces),
        (
            "api_keys.prefix",
            running.api_keys.prefix != next.api_keys.prefix,
        ),
        (
            "api_keys.argon2",
            running.api_keys.argon2 != next.api_keys.argon2,
        ),
    ]
}

fn at<'a>(doc: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(doc, |v, key| v.get(*key))
}

impl Config {
    /// The restart-only settings (`restart_only`, dotted) that differ between `self` and
    /// `next`; empty when `next` can be taken live.
    pub fn restart_only_changes(&self, next: &Config) -> Vec<String> {
        restart_only(self, next)
            .into_iter()
            .filter(|(_, differs)| *differs)
            .map(|(name, _)| name.to_owned())
            .collect()
    }

    /// The id of the settings that decide a request (`RulesId`).
    pub fn rules_id(&self) -> RulesId {
        let mut digest = Sha256::new();
        for path in DECIDING {
            let text = at(&self.source, path)
                .map(|v| serde_yaml_ng::to_string(v).expect("a loaded document serializes"))
                .unwrap_or_default();
            // Each part's length first: no two lists of parts read as the same bytes.
            digest.update((text.len() as u64).to_le_bytes());
            digest.update(text.as_bytes());
        }
        let mut id = [0; 16];
        id.copy_from_slice(&digest.finalize()[..16]);
        RulesId(id)
    }

    /// Whether the setting at `path` (`["policy", "plans"]`) differs between `self` and
    /// `next`.
    pub fn changed(&self, next: &Config, path: &[&str]) -> bool {
        at(&self.source, path) != at(&next.source, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Config {
        Config::load(Some(yaml), Vec::new()).expect("valid")
    }

    #[test]
    fn a_default_written_out_or_a_duration_written_otherwise_is_no_change() {
        let before = load("policy: { unmatched: deny }\n");
        let spelled_out = load(
            "policy: { unmatched: deny }\nlisten: { grpc: '0.0.0.0:50051' }\n\
             cache: { ttl: 30000ms }\nlogging: { level: info }\n",
        );
        assert!(before.restart_only_changes(&spelled_out).is_empty());
        let other = load("policy: { unmatched: deny }\ncache: { ttl: 31s }\n");
        assert_eq!(before.restart_only_changes(&other), ["cache"]);
    }

    #[test]
    fn the_rules_id_names_what_decides_and_nothing_else() {
        let base = "policy: { unmatched: deny }\nerrors: { opaque: false }\n";
        let id = load(base).rules_id();
        assert_eq!(id, load(base).rules_id());
        assert_eq!(
            id,
            load(&format!(
                "{base}listen: {{ grpc: '127.0.0.1:1' }}\ncache: {{ ttl: 31s }}\n\
                 api_keys: {{ usage_flush_interval: 1s, argon2: {{ verify_concurrency: 1 }} }}\n"
            ))
            .rules_id(),
            "listeners, caches, usage and argon2 decide nothing"
        );
        for other in [
            "policy: { unmatched: authenticated }\nerrors: { opaque: false }\n",
            "policy: { unmatched: deny }\nerrors: { opaque: true }\n",
            &format!("{base}api_keys: {{ prefix: eng }}\n"),
            &format!("{base}api_keys: {{ accept_test_keys: false }}\n"),
            &format!("{base}rate_limits: {{ on_store_error: allow }}\n"),
        ] {
            assert_ne!(id, load(other).rules_id(), "{other}");
        }
        // An override from the environment is part of what decides.
        let overridden = Config::load(
            Some(base),
            [(
                "KEYGATE_POLICY__UNMATCHED".to_owned(),
                "authenticated".to_owned(),
            )],
        )
        .expect("valid");
        assert_ne!(id, overridden.rules_id());
        assert_eq!(id.to_string().len(), 32);
    }

    #[test]
    fn a_route_change_is_live_and_a_listener_change_is_not() {
        let before = load("policy: { unmatched: deny }\nlisten: { grpc: '127.0.0.1:50051' }\n");
        let routes =
            load("policy: { unmatched: authenticated }\nlisten: { grpc: '127.0.0.1:50051' }\n");
        let listener = load("policy: { unmatched: deny }\nlisten: { grpc: '127.0.0.1:50061' }\n");
        assert!(before.restart_only_changes(&routes).is_empty());
        assert!(before.changed(&routes, &["policy"]));
        assert!(!before.changed(&routes, &["policy", "plans"]));
        assert_eq!(before.restart_only_changes(&listener), ["listen"]);
    }

    #[test]
    fn api_keys_prefix_needs_a_restart_and_its_lifetime_does_not() {
        let before = load("api_keys: { prefix: sk, default_lifetime: 90d }\n");
        let lifetime = load("api_keys: { prefix: sk, default_lifetime: 30d }\n");
        let prefix = load("api_keys: { prefix: eng, default_lifetime: 90d }\n");
        assert!(before.restart_only_changes(&lifetime).is_empty());
        assert_eq!(before.restart_only_changes(&prefix), ["api_keys.prefix"]);
    }

    #[test]
    fn an_environment_override_counts_as_written() {
        let file = "cache: { ttl: 30s }\n";
        let before = Config::load(Some(file), Vec::new()).expect("valid");
        let env = vec![("KEYGATE_CACHE__TTL".to_owned(), "5s".to_owned())];
        let after = Config::load(Some(file), env).expect("valid");
        assert_eq!(before.restart_only_changes(&after), ["cache"]);
    }
}
