//! The effective tenant of a request: which tenant the caller acts for, given its key and
//! the `X-Tenant-Id` header. Tenant keys act only inside their own tenant.

use crate::config::TenantRule;
use crate::decision::DenyReason;
use crate::principal::Principal;

/// The tenant the request acts for, or why it may not.
pub fn resolve(
    principal: &Principal,
    rule: TenantRule,
    header: Option<&str>,
) -> Result<String, DenyReason> {
    let requested = match header.map(str::trim) {
        None | Some("") => {
            if rule == TenantRule::Required {
                return Err(DenyReason::TenantRequired);
            }
            None
        }
        Some(raw) => Some(parse_tenant(raw).ok_or(DenyReason::InvalidTenant)?),
    };
    // Every kind acts in its own tenant for now; partner delegation widens this for
    // partner keys when it comes.
    match requested {
        Some(t) if t != principal.tenant_id => Err(DenyReason::TenantForbidden),
        _ => Ok(principal.tenant_id.clone()),
    }
}

/// A tenant id in canonical form (lower-case hyphenated UUID), or `None`.
pub fn parse_tenant(raw: &str) -> Option<String> {
    let id = uuid::Uuid::try_parse(raw).ok()?;
    Some(id.hyphenated().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::{Environment, KeyKind};

    const T: &str = "9f1c7d4e-2b7a-4c1e-9d55-0b3f6a2e8c11";
    const OTHER: &str = "0b3f6a2e-8c11-4c1e-9d55-9f1c7d4e2b7a";

    fn key(kind: KeyKind) -> Principal {
        Principal::new(T.into(), "key:x".into(), kind, Environment::Live, vec![])
    }

    #[test]
    fn tenant_key_acts_only_in_its_own_tenant() {
        let p = key(KeyKind::Tenant);
        assert_eq!(resolve(&p, TenantRule::Optional, None), Ok(T.to_string()));
        assert_eq!(
            resolve(&p, TenantRule::Optional, Some(T)),
            Ok(T.to_string())
        );
        assert_eq!(
            resolve(&p, TenantRule::Optional, Some(&T.to_uppercase())),
            Ok(T.to_string())
        );
        assert_eq!(
            resolve(&p, TenantRule::Optional, Some(OTHER)),
            Err(DenyReason::TenantForbidden)
        );
    }

    #[test]
    fn header_rules() {
        let p = key(KeyKind::Tenant);
        assert_eq!(
            resolve(&p, TenantRule::Required, None),
            Err(DenyReason::TenantRequired)
        );
        assert_eq!(
            resolve(&p, TenantRule::Required, Some(" ")),
            Err(DenyReason::TenantRequired)
        );
        assert_eq!(
            resolve(&p, TenantRule::Optional, Some("acme")),
            Err(DenyReason::InvalidTenant)
        );
        assert_eq!(
            resolve(&p, TenantRule::Required, Some(&format!("{T},{T}"))),
            Err(DenyReason::InvalidTenant)
        );
        assert_eq!(
            resolve(&p, TenantRule::Required, Some(T)),
            Ok(T.to_string())
        );
    }
}
