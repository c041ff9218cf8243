//! Headers → `Credential`. Which headers are read is configuration; the kind of token is
//! decided by its shape alone (an API key's `<prefix>_<env>_` head, a JWT's three
//! segments), never by trying one verifier and then the other.

use crate::apikey::token::looks_like_api_key;
use crate::policy::PolicyConfig;
use crate::request::AuthRequest;

/// What the caller presented, borrowed from the request. `Debug` never shows a token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    ApiKey(&'a str),
    Jwt(&'a str),
    /// Something was presented, but it has neither shape.
    Unrecognized,
    None,
}

impl std::fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::ApiKey(_) => "ApiKey([redacted])",
            Credential::Jwt(_) => "Jwt([redacted])",
            Credential::Unrecognized => "Unrecognized",
            Credential::None => "None",
        })
    }
}

/// Where credentials are looked for, compiled from the policy.
#[derive(Debug, Clone)]
pub struct CredentialSource {
    headers: Vec<(String, Option<String>)>,
}

impl CredentialSource {
    pub fn new(policy: &PolicyConfig) -> Self {
        CredentialSource {
            headers: policy
                .credential_headers
                .iter()
                .map(|h| (h.header.clone(), h.scheme.clone()))
                .collect(),
        }
    }

    /// Names of the headers that may carry a credential (to strip them upstream).
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        self.headers.iter().map(|(h, _)| h.as_str())
    }

    /// The first configured header that carries a token, classified by shape.
    pub fn extract<'r>(&self, req: &'r AuthRequest) -> Credential<'r> {
        if let Some(token) = req.credential.as_deref().map(str::trim) {
            if !token.is_empty() {
                return classify(token);
            }
        }
        for (name, scheme) in &self.headers {
            let Some(value) = req.header(name) else {
                continue;
            };
            let token = match scheme {
                Some(scheme) => match strip_scheme(value, scheme) {
                    Some(t) => t,
                    // `authorization: Basic …` is not ours; another header may be.
                    None => continue,
                },
                None => value.trim(),
            };
            if token.is_empty() {
                continue;
            }
            return classify(token);
        }
        Credential::None
    }
}

fn strip_scheme<'v>(value: &'v str, scheme: &str) -> Option<&'v str> {
    let value = value.trim_start();
    let head = value.get(..scheme.len())?;
    if !head.eq_ignore_ascii_case(scheme) {
        return None;
    }
    let rest = &value[scheme.len()..];
    rest.starts_with(' ').then(|| rest.trim())
}

pub fn classify(token: &str) -> Credential<'_> {
    if looks_like_api_key(token) {
        Credential::ApiKey(token)
    } else if is_jwt_shaped(token) {
        Credential::Jwt(token)
    } else {
        Credential::Unrecognized
    }
}

/// Three dot-separated base64url segments. The signature may be empty, so that an
/// unsigned (`alg: none`) token is judged as a JWT — and refused as one, `invalid_token`.
fn is_jwt_shaped(token: &str) -> bool {
    let mut n = 0;
    for part in token.split('.') {
        n += 1;
        if n > 3
            || (part.is_empty() && n < 3)
            || !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return false;
        }
    }
    n == 3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> AuthRequest {
        AuthRequest {
            method: "GET".into(),
            path: "/".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            peer: None,
            credential: None,
        }
    }

    const KEY: &str = "sk_live_0123456789abcdef_0123456789012345678901234567890123";

    #[test]
    fn reads_the_configured_headers_in_order() {
        let src = CredentialSource::new(&PolicyConfig::default());
        let bearer = format!("Bearer {KEY}");
        assert_eq!(
            src.extract(&req(&[("authorization", &bearer)])),
            Credential::ApiKey(KEY)
        );
        let lower = format!("bearer   {KEY} ");
        assert_eq!(
            src.extract(&req(&[("authorization", &lower)])),
            Credential::ApiKey(KEY)
        );
        assert_eq!(
            src.extract(&req(&[("x-api-key", KEY)])),
            Credential::ApiKey(KEY)
        );
        assert_eq!(
            src.extract(&req(&[("x-access-token", KEY)])),
            Credential::ApiKey(KEY)
        );
        assert_eq!(
            src.extract(&req(&[
                ("authorization", "Basic dXNlcjpwYXNz"),
                ("x-api-key", KEY)
            ])),
            Credential::ApiKey(KEY)
        );
        assert_eq!(
            src.extract(&req(&[("authorization", "Basic dXNlcjpwYXNz")])),
            Credential::None
        );
        assert_eq!(
            src.extract(&req(&[("authorization", "Bearer")])),
            Credential::None
        );
        assert_eq!(
            src.extract(&req(&[("authorization", "Bearer ")])),
            Credential::None
        );
        assert_eq!(src.extract(&req(&[("x-api-key", "")])), Credential::None);
        assert_eq!(src.extract(&req(&[])), Credential::None);
    }

    #[test]
    fn debug_never_shows_the_token() {
        assert_eq!(format!("{:?}", classify(KEY)), "ApiKey([redacted])");
        assert_eq!(format!("{:?}", classify("a.b.c")), "Jwt([redacted])");
    }

    #[test]
    fn kind_is_decided_by_shape() {
        assert_eq!(
            classify("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"),
            Credential::Jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln")
        );
        assert_eq!(classify("a.b"), Credential::Unrecognized);
        assert_eq!(classify("a..c"), Credential::Unrecognized);
        assert_eq!(
            classify("a.b."),
            Credential::Jwt("a.b."),
            "unsigned: a JWT, refused as one"
        );
        assert_eq!(classify(".b.c"), Credential::Unrecognized);
        assert_eq!(classify("hello world"), Credential::Unrecognized);
        assert_eq!(classify("!!!!"), Credential::Unrecognized);
    }
}
