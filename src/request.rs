//! `AuthRequest`: the protocol-neutral view of the request being authorized. Adapters
//! build it from Envoy's `CheckRequest` or keygate's own; the core never sees a protobuf.

use std::borrow::Cow;
use std::collections::HashMap;

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

/// Why a request path cannot be decided on: no server could be trusted to route it the
/// way keygate reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with `/`")]
    NotAbsolute,
    #[error("the path encodes `/`, `\\` or NUL, or holds a backslash or control character")]
    Ambiguous,
    #[error("the path has a `%` that is not followed by two hex digits")]
    BadPercent,
    #[error("the path has path parameters (`;`, or `%3B`)")]
    Parameters,
}

/// The path a server would route, without the query: percent-encoded unreserved
/// characters decoded, runs of `/` merged, then dot segments removed (RFC 3986, 5.2.4).
/// `/public/../v1/contacts` and `/public/%2e%2e/v1/contacts` are `/v1/contacts`.
///
/// Refused, because servers disagree on what they mean and one of them would route past
/// the policy: an encoded `/`, `\` or NUL, a raw `\` or control character, a `%` without
/// two hex digits, and a `;` anywhere in the path, raw or as `%3B`. Servlet containers
/// (Tomcat, Jetty, Spring) cut path parameters off each segment before routing, so
/// `/v1/admin;x/users` is `/v1/admin/users` to them and `..;x` is `..`; most other servers
/// keep `;` as part of the segment. No one reading of it agrees with every upstream, so
/// none is taken (Spring Security's `StrictHttpFirewall` refuses it too). The query, cut
/// off first, may hold `;`. Slashes are merged before dots are resolved because common
/// proxies and servers merge them: `/public//../v1` is then `/v1`, whichever way a
/// server reads it, the stricter of the two readings for any route below `/public`.
///
/// A path with nothing to change (nearly every request) is borrowed, not copied.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    let mut plain = true;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\\' | 0..=0x1f | 0x7f => return Err(PathError::Ambiguous),
            b'%' => plain = false,
            b'/' if matches!(bytes.get(i + 1), Some(b'/' | b'.')) => plain = false,
            b';' => return Err(PathError::Parameters),
            _ => {}
        }
    }
    if plain {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            // A merged slash; a trailing one is kept, as it is part of the route.
            "" if i < last => {}
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
    Ok(Cow::Owned(normal))
}

/// `%XX` of an unreserved character (`A-Z a-z 0-9 - . _ ~`) decoded; any other `%XX`
/// kept, with its hex digits upper-cased so that equal paths are equal strings.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            // Copy the run up to the next `%` as it is (it may hold non-ASCII text).
            let end = bytes[i..]
                .iter()
                .position(|&c| c == b'%')
                .map_or(bytes.len(), |p| i + p);
            out.push_str(&path[i..end]);
            i = end;
            continue;
        }
        let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
        let (Some(hi), Some(lo)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
            return Err(PathError::BadPercent);
        };
        let c = (hi * 16 + lo) as u8;
        match c {
            b'/' | b'\\' | 0 => return Err(PathError::Ambiguous),
            b';' => return Err(PathError::Parameters),
            c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                out.push(c as char)
            }
            c => {
                out.push('%');
                out.push_str(&format!("{c:02X}"));
            }
        }
        i += 3;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize_path(p).map(Cow::into_owned)
    }

    #[test]
    fn dot_segments_and_encoded_unreserved_characters_resolve_to_the_routed_path() {
        for (raw, want) in [
            ("/v1/contacts/42?fields=name", "/v1/contacts/42"),
            ("/public/../v1/contacts/42", "/v1/contacts/42"),
            ("/public/%2e%2e/v1/contacts/42", "/v1/contacts/42"),
            ("/public/%2E./v1/contacts/42", "/v1/contacts/42"),
            ("/public/./../v1/contacts", "/v1/contacts"),
            ("/../../v1/contacts", "/v1/contacts"),
            ("/public//../v1/contacts", "/v1/contacts"),
            ("//v1//contacts", "/v1/contacts"),
            ("/v1/contacts/", "/v1/contacts/"),
            ("/v1/contacts/.", "/v1/contacts/"),
            ("/v1/contacts/x/..", "/v1/contacts/"),
            ("/v1/%63ontacts", "/v1/contacts"),
            ("/v1/contacts/a%20b", "/v1/contacts/a%20b"),
            ("/v1/contacts/a%3fb", "/v1/contacts/a%3Fb"),
            ("/v1/contacts/..a", "/v1/contacts/..a"),
            ("/v1/contacts?v=1;x=2", "/v1/contacts"),
            ("/v1/contacts#a;b", "/v1/contacts"),
            ("/..", "/"),
            ("/", "/"),
        ] {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn debug_shows_no_header_value_and_no_credential() {
        let req = AuthRequest {
            method: "GET".into(),
            path: "/v1".into(),
            headers: [(
                "authorization".to_owned(),
                "Bearer sk_live_SECRET".to_owned(),
            )]
            .into(),
            peer: None,
            credential: Some("sk_live_OTHERSECRET".into()),
        };
        let shown = format!("{req:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("authorization"), "{shown}");
    }

    #[test]
    fn a_plain_path_is_borrowed() {
        assert!(matches!(
            normalize_path("/v1/contacts/42?x=/../y"),
            Ok(Cow::Borrowed("/v1/contacts/42"))
        ));
    }

    #[test]
    fn paths_servers_read_differently_are_refused() {
        for (raw, why) in [
            ("/public/..%2fv1/contacts/42", PathError::Ambiguous),
            ("/public/..%2Fv1/contacts/42", PathError::Ambiguous),
            ("/public/..%5cv1/contacts/42", PathError::Ambiguous),
            ("/public/..\\v1/contacts/42", PathError::Ambiguous),
            ("/public/%00/x", PathError::Ambiguous),
            ("/public/\0/x", PathError::Ambiguous),
            ("/public/\t/x", PathError::Ambiguous),
            ("/public/%zz", PathError::BadPercent),
            ("/public/%2", PathError::BadPercent),
            ("/public/..;/v1/contacts", PathError::Parameters),
            ("/public/.;x/v1/contacts", PathError::Parameters),
            ("v1/contacts", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
        ] {
            assert_eq!(norm(raw), Err(why), "{raw:?}");
        }
    }

    /// Servlet containers route `/v1/admin;x/users` as `/v1/admin/users`, other servers
    /// as a segment `admin;x`: a `;` anywhere in the path, raw or encoded, is refused.
    #[test]
    fn path_parameters_are_refused_in_every_segment_and_spelling() {
        for raw in [
            "/v1/admin;x/users",
            "/v1/admin;/users",
            "/v1/contacts;v=1",
            "/v1/contacts/42;jsessionid=ABC",
            "/public;x/../v1/contacts",
            "/;/v1/contacts",
            "/;",
            "/v1/admin%3bx/users",
            "/v1/admin%3Bx/users",
            "/public/..%3b/v1/contacts",
            "/public/%2e%2e;/v1/contacts",
            "/v1/contacts;?q=1",
        ] {
            assert_eq!(norm(raw), Err(PathError::Parameters), "{raw:?}");
        }
        // Encoded once more, `%253B` is a literal `%3B` to a server that decodes once.
        assert_eq!(norm("/v1/a%253Bb").as_deref(), Ok("/v1/a%253Bb"));
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for raw in [
            "/a/%2e%2e/b/./c//d/",
            "/a/%252e%252e/b",
            "/%7e/~/x/../y",
            "/a/b/../../../c",
        ] {
            let once = norm(raw).unwrap();
            assert_eq!(norm(&once).unwrap(), once, "{raw}");
        }
    }
}
