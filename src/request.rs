//! `AuthRequest`: the protocol-neutral view of the request being authorized. Adapters
//! build it from Envoy's `CheckRequest` or keygate's own; the core never sees a protobuf.
//!
//! One thing, with its path rules (`normalize_path`, `path_readings`) and their tests:
//! hence its length. The percent-decoding is written here rather than taken from the
//! `percent-encoding` crate on purpose: keygate decodes only escapes of unreserved
//! characters, keeps every other escape (upper-cased) and refuses some outright (`%2F`,
//! `%5C`, `%25XX`, non-UTF-8, `;`), a choice per escape that a decode-everything iterator
//! does not offer; `tests/path_readings.rs` is an independent oracle for it.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::HashMap;

/// Adds a header to `AuthRequest::headers` as Envoy hands repeated ones over: `value`
/// joined to any earlier value of `name` (lower-case) with a comma.
pub fn join_header(headers: &mut HashMap<String, String>, name: String, value: Cow<'_, str>) {
    match headers.entry(name) {
        Entry::Occupied(mut e) => {
            let joined = e.get_mut();
            joined.push(',');
            joined.push_str(&value);
        }
        Entry::Vacant(e) => {
            e.insert(value.into_owned());
        }
    }
}

/// `Debug` shows header names but no header value, and not the credential: any of them
/// may carry a secret.
#[derive(Clone, Default)]
pub struct AuthRequest {
    pub method: String,
    /// As received, query string included; `normalize_path` gives the path routes are
    /// matched on.
    pub path: String,
    /// Lower-cased names. Repeated headers arrive joined with commas. Only the headers
    /// keygate consults need be here: the Envoy adapter keeps the credential headers, the
    /// tenant header, `x-keygate-*`, `:method` and `:path` (`api::envoy_wire`).
    pub headers: HashMap<String, String>,
    /// The downstream peer address, for logs.
    pub peer: Option<String>,
    /// A credential handed over outside the headers (keygate.v1 Check's `credential`).
    /// Read before any header.
    pub credential: Option<String>,
}

impl std::fmt::Debug for AuthRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.headers.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("AuthRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("headers", &names)
            .field("peer", &self.peer)
            .field(
                "credential",
                &self.credential.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

impl AuthRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Why a request path cannot be decided on: two common servers could read it differently,
/// and one of the readings could reach a route the policy did not allow. Each names what
/// was refused and holds no request data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with `/` (an absolute-form or `*` target)")]
    NotAbsolute,
    #[error("the request target holds a `#`")]
    Fragment,
    #[error(
        "the path holds a control character, NUL, space or non-ASCII byte, \
         or encodes a control character"
    )]
    Unprintable,
    #[error("the path holds a backslash")]
    Backslash,
    #[error("the path has a `%` that is not followed by two hex digits")]
    BadPercent,
    #[error("the path has path parameters (`;`, or `%3B`)")]
    Parameters,
    #[error("the path encodes `/` (`%2F`)")]
    EncodedSlash,
    #[error("the path encodes `\\` (`%5C`)")]
    EncodedBackslash,
    #[error("the path encodes `%` before two hex digits (`%25XX`, encoded twice)")]
    EncodedPercent,
    #[error("the path's percent-encoded bytes are not UTF-8 (overlong forms included)")]
    InvalidUtf8,
    #[error("the path encodes a character some servers fold into ASCII")]
    Lookalike,
    #[error("the path has an empty segment (`//`)")]
    EmptySegment,
    #[error(
        "the path falls on another route when read case-blind, \
         or without the trailing dots and spaces of its segments"
    )]
    Readings,
}

impl PathError {
    /// Every reason, in the order `index` numbers them.
    pub const ALL: [PathError; 13] = [
        PathError::NotAbsolute,
        PathError::Fragment,
        PathError::Unprintable,
        PathError::Backslash,
        PathError::BadPercent,
        PathError::Parameters,
        PathError::EncodedSlash,
        PathError::EncodedBackslash,
        PathError::EncodedPercent,
        PathError::InvalidUtf8,
        PathError::Lookalike,
        PathError::EmptySegment,
        PathError::Readings,
    ];

    /// Its place in `ALL` (declaration order, as `DenyReason::index`).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The relaxation that lets a route take a path refused for this reason, if there is
    /// one.
    pub fn relaxation(self) -> Option<PathRelaxation> {
        match self {
            PathError::EncodedSlash => Some(PathRelaxation::EncodedSlash),
            PathError::EncodedBackslash => Some(PathRelaxation::EncodedBackslash),
            PathError::EncodedPercent => Some(PathRelaxation::EncodedPercent),
            PathError::EmptySegment => Some(PathRelaxation::EmptySegments),
            _ => None,
        }
    }
}

/// A kind of path refused by default that a route may take
/// (`policy.routes[].path_relaxations`). A path using one is allowed only if every
/// reading of it (the character kept as data, and decoded; empty segments merged, and
/// kept) falls on one route, and that route names every relaxation the path uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathRelaxation {
    /// `%2F` inside a segment (an identifier or file name holding `/`).
    EncodedSlash,
    /// `%5C` inside a segment.
    EncodedBackslash,
    /// `%25` before two hex digits (a file name holding `%`, `100%25ab.txt`).
    EncodedPercent,
    /// Empty segments (`/a//b`), but never a leading `//`.
    EmptySegments,
}

impl PathRelaxation {
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of `PathRelaxation`s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relaxations(u8);

impl Relaxations {
    pub const NONE: Relaxations = Relaxations(0);

    pub fn with(self, r: PathRelaxation) -> Relaxations {
        Relaxations(self.0 | r.bit())
    }

    fn without(self, r: PathRelaxation) -> Relaxations {
        Relaxations(self.0 & !r.bit())
    }

    pub fn has(self, r: PathRelaxation) -> bool {
        self.0 & r.bit() != 0
    }

    /// Whether every relaxation in `other` is in `self`.
    pub fn covers(self, other: Relaxations) -> bool {
        other.0 & !self.0 == 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn union(self, other: Relaxations) -> Relaxations {
        Relaxations(self.0 | other.0)
    }
}

impl FromIterator<PathRelaxation> for Relaxations {
    fn from_iter<I: IntoIterator<Item = PathRelaxation>>(iter: I) -> Self {
        iter.into_iter().fold(Relaxations::NONE, Relaxations::with)
    }
}

/// How one reading of a path takes what a relaxation lets through.
#[derive(Debug, Clone, Copy)]
struct Reading {
    allowed: Relaxations,
    /// `%2F` and `%5C` read as `/` (as a server that decodes before it splits);
    /// otherwise they stay encoded, data inside their segment.
    decode_slashes: bool,
    /// Empty segments kept (RFC 3986: `..` then removes one); otherwise merged.
    keep_empty: bool,
}

impl Reading {
    const STRICT: Reading = Reading {
        allowed: Relaxations::NONE,
        decode_slashes: false,
        keep_empty: false,
    };
}

/// The path a server would route, without the query: percent-encoded unreserved
/// characters decoded (`%2E` and `%2e` alike), other escapes kept with upper-case hex,
/// then dot segments removed (RFC 3986, 5.2.4). `/public/../v1/contacts` and
/// `/public/%2e%2e/v1/contacts` are `/v1/contacts`. A trailing `/` is kept; a `..` above
/// the root stays at the root.
///
/// Refused, because common servers read it differently and one reading could route past
/// the policy (docs/security.md has the table):
/// - a `#` anywhere in the target, query included: Envoy refuses it, nginx hands it to
///   the authorizer and the upstream verbatim, and servers differ on cutting it;
/// - a raw control character, NUL, space or byte above ASCII, and an encoded control
///   character or NUL (`%00`, `%0a`);
/// - a raw `\` (Windows servers, IIS and some frameworks read it as `/`);
/// - `%2F`, `%5C` (servers that decode before splitting read a `/`) and `%25` before two
///   hex digits (`%252e`: a server that decodes twice reads `.`): relaxable per route;
/// - percent-encoded bytes that are not UTF-8 (`%c0%ae`, an overlong `.`), or encode a
///   character that case-blind or compatibility-normalising servers fold into ASCII
///   (fullwidth `％２ｅ`, `ſ`, `K`, dot leaders);
/// - an empty segment (`//`): proxies that merge slashes and servers that keep them
///   remove different segments on a later `..`, and URL parsers read a leading `//` as a
///   host. Relaxable per route, a leading `//` never;
/// - a `%` without two hex digits, and a `;` anywhere in the path, raw or as `%3B`:
///   servlet containers (Tomcat, Jetty, Spring) cut path parameters off each segment
///   before routing, so `/v1/admin;x/users` is `/v1/admin/users` to them and `..;x` is
///   `..`, while other servers keep `;` in the segment. The query may hold one.
///
/// A path with nothing to change (nearly every request) is borrowed, not copied: the
/// checks are one pass over bytes already read.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    normalize(raw, Reading::STRICT).map(|(path, _)| path)
}

/// The readings of a path that takes relaxations, and the relaxations it uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathReadings {
    /// Which of the allowed relaxations the path needs.
    pub used: Relaxations,
    /// Each distinct reading, normalised as `normalize_path` would; the first keeps every
    /// relaxed character encoded (and merges empty segments).
    pub paths: Vec<String>,
}

/// Every reading of `raw` a server could take once `allowed` lets it through: `%2F` and
/// `%5C` kept as data or read as `/`, empty segments merged or kept, and, where `%25XX`
/// is allowed, the path decoded twice (read each of those ways again). A path refused
/// even so is an error, as from `normalize_path`. For relaxed routes only: it allocates.
pub fn path_readings(raw: &str, allowed: Relaxations) -> Result<PathReadings, PathError> {
    let kept = Reading {
        allowed,
        decode_slashes: false,
        keep_empty: false,
    };
    let (first, mut used) = normalize(raw, kept)?;
    let mut paths = vec![first.into_owned()];
    let twice = used
        .has(PathRelaxation::EncodedPercent)
        .then(|| decode_percent_once(raw));
    let sources = [
        Some((raw, allowed)),
        twice.as_deref().map(|t| {
            // Encoded three times is never relaxed.
            (t, allowed.without(PathRelaxation::EncodedPercent))
        }),
    ];
    for (source, allowed) in sources.into_iter().flatten() {
        for decode_slashes in [false, true] {
            for keep_empty in [false, true] {
                let slashes = used.has(PathRelaxation::EncodedSlash)
                    || used.has(PathRelaxation::EncodedBackslash);
                if (decode_slashes && !slashes)
                    || (keep_empty && !used.has(PathRelaxation::EmptySegments))
                {
                    continue;
                }
                let reading = Reading {
                    allowed,
                    decode_slashes,
                    keep_empty,
                };
                let (path, also) = normalize(source, reading)?;
                used = used.union(also);
                if !paths.iter().any(|p| *p == *path) {
                    paths.push(path.into_owned());
                }
            }
        }
    }
    Ok(PathReadings { used, paths })
}

/// `raw` with each `%25` that stands before two hex digits decoded: what a server that
/// decodes twice sees at its second pass.
fn decode_percent_once(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if bytes[i..].starts_with(b"%25")
            && hex(bytes.get(i + 3)).is_some()
            && hex(bytes.get(i + 4)).is_some()
        {
            out.push('%');
            i += 3;
        } else {
            let next = raw[i + 1..].find('%').map_or(raw.len(), |p| i + 1 + p);
            out.push_str(&raw[i..next]);
            i = next;
        }
    }
    out
}

fn hex(c: Option<&u8>) -> Option<u8> {
    c.and_then(|c| (*c as char).to_digit(16)).map(|d| d as u8)
}

/// The byte the escape at `bytes[i]` (a `%`) encodes.
fn escaped(bytes: &[u8], i: usize) -> Result<u8, PathError> {
    match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
        (Some(hi), Some(lo)) => Ok(hi * 16 + lo),
        _ => Err(PathError::BadPercent),
    }
}

fn normalize(raw: &str, reading: Reading) -> Result<(Cow<'_, str>, Relaxations), PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = raw.as_bytes();
    if bytes.get(1) == Some(&b'/') {
        // `//host/x` is a network-path reference to a URL parser (Node's `new URL`,
        // Python's `urlsplit`): its first segment is read as a host.
        return Err(PathError::EmptySegment);
    }
    let mut used = Relaxations::NONE;
    let mut plain = true;
    let mut end = bytes.len();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'?' => {
                end = i;
                break;
            }
            b'#' => return Err(PathError::Fragment),
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::Parameters),
            b'%' => plain = false,
            b'/' => match bytes.get(i + 1) {
                Some(b'/') => {
                    relax(reading.allowed, PathRelaxation::EmptySegments, &mut used)?;
                    plain = false;
                }
                Some(b'.') => plain = false,
                _ => {}
            },
            0x21..=0x7e => {}
            _ => return Err(PathError::Unprintable),
        }
    }
    // The query is not the path, but a `#` in it is still a fragment to some servers.
    if raw[end..].contains('#') {
        return Err(PathError::Fragment);
    }
    let path = &raw[..end];
    if plain {
        return Ok((Cow::Borrowed(path), used));
    }
    let decoded = decode(path, reading, &mut used)?;
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            // A trailing one is kept, as it is part of the route.
            "" if i < last => {
                relax(reading.allowed, PathRelaxation::EmptySegments, &mut used)?;
                if reading.keep_empty {
                    out.push("");
                }
            }
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for seg in &out {
        normal.push('/');
        normal.push_str(seg);
    }
    if normal.is_empty() {
        normal.push('/');
    }
    Ok((Cow::Owned(normal), used))
}

/// Takes `r` if `allowed` has it, or refuses the path for it.
fn relax(allowed: Relaxations, r: PathRelaxation, used: &mut Relaxations) -> Result<(), PathError> {
    if !allowed.has(r) {
        return Err(match r {
            PathRelaxation::EncodedSlash => PathError::EncodedSlash,
            PathRelaxation::EncodedBackslash => PathError::EncodedBackslash,
            PathRelaxation::EncodedPercent => PathError::EncodedPercent,
            PathRelaxation::EmptySegments => PathError::EmptySegment,
        });
    }
    *used = used.with(r);
    Ok(())
}

/// `%XX` of an unreserved character (`A-Z a-z 0-9 - . _ ~`) decoded; any other `%XX`
/// kept, with its hex digits upper-cased so that equal paths are equal strings.
fn decode(path: &str, reading: Reading, used: &mut Relaxations) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            // Copy the run up to the next `%` as it is.
            let end = path[i..].find('%').map_or(bytes.len(), |p| i + p);
            out.push_str(&path[i..end]);
            i = end;
            continue;
        }
        let c = escaped(bytes, i)?;
        if c >= 0x80 {
            i = encoded_text(bytes, i, &mut out)?;
            continue;
        }
        match c {
            b'/' | b'\\' => {
                let r = if c == b'/' {
                    PathRelaxation::EncodedSlash
                } else {
                    PathRelaxation::EncodedBackslash
                };
                relax(reading.allowed, r, used)?;
                if reading.decode_slashes {
                    out.push('/');
                } else {
                    out.push_str(&format!("%{c:02X}"));
                }
            }
            b'%' => {
                // `%25` then two hex digits is an escape once decoded: `%252e` is `.` to
                // a server that decodes twice. Digits that are escapes themselves
                // (`%25%32%65`) are never relaxed: no reading of them is plain.
                if let Some(escapes) = hex_pair_at(bytes, i + 3) {
                    if escapes {
                        return Err(PathError::EncodedPercent);
                    }
                    relax(reading.allowed, PathRelaxation::EncodedPercent, used)?;
                }
                out.push_str("%25");
            }
            b';' => return Err(PathError::Parameters),
            0..=0x1f | 0x7f => return Err(PathError::Unprintable),
            c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                out.push(c as char)
            }
            c => out.push_str(&format!("%{c:02X}")),
        }
        i += 3;
    }
    Ok(out)
}

/// Whether two hex digits start at `bytes[at]`, as a server that decodes once sees them:
/// `Some(true)` if either of them is an escape itself.
fn hex_pair_at(bytes: &[u8], at: usize) -> Option<bool> {
    let digit = |at: usize| -> Option<(bool, usize)> {
        match bytes.get(at)? {
            b'%' => escaped(bytes, at)
                .ok()
                .filter(u8::is_ascii_hexdigit)
                .map(|_| (true, at + 3)),
            b if b.is_ascii_hexdigit() => Some((false, at + 1)),
            _ => None,
        }
    };
    let (first, next) = digit(at)?;
    let (second, _) = digit(next)?;
    Some(first || second)
}

/// The run of escapes above ASCII at `bytes[i]`, checked as UTF-8 text and kept encoded
/// (upper-case hex) in `out`; returns where the run ends.
fn encoded_text(bytes: &[u8], mut i: usize, out: &mut String) -> Result<usize, PathError> {
    let mut text = Vec::new();
    while bytes.get(i) == Some(&b'%') {
        match escaped(bytes, i) {
            Ok(c) if c >= 0x80 => text.push(c),
            _ => break,
        }
        i += 3;
    }
    // `from_utf8` refuses overlong forms (`%c0%ae` for `.`), surrogates and code
    // points past U+10FFFF, which lenient decoders turn into ASCII or replace.
    let text = std::str::from_utf8(&text).map_err(|_| PathError::InvalidUtf8)?;
    if text.chars().any(folds_into_ascii) {
        return Err(PathError::Lookalike);
    }
    for b in text.bytes() {
        out.push_str(&format!("%{b:02X}"));
    }
    Ok(i)
}

/// A character some servers read as ASCII: by case mapping (`ſ` is `S` upper-cased, `K`
/// the Kelvin sign is `k` lower-cased, `ﬁ` is `FI`), or by compatibility normalisation
/// (NFKC) or Windows' best-fit mapping: fullwidth and small forms (`／`, `．`, `﹨`), dot
/// leaders (`‥` is `..`), letterlike symbols (`℀` is `a/c`), division and fraction
/// slashes, mathematical letters and digits.
fn folds_into_ascii(c: char) -> bool {
    matches!(
        c as u32,
        0xFF01..=0xFF5E
            | 0xFE50..=0xFE6B
            | 0x2024..=0x2026
            | 0x2044
            | 0x2100..=0x214F
            | 0x2215
            | 0x2216
            | 0x29F8
            | 0x29F9
            | 0x1D400..=0x1D7FF
    ) || c.to_lowercase().any(|l| l.is_ascii())
        || c.to_uppercase().any(|u| u.is_ascii())
}

#[cfg(test)]
mod tests;
