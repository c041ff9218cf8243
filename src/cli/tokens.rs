//! `keygate tokens revoke`: revoke JWTs of a configured issuer through the admin listener.
//! It must not open connections of its own (`mod.rs`'s `admin_client` does).

use clap::Subcommand;
use serde_json::json;

use super::{admin_client, grpc_error, instant_arg, non_empty, ts, AdminArgs};
use crate::api::proto;

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

pub(super) async fn tokens(cmd: TokensCommand) -> anyhow::Result<()> {
    let TokensCommand::Revoke {
        issuer,
        jti,
        subject,
        before,
        admin,
    } = cmd;
    let issued_before = instant_arg("--before", before.as_deref())?;
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
    let v = json!({
        "issuer": r.issuer,
        "jti": non_empty(&r.jti),
        "subject": non_empty(&r.subject),
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
