"""TLS and mTLS, with certificates openssl makes for the test: a plain-text client is
refused by a TLS listener; the admin listener with a client CA refuses a client without
a certificate (or with one of another CA) and serves one with a valid certificate (the
CLI, over https://); Envoy reaches keygate over TLS; a renewed certificate is served, and
a rotated client CA trusted, without a restart; keygate reaches a redis-server that speaks
only TLS, as an ACL user."""

import re
import ssl
import subprocess
import uuid
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

import harness
from harness import check_request, wait_for


def openssl(*args: str, cwd: Path):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}", cwd=d)


def make_cert(d: Path, name: str, ca: str, server: bool):
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n" if server
        else "extendedKeyUsage=clientAuth\n"
    )
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_cert(d, "server", "ca", server=True)
    make_cert(d, "client", "ca", server=False)
    make_cert(d, "rogue", "rogue-ca", server=False)
    return d


def tls_env(pki: Path) -> dict[str, str]:
    return {
        "KEYGATE_LISTEN__GRPC_TLS": f"{{cert_file: {pki}/server.pem, key_file: {pki}/server.key}}",
        "KEYGATE_LISTEN__ADMIN_TLS": f"{{cert_file: {pki}/server.pem, key_file: {pki}/server.key, client_ca_file: {pki}/ca.pem}}",
    }


@pytest.fixture(scope="module")
def tls_keygate(workdir, redis, pki):
    yield from harness.running(harness.Keygate("tls-keygate", workdir, redis, tls_env(pki)))


def admin_cli(kg, pki: Path, *args: str, cert: str | None = "client", certs: Path | None = None) -> harness.CliResult:
    """The CLI against `kg`'s admin listener, presenting `cert` (from `certs`, else `pki`)."""
    extra = {"KEYGATE_ADMIN_URL": f"https://127.0.0.1:{kg.admin_port}", "KEYGATE_TLS_CA_FILE": str(pki / "ca.pem")}
    if cert:
        certs = certs or pki
        extra |= {"KEYGATE_TLS_CERT_FILE": str(certs / f"{cert}.pem"), "KEYGATE_TLS_KEY_FILE": str(certs / f"{cert}.key")}
    return harness.run_cli(list(args), kg.cli_env(**extra))


def check_over(channel, token: str) -> int:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    req = check_request("GET", "/v1/contacts/1", {"authorization": f"Bearer {token}"})
    return stub.Check(req, timeout=5).status.code


def test_the_admin_listener_serves_a_client_with_a_valid_certificate(tls_keygate, pki):
    created = admin_cli(tls_keygate, pki, "keys", "create", "--tenant", str(uuid.uuid4()),
                        "--scopes", "contacts:read", "--json")
    assert created.code == 0, str(created)
    assert created.json()["token"].startswith("sk_live_")


@pytest.mark.parametrize("cert", [None, "rogue"])
def test_the_admin_listener_refuses_a_client_without_a_valid_certificate(tls_keygate, pki, cert):
    refused = admin_cli(tls_keygate, pki, "keys", "list", "--tenant", str(uuid.uuid4()), cert=cert)
    assert refused.code != 0, str(refused)
    assert "client certificate" in refused.stderr or "cannot reach keygate" in refused.stderr, str(refused)
    assert "KEY ID" not in refused.stdout


def test_a_plain_text_client_is_refused_by_the_tls_listener(tls_keygate, pki):
    key = admin_cli(tls_keygate, pki, "keys", "create", "--tenant", str(uuid.uuid4()),
                    "--scopes", "contacts:read", "--quiet").stdout.strip()
    with grpc.insecure_channel(f"127.0.0.1:{tls_keygate.grpc_port}") as plain:
        with pytest.raises(grpc.RpcError) as refused:
            check_over(plain, key)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    with grpc.secure_channel(f"localhost:{tls_keygate.grpc_port}", creds) as secure:
        assert check_over(secure, key) == 0


def served_certificate(port: int, ca: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    with ctx.wrap_socket(__import__("socket").create_connection(("127.0.0.1", port), timeout=5),
                         server_hostname="localhost") as s:
        return s.getpeercert(binary_form=True)


def test_a_renewed_certificate_is_served_without_a_restart(workdir, redis, pki, tmp_path):
    for name in ("ca.pem", "ca.key"):
        (tmp_path / name).write_bytes((pki / name).read_bytes())
    make_cert(tmp_path, "server", "ca", server=True)
    env = {"KEYGATE_LISTEN__GRPC_TLS": f"{{cert_file: {tmp_path}/server.pem, key_file: {tmp_path}/server.key}}"}
    kg = harness.Keygate("tls-reload-keygate", workdir, redis, env)
    try:
        before = served_certificate(kg.grpc_port, tmp_path / "ca.pem")
        make_cert(tmp_path, "next", "ca", server=True)
        # Key first, then the certificate: a renewal as cert-manager writes it.
        (tmp_path / "server.key").write_bytes((tmp_path / "next.key").read_bytes())
        (tmp_path / "server.pem").write_bytes((tmp_path / "next.pem").read_bytes())
        renewed = (tmp_path / "next.pem").read_text()
        assert before != renewed
        wait_for(
            "the renewed certificate to be served",
            lambda: served_certificate(kg.grpc_port, tmp_path / "ca.pem") == ssl.PEM_cert_to_DER_cert(renewed),
            timeout=15,
            interval=0.2,
        )
        kg.proc.ensure_alive()
    finally:
        kg.stop()


def tls_reloads(kg, listener: str, result: str) -> int:
    """keygate_tls_reloads_total for `listener` and `result`, from /metrics."""
    status, body = harness.http_get(kg.http_url + "/metrics")
    assert status == 200
    found = re.search(
        rf'^keygate_tls_reloads_total{{listener="{re.escape(listener)}",result="{result}"}} (\d+)$', body, re.M)
    return int(found.group(1)) if found else 0


def replace(d: Path, source: str, target: str):
    """Puts `source`'s bytes at `target` in one rename, as a Kubernetes secret volume does."""
    (d / f"{target}.staged").write_bytes((d / source).read_bytes())
    (d / f"{target}.staged").rename(d / target)


def test_a_rotated_client_ca_is_trusted_without_a_restart(workdir, redis, pki, tmp_path):
    for ca in ("old-ca", "new-ca"):
        make_ca(tmp_path, ca)
    make_cert(tmp_path, "old-client", "old-ca", server=False)
    make_cert(tmp_path, "new-client", "new-ca", server=False)
    replace(tmp_path, "old-ca.pem", "client-ca.pem")
    env = {"KEYGATE_LISTEN__ADMIN_TLS":
           f"{{cert_file: {pki}/server.pem, key_file: {pki}/server.key, client_ca_file: {tmp_path}/client-ca.pem}}"}
    kg = harness.Keygate("tls-ca-keygate", workdir, redis, env)
    try:
        def listed(cert: str) -> harness.CliResult:
            return admin_cli(kg, pki, "keys", "list", "--tenant", str(uuid.uuid4()), cert=cert, certs=tmp_path)

        assert listed("old-client").code == 0, str(listed("old-client"))
        assert listed("new-client").code != 0
        replace(tmp_path, "new-ca.pem", "client-ca.pem")
        wait_for("the new client CA to be read", lambda: tls_reloads(kg, "listen.admin_tls", "ok") == 1,
                 timeout=15, interval=0.2)
        assert listed("new-client").code == 0, str(listed("new-client"))
        refused = listed("old-client")
        assert refused.code != 0 and "KEY ID" not in refused.stdout, str(refused)
        assert tls_reloads(kg, "listen.admin_tls", "error") == 0
        kg.proc.ensure_alive()
    finally:
        kg.stop()


def test_envoy_reaches_keygate_over_tls(workdir, redis, upstream, pki):
    def keygate_over_tls(text: str) -> str:
        marker = "  - name: keygate\n"
        assert text.count(marker) == 1
        socket_cfg = (
            "  - name: keygate\n"
            "    transport_socket:\n"
            "      name: envoy.transport_sockets.tls\n"
            "      typed_config:\n"
            '        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n'
            "        sni: localhost\n"
            "        common_tls_context:\n"
            "          alpn_protocols: [h2]\n"
            "          validation_context:\n"
            f"            trusted_ca: {{ filename: {pki}/ca.pem }}\n"
            "            match_typed_subject_alt_names:\n"
            "            - san_type: DNS\n"
            "              matcher: { exact: localhost }\n"
        )
        return text.replace(marker, socket_cfg)

    stack = harness.Stack("tls", workdir, redis, upstream,
                          keygate_env={"KEYGATE_LISTEN__GRPC_TLS": tls_env(pki)["KEYGATE_LISTEN__GRPC_TLS"]},
                          edit_envoy_config=keygate_over_tls)
    try:
        key = stack.keygate.create_key(str(uuid.uuid4()), ["contacts:read"])
        ok = stack.request("GET", "/v1/contacts/1", [("authorization", f"Bearer {key['token']}")])
        assert ok.status == 200 and len(ok.upstream) == 1, str(ok)
        denied = stack.request("GET", "/v1/contacts/1")
        assert denied.status == 401, str(denied)
    finally:
        stack.stop()


def test_keygate_reaches_a_tls_redis_as_an_acl_user(workdir, pki, tmp_path):
    password = uuid.uuid4().hex
    tls_redis = harness.Redis(tmp_path / "redis-tls",
                              tls={"cert": pki / "server.pem", "key": pki / "server.key", "ca": pki / "ca.pem"},
                              user=("keygate", password))
    try:
        def config(grpc_port, admin, http, _url):
            return harness.keygate_config(grpc_port, admin, http, tls_redis.url).replace(
                f'redis_url: "{tls_redis.url}"',
                f'redis_url: "{tls_redis.url}"\n  username: keygate\n  tls_ca_file: "{pki}/ca.pem"',
            )

        kg = harness.Keygate("redis-tls-keygate", workdir, tls_redis, {"KEYGATE_REDIS_PASSWORD": password}, config)
        try:
            key = kg.create_key(str(uuid.uuid4()), ["contacts:read"])
            allowed = kg.check(key["token"], "GET", "/v1/contacts/1")
            assert allowed.code == 0, str(allowed)
        finally:
            kg.stop()
    finally:
        tls_redis.stop()
