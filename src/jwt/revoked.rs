//! The JWT revocations one replica holds: loaded from its feed when it starts (and again
//! after events were lost), kept current by the revocation stream, and asked on every
//! JWT check, cached or not, so a revocation takes effect the moment it arrives.
//!
//! While the set is not known to be complete (between a lost stretch of events and the
//! reload), a JWT can be neither allowed nor denied: the caller gets `Incomplete` and
//! answers UNAVAILABLE, never a guess. A new set is empty and complete: nothing is
//! answered before the first load anyway, because the served adapters wait for the
//! follower's position (`api::starting`), which it takes only after loading.
//! It must not hold anything but what revocations name: issuer names, `jti`s, subjects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::RwLock;

use crate::principal::Principal;
use crate::store::{TokenRevocation, TokenTarget};

/// The set cannot say yet whether a token is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the JWT revocations are not loaded yet")]
pub struct Incomplete;

pub struct RevokedTokens {
    by_issuer: RwLock<HashMap<String, IssuerRevocations>>,
    /// How many revocations are held: with none (the usual case) a check is two loads.
    held: AtomicUsize,
    complete: AtomicBool,
}

#[derive(Default)]
struct IssuerRevocations {
    /// `jti` → when the revocation expires (unix ms).
    jtis: HashMap<String, u64>,
    /// subject → (cut-off, expiry), unix ms.
    subjects: HashMap<String, (u64, u64)>,
}

impl Default for RevokedTokens {
    fn default() -> Self {
        RevokedTokens {
            by_issuer: RwLock::default(),
            held: AtomicUsize::new(0),
            complete: AtomicBool::new(true),
        }
    }
}

impl RevokedTokens {
    pub fn new() -> Self {
        RevokedTokens::default()
    }

    /// Whether `principal` (from a JWT) is revoked at `now_ms`.
    pub fn is_revoked(&self, principal: &Principal, now_ms: u64) -> Result<bool, Incomplete> {
        if !self.complete.load(Ordering::Acquire) {
            return Err(Incomplete);
        }
        if self.held.load(Ordering::Acquire) == 0 {
            return Ok(false);
        }
        let Some(issuer) = principal.issuer.as_deref() else {
            return Ok(false);
        };
        let map = self.by_issuer.read().unwrap_or_else(|e| e.into_inner());
        let Some(rules) = map.get(issuer) else {
            return Ok(false);
        };
        let live = |expires: u64| !crate::principal::expired(expires, now_ms);
        let ids = principal.token_ids.as_deref();
        if let Some(jti) = ids.and_then(|i| i.jti.as_deref()) {
            if rules.jtis.get(jti).is_some_and(|&exp| live(exp)) {
                return Ok(true);
            }
        }
        Ok(rules
            .subjects
            .get(&*principal.subject)
            .is_some_and(|&(before_ms, exp)| {
                live(exp) && issued_before(ids.and_then(|i| i.issued_at), before_ms)
            }))
    }

    /// Adds one revocation (merged with what is held for the same subject or `jti`).
    pub fn apply(&self, r: &TokenRevocation) {
        let mut map = self.by_issuer.write().unwrap_or_else(|e| e.into_inner());
        add(&mut map, r);
        self.recount(&map);
    }

    /// Replaces everything with `all` (a fresh load) and marks the set complete.
    pub fn load(&self, all: &[TokenRevocation]) {
        let mut fresh = HashMap::new();
        for r in all {
            add(&mut fresh, r);
        }
        let mut map = self.by_issuer.write().unwrap_or_else(|e| e.into_inner());
        *map = fresh;
        self.recount(&map);
        drop(map);
        self.complete.store(true, Ordering::Release);
    }

    /// Events may have been lost: until the next `load`, no JWT can be judged.
    pub fn mark_incomplete(&self) {
        self.complete.store(false, Ordering::Release);
    }

    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Drops what has expired (called as revocations arrive, so the set stays small).
    pub fn prune(&self, now_ms: u64) {
        let mut map = self.by_issuer.write().unwrap_or_else(|e| e.into_inner());
        let live = |exp: u64| !crate::principal::expired(exp, now_ms);
        for rules in map.values_mut() {
            rules.jtis.retain(|_, exp| live(*exp));
            rules.subjects.retain(|_, (_, exp)| live(*exp));
        }
        map.retain(|_, r| !r.jtis.is_empty() || !r.subjects.is_empty());
        self.recount(&map);
    }

    /// How many revocations are held.
    pub fn len(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn recount(&self, map: &HashMap<String, IssuerRevocations>) {
        let n = map.values().map(|r| r.jtis.len() + r.subjects.len()).sum();
        self.held.store(n, Ordering::Release);
    }
}

fn add(map: &mut HashMap<String, IssuerRevocations>, r: &TokenRevocation) {
    let rules = map.entry(r.issuer.clone()).or_default();
    match &r.target {
        TokenTarget::Jti { jti } => {
            let exp = rules.jtis.entry(jti.clone()).or_default();
            *exp = (*exp).max(r.expires_at_ms);
        }
        TokenTarget::Subject { subject, before_ms } => {
            let (before, exp) = rules.subjects.entry(subject.clone()).or_default();
            *before = (*before).max(*before_ms);
            *exp = (*exp).max(r.expires_at_ms);
        }
    }
}

/// Whether a token issued at `iat` (unix seconds) was issued before `before_ms`, in whole
/// seconds: a token issued in the second of the cut-off passes (a dashboard that rotates
/// a token revokes the old one and signs the new one in the same second). Without `iat`
/// a token cannot show it is newer.
pub fn issued_before(iat: Option<u64>, before_ms: u64) -> bool {
    iat.is_none_or(|iat| iat < before_ms / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::{CredentialKind, Environment, KeyKind};

    fn jwt_principal(
        issuer: &str,
        subject: &str,
        jti: Option<&str>,
        iat: Option<u64>,
    ) -> Principal {
        let mut p = Principal::new(
            "t".into(),
            subject.into(),
            KeyKind::Tenant,
            Environment::Live,
            vec![],
        );
        p.credential = CredentialKind::Jwt;
        p.issuer = Some(issuer.into());
        p.token_ids = Some(Box::new(crate::principal::TokenIds {
            jti: jti.map(Into::into),
            issued_at: iat,
        }));
        p
    }

    fn by_subject(
        issuer: &str,
        subject: &str,
        before_ms: u64,
        expires_at_ms: u64,
    ) -> TokenRevocation {
        TokenRevocation {
            issuer: issuer.into(),
            target: TokenTarget::Subject {
                subject: subject.into(),
                before_ms,
            },
            at_ms: before_ms,
            expires_at_ms,
        }
    }

    #[test]
    fn nothing_is_judged_between_a_loss_and_the_reload() {
        let set = RevokedTokens::new();
        let p = jwt_principal("idp", "alice", None, Some(10));
        assert_eq!(set.is_revoked(&p, 0), Ok(false));
        set.mark_incomplete();
        assert_eq!(set.is_revoked(&p, 0), Err(Incomplete));
        set.load(&[by_subject("idp", "alice", 20_000, 1_000_000)]);
        assert_eq!(set.is_revoked(&p, 0), Ok(true));
    }

    #[test]
    fn a_subject_cut_off_counts_whole_seconds_and_names_one_issuer() {
        let set = RevokedTokens::new();
        set.load(&[by_subject("idp", "alice", 100_500, 1_000_000)]);
        let at = |iat| set.is_revoked(&jwt_principal("idp", "alice", None, iat), 0);
        assert_eq!(at(Some(99)), Ok(true), "issued the second before");
        assert_eq!(at(Some(100)), Ok(false), "issued in the cut-off's second");
        assert_eq!(at(Some(101)), Ok(false));
        assert_eq!(at(None), Ok(true), "no iat: cannot show it is newer");
        let other = jwt_principal("other-idp", "alice", None, Some(1));
        assert_eq!(set.is_revoked(&other, 0), Ok(false));
        let bob = jwt_principal("idp", "bob", None, Some(1));
        assert_eq!(set.is_revoked(&bob, 0), Ok(false));
        // Once expired, the revocation matches nothing and is pruned.
        assert_eq!(at(Some(1)), Ok(true));
        assert_eq!(
            set.is_revoked(&jwt_principal("idp", "alice", None, Some(1)), 1_000_000),
            Ok(false)
        );
        set.prune(1_000_000);
        assert!(set.is_empty());
    }

    #[test]
    fn a_later_cut_off_wins_and_an_earlier_one_changes_nothing() {
        let set = RevokedTokens::new();
        set.load(&[by_subject("idp", "alice", 200_000, 1_000_000)]);
        set.apply(&by_subject("idp", "alice", 100_000, 900_000));
        let p = jwt_principal("idp", "alice", None, Some(150));
        assert_eq!(set.is_revoked(&p, 950_000), Ok(true));
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn a_jti_revocation_matches_that_token_only() {
        let set = RevokedTokens::new();
        set.load(&[TokenRevocation {
            issuer: "idp".into(),
            target: TokenTarget::Jti { jti: "t-1".into() },
            at_ms: 0,
            expires_at_ms: 10_000,
        }]);
        let with = |jti| set.is_revoked(&jwt_principal("idp", "alice", jti, Some(1)), 0);
        assert_eq!(with(Some("t-1")), Ok(true));
        assert_eq!(with(Some("t-2")), Ok(false));
        assert_eq!(with(None), Ok(false));
    }
}
