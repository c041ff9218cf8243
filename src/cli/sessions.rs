//! `keygate sessions mint`: a session token from an API key, through the gRPC listener.
//! It must not open connections of its own (`mod.rs`'s `authorizer_client` does).

use anyhow::anyhow;
use clap::Subcommand;
use serde_json::json;

use super::{authorizer_client, denied, grpc_error, ts};
use crate::api::proto;
use crate::secret::Secret;

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

pub(super) async fn sessions(cmd: SessionsCommand) -> anyhow::Result<i32> {
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
        return Ok(denied(json, &d));
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
