//! `keygate keys …`: create, rotate, list, get, revoke, update and delete API keys
//! through the admin listener, and how a key is printed. It must not open connections of
//! its own (`mod.rs`'s `admin_client` does) nor check what the server checks.

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::{admin_client, grpc_error, non_empty, say_done, ts, AdminArgs};
use crate::api::proto;

/// Whose keys: a tenant's, a partner's or an internal service's (`create`, `list`).
#[derive(Args, Debug)]
pub struct OwnerArgs {
    /// The tenant a tenant key belongs to.
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// The partner a partner key belongs to; it acts for the tenants delegated to it.
    #[arg(long, default_value = "")]
    pub partner: String,
    /// The internal service a runtime key belongs to.
    #[arg(long, default_value = "")]
    pub service: String,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a key. The token is printed once and cannot be shown again.
    Create {
        /// tenant (with --tenant), partner (with --partner) or runtime (with --service).
        #[arg(long, default_value = "tenant")]
        kind: String,
        #[command(flatten)]
        owner: OwnerArgs,
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
        #[command(flatten)]
        owner: OwnerArgs,
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

fn key_json(k: &proto::Key) -> serde_json::Value {
    json!({
        "key_id": k.key_id,
        "tenant_id": k.tenant_id,
        "partner_id": non_empty(&k.partner_id),
        "service": non_empty(&k.service),
        "name": k.name,
        "kind": k.kind,
        "environment": k.environment,
        "scopes": k.scopes,
        "plan": non_empty(&k.plan),
        "status": k.status,
        "token_prefix": k.token_prefix,
        "created_at": ts(&k.created_at),
        "expires_at": ts(&k.expires_at),
        "revoked_at": ts(&k.revoked_at),
        "rotated_from": non_empty(&k.rotated_from),
        "requests_allowed": k.requests_allowed,
        "requests_denied": k.requests_denied,
        "last_used_at": ts(&k.last_used_at),
    })
}

/// Prints the key an admin call answered with (`keys get`, `revoke`, `update`), or turns
/// its gRPC error into the command's error.
fn print_answered_key(
    answer: Result<tonic::Response<proto::Key>, tonic::Status>,
    json: bool,
) -> anyhow::Result<()> {
    let key = answer.map_err(grpc_error)?.into_inner();
    print_key(&key, json);
    Ok(())
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

/// Prints a key with its token, shown this once (`keys create`, `keys rotate`); `previous`
/// is the key a rotation replaced, which keeps working for the grace.
fn print_issued_key(key: &proto::Key, token: &str, previous: Option<&proto::Key>, json_out: bool) {
    if json_out {
        let mut v = key_json(key);
        v["token"] = json!(token);
        if let Some(previous) = previous {
            v["previous"] = key_json(previous);
        }
        println!("{v}");
        return;
    }
    print_key(key, false);
    println!("token:       {token}");
    match previous {
        None => println!(
            "\nStore the token now: keygate keeps only its hash and cannot show it again."
        ),
        Some(previous) => println!(
            "\nThe old key {} works until {}. Store the new token now: keygate keeps only its hash.",
            previous.key_id,
            ts(&previous.expires_at).unwrap_or_else(|| "-".into())
        ),
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

pub(super) async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create {
            kind,
            owner,
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
                    tenant_id: owner.tenant,
                    name,
                    scopes: scopes.into_iter().filter(|s| !s.is_empty()).collect(),
                    environment: env,
                    kind,
                    expires_in_seconds,
                    plan,
                    partner_id: owner.partner,
                    service: owner.service,
                    never_expires,
                })
                .await
                .map_err(grpc_error)?
                .into_inner();
            let key = resp.key.ok_or_else(|| anyhow!("server returned no key"))?;
            if quiet {
                println!("{}", resp.token);
            } else {
                print_issued_key(&key, &resp.token, None, admin.json);
            }
        }
        KeysCommand::List {
            status,
            owner,
            admin,
        } => {
            let mut client = admin_client(&admin).await?;
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let resp = client
                    .list_keys(proto::ListKeysRequest {
                        tenant_id: owner.tenant.clone(),
                        partner_id: owner.partner.clone(),
                        service: owner.service.clone(),
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
            let mut client = admin_client(&admin).await?;
            let answer = client.get_key(proto::GetKeyRequest { key_id }).await;
            print_answered_key(answer, admin.json)?;
        }
        KeysCommand::Revoke { key_id, admin } => {
            let mut client = admin_client(&admin).await?;
            let answer = client.revoke_key(proto::RevokeKeyRequest { key_id }).await;
            print_answered_key(answer, admin.json)?;
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
            print_issued_key(&key, &resp.token, Some(&previous), admin.json);
        }
        KeysCommand::Update {
            key_id,
            name,
            scopes,
            plan,
            expires_in,
            admin,
        } => {
            let answer = admin_client(&admin)
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
                .await;
            print_answered_key(answer, admin.json)?;
        }
        KeysCommand::Delete { key_id, admin } => {
            let mut client = admin_client(&admin).await?;
            let request = proto::DeleteKeyRequest {
                key_id: key_id.clone(),
            };
            client.delete_key(request).await.map_err(grpc_error)?;
            say_done(admin.json, "key_id", &key_id, "deleted");
        }
    }
    Ok(())
}
