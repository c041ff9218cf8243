"""Fixtures for the end-to-end tests: one Redis, one echo upstream and one keygate+Envoy
stack for the whole session; tests that need to break or reconfigure keygate start
their own stack (see test_unavailable.py, test_secrets.py).

Environment: KEYGATE_BIN (default target/debug/keygate), ENVOY_BIN (default
.venv/bin/envoy), REDIS_SERVER (default: redis-server on PATH).
"""

import uuid

import pytest

import harness


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def redis(workdir):
    yield from harness.running(harness.Redis(workdir / "redis"))


@pytest.fixture(scope="session")
def upstream():
    yield from harness.running(harness.Upstream())


@pytest.fixture(scope="session")
def stack(workdir, redis, upstream):
    yield from harness.running(harness.Stack("main", workdir, redis, upstream))


@pytest.fixture(scope="session")
def keygate(stack):
    return stack.keygate


@pytest.fixture
def tenant():
    return str(uuid.uuid4())


@pytest.fixture(scope="session")
def reader(keygate):
    """A key of its own tenant that may read contacts."""
    return keygate.create_key(str(uuid.uuid4()), ["contacts:read"], "--name", "e2e-reader")


@pytest.fixture(scope="session")
def writer(keygate):
    """A key of its own tenant that may read and write contacts."""
    return keygate.create_key(
        str(uuid.uuid4()), ["contacts:read", "contacts:write"], "--name", "e2e-writer"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, show the last lines every running process wrote."""
    report = yield
    if report.failed:
        for proc in harness.running_processes():
            report.sections.append((f"{proc.name} (pid {proc.pid})", proc.tail(20)))
    return report
