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
        ("/public/%2E%2e/v1/contacts/42", "/v1/contacts/42"),
        ("/public/./../v1/contacts", "/v1/contacts"),
        ("/public/%2e/../v1/contacts", "/v1/contacts"),
        ("/../../v1/contacts", "/v1/contacts"),
        ("/v1/contacts/", "/v1/contacts/"),
        ("/v1/contacts/.", "/v1/contacts/"),
        ("/v1/contacts/%2E", "/v1/contacts/"),
        ("/v1/contacts/x/..", "/v1/contacts/"),
        ("/v1/%63ontacts", "/v1/contacts"),
        ("/v1/contacts/a%20b", "/v1/contacts/a%20b"),
        ("/v1/contacts/a%3fb", "/v1/contacts/a%3Fb"),
        ("/v1/contacts/a%23b", "/v1/contacts/a%23b"),
        ("/v1/contacts/..a", "/v1/contacts/..a"),
        ("/v1/contacts/a.", "/v1/contacts/a."),
        ("/v1/contacts?v=1;x=2", "/v1/contacts"),
        ("/v1/contacts?a=%2F..%00\\", "/v1/contacts"),
        ("/files/caf%c3%a9", "/files/caf%C3%A9"),
        ("/files/%E2%82%AC", "/files/%E2%82%AC"),
        ("/files/100%25", "/files/100%25"),
        ("/files/50%25off", "/files/50%25off"),
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
    use PathError::*;
    for (raw, why) in [
        // The rows of issue 33's table.
        ("/public/x#/../../v1/contacts/42", Fragment),
        ("/public/%252e%252e/v1/contacts/42", EncodedPercent),
        ("/public/%c0%ae%c0%ae/v1/contacts/42", InvalidUtf8),
        // A fragment anywhere, the query included.
        ("/public#", Fragment),
        ("/public/x?a=1#/../v1", Fragment),
        ("/v1/contacts#a;b", Fragment),
        // Encoded `/` and `\`, raw `\`.
        ("/public/..%2fv1/contacts/42", EncodedSlash),
        ("/public/..%2Fv1/contacts/42", EncodedSlash),
        ("/public/..%5cv1/contacts/42", EncodedBackslash),
        ("/public/..%5Cv1/contacts/42", EncodedBackslash),
        ("/public/..\\v1/contacts/42", Backslash),
        ("/public\\..\\v1", Backslash),
        // Double encoding of `.`, `/`, `\` and of anything else.
        ("/public/%252e%252e%252fv1", EncodedPercent),
        ("/public/..%252fv1/contacts", EncodedPercent),
        ("/public/..%255cv1/contacts", EncodedPercent),
        ("/v1/%2561dmin", EncodedPercent),
        ("/public/%25%32%65", EncodedPercent),
        ("/public/%25%32e", EncodedPercent),
        // Controls, NUL, space and raw bytes above ASCII.
        ("/public/%00/x", Unprintable),
        ("/public/\0/x", Unprintable),
        ("/public/\t/x", Unprintable),
        ("/public/%0a/x", Unprintable),
        ("/public/%0D%0Ax", Unprintable),
        ("/public/%7f", Unprintable),
        ("/public/%1f", Unprintable),
        ("/public/a b", Unprintable),
        ("/public/\u{7f}", Unprintable),
        ("/public/caf\u{e9}", Unprintable),
        ("/public/\u{fffd}\u{fffd}/x", Unprintable),
        // Escapes that are not UTF-8: overlong, surrogate, truncated, past U+10FFFF.
        ("/public/%c0%ae", InvalidUtf8),
        ("/public/%C0%AE%C0%AE/v1", InvalidUtf8),
        ("/public/%e0%80%ae", InvalidUtf8),
        ("/public/%f0%80%80%ae", InvalidUtf8),
        ("/public/%c0%af", InvalidUtf8),
        ("/public/%ed%a0%80", InvalidUtf8),
        ("/public/%c3", InvalidUtf8),
        ("/public/%c3.", InvalidUtf8),
        ("/public/%f4%90%80%80", InvalidUtf8),
        ("/public/%e9", InvalidUtf8),
        // Characters that fold into ASCII.
        ("/public/%ef%bc%8e%ef%bc%8e/v1", Lookalike),
        ("/public/..%ef%bc%8fv1", Lookalike),
        ("/public/%EF%BC%BC", Lookalike),
        ("/public/%e2%80%a5", Lookalike),
        ("/v1/admin%c4%b1n", Lookalike),
        ("/v1/%c5%bfecret", Lookalike),
        ("/v1/%e2%84%aaeys", Lookalike),
        ("/v1/%ef%ac%81les", Lookalike),
        ("/v1/a%e2%88%95b", Lookalike),
        // Empty segments, a leading `//` above all.
        ("//v1/contacts", EmptySegment),
        ("//evil.example/v1", EmptySegment),
        ("/public//../v1/contacts", EmptySegment),
        ("/v1//contacts", EmptySegment),
        ("/v1/contacts//", EmptySegment),
        ("/public/.//../v1", EmptySegment),
        ("/public/%2e//v1", EmptySegment),
        // The rest.
        ("/public/%zz", BadPercent),
        ("/public/%2", BadPercent),
        ("/public/%", BadPercent),
        ("/public/%%32%65", BadPercent),
        ("/public/..;/v1/contacts", Parameters),
        ("/public/.;x/v1/contacts", Parameters),
        ("v1/contacts", NotAbsolute),
        ("http://api.example.com/v1/contacts", NotAbsolute),
        ("", NotAbsolute),
        ("*", NotAbsolute),
        ("?/v1", NotAbsolute),
    ] {
        assert_eq!(norm(raw), Err(why), "{raw:?}");
    }
}

#[test]
fn each_relaxation_lets_its_character_through_and_no_other() {
    use PathRelaxation::*;
    let only = |r| Relaxations::NONE.with(r);
    let readings = |raw, allowed| path_readings(raw, allowed).map(|r| (r.used, r.paths));
    assert_eq!(
        readings("/files/a%2fb", only(EncodedSlash)),
        Ok((
            only(EncodedSlash),
            vec!["/files/a%2Fb".to_owned(), "/files/a/b".to_owned()]
        ))
    );
    assert_eq!(
        readings("/files/..%2F..%2Fadmin", only(EncodedSlash)),
        Ok((
            only(EncodedSlash),
            vec!["/files/..%2F..%2Fadmin".to_owned(), "/admin".to_owned()]
        ))
    );
    // Nothing relaxed, nothing used: the one strict reading.
    assert_eq!(
        readings("/files/a", only(EncodedSlash)),
        Ok((Relaxations::NONE, vec!["/files/a".to_owned()]))
    );
    let slash_twice = only(EncodedPercent).with(EncodedSlash);
    // Each path, what it is relaxed of, and the paths it reads as.
    let read: [(&str, Relaxations, &[&str]); 5] = [
        (
            "/files/a%5cb",
            only(EncodedBackslash),
            &["/files/a%5Cb", "/files/a/b"],
        ),
        (
            "/files/100%2541.txt",
            only(EncodedPercent),
            &["/files/100%2541.txt", "/files/100A.txt"],
        ),
        (
            "/files/%252e%252e/x",
            only(EncodedPercent),
            &["/files/%252e%252e/x", "/x"],
        ),
        (
            "/files/a//b/../c",
            only(EmptySegments),
            &["/files/a/c", "/files/a//c"],
        ),
        // Encoded twice, a `/` needs both relaxations.
        (
            "/files/a%252fb",
            slash_twice,
            &["/files/a%252fb", "/files/a%2Fb", "/files/a/b"],
        ),
    ];
    for (raw, allowed, paths) in read {
        let paths = paths.iter().map(|p| p.to_string()).collect();
        assert_eq!(readings(raw, allowed).map(|r| r.1), Ok(paths), "{raw}");
    }
    // Each path, what it is relaxed of, and why it is refused all the same.
    let refused = [
        // A reading that is refused refuses the path: `%ab` is no UTF-8 once decoded.
        (
            "/files/100%25ab.txt",
            only(EncodedPercent),
            PathError::InvalidUtf8,
        ),
        // Encoded twice, a `/` needs both relaxations; encoded three times, none will do.
        (
            "/files/a%252fb",
            only(EncodedPercent),
            PathError::EncodedSlash,
        ),
        ("/files/a%25252fb", slash_twice, PathError::EncodedPercent),
        // A relaxation is for its character only.
        (
            "/files/a%5cb",
            only(EncodedSlash),
            PathError::EncodedBackslash,
        ),
        ("/files/a%2fb#", only(EncodedSlash), PathError::Fragment),
        ("//files/a", only(EmptySegments), PathError::EmptySegment),
        (
            "/files/%25%32%65",
            only(EncodedPercent),
            PathError::EncodedPercent,
        ),
    ];
    for (raw, allowed, refusal) in refused {
        assert_eq!(readings(raw, allowed), Err(refusal), "{raw}");
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
    // Encoded once more, `%253B` is `;` to a server that decodes twice.
    assert_eq!(norm("/v1/a%253Bb"), Err(PathError::EncodedPercent));
}

#[test]
fn normalising_twice_changes_nothing() {
    for raw in [
        "/a/%2e%2e/b/./c/d/",
        "/a/%25%25/b",
        "/%7e/~/x/../y",
        "/a/b/../../../c",
        "/a/caf%c3%a9/%3f%23",
    ] {
        let once = norm(raw).unwrap();
        assert_eq!(norm(&once).unwrap(), once, "{raw}");
    }
}
