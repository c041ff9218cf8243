"""OpenTelemetry: with an OTLP endpoint configured, each check through real Envoy is a span
that reaches a local OTLP/gRPC receiver (opentelemetry-proto's stubs), parented on the
`traceparent` the client sent, with the decision and stage timings as attributes and no
credential anywhere in it; JSON log lines written during the check carry its trace id.
(Without an endpoint no span is made at all: BENCHMARKS.md measures that path.)"""

import json
import secrets
import threading
import uuid
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

import harness
from harness import wait_for


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self):
        self.spans, self.lock = [], threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
                for ss in rs.scope_spans:
                    self.spans.extend((service, s) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, name):
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.name == name]

    def stop(self):
        self.server.stop(0)


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.stop()


def attributes(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value or v.int_value or v.double_value or v.bool_value
    return out


def test_a_check_is_a_span_parented_on_the_traceparent_sent_through_envoy(workdir, redis, upstream, receiver):
    env = {
        "KEYGATE_TRACES__OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "KEYGATE_TRACES__SERVICE_NAME": "keygate-e2e",
        "KEYGATE_LOGGING__FORMAT": "json",
        "KEYGATE_LOGGING__LEVEL": "keygate=debug,info",
        # Export at once rather than every 5 s.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    stack = harness.Stack("traces", workdir, redis, upstream, keygate_env=env)
    try:
        key = stack.keygate.create_key(str(uuid.uuid4()), ["contacts:read"])
        trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
        resp = stack.request("GET", "/v1/contacts/1", [
            ("authorization", f"Bearer {key['token']}"),
            ("traceparent", f"00-{trace_id}-{parent_id}-01"),
        ])
        assert resp.status == 200, str(resp)
        denied = stack.request("GET", "/v1/contacts/1", [
            ("traceparent", f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"),
        ])
        assert denied.status == 401

        def ours():
            return [s for _, s in receiver.named("ext_authz.check") if s.trace_id.hex() == trace_id]

        (span,) = wait_for("the check's span at the receiver", ours, timeout=15, interval=0.1)
        assert span.parent_span_id.hex() == parent_id
        attrs = attributes(span)
        assert attrs["keygate.decision"] == "allow", attrs
        assert attrs["keygate.route"] == "contacts-read", attrs
        for stage in ("keygate.authn_us", "keygate.authorize_us", "keygate.check_us"):
            assert isinstance(attrs[stage], int), (stage, attrs)
        services = {svc for svc, _ in receiver.named("ext_authz.check")}
        assert services == {"keygate-e2e"}, services
        wait_for("the denial's span", lambda: any(
            attributes(s).get("keygate.decision") == "missing_credentials"
            for _, s in receiver.named("ext_authz.check")), timeout=15, interval=0.1)
        secret = key["token"].rsplit("_", 1)[1]
        for _, s in receiver.spans:
            assert secret not in str(s) and key["token"] not in str(s), "a credential in a span"
            assert key["key_id"] not in str(s.name)
    finally:
        stack.stop()
    # JSON log lines written inside the check carry its trace id.
    logged = [json.loads(l) for l in stack.keygate.proc.stderr().splitlines() if l.startswith("{")]
    inside = [l for l in logged if l.get("span", {}).get("trace_id") == trace_id]
    assert inside, "no JSON log line with the check's trace id"
