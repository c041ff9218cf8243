//! Key administration: create (the plaintext returned once), get, list, revoke, delete;
//! and the revocation of JWTs by `jti` or by subject. Validates every argument and names
//! the one that is wrong; changes nothing on error.
//! Transport-free: `api/keys.rs` maps this onto gRPC.
//!
//! One service a file: `key_admin.rs` (`KeyAdmin`: keys), `token_admin.rs` (`TokenAdmin`:
//! JWT revocation), `partner_admin.rs` (`PartnerAdmin`: delegations); `key_requests.rs`
//! holds what callers hand `KeyAdmin` and its argument checks. This file keeps the error
//! the three share and the checks more than one of them uses.

mod key_admin;
mod key_requests;
mod partner_admin;
mod token_admin;

pub use key_admin::{KeyAdmin, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
pub use key_requests::{CreatedKey, KeyOwner, KeyUpdate, NewKey, Rotated, StatusFilter};
pub use partner_admin::PartnerAdmin;
pub use token_admin::{RevokeTokens, TokenAdmin};

use crate::store::{Outage, StoreError};
use crate::tenant::parse_tenant;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("no key with id {0}")]
    NotFound(String),
    /// The store could not answer; the outage says what failed and why.
    #[error("store unavailable")]
    Unavailable(#[source] Outage),
    #[error("{0}")]
    Internal(String),
}

fn invalid(field: &'static str, message: impl Into<String>) -> AdminError {
    AdminError::InvalidArgument {
        field,
        message: message.into(),
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(outage) => AdminError::Unavailable(outage),
            other => AdminError::Internal(other.to_string()),
        }
    }
}

fn check_tenant(tenant_id: &str) -> Result<String, AdminError> {
    parse_tenant(tenant_id.trim()).ok_or_else(|| invalid("tenant_id", "must be a UUID"))
}

/// A partner id or service name: 1 to 64 of `A-Z a-z 0-9 . _ -`.
fn check_id<'a>(field: &'static str, id: &'a str) -> Result<&'a str, AdminError> {
    let id = id.trim();
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(field, "must be 1 to 64 of A-Z a-z 0-9 . _ -"));
    }
    Ok(id)
}
