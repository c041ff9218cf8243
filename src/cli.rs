//! The `keygate` command line: `serve`, `keys …`, `check`. Every command that prints
//! something a script would read takes `--json` and then prints one JSON object.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::api::proto::{self, authorizer_client::AuthorizerClient, keys_client::KeysClient};
use crate::api::rfc3339;
use crate::config::{Config, Secrets, DEV_CONFIG};
use crate::secret::Secret;
use crate::server;

/// Exit code of `keygate check` when the request is denied.
pub const EXIT_DENIED: i32 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "keygate",
    version,
    about = "External authorization for Envoy and internal callers."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Administer API keys (talks to the admin listener).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Revoke JWTs of a configured issuer (talks to the admin listener).
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Which tenants partners may act for (talks to the admin listener).
    #[command(subcommand)]
    Partners(PartnersCommand),
    /// The audit trail (talks to the admin listener).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Ask a running keygate whether a request with this token may pass.
    Check(CheckArgs),
    /// keygate's own session tokens (talks to the gRPC listener).
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Concurrent-session leases: take one of a key's plan's sessions, keep it, give it
    /// back (talks to the gRPC listener).
    #[command(subcommand)]
    Leases(LeasesCommand),
}

#[derive(Subcommand, Debug)]
pub enum LeasesCommand {
    /// Take one of the key's concurrent sessions for --ttl. Prints the lease id, which
    /// renews and releases it; exits 3 with the denial when every session is in use.
    Acquire {
        /// The API key whose session this is.
        #[arg(long)]
        token: Secret,
        /// How long the lease lasts unless renewed, e.g. 1h (1s to 24h).
        #[arg(long)]
        ttl: String,
        #[command(flatten)]
        grpc: GrpcArgs,
        /// Print only the lease id (for `LEASE=$(keygate leases acquire … --quiet)`).
        #[arg(long, short, conflicts_with = "json")]
        quiet: bool,
    },
    /// Extend a held lease to --ttl from now.
    Renew {
        /// The lease id (from `acquire`, or `x-keygate-lease-id` on a route that takes one).
        lease_id: String,
        /// e.g. 1h (1s to 24h).
        #[arg(long)]
        ttl: String,
        #[command(flatten)]
        grpc: GrpcArgs,
    },
    /// Give a session back at once: the key may take another.
    Release {
        /// The lease id (from `acquire`, or `x-keygate-lease-id` on a route that takes one).
        lease_id: String,
        #[command(flatten)]
        grpc: GrpcArgs,
    },
}

/// Where keygate's gRPC listener is, and how to print.
#[derive(Args, Debug, Clone)]
pub struct GrpcArgs {
    /// keygate's gRPC listener, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "KEYGATE_URL")]
    pub url: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum SessionsCommand {
    /// Mint a session token from an API key: for its tenant, with a subset of its
    /// scopes, for one hour unless --ttl says otherwise. Printed once.
    Mint {
        /// The API key.
        #[arg(long)]
        token: Secret,
        /// Comma-separated; default: all of the key's scopes.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Lifetime, e.g. 15m (default: sessions.lifetime).
        #[arg(long)]
        ttl: Option<String>,
        /// A partner key's delegated tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// keygate's gRPC listener, e.g. http://127.0.0.1:50051.
        #[arg(long, env = "KEYGATE_URL")]
        url: Option<String>,
        #[arg(long)]
        json: bool,
        /// Print only the token (for `SESSION=$(keygate sessions mint … --quiet)`).
        #[arg(long, short, conflicts_with = "json")]
        quiet: bool,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// YAML configuration file.
    #[arg(long, env = "KEYGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Zero-setup mode: in-memory store, the built-in sample policy (unless --config),
    /// generated pepper and admin token (unless set), and a state file the CLI reads.
    #[arg(long)]
    pub dev: bool,
    /// Check everything `serve` checks before it binds its ports and reaches the store
    /// (the configuration, the secrets, the session keys, the JWT issuers' keys, the TLS
    /// files, the policy, the error shapes) and exit: 0 and `configuration ok`, or the
    /// error `serve` would stop with, naming its field. Needs the same environment
    /// (secrets) and files as `serve`; binds no port and needs no store.
    #[arg(long)]
    pub check: bool,
}

#[derive(Args, Debug, Clone)]
pub struct AdminArgs {
    /// Admin listener, e.g. http://127.0.0.1:50052.
    #[arg(long, env = "KEYGATE_ADMIN_URL", global = true)]
    pub admin_url: Option<String>,
    /// Admin credential. Prefer the environment variable: arguments show in `ps`.
    #[arg(
        long,
        env = "KEYGATE_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub admin_token: Option<Secret>,
    /// Print one JSON object.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a key. The token is printed once and cannot be shown again.
    Create {
        /// tenant (with --tenant), partner (with --partner) or runtime (with --service).
        #[arg(long, default_value = "tenant")]
        kind: String,
        /// The tenant a tenant key belongs to.
        #[arg(long, default_value = "")]
        tenant: String,
        /// The partner a partner key belongs to; it acts for the tenants delegated to it.
        #[arg(long, default_value = "")]
        partner: String,
        /// The internal service a runtime key belongs to.
        #[arg(long, default_value = "")]
        service: String,
        /// Comma-separated scopes, e.g. contacts:read,contacts:write.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// live or test.
        #[arg(long, default_value = "live")]
        env: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Lifetime, e.g. 90d, 12h (default: the server's default lifetime), or `never`
        /// where the deployment allows keys that never expire.
        #[arg(long)]
        expires_in: Option<String>,
        #[arg(long, default_value = "")]
        plan: String,
        /// Print only the token (for `TOKEN=$(keygate keys create … --quiet)`).
        #[arg(long, short, conflicts_with = "json")]
        quiet: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Replace a key: a successor with the same owner, scopes, plan and name (its token
    /// printed once); the old key keeps working for the grace, then expires.
    Rotate {
        key_id: String,
        /// How long the old key keeps working, e.g. 1h, 0s (default 24h).
        #[arg(long, default_value = "24h")]
        grace: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the keys of a tenant, a partner or a service (metadata only).
    List {
        /// active, expired, revoked or all (default: active and expired).
        #[arg(long, default_value = "")]
        status: String,
        #[arg(long, default_value = "")]
        tenant: String,
        #[arg(long, default_value = "")]
        partner: String,
        #[arg(long, default_value = "")]
        service: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show one key.
    Get {
        key_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke a key at once.
    Revoke {
        key_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Change a key's name, scopes, plan or lifetime. Every replica stops using the old
    /// values at once.
    Update {
        key_id: String,
        #[arg(long)]
        name: Option<String>,
        /// Replaces the scopes (comma-separated; "" for none).
        #[arg(long, value_delimiter = ',')]
        scopes: Option<Vec<String>>,
        /// "" clears the plan.
        #[arg(long)]
        plan: Option<String>,
        /// A new lifetime counted from now, e.g. 30d.
        #[arg(long)]
        expires_in: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete a key.
    Delete {
        key_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Entries oldest first: key and delegation changes, JWT revocations, guessed keys.
    List {
        #[arg(long, default_value = "")]
        key: String,
        #[arg(long, default_value = "")]
        tenant: String,
        /// From this time on (RFC 3339 or unix seconds).
        #[arg(long)]
        since: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum PartnersCommand {
    /// Let PARTNER's keys act for TENANT (naming it in X-Tenant-Id).
    Delegate {
        partner: String,
        tenant: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Withdraw it: every replica refuses PARTNER in TENANT at once.
    Undelegate {
        partner: String,
        tenant: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List a partner's tenants, or a tenant's partners.
    #[command(group = clap::ArgGroup::new("of").required(true).args(["partner", "tenant"]))]
    Delegations {
        #[arg(long)]
        partner: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokensCommand {
    /// Revoke one token by its `jti`, or every token of a subject issued before a time.
    /// Every replica denies them at once.
    #[command(group = clap::ArgGroup::new("which").required(true).args(["jti", "subject"]))]
    Revoke {
        /// The issuer's configured name (jwt.issuers[].name).
        #[arg(long)]
        issuer: String,
        /// The token's `jti` claim.
        #[arg(long)]
        jti: Option<String>,
        /// The subject whose tokens are revoked.
        #[arg(long)]
        subject: Option<String>,
        /// With --subject: revoke tokens issued before this (RFC 3339, e.g.
        /// 2026-12-01T10:00:00Z, or unix seconds). Default: now.
        #[arg(long)]
        before: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The credential (API key). Leave out to ask about a request without one.
    #[arg(long, default_value = "")]
    pub token: Secret,
    #[arg(long, default_value = "GET")]
    pub method: String,
    #[arg(long)]
    pub path: String,
    #[arg(long)]
    pub tenant: Option<String>,
    /// keygate's gRPC listener, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "KEYGATE_URL")]
    pub url: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// Runs the command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => serve(args).await.map(|_| 0),
        Command::Keys(cmd) => keys(cmd).await.map(|_| 0),
        Command::Tokens(cmd) => tokens(cmd).await.map(|_| 0),
        Command::Partners(cmd) => partners(cmd).await.map(|_| 0),
        Command::Audit(cmd) => audit(cmd).await.map(|_| 0),
        Command::Check(args) => check(args).await,
        Command::Sessions(cmd) => sessions(cmd).await,
        Command::Leases(cmd) => leases(cmd).await,
    }
}

// ---------------------------------------------------------------------------------------
// serve

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let yaml = match &args.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read configuration file {}", path.display()))?,
        ),
        None if args.dev => Some(DEV_CONFIG.to_owned()),
        None => None,
    };
    let config = Config::load(yaml.as_deref(), std::env::vars())?;
    let secrets = Secrets::from_env(args.dev)?;
    crate::telemetry::init_logging(&config.logging, &config.traces).map_err(|e| anyhow!(e))?;
    let admin_token = secrets.admin_token.clone();
    // One routine reads and checks all that serve needs short of its ports and its store,
    // so --check refuses exactly what serve refuses, with the same message.
    let app = server::App::build(config, secrets)?;
    if args.check {
        println!("configuration ok");
        return Ok(());
    }
    if !args.dev && app.config.store.backend == crate::config::StoreBackend::Memory {
        tracing::warn!("store.backend is memory: keys live only as long as this process");
    }
    let running = server::start(std::sync::Arc::new(app)).await?;
    let state = if args.dev {
        let path = dev_state_path();
        write_dev_state(&path, &running, admin_token.expose())?;
        eprintln!(
            "keygate is running in dev mode (in-memory store, sample policy).\n  \
             gRPC (Envoy ext_authz, keygate.v1): {}\n  admin: {}\n  http: {}\n\
             The CLI on this machine finds the admin credential in {}.\n\
             Try: keygate keys create --tenant 9f1c7d4e-2b7a-4c1e-9d55-0b3f6a2e8c11 --scopes contacts:read",
            running.grpc,
            running.admin,
            running.http,
            path.display()
        );
        Some(path)
    } else {
        None
    };
    let drainer = running.drainer();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        drainer.drain().await;
    });
    let result = running.wait().await;
    crate::telemetry::flush_traces();
    if let Some(path) = state {
        let _ = std::fs::remove_file(path);
    }
    result
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("can install a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Where `serve --dev` leaves its addresses and admin credential for the CLI.
pub fn dev_state_path() -> PathBuf {
    let dir = std::env::var_os("KEYGATE_STATE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("keygate")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/keygate")))
        .unwrap_or_else(|| std::env::temp_dir().join("keygate"));
    dir.join("dev.json")
}

fn write_dev_state(
    path: &Path,
    running: &server::Running,
    admin_token: &str,
) -> anyhow::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let body = json!({
        "admin_url": format!("http://{}", running.admin),
        "admin_token": admin_token,
        "grpc_url": format!("http://{}", loopback_for(running.grpc)),
        "http_url": format!("http://{}", running.http),
    });
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(body.to_string().as_bytes())?;
    Ok(())
}

fn loopback_for(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    if addr.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

fn read_dev_state() -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dev_state_path()).ok()?;
    serde_json::from_str(&text).ok()
}

// ---------------------------------------------------------------------------------------
// keys

/// A channel to `url`. An `https://` URL is TLS, trusting the CA in `KEYGATE_TLS_CA_FILE`,
/// and presenting the client certificate in
/// `KEYGATE_TLS_CERT_FILE` / `KEYGATE_TLS_KEY_FILE` where the listener requires one.
async fn channel(url: &str) -> anyhow::Result<Channel> {
    let mut endpoint =
        Endpoint::from_shared(url.to_owned()).map_err(|e| anyhow!("invalid URL {url}: {e}"))?;
    if url.starts_with("https://") {
        endpoint = endpoint
            .tls_config(client_tls()?)
            .map_err(|e| anyhow!("TLS to {url}: {e}"))?;
    }
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| anyhow!("cannot reach keygate at {url}: {e}"))
}

fn client_tls() -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |var: &str| -> anyhow::Result<Option<Vec<u8>>> {
        match std::env::var_os(var) {
            None => Ok(None),
            Some(path) => std::fs::read(&path)
                .map(Some)
                .with_context(|| format!("{var}: cannot read {}", Path::new(&path).display())),
        }
    };
    let mut tls = ClientTlsConfig::new();
    let ca = read("KEYGATE_TLS_CA_FILE")?.ok_or_else(|| {
        anyhow!("an https:// URL needs KEYGATE_TLS_CA_FILE: the CA keygate's certificate chains to")
    })?;
    tls = tls.ca_certificate(Certificate::from_pem(ca));
    match (
        read("KEYGATE_TLS_CERT_FILE")?,
        read("KEYGATE_TLS_KEY_FILE")?,
    ) {
        (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(cert, key)),
        (None, None) => {}
        _ => bail!("KEYGATE_TLS_CERT_FILE and KEYGATE_TLS_KEY_FILE go together"),
    }
    Ok(tls)
}

type AdminInterceptor =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type AdminClient =
    KeysClient<tonic::service::interceptor::InterceptedService<Channel, AdminInterceptor>>;

/// The admin listener's channel with the admin credential on every call.
async fn admin_channel(
    args: &AdminArgs,
) -> anyhow::Result<tonic::service::interceptor::InterceptedService<Channel, AdminInterceptor>> {
    let dev = read_dev_state();
    let from_dev = |field: &str| {
        dev.as_ref()
            .and_then(|d| d.get(field))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let url = args
        .admin_url
        .clone()
        .or_else(|| from_dev("admin_url"))
        .unwrap_or_else(|| "http://127.0.0.1:50052".into());
    let token = args.admin_token.clone().or_else(|| from_dev("admin_token").map(Secret::new)).ok_or_else(|| {
        anyhow!("no admin credential: set KEYGATE_ADMIN_TOKEN (or --admin-token), or run `keygate serve --dev` on this machine")
    })?;
    let header: MetadataValue<_> = format!("Bearer {}", token.expose())
        .parse()
        .map_err(|_| anyhow!("the admin token contains characters not allowed in a header"))?;
    let channel = channel(&url).await?;
    let interceptor: AdminInterceptor = Box::new(move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", header.clone());
        Ok(req)
    });
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel,
        interceptor,
    ))
}

async fn admin_client(args: &AdminArgs) -> anyhow::Result<AdminClient> {
    Ok(KeysClient::new(admin_channel(args).await?))
}

/// An optional protobuf timestamp as RFC 3339, for output.
fn ts(t: &Option<prost_types::Timestamp>) -> Option<String> {
    t.as_ref().map(|t| rfc3339(crate::api::timestamp_ms(t)))
}

fn key_json(k: &proto::Key) -> serde_json::Value {
    json!({
        "key_id": k.key_id,
        "tenant_id": k.tenant_id,
        "partner_id": (!k.partner_id.is_empty()).then_some(&k.partner_id),
        "service": (!k.service.is_empty()).then_some(&k.service),
        "name": k.name,
        "kind": k.kind,
        "environment": k.environment,
        "scopes": k.scopes,
        "plan": if k.plan.is_empty() { None } else { Some(&k.plan) },
        "status": k.status,
        "token_prefix": k.token_prefix,
        "created_at": ts(&k.created_at),
        "expires_at": ts(&k.expires_at),
        "revoked_at": ts(&k.revoked_at),
        "rotated_from": (!k.rotated_from.is_empty()).then_some(&k.rotated_from),
        "requests_allowed": k.requests_allowed,
        "requests_denied": k.requests_denied,
        "last_used_at": ts(&k.last_used_at),
    })
}

fn print_key(k: &proto::Key, json_out: bool) {
    let v = key_json(k);
    if json_out {
        println!("{v}");
        return;
    }
    println!("key_id:      {}", k.key_id);
    if !k.tenant_id.is_empty() {
        println!("tenant_id:   {}", k.tenant_id);
    }
    if !k.partner_id.is_empty() {
        println!("partner_id:  {}", k.partner_id);
    }
    if !k.service.is_empty() {
        println!("service:     {}", k.service);
    }
    println!("kind:        {}", k.kind);
    if !k.name.is_empty() {
        println!("name:        {}", k.name);
    }
    println!("environment: {}", k.environment);
    println!("scopes:      {}", k.scopes.join(","));
    println!("status:      {}", k.status);
    println!(
        "expires_at:  {}",
        v["expires_at"].as_str().unwrap_or("never")
    );
    println!(
        "requests:    {} allowed, {} denied (last used {})",
        k.requests_allowed,
        k.requests_denied,
        v["last_used_at"].as_str().unwrap_or("never")
    );
    if let Some(r) = v["revoked_at"].as_str() {
        println!("revoked_at:  {r}");
    }
}

fn grpc_error(e: tonic::Status) -> anyhow::Error {
    let closed = e.code() == tonic::Code::Cancelled
        || (e.code() == tonic::Code::Unknown && e.message() == "transport error");
    if closed {
        // What a TLS 1.3 listener's refusal of the client certificate looks like from here:
        // the handshake seemed done, then the connection closed.
        return anyhow!(
            "the connection was closed before keygate answered (a listener that requires a \
             client certificate closes it when none, or an untrusted one, is presented: see \
             KEYGATE_TLS_CERT_FILE): {}",
            e.message()
        );
    }
    anyhow!("{}: {}", code_name(e.code()), e.message())
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::Unauthenticated => "admin credential rejected",
        tonic::Code::Unavailable => "unavailable",
        _ => "error",
    }
}

/// `--expires-in` as whole seconds; 0 when not given.
fn expires_in_seconds(arg: Option<&str>) -> anyhow::Result<i64> {
    let Some(s) = arg else { return Ok(0) };
    let d = crate::config::parse_duration(s).map_err(|e| anyhow!("--expires-in: {e}"))?;
    if d.as_secs() == 0 {
        bail!("--expires-in: must be at least one second");
    }
    Ok(d.as_secs() as i64)
}

async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create {
            kind,
            tenant,
            partner,
            service,
            scopes,
            env,
            name,
            expires_in,
            plan,
            quiet,
            admin,
        } => {
            let never_expires = expires_in.as_deref() == Some("never");
            let expires_in_seconds = if never_expires {
                0
            } else {
                expires_in_seconds(expires_in.as_deref())?
            };
            let mut client = admin_client(&admin).await?;
            let resp = client
                .create_key(proto::CreateKeyRequest {
                    tenant_id: tenant,
                    name,
                    scopes: scopes.into_iter().filter(|s| !s.is_empty()).collect(),
                    environment: env,
                    kind,
                    expires_in_seconds,
                    plan,
                    partner_id: partner,
                    service,
                    never_expires,
                })
                .await
                .map_err(grpc_error)?
                .into_inner();
            let key = resp.key.ok_or_else(|| anyhow!("server returned no key"))?;
            if quiet {
                println!("{}", resp.token);
            } else if admin.json {
                let mut v = key_json(&key);
                v["token"] = json!(resp.token);
                println!("{v}");
            } else {
                print_key(&key, false);
                println!("token:       {}", resp.token);
                println!(
                    "\nStore the token now: keygate keeps only its hash and cannot show it again."
                );
            }
        }
        KeysCommand::List {
            status,
            tenant,
            partner,
            service,
            admin,
        } => {
            let mut client = admin_client(&admin).await?;
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let resp = client
                    .list_keys(proto::ListKeysRequest {
                        tenant_id: tenant.clone(),
                        partner_id: partner.clone(),
                        service: service.clone(),
                        status: status.clone(),
                        page_size: 1000,
                        page_token: page_token.clone(),
                    })
                    .await
                    .map_err(grpc_error)?
                    .into_inner();
                all.extend(resp.keys);
                if resp.next_page_token.is_empty() {
                    break;
                }
                page_token = resp.next_page_token;
            }
            if admin.json {
                println!(
                    "{}",
                    json!({"keys": all.iter().map(key_json).collect::<Vec<_>>()})
                );
            } else {
                println!(
                    "{:<18} {:<9} {:<8} {:<22} NAME",
                    "KEY ID", "STATUS", "ENV", "EXPIRES"
                );
                for k in &all {
                    let v = key_json(k);
                    println!(
                        "{:<18} {:<9} {:<8} {:<22} {}",
                        k.key_id,
                        k.status,
                        k.environment,
                        v["expires_at"].as_str().unwrap_or("-"),
                        k.name
                    );
                }
            }
        }
        KeysCommand::Get { key_id, admin } => {
            let key = admin_client(&admin)
                .await?
                .get_key(proto::GetKeyRequest { key_id })
                .await
                .map_err(grpc_error)?
                .into_inner();
            print_key(&key, admin.json);
        }
        KeysCommand::Rotate {
            key_id,
            grace,
            admin,
        } => {
            let grace =
                crate::config::parse_duration(&grace).map_err(|e| anyhow!("--grace: {e}"))?;
            let resp = admin_client(&admin)
                .await?
                .rotate_key(proto::RotateKeyRequest {
                    key_id,
                    grace_seconds: grace.as_secs() as i64,
                })
                .await
                .map_err(grpc_error)?
                .into_inner();
            let key = resp.key.ok_or_else(|| anyhow!("server returned no key"))?;
            let previous = resp.previous.unwrap_or_default();
            if admin.json {
                let mut v = key_json(&key);
                v["token"] = json!(resp.token);
                v["previous"] = key_json(&previous);
                println!("{v}");
            } else {
                print_key(&key, false);
                println!("token:       {}", resp.token);
                println!(
                    "\nThe old key {} works until {}. Store the new token now: keygate keeps only its hash.",
                    previous.key_id,
                    ts(&previous.expires_at).unwrap_or_else(|| "-".into())
                );
            }
        }
        KeysCommand::Revoke { key_id, admin } => {
            let key = admin_client(&admin)
                .await?
                .revoke_key(proto::RevokeKeyRequest { key_id })
                .await
                .map_err(grpc_error)?
                .into_inner();
            print_key(&key, admin.json);
        }
        KeysCommand::Update {
            key_id,
            name,
            scopes,
            plan,
            expires_in,
            admin,
        } => {
            let key = admin_client(&admin)
                .await?
                .update_key(proto::UpdateKeyRequest {
                    key_id,
                    name,
                    scopes: scopes.map(|s| proto::ScopeList {
                        scopes: s.into_iter().filter(|s| !s.is_empty()).collect(),
                    }),
                    plan,
                    expires_in_seconds: expires_in_seconds(expires_in.as_deref())?,
                })
                .await
                .map_err(grpc_error)?
                .into_inner();
            print_key(&key, admin.json);
        }
        KeysCommand::Delete { key_id, admin } => {
            admin_client(&admin)
                .await?
                .delete_key(proto::DeleteKeyRequest {
                    key_id: key_id.clone(),
                })
                .await
                .map_err(grpc_error)?;
            say(
                admin.json,
                json!({"key_id": key_id, "deleted": true}),
                format_args!("deleted {key_id}"),
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// audit

async fn audit(cmd: AuditCommand) -> anyhow::Result<()> {
    let AuditCommand::List {
        key,
        tenant,
        since,
        limit,
        admin,
    } = cmd;
    let since = since
        .as_deref()
        .map(|s| instant_arg("--since", s))
        .transpose()?;
    let entries = admin_client(&admin)
        .await?
        .list_audit(proto::ListAuditRequest {
            key_id: key,
            tenant_id: tenant,
            since,
            limit,
        })
        .await
        .map_err(grpc_error)?
        .into_inner()
        .entries;
    let text = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let rows: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            json!({
                "id": e.id,
                "at": ts(&e.at),
                "action": e.action,
                "key_id": text(&e.key_id),
                "tenant_id": text(&e.tenant_id),
                "partner_id": text(&e.partner_id),
                "actor": e.actor,
                "outcome": e.outcome,
            })
        })
        .collect();
    if admin.json {
        println!("{}", json!({ "entries": rows }));
        return Ok(());
    }
    println!(
        "{:<20} {:<20} {:<18} {:<24} OUTCOME",
        "AT", "ACTION", "KEY ID", "ACTOR"
    );
    for e in &entries {
        println!(
            "{:<20} {:<20} {:<18} {:<24} {}",
            ts(&e.at).unwrap_or_default(),
            e.action,
            e.key_id,
            e.actor,
            e.outcome
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// partners

async fn partners(cmd: PartnersCommand) -> anyhow::Result<()> {
    use crate::api::proto::partners_client::PartnersClient;
    let delegation_json =
        |d: &proto::Delegation| json!({"partner_id": d.partner_id, "tenant_id": d.tenant_id});
    let (partner, tenant, admin, granted) = match cmd {
        PartnersCommand::Delegations {
            partner,
            tenant,
            admin,
        } => {
            let all = PartnersClient::new(admin_channel(&admin).await?)
                .list_delegations(proto::ListDelegationsRequest {
                    partner_id: partner.unwrap_or_default(),
                    tenant_id: tenant.unwrap_or_default(),
                })
                .await
                .map_err(grpc_error)?
                .into_inner()
                .delegations;
            if admin.json {
                let list: Vec<_> = all.iter().map(delegation_json).collect();
                println!("{}", json!({ "delegations": list }));
            } else {
                println!("{:<40} TENANT", "PARTNER");
                for d in &all {
                    println!("{:<40} {}", d.partner_id, d.tenant_id);
                }
            }
            return Ok(());
        }
        PartnersCommand::Delegate {
            partner,
            tenant,
            admin,
        } => (partner, tenant, admin, true),
        PartnersCommand::Undelegate {
            partner,
            tenant,
            admin,
        } => (partner, tenant, admin, false),
    };
    let mut client = PartnersClient::new(admin_channel(&admin).await?);
    let req = proto::DelegationRequest {
        partner_id: partner,
        tenant_id: tenant,
    };
    let resp = if granted {
        client.delegate(req).await
    } else {
        client.undelegate(req).await
    }
    .map_err(grpc_error)?
    .into_inner();
    let d = resp.delegation.unwrap_or_default();
    if admin.json {
        let mut v = delegation_json(&d);
        v["delegated"] = json!(granted);
        v["changed"] = json!(resp.changed);
        println!("{v}");
    } else {
        let what = if granted {
            "may act for"
        } else {
            "may no longer act for"
        };
        let note = if resp.changed { "" } else { " (unchanged)" };
        println!("{} {what} {}{note}", d.partner_id, d.tenant_id);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// tokens

/// `--before`: RFC 3339 or unix seconds.
fn instant_arg(name: &str, s: &str) -> anyhow::Result<prost_types::Timestamp> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: i64 = s.parse().map_err(|_| anyhow!("{name}: too large"))?;
        return Ok(prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        });
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
        anyhow!("{name}: must be RFC 3339 (e.g. 2026-12-01T10:00:00Z) or unix seconds")
    })?;
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| anyhow!("{name}: must be after 1970"))?;
    Ok(prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

async fn tokens(cmd: TokensCommand) -> anyhow::Result<()> {
    let TokensCommand::Revoke {
        issuer,
        jti,
        subject,
        before,
        admin,
    } = cmd;
    let issued_before = before
        .as_deref()
        .map(|b| instant_arg("--before", b))
        .transpose()?;
    let r = admin_client(&admin)
        .await?
        .revoke_tokens(proto::RevokeTokensRequest {
            issuer,
            jti: jti.unwrap_or_default(),
            subject: subject.unwrap_or_default(),
            issued_before,
        })
        .await
        .map_err(grpc_error)?
        .into_inner();
    let text = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let v = json!({
        "issuer": r.issuer,
        "jti": text(&r.jti),
        "subject": text(&r.subject),
        "issued_before": ts(&r.issued_before),
        "revoked_at": ts(&r.revoked_at),
        "expires_at": ts(&r.expires_at),
    });
    if admin.json {
        println!("{v}");
        return Ok(());
    }
    println!("issuer:        {}", r.issuer);
    if let Some(j) = v["jti"].as_str() {
        println!("jti:           {j}");
    }
    if let Some(s) = v["subject"].as_str() {
        println!("subject:       {s}");
        println!(
            "issued before: {}",
            v["issued_before"].as_str().unwrap_or("-")
        );
    }
    println!("revoked at:    {}", v["revoked_at"].as_str().unwrap_or("-"));
    println!("kept until:    {}", v["expires_at"].as_str().unwrap_or("-"));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// check

/// The gRPC listener: `--url`/`KEYGATE_URL`, else the dev server's, else the default.
async fn authorizer_client(url: Option<String>) -> anyhow::Result<AuthorizerClient<Channel>> {
    let url = url
        .or_else(|| {
            read_dev_state().and_then(|d| {
                d.get("grpc_url")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            })
        })
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    Ok(AuthorizerClient::new(channel(&url).await?))
}

async fn check(args: CheckArgs) -> anyhow::Result<i32> {
    let mut client = authorizer_client(args.url.clone()).await?;
    let resp = client
        .check(proto::CheckRequest {
            credential: args.token.expose().to_owned(),
            method: args.method,
            path: args.path,
            tenant_id: args.tenant.unwrap_or_default(),
            headers: Default::default(),
        })
        .await
        .map_err(grpc_error)?
        .into_inner();
    let denial = resp.denial.unwrap_or_default();
    if args.json {
        let principal = resp.principal.as_ref().map(|p| {
            json!({
                "tenant_id": p.tenant_id,
                "subject": p.subject,
                "key_id": p.key_id,
                "kind": p.kind,
                "environment": p.environment,
                "scopes": p.scopes,
            })
        });
        println!(
            "{}",
            json!({
                "allowed": resp.allowed,
                "code": if resp.allowed { "ok" } else { denial.code.as_str() },
                "http_status": if resp.allowed { 200 } else { denial.http_status },
                "message": denial.message,
                "effective_tenant": resp.effective_tenant,
                "principal": principal,
            })
        );
    } else if resp.allowed {
        match resp.principal {
            Some(p) => println!(
                "allowed: tenant {} as {} (scopes: {})",
                resp.effective_tenant,
                p.subject,
                p.scopes.join(",")
            ),
            None => println!("allowed (public route)"),
        }
    } else {
        println!(
            "denied: {} ({}) {}",
            denial.code, denial.http_status, denial.message
        );
    }
    Ok(if resp.allowed { 0 } else { EXIT_DENIED })
}

// ---------------------------------------------------------------------------------------
// sessions

async fn sessions(cmd: SessionsCommand) -> anyhow::Result<i32> {
    let SessionsCommand::Mint {
        token,
        scopes,
        ttl,
        tenant,
        url,
        json,
        quiet,
    } = cmd;
    let ttl_seconds = match ttl.as_deref() {
        None => 0,
        Some(t) => {
            let d = crate::config::parse_duration(t).map_err(|e| anyhow!("--ttl: {e}"))?;
            u32::try_from(d.as_secs())
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| anyhow!("--ttl: must be at least 1s"))?
        }
    };
    let r = authorizer_client(url)
        .await?
        .mint_session_token(proto::MintSessionTokenRequest {
            credential: token.expose().to_owned(),
            scopes,
            ttl_seconds,
            tenant_id: tenant.unwrap_or_default(),
        })
        .await
        .map_err(grpc_error)?
        .into_inner();
    if let Some(d) = r.denial {
        if json {
            println!(
                "{}",
                json!({"code": d.code, "http_status": d.http_status, "message": d.message})
            );
        } else {
            println!("denied: {} ({}) {}", d.code, d.http_status, d.message);
        }
        return Ok(EXIT_DENIED);
    }
    if quiet {
        println!("{}", r.token);
    } else if json {
        println!(
            "{}",
            json!({
                "token": r.token,
                "expires_at": ts(&r.expires_at),
                "tenant_id": r.tenant_id,
                "scopes": r.scopes,
            })
        );
    } else {
        println!("token:      {}", r.token);
        println!("expires at: {}", ts(&r.expires_at).unwrap_or_default());
        println!("tenant:     {}", r.tenant_id);
        println!("scopes:     {}", r.scopes.join(","));
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------
// leases

/// A lease's `--ttl` in whole seconds, 1 s to a day (what the API takes).
fn lease_ttl_seconds(arg: &str) -> anyhow::Result<u32> {
    let d = crate::config::parse_duration(arg).map_err(|e| anyhow!("--ttl: {e}"))?;
    u32::try_from(d.as_secs())
        .ok()
        .filter(|s| (1..=86_400).contains(s))
        .ok_or_else(|| anyhow!("--ttl: must be 1s to 24h"))
}

async fn leases(cmd: LeasesCommand) -> anyhow::Result<i32> {
    match cmd {
        LeasesCommand::Acquire {
            token,
            ttl,
            grpc,
            quiet,
        } => {
            let ttl_seconds = lease_ttl_seconds(&ttl)?;
            let r = authorizer_client(grpc.url)
                .await?
                .acquire_lease(proto::AcquireLeaseRequest {
                    credential: token.expose().to_owned(),
                    ttl_seconds,
                })
                .await
                .map_err(grpc_error)?
                .into_inner();
            if let Some(d) = r.denial {
                if grpc.json {
                    println!(
                        "{}",
                        json!({"code": d.code, "http_status": d.http_status, "message": d.message})
                    );
                } else {
                    println!("denied: {} ({}) {}", d.code, d.http_status, d.message);
                }
                return Ok(EXIT_DENIED);
            }
            let expires_at = ts(&r.expires_at);
            if quiet {
                println!("{}", r.lease_id);
            } else if grpc.json {
                println!(
                    "{}",
                    json!({"lease_id": r.lease_id, "expires_at": expires_at})
                );
            } else {
                println!("lease_id:   {}", r.lease_id);
                println!("expires at: {}", expires_at.unwrap_or_default());
            }
        }
        LeasesCommand::Renew {
            lease_id,
            ttl,
            grpc,
        } => {
            let ttl_seconds = lease_ttl_seconds(&ttl)?;
            authorizer_client(grpc.url)
                .await?
                .renew_lease(proto::RenewLeaseRequest {
                    lease_id: lease_id.clone(),
                    ttl_seconds,
                })
                .await
                .map_err(grpc_error)?;
            say(
                grpc.json,
                json!({"lease_id": lease_id, "renewed": true, "ttl_seconds": ttl_seconds}),
                format_args!("renewed {lease_id} for {ttl}"),
            );
        }
        LeasesCommand::Release { lease_id, grpc } => {
            authorizer_client(grpc.url)
                .await?
                .release_lease(proto::ReleaseLeaseRequest {
                    lease_id: lease_id.clone(),
                })
                .await
                .map_err(grpc_error)?;
            say(
                grpc.json,
                json!({"lease_id": lease_id, "released": true}),
                format_args!("released {lease_id}"),
            );
        }
    }
    Ok(0)
}

/// What a command that changes one thing prints: `value` with `--json`, else `text`.
fn say(json: bool, value: serde_json::Value, text: std::fmt::Arguments<'_>) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

#[cfg(test)]
mod debug_tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn parsed_arguments_never_show_a_credential_in_debug() {
        let cli = Cli::parse_from([
            "keygate",
            "check",
            "--token",
            "sk_live_0123456789abcdef_SECRETSECRET",
            "--path",
            "/v1",
        ]);
        let shown = format!("{cli:?}");
        assert!(!shown.contains("SECRETSECRET"), "{shown}");
        let cli = Cli::parse_from([
            "keygate",
            "keys",
            "list",
            "--tenant",
            "t",
            "--admin-token",
            "hunter2hunter2xx",
        ]);
        let shown = format!("{cli:?}");
        assert!(!shown.contains("hunter2hunter2xx"), "{shown}");
    }
}
