//! `keygate partners …`: grant, withdraw and list delegations through the admin listener.
//! It must not open connections of its own (`mod.rs`'s `admin_channel` does).

use clap::Subcommand;
use serde_json::json;

use super::{admin_channel, grpc_error, AdminArgs};
use crate::api::proto;

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

pub(super) async fn partners(cmd: PartnersCommand) -> anyhow::Result<()> {
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
