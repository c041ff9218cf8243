//! keygate inside Envoy: the deciding half of the dynamic module (the
//! `keygate-envoy-module` crate holds the other half, Envoy's ABI, and nothing else).
//!
//! The module runs in front of Envoy's ext_authz filter. On each request it either
//! answers as the service would (`Local::Allow`, `Local::Deny`) or hands the request to
//! ext_authz (`Local::Defer`, `Local::HandOver`, `Local::NotFollowing`). It answers only
//! from what it holds for sure: a credential the service verified and the module learned
//! (`api::envoy_learn`), the delegations the service's answers showed, and the policy,
//! compiled from the same configuration by the same code (`Authorizer::decide_known`),
//! in its current version (`CurrentEnvoy`: a reload reaches the module as it reaches a
//! replica). Anything that needs the store, argon2, a JWT validation, a rate limit, a
//! lease or a session mint goes to the service. So does everything while the module's
//! revocation follower is not following the service's `Watch` stream: a module that
//! might miss a revocation decides nothing.
//!
//! A credential whose every request needs the service (its plan limits its rate) is
//! remembered for a moment (`HANDED_OVER_FOR`) under a hash of the headers it came in,
//! and its next requests are handed over at once, before they are even read.
//! That memo only ever hands a request over, which is never wrong: the service decides
//! it as it would without the module. Any invalidation the module applies forgets it.
//!
//! What it learns is kept only from a service deciding by the same settings (the id in
//! the answer is the module's own: `Config::rules_id`), and only when nothing it knows
//! of overtook the answer: the answering replica's stream position must cover every
//! event the module had applied when it asked (a replica that is behind cannot teach it
//! a revoked key), and no invalidation may have reached the module's cache (or
//! delegation change its delegations) while the request was out.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use super::envoy::{Answer, CurrentEnvoy, EnvoyAuthorization};
use super::envoy_answer::{AllowAnswer, Identity};
use super::envoy_learn::Learned;
use crate::cache::{CredentialCache, Digest, Verified};
use crate::credential::Credential;
use crate::principal::KeyKind;
use crate::request::{join_header, AuthRequest};
use crate::revocation::RevocationBus;
use crate::store::Cursor;
use crate::tenant::Delegations;

pub use super::envoy_learn::LEARN_HEADER;

/// What the module does with one request.
#[derive(Debug)]
pub enum Local {
    /// Let it pass, as the service's allow would.
    Allow(LocalAllow),
    /// Answer it, as the service's denial would.
    Deny(LocalDeny),
    /// Hand it to ext_authz, asking to learn from the answer.
    Defer(Ticket),
    /// Hand it to ext_authz, with nothing to learn: the module holds the credential's
    /// answer already, and the request needs what only the service has (a rate limit,
    /// a lease, a session mint, a delegation not seen yet).
    HandOver,
    /// Hand it to ext_authz, unread, with nothing to learn: the module is not following
    /// the service's revocation stream, so it decides nothing (and could keep nothing
    /// it learned).
    NotFollowing,
}

/// An allow, in the terms of Envoy's filter ABI: read straight from the service's own
/// allow (`AllowAnswer`), so that nothing is copied on the way to Envoy, which copies
/// every header and field it is given anyway.
#[derive(Debug)]
pub struct LocalAllow(AllowAnswer);

impl LocalAllow {
    /// Request headers set upstream (each replaces any value the request had).
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.identity.iter().flat_map(Identity::headers)
    }

    /// Request headers removed.
    pub fn remove(&self) -> &[String] {
        &self.0.remove
    }

    /// Headers added to the client's response.
    pub fn response_headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.client_headers()
    }

    /// The dynamic metadata (ext_authz's namespace), where the service sends it: its
    /// string fields, and the `scopes` list.
    pub fn metadata(&self) -> Option<(impl Iterator<Item = (&str, &str)>, &[String])> {
        let identity = self.0.identity.as_ref().filter(|i| i.metadata)?;
        Some((identity.metadata(), identity.scopes()))
    }
}

/// A denial: the local reply Envoy sends.
#[derive(Debug)]
pub struct LocalDeny {
    /// The public error code shown (the body's, unless the body's template leaves it out).
    pub code: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// What the module knew when it handed a request over, to judge the answer by.
#[derive(Debug)]
pub struct Ticket {
    digest: Option<Digest>,
    cache_epoch: u64,
    delegation_changes: u64,
    after: Cursor,
}

/// Why a learned answer was not kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotLearned {
    #[error("the answer's metadata is not keygate's: {0}")]
    Unreadable(String),
    #[error("the request had no credential to learn")]
    NoCredential,
    #[error("the answering replica was behind this module in the revocation stream")]
    ReplicaBehind,
    #[error("a revocation event or delegation change arrived while the request was out")]
    Overtaken,
    #[error("the module is not following the revocation stream")]
    NotFollowing,
    #[error(
        "the service decides by other settings than this module ({service}, not {module}): \
         give both the same configuration"
    )]
    OtherRules { service: String, module: String },
}

impl NotLearned {
    /// Its name in Envoy's counters (`keygate_module_not_learned`, label `reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            NotLearned::Unreadable(_) => "unreadable",
            NotLearned::NoCredential => "no_credential",
            NotLearned::ReplicaBehind => "replica_behind",
            NotLearned::Overtaken => "overtaken",
            NotLearned::NotFollowing => "not_following",
            NotLearned::OtherRules { .. } => "other_rules",
        }
    }
}

/// A module whose settings are not the service's hands every request over; this says
/// why in Envoy's log, once a second at most.
static OTHER_RULES_LOGGED: crate::telemetry::LogBudget = crate::telemetry::LogBudget::new(1);

/// How long a credential whose requests all need the service is handed over without
/// deciding: a policy reload that lifts its plan's limit reaches the module within this.
const HANDED_OVER_FOR: Duration = Duration::from_secs(1);
/// Credentials remembered so at most; past it the least used are forgotten (and decided
/// again on their next request).
const HANDED_OVER_MAX: u64 = 65_536;

pub struct ModuleDecider {
    /// The rules it decides by: the current ones, which a reload of the configuration
    /// file replaces (`server::Live`, as on a replica).
    rules: Arc<dyn CurrentEnvoy>,
    bus: Arc<RevocationBus>,
    cache: Arc<CredentialCache>,
    delegations: Arc<Delegations>,
    /// Hash of a request's credential headers (`memo`) → the cache's epoch when its
    /// request was handed over because its plan limits its rate. Only ever a reason to
    /// hand a request over: a hash shared by two credentials costs the other one a round
    /// trip to the service, nothing more.
    handed_over: moka::sync::Cache<u64, u64>,
    /// Keyed per process, so the hashes tell nothing outside it.
    memo_hash: RandomState,
}

impl ModuleDecider {
    /// `rules`' adapters must be gated on `bus`, and `bus` follow the service's `Watch`
    /// stream.
    pub fn new(
        rules: Arc<dyn CurrentEnvoy>,
        bus: Arc<RevocationBus>,
        cache: Arc<CredentialCache>,
        delegations: Arc<Delegations>,
    ) -> Self {
        ModuleDecider {
            rules,
            bus,
            cache,
            delegations,
            handed_over: moka::sync::Cache::builder()
                .max_capacity(HANDED_OVER_MAX)
                .time_to_live(HANDED_OVER_FOR)
                .build(),
            memo_hash: RandomState::new(),
        }
    }

    /// Whether the revocation follower is following now: only then does the module
    /// decide anything itself.
    pub fn following(&self) -> bool {
        self.bus.has_position() && self.bus.is_connected()
    }

    /// What the module does with a request whose headers (pseudo-headers included) are
    /// `headers`, by the current rules: a remembered credential's request is handed over
    /// before the request is even read; otherwise the request is read (`read`) and
    /// decided (`decide`). `None` where `read` refuses to read it: the service's to
    /// judge.
    pub fn answer(&self, headers: &[(&[u8], &[u8])]) -> Option<Local> {
        if !self.following() {
            return Some(Local::NotFollowing);
        }
        // One version of the rules for the whole request, whatever a reload does meanwhile.
        let envoy = self.rules.envoy();
        let memo = memo(&envoy, &self.memo_hash, headers);
        if self.remembered(memo) {
            return Some(Local::HandOver);
        }
        let req = read(&envoy, headers.iter().copied())?;
        Some(self.decide(&envoy, &req, memo))
    }

    /// Whether the credential `memo` names was handed over for its plan since the last
    /// invalidation, and not long ago (`HANDED_OVER_FOR`).
    fn remembered(&self, memo: Option<u64>) -> bool {
        memo.and_then(|m| self.handed_over.get(&m))
            .is_some_and(|epoch| epoch == self.cache.epoch())
    }

    /// The module's answer to `req`, whose credential headers `memo` names (`memo`):
    /// reached through `answer` only, which asks whether the module is following and
    /// looks in the memo first.
    fn decide(&self, envoy: &EnvoyAuthorization, req: &AuthRequest, memo: Option<u64>) -> Local {
        match envoy.decide_known(req) {
            None => {
                let token = match envoy.credentials().extract(req) {
                    Credential::ApiKey(token) | Credential::Jwt(token) => Some(token),
                    Credential::None | Credential::Unrecognized => None,
                };
                self.hand_over(envoy, token, memo)
            }
            Some(Answer::Allow(allow)) => Local::Allow(LocalAllow(allow)),
            Some(Answer::Deny { error, headers }) => Local::Deny(LocalDeny {
                code: error.code,
                status: error.status,
                headers: headers
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
                body: error.body.to_string(),
            }),
        }
    }

    /// The request of `token` (whose hash is `memo`) for the service; asking to learn
    /// from its answer unless the module holds the credential's answer already (asking
    /// again would only cost both sides the principal's round trip, on every request of
    /// a key on a rate-limited plan), but for a partner key's.
    fn hand_over(
        &self,
        envoy: &EnvoyAuthorization,
        token: Option<&str>,
        memo: Option<u64>,
    ) -> Local {
        // Read before the entry: an invalidation between the two forgets what is
        // remembered here.
        let epoch = self.cache.epoch();
        let digest = token.map(|t| self.cache.digest(t));
        // A partner key's answer is learned again: a tenant delegated to it that the
        // module has not seen is learned from it.
        match digest.and_then(|d| self.cache.peek(&d)) {
            Some(Verified::Valid(p)) if p.kind != KeyKind::Partner => {
                if let Some(memo) = memo.filter(|_| envoy.rate_limited(&p)) {
                    self.handed_over.insert(memo, epoch);
                }
                Local::HandOver
            }
            _ => Local::Defer(self.ticket(digest)),
        }
    }

    /// Taken before the request leaves for the service: anything applied here after
    /// this is checked against the answer (`learn`).
    fn ticket(&self, digest: Option<Digest>) -> Ticket {
        // One snapshot: an event is applied to the cache, the delegations and the
        // position together, never in part of what the ticket reads.
        self.bus.at_position(|after| Ticket {
            digest,
            cache_epoch: self.cache.epoch(),
            delegation_changes: self.delegations.changes(),
            after: after.clone(),
        })
    }

    /// Learns the service's allow of a handed-over request, from the `learn` field of
    /// its dynamic metadata: the next request with that credential (and, for a partner
    /// key, that tenant) is answered here. `Ok` only when it was kept.
    pub fn learn(&self, ticket: &Ticket, text: &str) -> Result<(), NotLearned> {
        let learned =
            Learned::from_json(text).map_err(|e| NotLearned::Unreadable(e.to_string()))?;
        let after = Cursor::parse(&learned.after)
            .ok_or_else(|| NotLearned::Unreadable("after is not a stream position".into()))?;
        let digest = ticket.digest.ok_or(NotLearned::NoCredential)?;
        if !self.following() {
            return Err(NotLearned::NotFollowing);
        }
        // Its next requests would be decided here by this module's settings: only the
        // same as the service's give the service's answers.
        let module = self.rules.envoy().rules_id().to_string();
        if learned.rules != module {
            let refused = NotLearned::OtherRules {
                service: learned.rules,
                module,
            };
            if let Some(not_logged) = OTHER_RULES_LOGGED.admit() {
                tracing::warn!(event = "module.other_rules", error = %refused, not_logged, "keygate module: nothing is learned from this service");
            }
            return Err(refused);
        }
        if !covers(&after, &ticket.after) {
            return Err(NotLearned::ReplicaBehind);
        }
        let principal = Arc::new(learned.principal);
        let delegated = match (
            &learned.tenant,
            principal.kind,
            principal.partner_id.as_deref(),
        ) {
            (Some(tenant), KeyKind::Partner, Some(partner)) => Some((partner, tenant.as_str())),
            _ => None,
        };
        if let Some((partner, tenant)) = delegated {
            if !self
                .delegations
                .learn(partner, tenant, ticket.delegation_changes)
            {
                return Err(NotLearned::Overtaken);
            }
        }
        if !self
            .cache
            .learn(digest, Arc::clone(&principal), ticket.cache_epoch)
        {
            return Err(NotLearned::Overtaken);
        }
        Ok(())
    }
}

/// The request as the service's adapter would read it from Envoy, by `envoy`'s rules:
/// its method and path, and the headers a decision consults, repeated ones joined with
/// commas. `None` if one of those is not UTF-8 (Envoy would send ext_authz `!` in its
/// place: that request is the service's to judge), or the method or path is missing.
fn read<'h>(
    envoy: &EnvoyAuthorization,
    headers: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
) -> Option<AuthRequest> {
    let mut consulted: HashMap<String, String> = HashMap::new();
    let (mut method, mut path) = (None, None);
    for (name, value) in headers {
        // Envoy's ext_authz sends the request's method and path as fields of their
        // own, which the service reads; here they are the pseudo-headers.
        match name {
            b":method" => method = Some(std::str::from_utf8(value).ok()?.to_owned()),
            b":path" => path = Some(std::str::from_utf8(value).ok()?.to_owned()),
            _ => {}
        }
        if !envoy.consults(name) {
            continue;
        }
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let value = std::str::from_utf8(value).ok()?;
        join_header(
            &mut consulted,
            name.to_ascii_lowercase(),
            Cow::Borrowed(value),
        );
    }
    Some(AuthRequest {
        method: method?,
        path: path?,
        headers: consulted,
        peer: None,
        credential: None,
    })
}

/// The hand-over memo's name for the credential of a request with `headers`: a
/// hash of the headers a credential is read from, in order, as Envoy holds them.
/// The credential is a function of those alone (`CredentialSource::extract`), so
/// the same headers name the same credential. `None`: the request has none of them.
fn memo(
    envoy: &EnvoyAuthorization,
    keyed: &RandomState,
    headers: &[(&[u8], &[u8])],
) -> Option<u64> {
    let mut hasher = keyed.build_hasher();
    let mut any = false;
    for (name, value) in headers {
        let source = envoy
            .credentials()
            .header_names()
            .position(|h| name.eq_ignore_ascii_case(h.as_bytes()));
        if let Some(source) = source {
            any = true;
            hasher.write_usize(source);
            hasher.write_usize(value.len());
            hasher.write(value);
        }
    }
    any.then(|| hasher.finish())
}

/// Whether `replica` is at or past `module` in every partition.
fn covers(replica: &Cursor, module: &Cursor) -> bool {
    replica.partitions() == module.partitions()
        && replica.0.iter().zip(&module.0).all(|(r, m)| r >= m)
}

#[cfg(test)]
mod tests;
