//! API keys: the token format, generating new keys, and hashing their secrets; their
//! settings (`api_keys`, argon2's cost) are `config.rs`. Verification against a stored
//! record lives in `authn`; this module knows nothing of stores, caches or the
//! configuration file.

mod config;
pub mod hash;
pub mod token;

pub use config::{ApiKeysConfig, Argon2Config};
pub use hash::{HashError, SecretHasher};
pub use token::{generate, parse, NewToken, ParsedToken, TokenError};
