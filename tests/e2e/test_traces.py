"""OpenTelemetry: with an OTLP endpoint configured, each check through real Envoy is a span
that reaches a local OTLP/gRPC receiver, parented on the `traceparent` the client sent,
with the decision and stage timings as attributes and no credential anywhere in it; JSON
log lines written during the check carry its trace id. (Without an endpoint no span is
made at all: BENCHMARKS.md measures that path.)

The receiver reads OTLP's protobuf itself: xds-protos ships an old copy of the OTLP
Python modules that shadows opentelemetry-proto's, so neither can be trusted here."""

import json
import secrets
import struct
import threading
import uuid
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

import harness
from harness import wait_for


def fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message: varints as int, 64-bit as
    bytes, length-delimited as bytes."""
    i = 0

    def varint():
        nonlocal i
        shift = result = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 1:
            yield number, wire, buf[i:i + 8]
            i += 8
        elif wire == 2:
            n = varint()
            yield number, wire, buf[i:i + n]
            i += n
        elif wire == 5:
            yield number, wire, buf[i:i + 4]
            i += 4
        else:
            raise ValueError(f"wire type {wire}")


def any_value(buf: bytes):
    for number, _, v in fields(buf):
        if number == 1:
            return v.decode()
        if number == 2:
            return bool(v)
        if number == 3:
            return v - (1 << 64) if v >= 1 << 63 else v
        if number == 4:
            return struct.unpack("<d", v)[0]
    return None


def key_values(chunks: list[bytes]) -> dict:
    out = {}
    for kv in chunks:
        parts = {n: v for n, _, v in fields(kv)}
        out[parts[1].decode()] = any_value(parts.get(2, b""))
    return out


@dataclass
class Span:
    service: str | None
    trace_id: bytes = b""
    span_id: bytes = b""
    parent_span_id: bytes = b""
    name: str = ""
    attributes: dict = field(default_factory=dict)
    raw: bytes = b""


def spans_of(request: bytes) -> list[Span]:
    """The spans of an ExportTraceServiceRequest (resource_spans 1 → scope_spans 2 →
    spans 2; Span: trace_id 1, span_id 2, parent_span_id 4, name 5, attributes 9)."""
    out = []
    for n, _, resource_spans in fields(request):
        if n != 1:
            continue
        service, scopes = None, []
        for m, _, v in fields(resource_spans):
            if m == 1:
                attrs = key_values([a for k, _, a in fields(v) if k == 1])
                service = attrs.get("service.name")
            elif m == 2:
                scopes.append(v)
        for scope in scopes:
            for k, _, raw in fields(scope):
                if k != 2:
                    continue
                span = Span(service, raw=raw)
                attrs = []
                for f, _, v in fields(raw):
                    if f == 1:
                        span.trace_id = v
                    elif f == 2:
                        span.span_id = v
                    elif f == 4:
                        span.parent_span_id = v
                    elif f == 5:
                        span.name = v.decode()
                    elif f == 9:
                        attrs.append(v)
                span.attributes = key_values(attrs)
                out.append(span)
    return out


class Receiver:
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self):
        self.spans, self.lock = [], threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(
                self.export, request_deserializer=None, response_serializer=None)},
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def export(self, request: bytes, context) -> bytes:
        got = spans_of(request)
        with self.lock:
            self.spans.extend(got)
        # An empty ExportTraceServiceResponse.
        return b""

    def named(self, name):
        with self.lock:
            return [s for s in self.spans if s.name == name]

    def stop(self):
        self.server.stop(0)


@pytest.fixture(scope="module")
def receiver():
    yield from harness.running(Receiver())


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
            return [s for s in receiver.named("ext_authz.check") if s.trace_id.hex() == trace_id]

        (span,) = wait_for("the check's span at the receiver", ours, timeout=15, interval=0.1)
        assert span.parent_span_id.hex() == parent_id
        attrs = span.attributes
        assert attrs["keygate.decision"] == "allow", attrs
        assert attrs["keygate.route"] == "contacts-read", attrs
        assert attrs["keygate.api"] == "envoy", attrs
        for stage in ("keygate.authn_us", "keygate.authorize_us", "keygate.check_us"):
            assert isinstance(attrs[stage], int), (stage, attrs)
        services = {s.service for s in receiver.named("ext_authz.check")}
        assert services == {"keygate-e2e"}, services
        wait_for("the denial's span", lambda: any(
            s.attributes.get("keygate.decision") == "missing_credentials"
            for s in receiver.named("ext_authz.check")), timeout=15, interval=0.1)
        secret = key["token"].rsplit("_", 1)[1].encode()
        for s in receiver.spans:
            assert secret not in s.raw and key["token"].encode() not in s.raw, "a credential in a span"
    finally:
        stack.stop()
    # JSON log lines written inside the check carry its trace id.
    logged = [json.loads(l) for l in stack.keygate.proc.stderr().splitlines() if l.startswith("{")]
    inside = [l for l in logged if l.get("span", {}).get("trace_id") == trace_id]
    assert inside, "no JSON log line with the check's trace id"


def pb_string(number: int, value: str) -> bytes:
    """One length-delimited protobuf field."""
    data, out, n = value.encode(), bytes([number << 3 | 2]), len(value.encode())
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n]) + data


def test_a_keygate_v1_check_is_a_span_parented_on_the_callers_grpc_trace_context(workdir, redis, receiver):
    env = {
        "KEYGATE_TRACES__OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    keygate = harness.Keygate("traced-v1", workdir, redis, env=env)
    try:
        key = keygate.create_key(str(uuid.uuid4()), ["contacts:read"])
        trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
        # keygate.v1.CheckRequest: credential 1, method 2, path 3 (encoded here: the suite
        # has no Python stubs of keygate's own API).
        request = pb_string(1, key["token"]) + pb_string(2, "GET") + pb_string(3, "/v1/contacts/1")
        with grpc.insecure_channel(f"127.0.0.1:{keygate.grpc_port}") as channel:
            check = channel.unary_unary("/keygate.v1.Authorizer/Check")
            answer = check(request, metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")], timeout=10)
        assert (1, 0, 1) in list(fields(answer)), "the check is allowed"

        def ours():
            return [s for s in receiver.named("ext_authz.check") if s.trace_id.hex() == trace_id]

        (span,) = wait_for("the keygate.v1 check's span", ours, timeout=15, interval=0.1)
        assert span.parent_span_id.hex() == parent_id
        assert span.attributes["keygate.api"] == "keygate.v1", span.attributes
        assert span.attributes["keygate.decision"] == "allow", span.attributes
        assert key["token"].encode() not in span.raw
    finally:
        keygate.stop()
