use super::*;

fn v(n: u8) -> Verification {
    Verification {
        digest: [n; 32],
        hash_fingerprint: n.into(),
    }
}

#[test]
fn key_index_keeps_a_mapping_for_its_whole_keep_then_sweeps_it() {
    let index = KeyIndex::new(Duration::from_secs(10));
    index.set_at("old", v(1), 0);
    index.set_at("refreshed", v(2), 0);
    index.set_at("refreshed", v(2), 8);
    // At 10 s nothing is older than `keep` yet: the sweep must not drop anything.
    index.set_at("new", v(3), 10);
    assert_eq!(index.len(), 3);
    // At 20 s "old" (set at 0) and "refreshed" (last set at 8) are past `keep`;
    // "new" (set at 10) is not.
    index.set_at("newer", v(4), 20);
    assert_eq!(index.take("old"), None);
    assert_eq!(index.take("refreshed"), None);
    assert_eq!(index.take("new"), Some(v(3)));
    assert_eq!(index.take("newer"), Some(v(4)));
    assert_eq!(index.len(), 0);
}

#[test]
fn key_index_sweeps_at_most_once_per_keep() {
    let index = KeyIndex::new(Duration::from_secs(10));
    index.set_at("a", v(1), 0);
    index.set_at("b", v(2), 10); // sweep at 10: "a" is exactly `keep` old, kept
    index.set_at("c", v(3), 15); // next sweep not before 20: "a" stays for now
    assert_eq!(index.len(), 3);
    index.set_at("d", v(4), 20); // sweep: "a" (20 s old) goes, "b" (10 s) stays
    assert_eq!(index.take("a"), None);
    assert_eq!(index.get("b"), Some(v(2)));
}

#[test]
fn a_verification_is_remembered_only_for_the_same_token_and_the_same_hash() {
    let cache = CredentialCache::new(&CacheConfig::default(), &Secret::random(43));
    let token = cache.digest("sk_live_token");
    let other = cache.digest("sk_live_other");
    assert!(!cache.verified_before("k1", &token, "$argon2id$a"));
    cache.note_verified("k1", token, "$argon2id$a");
    assert!(cache.verified_before("k1", &token, "$argon2id$a"));
    assert!(
        !cache.verified_before("k1", &other, "$argon2id$a"),
        "another token"
    );
    assert!(
        !cache.verified_before("k1", &token, "$argon2id$b"),
        "another hash"
    );
    assert!(
        !cache.verified_before("k2", &token, "$argon2id$a"),
        "another key id"
    );
    cache.invalidate_all();
    assert!(
        cache.verified_before("k1", &token, "$argon2id$a"),
        "a flush forgets entries, not what a secret hashes to"
    );
}
