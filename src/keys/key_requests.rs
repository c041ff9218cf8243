//! What callers hand `KeyAdmin` (unvalidated requests, listing filters) and what it hands
//! back, with the checks of key arguments that name the wrong field. Plain data and pure
//! checks: nothing here reads or writes the store.

use std::time::Duration;

use super::{check_id, check_tenant, invalid, AdminError};
use crate::apikey;
use crate::policy::valid_held_scope;
use crate::principal::KeyKind;
use crate::store::{KeyRecord, KeyStatus, Owner};

const MAX_SCOPES: usize = 100;
const MAX_NAME_LEN: usize = 200;

/// A request to create a key, as given by the caller (unvalidated).
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub tenant_id: String,
    pub name: String,
    pub scopes: Vec<String>,
    /// Empty: live.
    pub environment: String,
    /// Empty: tenant.
    pub kind: String,
    /// For partner keys: the partner they belong to.
    pub partner_id: String,
    /// For runtime keys: the internal service they belong to.
    pub service: String,
    pub expires_in: Option<Duration>,
    /// A key that never expires, where `api_keys.allow_non_expiring` allows it.
    pub never_expires: bool,
    pub plan: String,
}

/// A request to change a key; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct KeyUpdate {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    /// Empty clears the plan.
    pub plan: Option<String>,
    /// A new lifetime, counted from now.
    pub expires_in: Option<Duration>,
}

/// Which keys a listing shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StatusFilter {
    /// Active and expired keys: revoked ones vanish from the list (they stay readable by id).
    #[default]
    Listed,
    Only(KeyStatus),
    All,
}

impl std::str::FromStr for StatusFilter {
    type Err = AdminError;
    fn from_str(s: &str) -> Result<Self, AdminError> {
        Ok(match s {
            "" => StatusFilter::Listed,
            "all" => StatusFilter::All,
            "active" => StatusFilter::Only(KeyStatus::Active),
            "expired" => StatusFilter::Only(KeyStatus::Expired),
            "revoked" => StatusFilter::Only(KeyStatus::Revoked),
            _ => {
                return Err(invalid(
                    "status",
                    "must be active, expired, revoked or all (empty: active and expired)",
                ))
            }
        })
    }
}

impl StatusFilter {
    pub(super) fn shows(self, status: KeyStatus) -> bool {
        match self {
            StatusFilter::Listed => status != KeyStatus::Revoked,
            StatusFilter::Only(s) => s == status,
            StatusFilter::All => true,
        }
    }
}

/// A rotation: the successor (its token shown once) and the old key as it now is.
pub struct Rotated {
    pub successor: CreatedKey,
    pub previous: KeyRecord,
}

pub struct CreatedKey {
    pub record: KeyRecord,
    /// The plaintext token. Shown once; keygate keeps only its hash.
    pub token: String,
}

/// Whose keys to list, as given by the caller (unvalidated; empty means not given).
#[derive(Debug, Clone, Default)]
pub struct KeyOwner {
    pub tenant_id: String,
    pub partner_id: String,
    pub service: String,
}

impl KeyOwner {
    pub(super) fn check(&self) -> Result<Owner, AdminError> {
        let given = |s: &str| !s.trim().is_empty();
        match (
            given(&self.tenant_id),
            given(&self.partner_id),
            given(&self.service),
        ) {
            (true, false, false) => Ok(Owner::Tenant(check_tenant(&self.tenant_id)?)),
            (false, true, false) => Ok(Owner::Partner(
                check_id("partner_id", &self.partner_id)?.to_owned(),
            )),
            (false, false, true) => Ok(Owner::Service(
                check_id("service", &self.service)?.to_owned(),
            )),
            _ => Err(invalid(
                "tenant_id",
                "give exactly one of tenant_id, partner_id and service",
            )),
        }
    }
}

/// Whom a new key of `kind` belongs to: a tenant key to a tenant, a partner key to a
/// partner, a runtime key to a service, and nothing else given.
pub(super) fn owner_of_new(kind: KeyKind, req: &NewKey) -> Result<Owner, AdminError> {
    let not_for = |field: &'static str, value: &str, what: &str| {
        if value.trim().is_empty() {
            Ok(())
        } else {
            Err(invalid(field, format!("must be empty for {what}")))
        }
    };
    match kind {
        KeyKind::Tenant => {
            not_for("partner_id", &req.partner_id, "a tenant key")?;
            not_for("service", &req.service, "a tenant key")?;
            Ok(Owner::Tenant(check_tenant(&req.tenant_id)?))
        }
        KeyKind::Partner => {
            not_for(
                "tenant_id",
                &req.tenant_id,
                "a partner key (it acts for the tenants delegated to its partner)",
            )?;
            not_for("service", &req.service, "a partner key")?;
            Ok(Owner::Partner(
                check_id("partner_id", &req.partner_id)?.to_owned(),
            ))
        }
        KeyKind::Runtime => {
            not_for("tenant_id", &req.tenant_id, "a runtime key")?;
            not_for("partner_id", &req.partner_id, "a runtime key")?;
            Ok(Owner::Service(
                check_id("service", &req.service)?.to_owned(),
            ))
        }
    }
}

pub(super) fn check_name(name: &str) -> Result<String, AdminError> {
    let name = name.trim();
    if name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(invalid(
            "name",
            format!("must be at most {MAX_NAME_LEN} printable characters"),
        ));
    }
    Ok(name.to_owned())
}

/// Validated, de-duplicated scopes. Empty is allowed and grants nothing.
pub(super) fn check_scopes(requested: &[String]) -> Result<Vec<String>, AdminError> {
    if requested.len() > MAX_SCOPES {
        return Err(invalid("scopes", format!("at most {MAX_SCOPES} scopes")));
    }
    let mut scopes: Vec<String> = Vec::with_capacity(requested.len());
    for s in requested {
        let s = s.trim();
        if !valid_held_scope(s) {
            return Err(invalid(
                "scopes",
                format!(
                    "`{s}` is not a scope (`resource:action`, a-z 0-9 : - _ ., or a trailing `:*`)"
                ),
            ));
        }
        if !scopes.iter().any(|x| x == s) {
            scopes.push(s.to_owned());
        }
    }
    Ok(scopes)
}

pub(super) fn check_plan(plan: &str) -> Result<Option<String>, AdminError> {
    let plan = plan.trim();
    if plan.len() > 64
        || !plan
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid("plan", "must be at most 64 of a-z A-Z 0-9 - _"));
    }
    Ok((!plan.is_empty()).then(|| plan.to_owned()))
}

pub(super) fn check_key_id(key_id: &str) -> Result<&str, AdminError> {
    let key_id = key_id.trim();
    if !apikey::token::valid_key_id(key_id) {
        return Err(invalid(
            "key_id",
            format!("must be {} base62 characters", apikey::token::KEY_ID_LEN),
        ));
    }
    Ok(key_id)
}
