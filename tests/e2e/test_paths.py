"""Paths through an Envoy left at its defaults (no `normalize_path`, no `merge_slashes`,
escaped slashes kept): keygate decides on the path the upstream would route, so a dot
segment cannot walk from a public route to a protected one, and a path that servers read
differently is refused with 400, whatever the proxy in front did."""

import json
import socket
import urllib.parse
import uuid
from pathlib import Path

import pytest

import harness
from harness import assert_allowed, assert_denied

NORMALISING = (
    "          normalize_path: true\n"
    "          merge_slashes: true\n"
    "          path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT\n"
)


def envoy_defaults(config: str) -> str:
    assert config.count(NORMALISING) == 1, "examples/envoy.yaml changed: find its path options"
    return config.replace(NORMALISING, "")


plain_stack = harness.stack_fixture("plain", edit_envoy_config=envoy_defaults)


def test_the_envoy_of_this_module_does_not_normalise(plain_stack):
    assert "normalize_path" not in plain_stack.envoy.config_path.read_text()


@pytest.mark.parametrize(
    "path, status, code",
    [
        # Dot segments, raw or encoded: removed before matching, so no credential, no entry.
        ("/public/../v1/contacts/42", 401, "missing_credentials"),
        ("/public/%2e%2e/v1/contacts/42", 401, "missing_credentials"),
        ("/public/.%2E/v1/contacts/42", 401, "missing_credentials"),
        # Paths servers read differently are refused.
        ("/public/..%2fv1/contacts/42", 400, "invalid_path"),
        ("/public/..%2Fv1/contacts/42", 400, "invalid_path"),
        ("/public/..%5cv1/contacts/42", 400, "invalid_path"),
        # Merged, `..` leaves /public; kept, it removes the empty segment.
        ("/public//../v1/contacts/42", 400, "invalid_path"),
    ],
)
def test_dot_segments_cannot_reach_a_protected_route_without_a_credential(plain_stack, path, status, code):
    resp = plain_stack.request("GET", path)
    assert_denied(resp, status, code)
    assert resp.upstream == [], f"the upstream was reached:\n{resp}"


@pytest.mark.parametrize(
    "path, named",
    [
        ("/v1/contacts/a%2Fb", "`%2F`"),
        ("/v1/contacts/a;b", "path parameters"),
        ("/v1//contacts/42", "empty segment"),
    ],
)
def test_a_refused_path_is_answered_naming_what_was_refused(plain_stack, path, named):
    resp = plain_stack.request("GET", path)
    assert_denied(resp, 400, "invalid_path")
    message = resp.json()["error"]["message"]
    assert named in message, message
    assert path not in message, "the path itself is never echoed"


def test_a_public_route_stays_public(plain_stack):
    assert_allowed(plain_stack.request("GET", "/public/health"))


# ---------------------------------------------------------------- path parameters (`;`)

# Servlet containers (Tomcat, Jetty, Spring) cut `;…` off each segment before routing:
# `/v1/admin;x/users` is `/v1/admin/users` to them, a segment `admin;x` to others. With an
# `/v1/admin/**` family and a broader `/v1/**` one, the two readings need different scopes.
PARAMETER_ROUTES = (
    "["
    "{name: health, methods: [GET], path: '/public/**', public: true},"
    "{name: admin, path: '/v1/admin/**', scope: 'admin:all'},"
    "{name: v1, path: '/v1/**', scope: 'v1:read'}"
    "]"
)


@pytest.fixture(scope="module")
def parameters_stack(workdir, redis, upstream):
    yield from harness.running(harness.Stack(
        "parameters",
        workdir,
        redis,
        upstream,
        keygate_env={"KEYGATE_POLICY__ROUTES": PARAMETER_ROUTES},
        edit_envoy_config=envoy_defaults,
    ))


@pytest.fixture(scope="module")
def v1_reader(parameters_stack):
    """A key that may use `/v1/**` but not `/v1/admin/**`."""
    return parameters_stack.keygate.create_key(str(uuid.uuid4()), ["v1:read"])


def test_the_broad_route_serves_and_the_admin_route_needs_its_scope(parameters_stack, v1_reader):
    auth = [("authorization", f"Bearer {v1_reader['token']}")]
    assert_allowed(parameters_stack.request("GET", "/v1/things/1", auth))
    assert_denied(
        parameters_stack.request("GET", "/v1/admin/users", auth), 403, "insufficient_permissions"
    )


@pytest.mark.parametrize(
    "path",
    [
        "/v1/admin;x/users",
        "/v1/admin;/users",
        "/v1/admin/users;jsessionid=0123",
        "/v1/admin%3bx/users",
        "/v1/admin%3Bx/users",
        "/v1;x/admin/users",
    ],
)
def test_a_path_parameter_cannot_move_a_request_to_another_route(parameters_stack, v1_reader, path):
    resp = parameters_stack.request(
        "GET", path, [("authorization", f"Bearer {v1_reader['token']}")]
    )
    assert_denied(resp, 400, "invalid_path")


@pytest.mark.parametrize(
    "path", ["/public;x/../v1/things/1", "/public/..;x/v1/things/1", "/public%3b/../v1/things/1"]
)
def test_a_path_parameter_is_refused_before_any_credential_is_asked_for(parameters_stack, path):
    assert_denied(parameters_stack.request("GET", path), 400, "invalid_path")


def test_a_semicolon_in_the_query_is_not_a_path_parameter(parameters_stack):
    resp = parameters_stack.request("GET", "/public/health?a=1;b=2")
    assert_allowed(resp)
    assert resp.upstream[0]["path"] == "/public/health?a=1;b=2"


# ---------------------------------------------------------------- the probe list

# tests/fixtures/path_probes.json, also run over the gRPC Check by tests/path_probes.rs.
PROBES = json.loads((Path(__file__).parents[1] / "fixtures" / "path_probes.json").read_text())[
    "probes"
]
# The families of the probe list, by the routes of this stack (harness.KEYGATE_CONFIG).
FAMILIES = {"public": ["public"], "contacts": ["v1", "contacts"]}


def probe_path(p) -> str:
    if isinstance(p["path"], str):
        return p["path"]
    return "".join(piece * count for piece, count in p["path"])


def raw_request(port: int, target: str, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """One HTTP/1.1 request with the target sent byte for byte (http.client refuses
    control characters and spaces in it): the status and the body."""
    head = f"GET {target} HTTP/1.1\r\nhost: api.example.test\r\nconnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), body


def served_family(path: str, blind: bool = False) -> str | None:
    """The family a server with this stack's routes serves `path` (already decoded) on."""
    segments = path.split("/")[1:]
    for name, prefix in FAMILIES.items():
        head = segments[: len(prefix)]
        if blind:
            head = [s.lower() for s in head]
        if head == prefix:
            return name
    return "other"


def remove_dots(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg in (".", ".."):
            if seg == ".." and out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def upstream_readings(target: str) -> dict[str, str | None]:
    """The family each common reading of the target the upstream received lands on
    (`None`: that reading is no text, a server taking it answers 400 itself)."""
    path = target.split("?")[0]

    def decode(p: str) -> str | None:
        try:
            return urllib.parse.unquote(p, errors="strict")
        except UnicodeDecodeError:
            return None

    once = decode(path)
    twice = decode(once) if once is not None else None
    readings: dict[str, str | None] = {}
    for how, text, blind in [
        ("decode once", once, False),
        ("decode twice", twice, False),
        ("case-blind", once, True),
        ("\\ as /", once.replace("\\", "/") if once is not None else None, False),
        ("cut ; parameters", decode("/".join(s.split(";")[0] for s in path.split("/"))), False),
        ("cut at #", decode(path.split("#")[0]), False),
    ]:
        readings[how] = served_family(remove_dots(text), blind) if text is not None else None
    return readings


@pytest.fixture(scope="module")
def probe_reader(plain_stack):
    return plain_stack.keygate.create_key(str(uuid.uuid4()), ["contacts:read"])


@pytest.mark.parametrize("probe", PROBES, ids=[p["what"] for p in PROBES])
def test_each_probe_through_envoy_at_its_defaults(plain_stack, probe_reader, probe):
    """keygate's answer (or Envoy's own 400, before keygate is asked), and an allowed
    request reaches the upstream on the family keygate allowed, in every reading."""
    target = probe_path(probe)
    expect = probe.get("via_envoy", probe["expect"])
    marker = uuid.uuid4().hex
    headers = [(harness.MARKER, marker)]
    if probe["key"] == "reader":
        headers.append(("authorization", f"Bearer {probe_reader['token']}"))
    status, body = raw_request(plain_stack.envoy.port, target, headers)
    seen = plain_stack.upstream.seen_with_marker(marker)
    verdict, *rest = expect.split()
    if verdict == "allow":
        assert status == 200, f"{probe['what']}: {status} {body[:300]!r}"
        assert len(seen) == 1, f"{probe['what']}: the upstream saw it {len(seen)} times"
        for how, family in upstream_readings(seen[0]["path"]).items():
            assert family in (rest[0], None), (
                f"{probe['what']}: allowed on {rest[0]}, but read by `{how}` the path the "
                f"upstream received ({seen[0]['path'][:100]!r}) is on {family}"
            )
        return
    assert seen == [], f"{probe['what']}: a denied request reached the upstream: {seen}"
    code = None
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        pass
    if code is None:
        # Envoy refused the target itself (a raw `#`, space or control character).
        assert status == 400, f"{probe['what']}: {status} {body[:300]!r}"
        return
    want_status, want_code = rest
    assert (status, code) == (int(want_status), want_code), f"{probe['what']}: {body[:300]!r}"


def test_envoy_leaves_most_probes_to_keygate(plain_stack):
    """The probe list tests keygate, not Envoy: count what Envoy refuses on its own."""
    refused_by_envoy = []
    for probe in PROBES:
        status, body = raw_request(plain_stack.envoy.port, probe_path(probe), [])
        if status == 400 and b'"code"' not in body:
            refused_by_envoy.append(probe["what"])
    print("refused by Envoy itself:", refused_by_envoy)
    assert len(refused_by_envoy) <= 10, refused_by_envoy
