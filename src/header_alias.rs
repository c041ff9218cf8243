//! Header names as upstreams read them. CGI, WSGI and PHP (and the frameworks on them)
//! turn `X-Tenant-Id`, `x_tenant_id` and `x.tenant.id` all into `HTTP_X_TENANT_ID`, so to
//! them the three are one header. keygate reads and vouches for one spelling of each
//! header it owns; every other spelling of it is an alias, which an allow removes.
//!
//! This module only compares names; it knows no request and no wire format. The adapters
//! (`api::envoy`) decide what to remove, the authorizer which headers carry a method
//! override (`authorizer::is_method_override_header`).

/// One byte of a header name as upstreams that read `-`, `_` and `.` alike see it.
fn fold(b: u8) -> u8 {
    match b {
        b'_' | b'.' => b'-',
        b => b.to_ascii_lowercase(),
    }
}

/// Whether a header name has a byte `fold` changes other than by case.
pub fn has_separator(name: &[u8]) -> bool {
    name.iter().any(|&b| b == b'_' || b == b'.')
}

/// Whether `name` reads as `header` once `_` and `.` are read as `-`, in any case.
pub fn folds_to(name: &[u8], header: &[u8]) -> bool {
    name.len() == header.len() && name.iter().zip(header).all(|(&a, &b)| fold(a) == fold(b))
}

/// Whether `name` starts with `prefix` once `_` and `.` are read as `-`, in any case.
pub fn folds_under(name: &[u8], prefix: &[u8]) -> bool {
    name.get(..prefix.len())
        .is_some_and(|head| folds_to(head, prefix))
}

/// The request headers keygate owns on an allow, by the spelling it reads and sets: the
/// tenant header, the credential headers, and everything under the identity prefix
/// (`x-keygate-`).
#[derive(Debug, Clone)]
pub struct OwnedHeaders {
    names: Vec<String>,
    prefix: String,
    /// Whether an owned name has `_` or `.`: only then can a name without either be an
    /// alias (`x-org-id` of `x_org_id`). Usually not, and most allows compare nothing.
    separated: bool,
}

impl OwnedHeaders {
    /// `names` and `prefix` lower-case (configuration validation sees to the names).
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>, prefix: &str) -> OwnedHeaders {
        let mut names: Vec<String> = names.into_iter().map(str::to_owned).collect();
        names.sort();
        names.dedup();
        OwnedHeaders {
            separated: names.iter().any(|n| has_separator(n.as_bytes())),
            names,
            prefix: prefix.to_owned(),
        }
    }

    /// Whether a client's (lower-case) header `name` is an alias of an owned header: not
    /// an owned spelling, but one an upstream reading `_` and `.` as `-` takes for one
    /// (`x_tenant_id`, `x.api.key`, `x.keygate.subject`). The owned spellings themselves
    /// are not aliases: an allow overwrites or removes them by their own rules (the
    /// tenant header is overwritten, `x-keygate-*` removed unless set,
    /// `policy.strip_credential_headers`).
    pub fn is_alias(&self, name: &str) -> bool {
        let bytes = name.as_bytes();
        let separated = has_separator(bytes);
        if !separated && !self.separated {
            return false;
        }
        (separated && folds_under(bytes, self.prefix.as_bytes()))
            || self
                .names
                .iter()
                .any(|owned| owned != name && folds_to(bytes, owned.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(tenant: &str) -> OwnedHeaders {
        OwnedHeaders::new(
            [tenant, "authorization", "x-api-key", "x-access-token"],
            "x-keygate-",
        )
    }

    #[test]
    fn aliases_are_the_underscore_and_dot_spellings_of_every_owned_header() {
        let default = owned("x-tenant-id");
        for name in [
            "x_tenant_id",
            "x.tenant.id",
            "x-tenant_id",
            "x_keygate_subject",
            "x.keygate.key.id",
            "x_keygate_scopes",
            "x_keygate_session_token",
            "x_keygate_anything",
            "x-keygate-key_id",
            "x_api_key",
            "x.api.key",
            "x-api_key",
            "x_access_token",
            "x.access-token",
        ] {
            assert!(default.is_alias(name), "{name}");
        }
        for name in [
            // keygate's own spellings: by their own rules.
            "x-tenant-id",
            "x-api-key",
            "x-access-token",
            "authorization",
            "x-keygate-subject",
            "x-keygate-anything",
            // Other headers, with or without separators.
            "x_custom",
            "x_tenant",
            "x_tenant_id_2",
            "xx_tenant_id",
            "x_keygate",
            "x_api_keys",
            "x-http-method-override",
        ] {
            assert!(!default.is_alias(name), "{name}");
        }
    }

    #[test]
    fn an_owned_name_spelled_with_underscores_has_its_dashed_spelling_for_alias() {
        let underscored = owned("x_org_id");
        assert!(underscored.is_alias("x-org-id"));
        assert!(underscored.is_alias("x.org.id"));
        assert!(!underscored.is_alias("x_org_id"));
        assert!(!underscored.is_alias("x-keygate-subject"));
        assert!(underscored.is_alias("x_keygate_subject"));
        assert!(!underscored.is_alias("x-org"));
        let credential = OwnedHeaders::new(["x_token", "x-tenant-id"], "x-keygate-");
        assert!(credential.is_alias("x-token"));
        assert!(!credential.is_alias("x_token"));
    }

    #[test]
    fn folding_reads_underscore_dot_and_case_alike() {
        assert!(folds_to(
            b"X_Http.Method-OVERRIDE",
            b"x-http-method-override"
        ));
        assert!(!folds_to(
            b"x-http-method-overrid",
            b"x-http-method-override"
        ));
        assert!(folds_under(b"X.KEYGATE_x", b"x-keygate-"));
        assert!(!folds_under(b"x-keygat", b"x-keygate-"));
    }
}
