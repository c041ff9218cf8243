//! `KeyAdmin`: creates, rotates, updates, revokes, deletes, reads and lists API keys, and
//! reads the audit trail; every change is audited and dropped from this replica's cache.
//! It must not know the transport (`api/keys.rs` maps it onto gRPC) and changes nothing
//! when an argument is wrong.

use std::sync::Arc;
use std::time::Duration;

use super::key_requests::{
    check_key_id, check_name, check_plan, check_scopes, owner_of_new, CreatedKey, KeyOwner,
    KeyUpdate, NewKey, Rotated, StatusFilter,
};
use super::{invalid, AdminError};
use crate::apikey::{self, SecretHasher};
use crate::audit::{Audit, AuditEntry, AuditQuery, Subject};
use crate::cache::CredentialCache;
use crate::config::ApiKeysConfig;
use crate::principal::{Environment, KeyKind};
use crate::store::{
    now_ms, EventKind, KeyChange, KeyPage, KeyRecord, KeyRecords, KeyStatus, Owner, NEVER,
};
use crate::telemetry::metrics;

pub const MAX_PAGE_SIZE: usize = 1000;
pub const DEFAULT_PAGE_SIZE: usize = 100;

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

    /// What the store answered a change of `key_id` with (`NotFound` when there was no
    /// such key), once this replica's cached copy is dropped; `kind` is the event the
    /// store appended in the same step, which drops the other replicas'.
    fn changed(
        &self,
        key_id: &str,
        kind: EventKind,
        stored: Option<KeyRecord>,
    ) -> Result<KeyRecord, AdminError> {
        let record = stored.ok_or_else(|| AdminError::NotFound(key_id.to_owned()))?;
        self.cache.invalidate_key(key_id, Some(kind));
        Ok(record)
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
        tracing::info!(event = "admin.key_created", key_id = %record.key_id, owner = %owner.index_name(), "API key created");
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
        let stored = self.store.update(key_id, &change, now).await?;
        let previous = self.changed(key_id, EventKind::Updated, stored)?;
        tracing::info!(event = "admin.key_rotated", key_id, successor = %successor.record.key_id, "API key rotated");
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
        let stored = self.store.update(key_id, &change, now_ms()).await?;
        let record = self.changed(key_id, EventKind::Updated, stored)?;
        tracing::info!(event = "admin.key_updated", key_id, "API key updated");
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
        self.existing(check_key_id(key_id)?).await
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
        let stored = self.store.revoke(key_id, now_ms()).await?;
        let record = self.changed(key_id, EventKind::Revoked, stored)?;
        metrics().keys_revoked.inc();
        tracing::info!(event = "admin.key_revoked", key_id, "API key revoked");
        Ok(record)
    }

    async fn delete_key(&self, key_id: &str) -> Result<KeyRecord, AdminError> {
        let key_id = check_key_id(key_id)?;
        let stored = self.store.delete(key_id, now_ms()).await?;
        let record = self.changed(key_id, EventKind::Deleted, stored)?;
        tracing::info!(event = "admin.key_deleted", key_id, "API key deleted");
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
