//! API key tokens written by hand from the documented format: forged, taken apart, and
//! guessed at.

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A token of the documented shape with a *correct* checksum for any parts, written from
/// the documented format rather than with keygate's code: `<prefix>_<env>_<key_id>_<secret><crc>`,
/// the CRC-32 of everything before it in six base62 characters.
pub fn forge_token(prefix: &str, env: &str, key_id: &str, secret: &str) -> String {
    let body = format!("{prefix}_{env}_{key_id}_{secret}");
    let mut n = crc32fast::hash(body.as_bytes()) as u64;
    let mut checksum = [b'0'; 6];
    for slot in checksum.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    body + std::str::from_utf8(&checksum).expect("ASCII")
}

/// The parts of a token: (prefix, env, key_id, secret, checksum).
pub fn token_parts(token: &str) -> (&str, &str, &str, &str, &str) {
    let parts: Vec<&str> = token.split('_').collect();
    assert_eq!(parts.len(), 4, "token shape: {token}");
    let (secret, checksum) = parts[3].split_at(parts[3].len() - 6);
    (parts[0], parts[1], parts[2], secret, checksum)
}

/// The secret part of a token (what argon2 hashes).
pub fn secret_of(token: &str) -> &str {
    token_parts(token).3
}

/// The same key id with another secret, correctly checksummed: a guess at a real key.
pub fn wrong_secret_for(token: &str) -> String {
    wrong_secret_at(token, 0)
}

/// Like `wrong_secret_for`, changing the secret's character at `pos`: guesses made at
/// different positions never turn back into the original.
pub fn wrong_secret_at(token: &str, pos: usize) -> String {
    let (prefix, env, key_id, secret, _) = token_parts(token);
    let mut other: Vec<u8> = secret.bytes().collect();
    other[pos] = if other[pos] == b'A' { b'B' } else { b'A' };
    forge_token(
        prefix,
        env,
        key_id,
        std::str::from_utf8(&other).expect("ASCII"),
    )
}

/// `n` characters of base62, from a cheap deterministic generator (tests need variety,
/// not secrecy).
pub fn base62(seed: u64, n: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            BASE62[(x % 62) as usize] as char
        })
        .collect()
}
