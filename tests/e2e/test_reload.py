"""The policy changes live: two replicas, each behind its own Envoy, each reading its own
copy of the configuration file. While a load of requests goes through both, the files
change a route's scope, a plan's rate and an error's message: no request fails, and the
new rules answer on both replicas within 2 s (the file is looked at every 0.5 s). A file
that does not load, or that changes a listener, changes nothing, and is reported in the
log, in `/readyz` and in `keygate_config_reloads_total`."""

import re
import threading
import uuid

import pytest

import harness
from harness import assert_allowed, assert_denied, http_get, wait_for

RELOAD_WITHIN = 2.0

CONFIG = """\
listen: {{ grpc: "127.0.0.1:{grpc}", admin: "127.0.0.1:{admin}", http: "127.0.0.1:{http}" }}
store: {{ backend: redis, redis_url: "{redis_url}" }}
api_keys: {{ prefix: sk, argon2: {{ memory_kib: 19456, iterations: 2, parallelism: 1 }} }}
logging: {{ level: info, format: text }}
errors:
  codes:
    insufficient_permissions: {{ message: "{denied_message}" }}
policy:
  credential_headers:
    - {{ header: authorization, scheme: Bearer }}
  strip_credential_headers: true
  unmatched: {unmatched}
  plans:
    metered: {{ requests_per_minute: {rate} }}
  routes:
    - {{ name: public, methods: [GET], path: /public/**, public: true }}
    - {{ name: steady, methods: [GET], path: "/v1/steady/**", scope: "steady:read" }}
    - {{ name: contacts-read, methods: [GET], path: "/v1/contacts/**", scope: "{contacts_scope}" }}
"""
BEFORE = {"denied_message": "Not allowed.", "unmatched": "deny", "rate": 6000, "contacts_scope": "contacts:read"}
AFTER = {"denied_message": "Your key lacks a scope.", "unmatched": "deny", "rate": 1, "contacts_scope": "contacts:list"}


def config_with(settings: dict):
    def render(grpc: int, admin: int, http: int, redis_url: str) -> str:
        return CONFIG.format(grpc=grpc, admin=admin, http=http, redis_url=redis_url, **settings)

    return render


class Replica:
    """One keygate with its own Envoy and its own configuration file."""

    def __init__(self, name, workdir, redis, upstream, pepper=None, admin_token=None):
        self.keygate = harness.Keygate(
            f"{name}-keygate", workdir, redis, config=config_with(BEFORE), pepper=pepper, admin_token=admin_token
        )
        self.envoy = harness.Envoy(f"{name}-envoy", workdir, self.keygate.grpc_port, upstream)

    def write(self, settings: dict, edit=lambda text: text):
        k = self.keygate
        text = config_with(settings)(k.grpc_port, k.admin_port, k.http_port, k.redis.url)
        k.config_path.write_text(edit(text))

    def reloads(self, result: str) -> int:
        status, body = http_get(self.keygate.http_url + "/metrics")
        assert status == 200, body
        m = re.search(rf'^keygate_config_reloads_total{{result="{result}"}} (\d+)$', body, re.M)
        return int(m.group(1)) if m else 0

    def readyz(self) -> tuple[int, str]:
        return http_get(self.keygate.http_url + "/readyz")

    def stop(self):
        self.envoy.stop()
        self.keygate.stop()


@pytest.fixture(scope="module")
def replicas(workdir, redis, upstream):
    started = []
    try:
        first = Replica("reload-a", workdir, redis, upstream)
        started.append(first)
        started.append(
            Replica("reload-b", workdir, redis, upstream, first.keygate.pepper, first.keygate.admin_token)
        )
        yield started
    finally:
        for r in started:
            r.stop()


def bearer(key: dict) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key['token']}")]


class Load:
    """Requests on the route no change touches, through every replica, until stopped:
    each must pass."""

    def __init__(self, replicas, key):
        self.replicas, self.key = replicas, key
        self.sent, self.failed = 0, []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.is_set():
            for r in self.replicas:
                try:
                    resp = r.envoy.request("GET", "/v1/steady/1", bearer(self.key))
                    ok = resp.status == 200 and len(resp.upstream) == 1
                except OSError as e:
                    ok, resp = False, e
                self.sent += 1
                if not ok:
                    self.failed.append(str(resp))

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=30)


def test_a_changed_policy_answers_on_every_replica_and_no_request_fails(replicas):
    keygate = replicas[0].keygate
    tenant = str(uuid.uuid4())
    steady = keygate.create_key(tenant, ["steady:read"])
    reader = keygate.create_key(tenant, ["contacts:read"])
    metered = keygate.create_key(tenant, ["steady:read"], "--plan", "metered")
    for r in replicas:
        assert_allowed(r.envoy.request("GET", "/v1/contacts/1", bearer(reader)))
        for _ in range(2):
            assert_allowed(r.envoy.request("GET", "/v1/steady/1", bearer(metered)))
    applied = [r.reloads("applied") for r in replicas]

    load = Load(replicas, steady)
    try:
        for r in replicas:
            r.write(AFTER)
        for r, before in zip(replicas, applied):
            wait_for(f"{r.keygate.name} to apply the new file", lambda: r.reloads("applied") > before,
                     timeout=RELOAD_WITHIN)
            # The route's new scope, with the new message.
            resp = r.envoy.request("GET", "/v1/contacts/1", bearer(reader))
            assert_denied(resp, 403, "insufficient_permissions")
            assert resp.json()["error"]["message"] == "Your key lacks a scope.", str(resp)
        # The plan's new rate: one a minute, already spent by the first request.
        results = [r.envoy.request("GET", "/v1/steady/1", bearer(metered)).status for r in replicas for _ in range(2)]
        assert 429 in results, results
    finally:
        load.stop()
    assert load.sent > 0
    assert load.failed == [], f"{len(load.failed)} of {load.sent} requests failed: {load.failed[:3]}"


def test_an_invalid_file_changes_nothing_and_is_reported(replicas):
    r = replicas[0]
    r.write(AFTER)
    invalid = r.reloads("invalid")
    r.write({**AFTER, "unmatched": "sometimes"})
    wait_for("the invalid file to be reported", lambda: r.reloads("invalid") > invalid, timeout=RELOAD_WITHIN)
    status, body = r.readyz()
    assert status == 200 and "policy.unmatched" in body, body
    assert "policy.unmatched" in r.keygate.proc.stderr()
    # The rules before it still answer.
    reader = r.keygate.create_key(str(uuid.uuid4()), ["contacts:list"])
    assert_allowed(r.envoy.request("GET", "/v1/contacts/1", bearer(reader)))
    # A good file clears the report.
    applied = r.reloads("applied")
    r.write(BEFORE)
    wait_for("the good file to apply", lambda: r.reloads("applied") > applied, timeout=RELOAD_WITHIN)
    assert "config:" not in r.readyz()[1]


def test_a_listener_change_is_refused_naming_the_setting(replicas):
    r = replicas[1]
    taken = r.reloads("applied") + r.reloads("unchanged")
    r.write(BEFORE)
    wait_for("the first file to be read", lambda: r.reloads("applied") + r.reloads("unchanged") > taken,
             timeout=RELOAD_WITHIN)
    refused = r.reloads("refused")
    moved = harness.free_port()
    r.write(
        {**BEFORE, "contacts_scope": "contacts:list"},
        edit=lambda text: text.replace(f"127.0.0.1:{r.keygate.grpc_port}", f"127.0.0.1:{moved}"),
    )
    wait_for("the listener change to be refused", lambda: r.reloads("refused") > refused, timeout=RELOAD_WITHIN)
    status, body = r.readyz()
    assert status == 200 and "listen needs a restart" in body, body
    # Nothing of that file was taken: the route keeps its scope.
    reader = r.keygate.create_key(str(uuid.uuid4()), ["contacts:read"])
    assert_allowed(r.envoy.request("GET", "/v1/contacts/1", bearer(reader)))


def test_sighup_reloads_a_change_the_file_watch_cannot_see(replicas):
    """The same length and modification time (a change no metadata shows): only SIGHUP
    makes keygate read the file again."""
    import os
    import signal

    r = replicas[0]
    taken = r.reloads("applied") + r.reloads("unchanged")
    r.write(BEFORE)
    wait_for("the first file to be read", lambda: r.reloads("applied") + r.reloads("unchanged") > taken,
             timeout=RELOAD_WITHIN)
    stat = os.stat(r.keygate.config_path)
    applied = r.reloads("applied")
    # contacts:read -> contacts:list: as many bytes, written in place, the old mtime put back.
    r.write({**BEFORE, "contacts_scope": "contacts:list"})
    os.utime(r.keygate.config_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(r.keygate.config_path).st_size == stat.st_size
    r.keygate.proc.popen.send_signal(signal.SIGHUP)
    wait_for("SIGHUP to apply the file", lambda: r.reloads("applied") > applied, timeout=RELOAD_WITHIN)
    reader = r.keygate.create_key(str(uuid.uuid4()), ["contacts:list"])
    assert_allowed(r.envoy.request("GET", "/v1/contacts/1", bearer(reader)))
