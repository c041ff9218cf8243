//! What a running keygate can take from a changed configuration file, and what needs a
//! restart. The decision sections (`policy`, `errors`, `jwt`, `sessions`, `rate_limits`
//! and `api_keys` but its `prefix` and `argon2`) are rebuilt live; the rest shapes
//! listeners, the store, the caches and the process itself, and a change to it is refused
//! until a restart. Sections are compared as written (the file with the environment over
//! it): a section spelled out with its default values counts as changed.

use serde_yaml_ng::Value;

use super::Config;

/// The settings a running keygate keeps until it restarts, as paths into the document.
pub const RESTART_ONLY: &[&[&str]] = &[
    &["listen"],
    &["store"],
    &["revocation"],
    &["cache"],
    &["logging"],
    &["traces"],
    &["api_keys", "prefix"],
    &["api_keys", "argon2"],
];

fn at<'a>(doc: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(doc, |v, key| v.get(*key))
}

impl Config {
    /// The restart-only settings (`RESTART_ONLY`, dotted) that differ between `self` and
    /// `next`; empty when `next` can be taken live.
    pub fn restart_only_changes(&self, next: &Config) -> Vec<String> {
        RESTART_ONLY
            .iter()
            .filter(|path| at(&self.source, path) != at(&next.source, path))
            .map(|path| path.join("."))
            .collect()
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
