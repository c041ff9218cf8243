//! One version of the decision sections (`policy`, `errors`, `jwt`, `sessions`,
//! `rate_limits`, `api_keys`' limits), built into the services that answer with them,
//! and what stays from one version to the next (`Shared`: the store, the caches, the
//! revocation bus). A live reload (`live.rs`) builds a new `Rules` beside the running one
//! and swaps it in whole; a request runs to its end on the version it started with.

use std::sync::Arc;

use tokio::sync::watch;

use crate::api::authorizer::AuthorizerService;
use crate::api::envoy::{EnvoyAuthorization, EnvoyOptions};
use crate::api::keys::KeysService;
use crate::apikey::SecretHasher;
use crate::authn::Authenticator;
use crate::authorizer::Authorizer;
use crate::cache::CredentialCache;
use crate::config::{Config, Secrets};
use crate::decision::ErrorShape;
use crate::jwt::session::SessionKeys;
use crate::jwt::JwtVerifier;
use crate::keys::{KeyAdmin, TokenAdmin};
use crate::policy::Policy;
use crate::ratelimit::Limiter;
use crate::revocation::RevocationBus;
use crate::store::KeyStore;

/// What every version of the rules uses and no reload replaces.
#[derive(Clone)]
pub struct Shared {
    pub store: Arc<dyn KeyStore>,
    pub hasher: SecretHasher,
    pub cache: Arc<CredentialCache>,
    pub revoked_tokens: Arc<crate::jwt::revoked::RevokedTokens>,
    pub audit: Arc<crate::audit::Audit>,
    pub delegations: Arc<crate::tenant::Delegations>,
    pub usage: Arc<crate::usage::UsageCounter>,
    pub bus: Arc<RevocationBus>,
    /// Wrong secrets per key id: a reload must not reset what a guesser has spent.
    pub failures: Arc<crate::authn::FailureBudget>,
    /// Read again when a version changes `jwt` or `sessions` (their issuers are rebuilt
    /// then, and an issuer's or a session key's secret file may have been replaced).
    pub secrets: Secrets,
}

/// A JWT verifier and the switch that ends its background refresh once no version of
/// the rules uses it any more.
pub struct Issuers {
    pub jwt: Arc<JwtVerifier>,
    pub sessions: Option<Arc<SessionKeys>>,
    retire: watch::Sender<bool>,
}

impl Issuers {
    /// Refreshes the issuers' key sets until they are replaced or `stop` is set.
    pub fn spawn_refresh(&self, mut stop: watch::Receiver<bool>) {
        let (jwt, retired) = (self.jwt.clone(), self.retire.subscribe());
        tokio::spawn(async move {
            tokio::select! {
                _ = jwt.refresh_in_background(retired) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

impl Drop for Issuers {
    fn drop(&mut self) {
        let _ = self.retire.send(true);
    }
}

/// One version of the decision sections, built.
pub struct Rules {
    pub config: Config,
    pub authorizer: Arc<Authorizer>,
    pub(super) errors: Arc<ErrorShape>,
    pub(super) issuers: Arc<Issuers>,
    /// Kept by the next version when the plans did not change.
    limiter: Arc<Limiter>,
    pub(super) admin: Arc<KeyAdmin>,
    pub(super) token_admin: Arc<TokenAdmin>,
    /// The adapters, each answering with this version.
    pub(super) envoy: Arc<EnvoyAuthorization>,
    pub(super) checks: AuthorizerService,
    pub(super) keys: KeysService,
}

impl Rules {
    /// Builds `config`'s decision sections around `shared`. What `previous` built from
    /// sections that did not change is kept: its issuers (no JWKS fetched again, an
    /// ephemeral session key kept) and its limiter (the admissions it holds).
    pub fn build(
        config: Config,
        shared: &Shared,
        previous: Option<&Rules>,
    ) -> anyhow::Result<Rules> {
        let kept = |paths: &[&[&str]]| {
            previous.filter(|p| paths.iter().all(|path| !p.config.changed(&config, path)))
        };
        let issuers = match kept(&[&["jwt"], &["sessions"]]) {
            Some(p) => p.issuers.clone(),
            None => {
                let secret = |var: &str| shared.secrets.named(var);
                let sessions = SessionKeys::load(&config.sessions, secret)?.map(Arc::new);
                let jwt = Arc::new(JwtVerifier::new(&config.jwt, sessions.as_deref(), secret)?);
                Arc::new(Issuers {
                    jwt,
                    sessions,
                    retire: watch::channel(false).0,
                })
            }
        };
        let limiter = match kept(&[
            &["policy", "plans"],
            &["policy", "default_plans"],
            &["rate_limits"],
        ]) {
            Some(p) => p.limiter.clone(),
            None => Arc::new(Limiter::new(
                shared.store.clone(),
                &config.policy,
                &config.rate_limits,
            )),
        };
        let authn = Authenticator::new(
            shared.store.clone(),
            shared.hasher.clone(),
            shared.cache.clone(),
            &config.api_keys,
            issuers.jwt.clone(),
            shared.revoked_tokens.clone(),
            shared.audit.clone(),
            shared.failures.clone(),
        );
        let policy = Policy::compile(&config.policy)?;
        let errors = Arc::new(ErrorShape::compile(&config.errors)?);
        let authorizer = Arc::new(Authorizer::new(
            &config.policy,
            policy,
            authn,
            shared.delegations.clone(),
            limiter.clone(),
            shared.usage.clone(),
            issuers.sessions.clone(),
        ));
        let token_admin = Arc::new(TokenAdmin::new(
            shared.store.clone(),
            issuers.jwt.clone(),
            shared.revoked_tokens.clone(),
            shared.audit.clone(),
        ));
        // A key's change reaches its session tokens through the key's own state (each
        // replica judges a session token on its key as it knows it now), not through
        // revocations written here.
        let admin = Arc::new(KeyAdmin::new(
            shared.store.clone(),
            shared.hasher.clone(),
            shared.cache.clone(),
            config.api_keys.clone(),
            &config.policy,
            shared.audit.clone(),
        ));
        let envoy = Arc::new(
            EnvoyAuthorization::new(
                authorizer.clone(),
                errors.clone(),
                EnvoyOptions {
                    strip_credentials: config.policy.strip_credential_headers,
                    dynamic_metadata: config.policy.dynamic_metadata,
                    rules: config.rules_id(),
                },
            )
            .gated(shared.bus.clone()),
        );
        let checks =
            AuthorizerService::new(authorizer.clone(), errors.clone()).gated(shared.bus.clone());
        let keys = KeysService::new(admin.clone(), token_admin.clone());
        Ok(Rules {
            config,
            authorizer,
            errors,
            issuers,
            limiter,
            admin,
            token_admin,
            envoy,
            checks,
            keys,
        })
    }
}
