//! `keygate leases …`: take, renew and give back a key's concurrent-session leases
//! through the gRPC listener. It must not open connections of its own (`mod.rs`'s
//! `authorizer_client` does).

use anyhow::anyhow;
use clap::Subcommand;
use serde_json::json;

use super::{authorizer_client, denied, grpc_error, say, say_done, ts, GrpcArgs};
use crate::api::proto;
use crate::secret::Secret;

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

/// A lease's `--ttl` in whole seconds, 1 s to a day (what the API takes).
fn lease_ttl_seconds(arg: &str) -> anyhow::Result<u32> {
    let d = crate::config::parse_duration(arg).map_err(|e| anyhow!("--ttl: {e}"))?;
    u32::try_from(d.as_secs())
        .ok()
        .filter(|s| (1..=86_400).contains(s))
        .ok_or_else(|| anyhow!("--ttl: must be 1s to 24h"))
}

pub(super) async fn leases(cmd: LeasesCommand) -> anyhow::Result<i32> {
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
                return Ok(denied(grpc.json, &d));
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
            let mut client = authorizer_client(grpc.url).await?;
            let request = proto::ReleaseLeaseRequest {
                lease_id: lease_id.clone(),
            };
            client.release_lease(request).await.map_err(grpc_error)?;
            say_done(grpc.json, "lease_id", &lease_id, "released");
        }
    }
    Ok(0)
}
