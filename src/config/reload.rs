//! What a running keygate can take from a changed configuration file, and what needs a
//! restart. The decision sections (`policy`, `errors`, `jwt`, `sessions`, `rate_limits`
//! and `api_keys` but its `prefix` and `argon2`) are rebuilt live; the rest shapes
//! listeners, the store, the caches and the process itself, and a change to it is refused
//! until a restart. Restart-only settings are compared by what they mean, not as written:
//! a section spelled out with its default values, or `30s` written `30000ms`, is no
//! change.

use serde_yaml_ng::Value;

use super::Config;

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
