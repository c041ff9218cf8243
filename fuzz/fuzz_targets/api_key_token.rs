//! Bytes as an API key: `parse` never panics, and a token it accepts is exactly its parts
//! put back together (so nothing it reads is ignored or invented), with a checksum that
//! only the accepted prefix gets past.

#![no_main]

use keygate::apikey::token::{CHECKSUM_LEN, KEY_ID_LEN, SECRET_LEN};
use keygate::apikey::{parse, TokenError};
use libfuzzer_sys::fuzz_target;

/// The prefix the deployment accepts; `parse` must refuse any other.
const PREFIX: &str = "sk";

fuzz_target!(|bytes: &[u8]| {
    let Ok(token) = std::str::from_utf8(bytes) else {
        return;
    };
    // The first segment as the accepted prefix, to reach the checksum from any input:
    // with "sk" alone, nearly every token would stop at UnknownPrefix.
    let own = token.split('_').next().unwrap_or("");
    for prefix in [PREFIX, own] {
        let Ok(parsed) = parse(token, prefix) else {
            continue;
        };
        assert_eq!(parsed.prefix, prefix, "{token:?}");
        assert_eq!(parsed.key_id.len(), KEY_ID_LEN, "{token:?}");
        assert_eq!(parsed.secret.len(), SECRET_LEN, "{token:?}");
        let checksum = &token[token.len().saturating_sub(CHECKSUM_LEN)..];
        let rebuilt = format!(
            "{}_{}_{}_{}{checksum}",
            parsed.prefix,
            parsed.environment.as_str(),
            parsed.key_id,
            parsed.secret,
        );
        assert_eq!(rebuilt, token, "parts of {token:?}");
        if prefix != PREFIX {
            assert_eq!(
                parse(token, PREFIX),
                Err(TokenError::UnknownPrefix),
                "{token:?}"
            );
        }
    }
});
