//! What keygate's module inside Envoy learns from the service, and how it asks.
//!
//! The module (`api::envoy_module`) hands a request it cannot answer to the ext_authz
//! filter with one more header, `x-keygate-learn`. An allow of such a request carries,
//! in its dynamic metadata (field `learn`), the principal exactly as the service holds
//! it, the tenant it acted for, and the service's position in the revocation stream when
//! it answered. Only Envoy sees dynamic metadata: a client cannot forge it, and the
//! header a client may send only makes the service say who the client already is. The
//! header itself never reaches the upstream (every `x-keygate-*` a client sent that the
//! allow does not set is removed). Session tokens are never learned: they are judged on
//! their key's state, which the module does not hold.

use serde::{Deserialize, Serialize};

use crate::config::RulesId;
use crate::principal::{CredentialKind, Principal};
use crate::store::Cursor;

/// The request header by which the module asks to learn from an allow.
pub const LEARN_HEADER: &str = "x-keygate-learn";

/// One allow, as the module learns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learned {
    /// The answering replica's position in the revocation stream (a `Cursor`) when it
    /// started deciding: the module keeps the answer only if this covers every event it
    /// had applied itself when it asked, so a replica that is behind cannot teach it a
    /// revoked key.
    pub after: String,
    /// The tenant the request acted for (a partner's delegated one is learned as a
    /// delegation).
    pub tenant: Option<String>,
    /// The principal, every field, as the service held it.
    pub principal: Principal,
    /// The id of the settings the service decided by (`Config::rules_id`): the module
    /// keeps the answer only if its own are the same, so that it answers the next
    /// request as that service would.
    pub rules: String,
}

impl Learned {
    /// What the module may learn from an allow of `principal` acting for `tenant`,
    /// decided by a replica at `after` by the settings `rules` names; `None` for a
    /// session token.
    pub fn of(
        principal: &Principal,
        tenant: Option<&str>,
        after: &Cursor,
        rules: RulesId,
    ) -> Option<Learned> {
        if principal.credential == CredentialKind::Session {
            return None;
        }
        Some(Learned {
            after: after.to_string(),
            tenant: tenant.map(str::to_owned),
            principal: principal.clone(),
            rules: rules.to_string(),
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a Learned is plain data")
    }

    pub fn from_json(text: &str) -> Result<Learned, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::principal::{Environment, KeyKind, TokenIds};
    use crate::store::EventId;

    fn rules() -> RulesId {
        crate::config::Config::load(None, Vec::new())
            .expect("the defaults load")
            .rules_id()
    }

    fn jwt_principal() -> Principal {
        let mut p = Principal::new(
            "5a0c6f0e-8c1b-4f6e-9a57-3d2b1c0e9f11".into(),
            "user-7".into(),
            KeyKind::Tenant,
            Environment::Live,
            vec!["contacts:read".into(), "contacts:write".into()],
        );
        p.credential = CredentialKind::Jwt;
        p.scopes_header = "contacts:read contacts:write".into();
        p.issuer = Some(Arc::from("https://issuer.example"));
        p.expires_at = Some(1_900_000_000_000);
        p.token_ids = Some(Box::new(TokenIds {
            jti: Some("j-1".into()),
            issued_at: Some(1_800_000_000),
        }));
        p
    }

    #[test]
    fn a_learned_principal_is_the_principal_the_service_held() {
        let mut key = Principal::new(
            String::new(),
            "key:k1".into(),
            KeyKind::Partner,
            Environment::Test,
            vec!["billing:partner:read".into()],
        );
        key.key_id = Some("k1".into());
        key.partner_id = Some("acme".into());
        key.plan = Some("gold".into());
        let after = Cursor(vec![EventId::parse("12-3").unwrap()]);
        let rules = rules();
        for p in [jwt_principal(), key] {
            let learned = Learned::of(&p, Some("t"), &after, rules).unwrap();
            let read = Learned::from_json(&learned.to_json()).unwrap();
            assert_eq!(read, learned);
            assert_eq!(read.principal, p);
            assert_eq!(read.after, "12-3");
            assert_eq!(read.rules, rules.to_string());
        }
    }

    #[test]
    fn a_session_token_is_never_learned() {
        let mut p = jwt_principal();
        p.credential = CredentialKind::Session;
        assert_eq!(Learned::of(&p, None, &Cursor::default(), rules()), None);
    }

    #[test]
    fn unreadable_text_is_an_error_not_a_principal() {
        assert!(Learned::from_json("{\"after\":\"1-0\"}").is_err());
        assert!(Learned::from_json("not json").is_err());
    }
}
