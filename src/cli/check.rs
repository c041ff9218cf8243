//! `keygate check`: ask a running keygate whether a request may pass; exits
//! `EXIT_DENIED` when it may not. It must not decide anything itself: the server does.

use clap::Args;
use serde_json::json;

use super::{authorizer_client, grpc_error, EXIT_DENIED};
use crate::api::proto;
use crate::secret::Secret;

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

pub(super) async fn check(args: CheckArgs) -> anyhow::Result<i32> {
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
