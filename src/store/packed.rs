//! The compact key record of partitioned layouts (the Redis Cluster's): what a key record
//! holds, in as few bytes as it can be read back from exactly.
//!
//! Ten million keys are ten million of these, so the record is MessagePack with fields by
//! position, a tenant UUID as its 16 bytes, the argon2id PHC string as its parameters,
//! salt and hash bytes (put back together on reading, and checked to read back as written
//! before it is stored this way), and the token prefix without the key id it repeats.
//! Anything that would not read back exactly (a tenant id that is not a lower-case UUID, a
//! PHC string argon2 would write otherwise) is kept as text instead.
//!
//! The usage counters and the revocation time are not in here: they change, and the Redis
//! scripts update them beside the packed bytes without reading them (`record.lua`).

use argon2::password_hash::{Output, PasswordHash, SaltString};
use serde::{Deserialize, Serialize};

use super::{KeyRecord, StoreError};
use crate::principal::{Environment, KeyKind};

#[derive(Serialize, Deserialize)]
struct Packed {
    /// A tenant id that is a lower-case UUID, as its 16 bytes.
    #[serde(with = "serde_bytes")]
    tenant_uuid: Option<Vec<u8>>,
    /// Any other tenant id as text (empty for partner and runtime keys).
    tenant: String,
    partner_id: Option<String>,
    service: Option<String>,
    name: String,
    kind: u8,
    environment: u8,
    scopes: Vec<String>,
    plan: Option<String>,
    /// The token prefix without `_<key_id>` (`sk_live`), or all of it with `whole`.
    prefix: String,
    whole: bool,
    hash: Hash,
    created_at_ms: u64,
    expires_at_ms: u64,
    rotated_from: Option<String>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Hash {
    /// `m=…,t=…,p=…` of `$argon2id$v=19$…`; empty with `text`.
    params: String,
    #[serde(with = "serde_bytes")]
    salt: Vec<u8>,
    #[serde(with = "serde_bytes")]
    output: Vec<u8>,
    /// The PHC string as it was, when it does not fit the shape above.
    text: Option<String>,
}

const KINDS: [KeyKind; 3] = [KeyKind::Tenant, KeyKind::Partner, KeyKind::Runtime];
const ENVIRONMENTS: [Environment; 2] = [Environment::Live, Environment::Test];

fn index_of<T: PartialEq>(all: &[T], x: &T) -> u8 {
    all.iter().position(|y| y == x).unwrap_or(0) as u8
}

/// `record` packed (its usage and revocation are not: see the module doc).
pub fn encode(record: &KeyRecord) -> Result<Vec<u8>, StoreError> {
    let (tenant_uuid, tenant) = match uuid::Uuid::try_parse(&record.tenant_id) {
        Ok(u) if u.hyphenated().to_string() == record.tenant_id => {
            (Some(u.as_bytes().to_vec()), String::new())
        }
        _ => (None, record.tenant_id.clone()),
    };
    let suffix = format!("_{}", record.key_id);
    let packed = Packed {
        tenant_uuid,
        tenant,
        partner_id: record.partner_id.clone(),
        service: record.service.clone(),
        name: record.name.clone(),
        kind: index_of(&KINDS, &record.kind),
        environment: index_of(&ENVIRONMENTS, &record.environment),
        scopes: record.scopes.clone(),
        plan: record.plan.clone(),
        prefix: record
            .token_prefix
            .strip_suffix(&suffix)
            .unwrap_or(&record.token_prefix)
            .to_owned(),
        whole: !record.token_prefix.ends_with(&suffix),
        hash: pack_hash(&record.hash),
        created_at_ms: record.created_at_ms,
        expires_at_ms: record.expires_at_ms,
        rotated_from: record.rotated_from.clone(),
    };
    let bytes = rmp_serde::to_vec(&packed).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    // Only what reads back as it was is stored.
    let back = decode(&record.key_id, &bytes)?;
    let mut expected = record.clone();
    expected.revoked_at_ms = None;
    expected.usage = Default::default();
    if back != expected {
        return Err(StoreError::Corrupt(format!(
            "key {} does not read back as written in the packed format",
            record.key_id
        )));
    }
    Ok(bytes)
}

/// The record of `key_id` from its packed bytes (without usage or revocation).
pub fn decode(key_id: &str, bytes: &[u8]) -> Result<KeyRecord, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("key {key_id}: {what}"));
    let p: Packed = rmp_serde::from_slice(bytes).map_err(|e| corrupt(&e.to_string()))?;
    let tenant_id = match p.tenant_uuid {
        Some(bytes) => uuid::Uuid::from_slice(&bytes)
            .map_err(|_| corrupt("tenant is not a UUID"))?
            .hyphenated()
            .to_string(),
        None => p.tenant,
    };
    let token_prefix = if p.whole {
        p.prefix
    } else {
        format!("{}_{key_id}", p.prefix)
    };
    Ok(KeyRecord {
        key_id: key_id.to_owned(),
        tenant_id,
        partner_id: p.partner_id,
        service: p.service,
        name: p.name,
        kind: *KINDS
            .get(usize::from(p.kind))
            .ok_or_else(|| corrupt("unknown kind"))?,
        environment: *ENVIRONMENTS
            .get(usize::from(p.environment))
            .ok_or_else(|| corrupt("unknown environment"))?,
        scopes: p.scopes,
        plan: p.plan,
        token_prefix,
        hash: unpack_hash(p.hash).ok_or_else(|| corrupt("unreadable hash"))?,
        created_at_ms: p.created_at_ms,
        expires_at_ms: p.expires_at_ms,
        revoked_at_ms: None,
        rotated_from: p.rotated_from,
        usage: Default::default(),
    })
}

fn pack_hash(phc: &str) -> Hash {
    let text = || Hash {
        params: String::new(),
        salt: Vec::new(),
        output: Vec::new(),
        text: Some(phc.to_owned()),
    };
    let Ok(parsed) = PasswordHash::new(phc) else {
        return text();
    };
    let (Some(salt), Some(output)) = (parsed.salt, parsed.hash) else {
        return text();
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt_bytes) = salt.decode_b64(&mut salt_bytes) else {
        return text();
    };
    let packed = Hash {
        params: parsed.params.to_string(),
        salt: salt_bytes.to_vec(),
        output: output.as_bytes().to_vec(),
        text: None,
    };
    // The shape this module writes back, or the text as it was.
    if parsed.algorithm.as_str() == "argon2id"
        && parsed.version == Some(19)
        && unpack_hash(packed.clone()).as_deref() == Some(phc)
    {
        packed
    } else {
        text()
    }
}

fn unpack_hash(h: Hash) -> Option<String> {
    if let Some(text) = h.text {
        return Some(text);
    }
    let salt = SaltString::encode_b64(&h.salt).ok()?;
    let output = Output::new(&h.output).ok()?;
    let mut buf = [0u8; 128];
    let output = output.b64_encode(&mut buf).ok()?;
    Some(format!(
        "$argon2id$v=19${}${}${output}",
        h.params,
        salt.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> KeyRecord {
        KeyRecord {
            key_id: "AbCdEfGh12345678".into(),
            tenant_id: "9f1c7d4e-2b7a-4c1e-9d55-0b3f6a2e8c11".into(),
            partner_id: None,
            service: None,
            name: "ci | deploys".into(),
            kind: KeyKind::Tenant,
            environment: Environment::Test,
            scopes: vec!["contacts:read".into(), "contacts:write".into()],
            plan: Some("pro".into()),
            token_prefix: "sk_test_AbCdEfGh12345678".into(),
            hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$\
                   Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm8"
                .replace(' ', ""),
            created_at_ms: 1_764_600_000_123,
            expires_at_ms: crate::store::NEVER,
            revoked_at_ms: None,
            rotated_from: Some("ZyXwVuTs87654321".into()),
            usage: Default::default(),
        }
    }

    #[test]
    fn a_record_reads_back_exactly_and_smaller_than_its_json() {
        let r = record();
        let bytes = encode(&r).unwrap();
        assert_eq!(decode(&r.key_id, &bytes).unwrap(), r);
        let json = serde_json::to_vec(&r).unwrap();
        assert!(
            bytes.len() * 2 < json.len(),
            "{} vs {}",
            bytes.len(),
            json.len()
        );
    }

    #[test]
    fn what_does_not_fit_the_compact_shape_is_kept_as_text() {
        let mut r = record();
        r.tenant_id = "9F1C7D4E-2B7A-4C1E-9D55-0B3F6A2E8C11".into();
        r.hash = "$argon2i$v=19$m=4096,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2g".into();
        r.token_prefix = "custom".into();
        let bytes = encode(&r).unwrap();
        assert_eq!(decode(&r.key_id, &bytes).unwrap(), r);
        for kind in [KeyKind::Partner, KeyKind::Runtime] {
            let mut other = record();
            other.kind = kind;
            other.tenant_id = String::new();
            other.partner_id = Some("acme".into());
            other.service = Some("billing".into());
            let bytes = encode(&other).unwrap();
            assert_eq!(decode(&other.key_id, &bytes).unwrap(), other);
        }
    }

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        for junk in [&b""[..], b"\xc1", b"\x9f\x00", b"not msgpack at all"] {
            assert!(matches!(
                decode("AbCdEfGh12345678", junk),
                Err(StoreError::Corrupt(_))
            ));
        }
    }
}
