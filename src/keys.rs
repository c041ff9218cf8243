//! Key administration: create (the plaintext returned once), get, list, revoke, delete;
//! and the revocation of JWTs by `jti` or by subject. Validates every argument and names
//! the one that is wrong; changes nothing on error.
//! Transport-free: `api/keys.rs` maps this onto gRPC.

use std::sync::Arc;
use std::time::Duration;

use crate::apikey::{self, SecretHasher};
use crate::audit::{Audit, AuditEntry, AuditQuery, Subject};
use crate::cache::CredentialCache;
use crate::config::ApiKeysConfig;
use crate::jwt::revoked::RevokedTokens;
use crate::jwt::JwtVerifier;
use crate::policy::valid_held_scope;
use crate::principal::{Environment, KeyKind};
use crate::store::{
    now_ms, Delegation, DelegationRecords, DelegationsOf, EventKind, KeyChange, KeyPage, KeyRecord,
    KeyRecords, KeyStatus, Owner, StoreError, TokenRevocation, TokenRevocations, TokenTarget,
    NEVER,
};
use crate::telemetry::metrics;
use crate::tenant::parse_tenant;
use crate::tenant::Delegations;

pub const MAX_PAGE_SIZE: usize = 1000;
pub const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_SCOPES: usize = 100;
const MAX_NAME_LEN: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("no key with id {0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

fn invalid(field: &'static str, message: impl Into<String>) -> AdminError {
    AdminError::InvalidArgument {
        field,
        message: message.into(),
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => AdminError::Unavailable(m),
            other => AdminError::Internal(other.to_string()),
        }
    }
}

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
    fn shows(self, status: KeyStatus) -> bool {
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

pub struct KeyAdmin {
    store: Arc<dyn KeyRecords>,
    hasher: SecretHasher,
    cache: Arc<CredentialCache>,
    cfg: ApiKeysConfig,
    /// `policy.partner_scopes`: only partner keys may hold them.
    partner_scopes: Vec<String>,
    audit: Arc<Audit>,
    /// The names of `policy.plans`: a key's plan must be one.
    plans: Vec<String>,
}

impl KeyAdmin {
    pub fn new(
        store: Arc<dyn KeyRecords>,
        hasher: SecretHasher,
        cache: Arc<CredentialCache>,
        cfg: ApiKeysConfig,
        policy: &crate::config::PolicyConfig,
        audit: Arc<Audit>,
    ) -> Self {
        KeyAdmin {
            store,
            hasher,
            cache,
            cfg,
            audit,
            partner_scopes: policy.partner_scopes.clone(),
            plans: policy.plans.keys().cloned().collect(),
        }
    }

    /// The key, or NotFound.
    async fn existing(&self, key_id: &str) -> Result<KeyRecord, AdminError> {
        self.store
            .get(key_id)
            .await?
            .ok_or_else(|| AdminError::NotFound(key_id.to_owned()))
    }

    /// Creates a key; the response holds its token, shown once. Audited.
    pub async fn create(&self, req: NewKey) -> Result<CreatedKey, AdminError> {
        let named = Subject {
            key_id: None,
            tenant_id: (!req.tenant_id.is_empty()).then(|| req.tenant_id.trim().to_owned()),
            partner_id: (!req.partner_id.is_empty()).then(|| req.partner_id.trim().to_owned()),
        };
        let r = self.create_key(req).await;
        let subject = match &r {
            Ok(c) => subject_of(&c.record),
            Err(_) => named,
        };
        self.audit.admin("key.created", subject, &r).await;
        r
    }

    /// See `rotate_key`. Audited (the entry names the old key).
    pub async fn rotate(&self, key_id: &str, grace: Duration) -> Result<Rotated, AdminError> {
        let r = self.rotate_key(key_id, grace).await;
        let subject = match &r {
            Ok(rot) => subject_of(&rot.previous),
            Err(_) => by_id(key_id),
        };
        self.audit.admin("key.rotated", subject, &r).await;
        r
    }

    /// See `update_key`. Audited.
    pub async fn update(&self, key_id: &str, req: KeyUpdate) -> Result<KeyRecord, AdminError> {
        let r = self.update_key(key_id, req).await;
        self.audit_key("key.updated", key_id, &r).await;
        r
    }

    /// Revokes a key at once. Audited.
    pub async fn revoke(&self, key_id: &str) -> Result<KeyRecord, AdminError> {
        let r = self.revoke_key(key_id).await;
        self.audit_key("key.revoked", key_id, &r).await;
        r
    }

    /// Deletes a key. Audited.
    pub async fn delete(&self, key_id: &str) -> Result<KeyRecord, AdminError> {
        let r = self.delete_key(key_id).await;
        self.audit_key("key.deleted", key_id, &r).await;
        r
    }

    async fn audit_key(&self, action: &str, key_id: &str, r: &Result<KeyRecord, AdminError>) {
        let subject = match r {
            Ok(rec) => subject_of(rec),
            Err(_) => by_id(key_id),
        };
        self.audit.admin(action, subject, r).await;
    }

    /// The audit trail.
    pub async fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, AdminError> {
        if q.limit == 0 || q.limit > MAX_PAGE_SIZE {
            return Err(invalid("limit", format!("must be 1 to {MAX_PAGE_SIZE}")));
        }
        if let Some(k) = &q.key_id {
            check_key_id(k)?;
        }
        Ok(self.audit.list(q).await?)
    }

    /// A plan named by the caller: empty for none (the environment's default applies),
    /// else one of `policy.plans`.
    fn plan(&self, plan: &str) -> Result<Option<String>, AdminError> {
        let plan = check_plan(plan)?;
        match plan {
            Some(p) if !self.plans.contains(&p) => Err(invalid(
                "plan",
                if self.plans.is_empty() {
                    format!("no plan named {p:?}: policy.plans is empty")
                } else {
                    format!("no plan named {p:?} (plans: {})", self.plans.join(", "))
                },
            )),
            other => Ok(other),
        }
    }

    /// Scopes for a key of `kind`: valid, de-duplicated, and partner scopes only for
    /// partner keys.
    fn scopes_for(&self, kind: KeyKind, requested: &[String]) -> Result<Vec<String>, AdminError> {
        let scopes = check_scopes(requested)?;
        if kind != KeyKind::Partner {
            if let Some(s) = scopes
                .iter()
                .find(|s| crate::policy::partner_only(&self.partner_scopes, s))
            {
                return Err(invalid(
                    "scopes",
                    format!("`{s}` is a partner scope: only partner keys may hold it"),
                ));
            }
        }
        Ok(scopes)
    }

    async fn create_key(&self, req: NewKey) -> Result<CreatedKey, AdminError> {
        let kind = match req.kind.as_str() {
            "" => KeyKind::Tenant,
            k => k.parse().map_err(|m: String| invalid("kind", m))?,
        };
        let owner = owner_of_new(kind, &req)?;
        let environment = match req.environment.as_str() {
            "" => Environment::Live,
            e => e.parse().map_err(|m: String| invalid("environment", m))?,
        };
        if environment == Environment::Test && !self.cfg.accept_test_keys {
            return Err(invalid(
                "environment",
                "this deployment does not accept test keys",
            ));
        }
        let scopes = self.scopes_for(kind, &req.scopes)?;
        let expires_in = match (req.never_expires, req.expires_in) {
            (true, Some(_)) => {
                return Err(invalid("expires_in", "give a lifetime or never, not both"))
            }
            (true, None) if !self.cfg.allow_non_expiring => {
                return Err(invalid(
                    "expires_in",
                    "this deployment does not allow keys that never expire \
                     (api_keys.allow_non_expiring)",
                ))
            }
            (true, None) => None,
            (false, lifetime) => {
                Some(self.check_lifetime(lifetime.unwrap_or(self.cfg.default_lifetime))?)
            }
        };
        let plan = self.plan(&req.plan)?;
        let name = check_name(&req.name)?;
        self.mint(
            owner,
            kind,
            environment,
            scopes,
            plan,
            name,
            expires_in,
            None,
        )
        .await
    }

    /// Makes and stores a key from validated parts. `expires_in: None` never expires.
    #[allow(clippy::too_many_arguments)]
    async fn mint(
        &self,
        owner: Owner,
        kind: KeyKind,
        environment: Environment,
        scopes: Vec<String>,
        plan: Option<String>,
        name: String,
        expires_in: Option<Duration>,
        rotated_from: Option<String>,
    ) -> Result<CreatedKey, AdminError> {
        let generated = apikey::generate(&self.cfg.prefix, environment);
        let hash = self
            .hasher
            .hash(&generated.secret)
            .await
            .map_err(|e| AdminError::Internal(e.to_string()))?;
        let now = now_ms();
        let record = KeyRecord {
            token_prefix: apikey::token::public_prefix(
                &self.cfg.prefix,
                environment,
                &generated.key_id,
            ),
            key_id: generated.key_id,
            tenant_id: match &owner {
                Owner::Tenant(t) => t.clone(),
                _ => String::new(),
            },
            partner_id: match &owner {
                Owner::Partner(p) => Some(p.clone()),
                _ => None,
            },
            service: match &owner {
                Owner::Service(s) => Some(s.clone()),
                _ => None,
            },
            name,
            kind,
            environment,
            scopes,
            plan,
            hash,
            created_at_ms: now,
            expires_at_ms: expires_in.map_or(NEVER, |d| now.saturating_add(d.as_millis() as u64)),
            revoked_at_ms: None,
            rotated_from,
            usage: Default::default(),
        };
        self.store.create(&record).await?;
        metrics().keys_created.inc();
        tracing::info!(key_id = %record.key_id, owner = %owner.index_name(), "API key created");
        Ok(CreatedKey {
            record,
            token: generated.token,
        })
    }

    /// Replaces an active key: a successor with the same owner, kind, environment, scopes,
    /// plan and name (and the default lifetime), and the old key set to expire at the end
    /// of `grace` (sooner if it expired sooner anyway). Both work until then; replicas
    /// learn the old key's new expiry from its `updated` event.
    async fn rotate_key(&self, key_id: &str, grace: Duration) -> Result<Rotated, AdminError> {
        let key_id = check_key_id(key_id)?;
        let old = self.existing(key_id).await?;
        let now = now_ms();
        let status = old.status(now);
        if status != KeyStatus::Active {
            return Err(invalid(
                "key_id",
                format!(
                    "only an active key can be rotated (this one is {})",
                    status.as_str()
                ),
            ));
        }
        if grace > self.cfg.max_lifetime {
            return Err(invalid("grace", "must be at most api_keys.max_lifetime"));
        }
        let lifetime = (old.expires_at_ms != NEVER).then_some(self.cfg.default_lifetime);
        let successor = self
            .mint(
                old.owner(),
                old.kind,
                old.environment,
                old.scopes.clone(),
                old.plan.clone(),
                old.name.clone(),
                lifetime,
                Some(old.key_id.clone()),
            )
            .await?;
        let ends = now
            .saturating_add(grace.as_millis() as u64)
            .min(old.expires_at_ms);
        let change = KeyChange {
            expires_at_ms: Some(ends),
            ..KeyChange::default()
        };
        let previous = self
            .store
            .update(key_id, &change, now)
            .await?
            .ok_or_else(|| AdminError::NotFound(key_id.to_owned()))?;
        self.cache.invalidate_key(key_id, Some(EventKind::Updated));
        tracing::info!(key_id, successor = %successor.record.key_id, "API key rotated");
        Ok(Rotated {
            successor,
            previous,
        })
    }

    /// Changes a key's name, scopes, plan or lifetime. Replicas drop the cached
    /// principal through the `updated` event written in the same step.
    async fn update_key(&self, key_id: &str, req: KeyUpdate) -> Result<KeyRecord, AdminError> {
        let key_id = check_key_id(key_id)?;
        // Which scopes a key may hold depends on its kind.
        let current = if req.scopes.is_some() {
            Some(self.existing(key_id).await?)
        } else {
            None
        };
        let scopes = match (req.scopes.as_deref(), &current) {
            (Some(requested), Some(current)) => Some(self.scopes_for(current.kind, requested)?),
            _ => None,
        };
        let change = KeyChange {
            name: req.name.as_deref().map(check_name).transpose()?,
            scopes,
            plan: req.plan.as_deref().map(|p| self.plan(p)).transpose()?,
            expires_at_ms: req
                .expires_in
                .map(|d| self.check_lifetime(d))
                .transpose()?
                .map(|d| now_ms().saturating_add(d.as_millis() as u64)),
        };
        if change == KeyChange::default() {
            return Err(invalid("update", "names no field to change"));
        }
        let record = self
            .store
            .update(key_id, &change, now_ms())
            .await?
            .ok_or_else(|| AdminError::NotFound(key_id.to_owned()))?;
        self.cache.invalidate_key(key_id, Some(EventKind::Updated));
        tracing::info!(key_id, "API key updated");
        Ok(record)
    }

    fn check_lifetime(&self, lifetime: Duration) -> Result<Duration, AdminError> {
        if lifetime.is_zero() || lifetime > self.cfg.max_lifetime {
            return Err(invalid(
                "expires_in",
                format!(
                    "must be above zero and at most {}",
                    humantime::format_duration(self.cfg.max_lifetime)
                ),
            ));
        }
        Ok(lifetime)
    }

    pub async fn get(&self, key_id: &str) -> Result<KeyRecord, AdminError> {
        let key_id = check_key_id(key_id)?;
        self.store
            .get(key_id)
            .await?
            .ok_or_else(|| AdminError::NotFound(key_id.to_owned()))
    }

    /// One owner's keys: give exactly one of a tenant, a partner or a service.
    pub async fn list(
        &self,
        owner: &KeyOwner,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<KeyPage, AdminError> {
        self.list_with(owner, StatusFilter::All, page_size, after)
            .await
    }

    /// `list`, showing only the keys `status` lets through (a page may then hold fewer
    /// than `page_size`; `next_after` still pages on).
    pub async fn list_with(
        &self,
        owner: &KeyOwner,
        status: StatusFilter,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<KeyPage, AdminError> {
        let owner = owner.check()?;
        let limit = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n <= MAX_PAGE_SIZE => n,
            _ => {
                return Err(invalid(
                    "page_size",
                    format!("must be at most {MAX_PAGE_SIZE}"),
                ))
            }
        };
        if let Some(a) = after {
            if check_key_id(a).is_err() {
                return Err(invalid("page_token", "is not a token this API returned"));
            }
        }
        let mut page = self.store.list(&owner, after, limit).await?;
        let now = now_ms();
        page.keys.retain(|k| status.shows(k.status(now)));
        Ok(page)
    }

    async fn revoke_key(&self, key_id: &str) -> Result<KeyRecord, AdminError> {
        let key_id = check_key_id(key_id)?;
        let record = self
            .store
            .revoke(key_id, now_ms())
            .await?
            .ok_or_else(|| AdminError::NotFound(key_id.to_owned()))?;
        self.cache.invalidate_key(key_id, Some(EventKind::Revoked));
        metrics().keys_revoked.inc();
        tracing::info!(key_id, "API key revoked");
        Ok(record)
    }

    async fn delete_key(&self, key_id: &str) -> Result<KeyRecord, AdminError> {
        let key_id = check_key_id(key_id)?;
        let record = self
            .store
            .delete(key_id, now_ms())
            .await?
            .ok_or_else(|| AdminError::NotFound(key_id.to_owned()))?;
        self.cache.invalidate_key(key_id, Some(EventKind::Deleted));
        tracing::info!(key_id, "API key deleted");
        Ok(record)
    }
}

/// What an audit entry names of a key.
fn subject_of(r: &KeyRecord) -> Subject {
    Subject {
        key_id: Some(r.key_id.clone()),
        tenant_id: (!r.tenant_id.is_empty()).then(|| r.tenant_id.clone()),
        partner_id: r.partner_id.clone(),
    }
}

/// A key named only by id (the call was refused before it was read), if it is one.
fn by_id(key_id: &str) -> Subject {
    Subject {
        key_id: apikey::token::valid_key_id(key_id.trim()).then(|| key_id.trim().to_owned()),
        ..Subject::default()
    }
}

/// Whose keys to list, as given by the caller (unvalidated; empty means not given).
#[derive(Debug, Clone, Default)]
pub struct KeyOwner {
    pub tenant_id: String,
    pub partner_id: String,
    pub service: String,
}

impl KeyOwner {
    fn check(&self) -> Result<Owner, AdminError> {
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
fn owner_of_new(kind: KeyKind, req: &NewKey) -> Result<Owner, AdminError> {
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

fn check_tenant(tenant_id: &str) -> Result<String, AdminError> {
    parse_tenant(tenant_id.trim()).ok_or_else(|| invalid("tenant_id", "must be a UUID"))
}

/// A partner id or service name: 1 to 64 of `A-Z a-z 0-9 . _ -`.
fn check_id<'a>(field: &'static str, id: &'a str) -> Result<&'a str, AdminError> {
    let id = id.trim();
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(field, "must be 1 to 64 of A-Z a-z 0-9 . _ -"));
    }
    Ok(id)
}

fn check_name(name: &str) -> Result<String, AdminError> {
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
fn check_scopes(requested: &[String]) -> Result<Vec<String>, AdminError> {
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

fn check_plan(plan: &str) -> Result<Option<String>, AdminError> {
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

fn check_key_id(key_id: &str) -> Result<&str, AdminError> {
    let key_id = key_id.trim();
    if !apikey::token::valid_key_id(key_id) {
        return Err(invalid(
            "key_id",
            format!("must be {} base62 characters", apikey::token::KEY_ID_LEN),
        ));
    }
    Ok(key_id)
}

/// What to revoke, as given by the caller (unvalidated): one of `jti` or `subject`.
#[derive(Debug, Clone, Default)]
pub struct RevokeTokens {
    /// The issuer's configured name.
    pub issuer: String,
    pub jti: Option<String>,
    pub subject: Option<String>,
    /// With `subject`: revoke tokens issued before this (unix ms); default now.
    pub before_ms: Option<u64>,
}

/// Longest `jti` or subject a revocation takes.
const MAX_CLAIM_LEN: usize = 1024;
/// How far in the future a cut-off may lie: clocks differ a little, never by minutes.
const MAX_CUTOFF_AHEAD_MS: u64 = 60_000;

/// JWT revocation: validated, stored with its event, and applied here at once (other
/// replicas get it from the stream).
pub struct TokenAdmin {
    store: Arc<dyn TokenRevocations>,
    jwt: Arc<JwtVerifier>,
    revoked: Arc<RevokedTokens>,
    audit: Arc<Audit>,
}

impl TokenAdmin {
    pub fn new(
        store: Arc<dyn TokenRevocations>,
        jwt: Arc<JwtVerifier>,
        revoked: Arc<RevokedTokens>,
        audit: Arc<Audit>,
    ) -> Self {
        TokenAdmin {
            store,
            jwt,
            revoked,
            audit,
        }
    }

    /// Revokes JWTs. Audited.
    pub async fn revoke(&self, req: RevokeTokens) -> Result<TokenRevocation, AdminError> {
        let r = self.revoke_tokens(req).await;
        self.audit
            .admin("tokens.revoked", Subject::default(), &r)
            .await;
        r
    }

    pub(crate) async fn revoke_tokens(
        &self,
        req: RevokeTokens,
    ) -> Result<TokenRevocation, AdminError> {
        let now = now_ms();
        let revocation = self.revocation(req, now)?;
        let stored = self.store.revoke_tokens(&revocation).await?;
        self.revoked.apply(&stored);
        tracing::info!(issuer = %stored.issuer, "JWTs revoked");
        Ok(stored)
    }

    fn revocation(&self, req: RevokeTokens, now: u64) -> Result<TokenRevocation, AdminError> {
        let lifetime = self.jwt.revocation_lifetime(&req.issuer).ok_or_else(|| {
            let names = self.jwt.issuer_names();
            if names.is_empty() {
                invalid("issuer", "no JWT issuer is configured")
            } else {
                invalid(
                    "issuer",
                    format!(
                        "no issuer named {:?} is configured (configured: {})",
                        req.issuer,
                        names.join(", ")
                    ),
                )
            }
        })?;
        let claim = |field: &'static str, value: String| {
            if value.is_empty() || value.len() > MAX_CLAIM_LEN {
                Err(invalid(
                    field,
                    format!("must be 1 to {MAX_CLAIM_LEN} bytes"),
                ))
            } else {
                Ok(value)
            }
        };
        let (target, cutoff) = match (req.jti, req.subject) {
            (Some(_), Some(_)) => return Err(invalid("jti", "give a jti or a subject, not both")),
            (None, None) => return Err(invalid("subject", "give a jti or a subject")),
            (Some(jti), None) => {
                if req.before_ms.is_some() {
                    return Err(invalid("before", "only with subject"));
                }
                // A token carrying this jti was issued by now, so it expires within its
                // issuer's bound from now.
                (
                    TokenTarget::Jti {
                        jti: claim("jti", jti)?,
                    },
                    now,
                )
            }
            (None, Some(subject)) => {
                let before_ms = req.before_ms.unwrap_or(now);
                if before_ms > now + MAX_CUTOFF_AHEAD_MS {
                    return Err(invalid("before", "must not be in the future"));
                }
                let subject = claim("subject", subject)?;
                (TokenTarget::Subject { subject, before_ms }, before_ms)
            }
        };
        Ok(TokenRevocation {
            issuer: req.issuer,
            target,
            at_ms: now,
            expires_at_ms: cutoff.saturating_add(lifetime.as_millis() as u64),
        })
    }
}

/// Delegations: which tenants a partner's keys may act for. A change is written with its
/// stream event and forgotten here at once (other replicas forget on the event).
pub struct PartnerAdmin {
    store: Arc<dyn DelegationRecords>,
    delegations: Arc<Delegations>,
    audit: Arc<Audit>,
}

impl PartnerAdmin {
    pub fn new(
        store: Arc<dyn DelegationRecords>,
        delegations: Arc<Delegations>,
        audit: Arc<Audit>,
    ) -> Self {
        PartnerAdmin {
            store,
            delegations,
            audit,
        }
    }

    /// Grants (`granted`) or withdraws; returns whether anything changed. Audited.
    pub async fn set(
        &self,
        partner_id: &str,
        tenant_id: &str,
        granted: bool,
    ) -> Result<(Delegation, bool), AdminError> {
        let r = self.set_delegation(partner_id, tenant_id, granted).await;
        let subject = Subject {
            key_id: None,
            tenant_id: Some(tenant_id.trim().to_owned()).filter(|t| !t.is_empty()),
            partner_id: Some(partner_id.trim().to_owned()).filter(|p| !p.is_empty()),
        };
        let action = if granted {
            "delegation.granted"
        } else {
            "delegation.withdrawn"
        };
        self.audit.admin(action, subject, &r).await;
        r
    }

    async fn set_delegation(
        &self,
        partner_id: &str,
        tenant_id: &str,
        granted: bool,
    ) -> Result<(Delegation, bool), AdminError> {
        let d = Delegation {
            partner_id: check_id("partner_id", partner_id)?.to_owned(),
            tenant_id: check_tenant(tenant_id)?,
        };
        let changed = self.store.set_delegation(&d, granted, now_ms()).await?;
        if changed {
            self.delegations.changed(&d.partner_id, &d.tenant_id);
        }
        tracing::info!(partner = %d.partner_id, tenant = %d.tenant_id, granted, changed, "delegation set");
        Ok((d, changed))
    }

    /// A partner's tenants, or a tenant's partners: exactly one of the two.
    pub async fn list(
        &self,
        partner_id: &str,
        tenant_id: &str,
    ) -> Result<Vec<Delegation>, AdminError> {
        let of = match (partner_id.trim().is_empty(), tenant_id.trim().is_empty()) {
            (false, true) => DelegationsOf::Partner(check_id("partner_id", partner_id)?.to_owned()),
            (true, false) => DelegationsOf::Tenant(check_tenant(tenant_id)?),
            _ => {
                return Err(invalid(
                    "partner_id",
                    "give exactly one of partner_id and tenant_id",
                ))
            }
        };
        Ok(self.store.delegations(&of).await?)
    }
}
