//! `keygate audit list`: the audit trail, as a table or one JSON object. It must not open
//! connections of its own (`mod.rs`'s `admin_client` does).

use clap::Subcommand;
use serde_json::json;

use super::{admin_client, grpc_error, instant_arg, non_empty, ts, AdminArgs};
use crate::api::proto;

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

pub(super) async fn audit(cmd: AuditCommand) -> anyhow::Result<()> {
    let AuditCommand::List {
        key,
        tenant,
        since,
        limit,
        admin,
    } = cmd;
    let entries = admin_client(&admin)
        .await?
        .list_audit(proto::ListAuditRequest {
            key_id: key,
            tenant_id: tenant,
            since: instant_arg("--since", since.as_deref())?,
            limit,
        })
        .await
        .map_err(grpc_error)?
        .into_inner()
        .entries;
    let rows: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            json!({
                "id": e.id,
                "at": ts(&e.at),
                "action": e.action,
                "key_id": non_empty(&e.key_id),
                "tenant_id": non_empty(&e.tenant_id),
                "partner_id": non_empty(&e.partner_id),
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
