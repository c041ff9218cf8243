//! API keys: the token format, generating new keys, and hashing their secrets.
//! Verification against a stored record lives in `authn`; this module knows nothing of
//! stores or caches.

pub mod hash;
pub mod token;

pub use hash::{HashError, SecretHasher};
pub use token::{generate, parse, NewToken, ParsedToken, TokenError};
