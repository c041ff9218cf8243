//! The `keygate` command line: `serve`, `keys …`, `check`. Every command that prints
//! something a script would read takes `--json` and then prints one JSON object.
//!
//! This file holds the command tree (`Cli`, `Command`, the argument groups several
//! commands share) and the dispatch, and what the commands share: the connections to
//! keygate's listeners, the error text of a failed call, and the `--json`-or-text
//! printing of a result. Each command family's arguments and handler live in a file of
//! their own: `serve.rs` (and the dev state file), `keys.rs`, `tokens.rs`, `partners.rs`,
//! `audit.rs`, `check.rs`, `sessions.rs`, `leases.rs`.

mod audit;
mod check;
mod keys;
mod leases;
mod partners;
mod serve;
mod sessions;
mod tokens;

pub use audit::AuditCommand;
pub use check::CheckArgs;
pub use keys::{KeysCommand, OwnerArgs};
pub use leases::LeasesCommand;
pub use partners::PartnersCommand;
pub use serve::{dev_state_path, ServeArgs};
pub use sessions::SessionsCommand;
pub use tokens::TokensCommand;

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::api::proto::{self, authorizer_client::AuthorizerClient, keys_client::KeysClient};
use crate::api::rfc3339;
use crate::secret::Secret;
use serve::read_dev_state;

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

/// Runs the command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => serve::serve(args).await.map(|_| 0),
        Command::Keys(cmd) => keys::keys(cmd).await.map(|_| 0),
        Command::Tokens(cmd) => tokens::tokens(cmd).await.map(|_| 0),
        Command::Partners(cmd) => partners::partners(cmd).await.map(|_| 0),
        Command::Audit(cmd) => audit::audit(cmd).await.map(|_| 0),
        Command::Check(args) => check::check(args).await,
        Command::Sessions(cmd) => sessions::sessions(cmd).await,
        Command::Leases(cmd) => leases::leases(cmd).await,
    }
}

// ---------------------------------------------------------------------------------------
// connections

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

// ---------------------------------------------------------------------------------------
// output and shared arguments

/// An optional protobuf timestamp as RFC 3339, for output.
fn ts(t: &Option<prost_types::Timestamp>) -> Option<String> {
    t.as_ref().map(|t| rfc3339(crate::api::timestamp_ms(t)))
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

/// A time argument (`--since`, `--before`): RFC 3339 or unix seconds; `None` when not given.
fn instant_arg(name: &str, arg: Option<&str>) -> anyhow::Result<Option<prost_types::Timestamp>> {
    arg.map(|s| instant(name, s)).transpose()
}

fn instant(name: &str, s: &str) -> anyhow::Result<prost_types::Timestamp> {
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

/// What a command that changes one thing prints: `value` with `--json`, else `text`.
fn say(json: bool, value: serde_json::Value, text: std::fmt::Arguments<'_>) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

/// What a command that ends one thing prints: `{"<id_field>": "<id>", "<done>": true}` with
/// `--json`, else `<done> <id>` (`deleted key_…`, `released lease_…`).
fn say_done(json: bool, id_field: &str, id: &str, done: &str) {
    say(
        json,
        json!({ id_field: id, done: true }),
        format_args!("{done} {id}"),
    );
}

/// A text field of an answer for `--json`: `null` where the server left it empty.
fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// What a command the server answered with a denial prints (the denial as one JSON object
/// with `--json`, else the `denied: …` line), and the exit code it then ends with.
fn denied(json: bool, d: &proto::Denial) -> i32 {
    say(
        json,
        json!({"code": d.code, "http_status": d.http_status, "message": d.message}),
        format_args!("denied: {} ({}) {}", d.code, d.http_status, d.message),
    );
    EXIT_DENIED
}

#[cfg(test)]
mod debug_tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn parsed_arguments_never_show_a_credential_in_debug() {
        // Each command line, and the part of its credential that must not be shown.
        let commands: [(&[&str], &str); 2] = [
            (
                &[
                    "keygate",
                    "check",
                    "--token",
                    "sk_live_0123456789abcdef_SECRETSECRET",
                    "--path",
                    "/v1",
                ],
                "SECRETSECRET",
            ),
            (
                &[
                    "keygate",
                    "keys",
                    "list",
                    "--tenant",
                    "t",
                    "--admin-token",
                    "hunter2hunter2xx",
                ],
                "hunter2hunter2xx",
            ),
        ];
        for (args, secret) in commands {
            let shown = format!("{:?}", Cli::parse_from(args));
            assert!(!shown.contains(secret), "{args:?}: {shown}");
        }
    }
}
