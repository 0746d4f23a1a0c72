"""Tracing: spans for decoded model calls over OTLP to a real TraceService receiver, trace context
from HTTP/1 headers and gRPC metadata, containment links, and nothing of the payload in spans."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from otlp_receiver import KIND_CLIENT, KIND_SERVER, OtlpReceiver, ReceivedSpan
from tritonclient.grpc import service_pb2
from wire_streams import (
    CLIENT_COOKIE,
    SERVER,
    SERVER_COOKIE,
    H2Call,
    H2Wire,
    h1_request,
    h1_response,
    run_connection,
    samples_of,
    sends_of,
)

from infertap.agent.export.tracing import (
    CallLinker,
    CallRecord,
    CallTracer,
    RemoteParent,
    call_record,
    parse_traceparent,
)
from infertap.agent.export.tracing_spec import TracingSpec
from infertap.agent.flows.records import Role
from infertap.agent.models.adapt import to_inference_event
from infertap.agent.policy.loader import PolicyError, load_policy_text
from infertap.agent.protocols.messages import HttpExchange

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
EMAIL = "jane.doe@example.com"
CLIENT_CG, FEATURE_CG, MODEL_CG = 11, 22, 33


def test_traceparent_is_parsed_and_bad_ones_are_refused() -> None:
    p = parse_traceparent(f"00-{TRACE}-{SPAN}-01")
    assert p == RemoteParent(int(TRACE, 16), int(SPAN, 16), True)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00") == RemoteParent(
        int(TRACE, 16), int(SPAN, 16), False
    )
    # A later version may add fields; its first four are read as version 00's.
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-01-extra") is not None
    for bad in (
        "",
        f"00-{TRACE}-{SPAN}",
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero span id
        f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper-case hex is invalid
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE[:-1]}x-{SPAN}-01",
    ):
        assert parse_traceparent(bad) is None, bad


def test_policy_tracing_section() -> None:
    base = "version: 1\n"
    assert not load_policy_text(base).tracing.enabled
    p = load_policy_text(
        base + "tracing:\n  endpoint: collector:4317\n  sample_ratio: 0.25\n  link_window: 2s\n"
    )
    assert p.tracing == TracingSpec("collector:4317", 0.25, True, 2.0)
    assert p.hash != load_policy_text(base).hash
    with pytest.raises(PolicyError) as err:
        load_policy_text(base + "tracing:\n  endpoint: nowhere\n  sample_ratio: 2\n")
    text = "\n".join(err.value.messages)
    assert "tracing.endpoint: must be host:port" in text
    assert "tracing.sample_ratio: must be a number from 0 to 1" in text
    with pytest.raises(PolicyError, match=r"tracing\.endpoint: required"):
        load_policy_text(base + "tracing:\n  sample_ratio: 0.5\n")


def v2_rest_exchange(
    headers: list[tuple[str, str]], ts: int, end: int, model: str = "fraud"
) -> HttpExchange:
    body = json.dumps(
        {
            "inputs": [
                {"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]},
                {"name": "note", "shape": [1], "datatype": "BYTES", "data": [EMAIL]},
            ]
        }
    ).encode()
    req = h1_request("POST", f"/v2/models/{model}/infer?user={EMAIL}", body, headers)
    out = json.dumps(
        {
            "model_name": model,
            "outputs": [{"name": "p", "shape": [1], "datatype": "FP32", "data": [0.5]}],
        }
    ).encode()
    resp = h1_response(200, out, [("Content-Type", "application/json")], for_method="POST")
    exchanges, _ = run_connection(
        samples_of(sends_of(req, [], ts), CLIENT_COOKIE, Role.CLIENT),
        samples_of(sends_of(resp, [], end), SERVER_COOKIE, Role.SERVER),
    )
    assert len(exchanges) == 1 and exchanges[0].response is not None
    return exchanges[0]


def grpc_exchange(headers: list[tuple[str, str]], ts: int) -> HttpExchange:
    req = service_pb2.ModelInferRequest(model_name="fraud", model_version="1")
    req.inputs.add(name="features", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(len(EMAIL).to_bytes(4, "little") + EMAIL.encode())
    resp = service_pb2.ModelInferResponse(model_name="fraud", model_version="1")
    wire = H2Wire()
    call = H2Call(
        "/inference.GRPCInferenceService/ModelInfer",
        [req.SerializeToString()],
        [resp.SerializeToString()],
        extra_headers=headers,
    )
    wire.call(call)
    client = [s for i, b in enumerate(wire.client_sends) for s in sends_of(b, [], ts + 10 * i)]
    server = [s for i, b in enumerate(wire.server_sends) for s in sends_of(b, [], ts + 10 * i + 5)]
    # Stream offsets: consecutive sends of each flow.
    for sends in (client, server):
        off = 0
        for s in sends:
            s.offset = off
            off += len(s.data)
    exchanges, _ = run_connection(
        samples_of(client, CLIENT_COOKIE, Role.CLIENT),
        samples_of(server, SERVER_COOKIE, Role.SERVER),
    )
    infer = [e for e in exchanges if e.request.path.endswith("ModelInfer")]
    assert len(infer) == 1
    return infer[0]


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.stop()


def labels(cgroup: int) -> tuple[str, str]:
    return {
        CLIENT_CG: ("shop", "client"),
        FEATURE_CG: ("shop", "features"),
        MODEL_CG: ("ml", "fraud"),
    }.get(cgroup, ("", ""))


def traced(receiver: OtlpReceiver, window: float = 0.2) -> CallTracer:
    tracer = CallTracer(labels)
    tracer.configure(TracingSpec(receiver.endpoint, link_window_s=window))
    return tracer


def tap(tracer: CallTracer, ex: HttpExchange, client_cg: int, server_cg: int) -> None:
    event = to_inference_event(ex, SERVER, client_cgroup=client_cg, server_cgroup=server_cg)
    assert event is not None and event.model == "fraud"
    tracer.tap(ex, event, labels(server_cg))


def assert_no_payload(spans: list[ReceivedSpan]) -> None:
    for s in spans:
        for key, value in s.attributes.items():
            text = str(value)
            assert EMAIL not in text and "user=" not in text, (key, value)
            assert TRACE not in text and SPAN not in text, (key, value)  # parsed, not copied
            assert "congo=" not in text, (key, value)


def test_http1_call_joins_the_applications_trace(receiver: OtlpReceiver) -> None:
    tracer = traced(receiver)
    headers = [("traceparent", f"00-{TRACE}-{SPAN}-01"), ("tracestate", "congo=t61rcWkgMzE")]
    tap(tracer, v2_rest_exchange(headers, ts=1_000_000, end=3_000_000), CLIENT_CG, MODEL_CG)
    spans = receiver.wait_for(lambda s: s if len(s) == 2 else None)
    tracer.stop()
    client = next(s for s in spans if s.kind == KIND_CLIENT)
    server = next(s for s in spans if s.kind == KIND_SERVER)
    assert client.trace_id == server.trace_id == TRACE
    assert client.parent_span_id == SPAN  # the application's span
    assert server.parent_span_id == client.span_id  # the two views of one call are linked
    assert client.name == server.name == "POST /v2/models/fraud/infer"
    assert client.attributes["http.request.method"] == "POST"
    assert client.attributes["url.path"] == "/v2/models/fraud/infer"
    assert client.attributes["http.response.status_code"] == 200
    assert client.attributes["server.address"] == SERVER.ip
    assert client.attributes["server.port"] == SERVER.port
    assert client.attributes["infertap.model.name"] == "fraud"
    assert client.attributes["infertap.model.protocol"] == "kserve-v2-rest"
    assert client.attributes["k8s.pod.name"] == "client"
    assert server.attributes["k8s.pod.name"] == "fraud"
    assert server.attributes["k8s.namespace.name"] == "ml"
    # Kernel timestamps (monotonic) become wall time; the duration is the kernel's.
    assert client.end_ns - client.start_ns == 2_000_000
    assert client.resource["service.name"] == "infertap"
    assert_no_payload(spans)


def test_grpc_metadata_traceparent_and_status(receiver: OtlpReceiver) -> None:
    tracer = traced(receiver)
    ex = grpc_exchange([("traceparent", f"00-{TRACE}-{SPAN}-01")], ts=5_000_000)
    tap(tracer, ex, 0, MODEL_CG)  # only the server's socket is intercepted: one SERVER span
    spans = receiver.wait_for(lambda s: s if s else None)
    tracer.stop()
    assert len(spans) == 1
    (span,) = spans
    assert span.kind == KIND_SERVER and span.trace_id == TRACE and span.parent_span_id == SPAN
    assert span.name == "inference.GRPCInferenceService/ModelInfer"
    assert span.attributes["rpc.system"] == "grpc"
    assert span.attributes["rpc.service"] == "inference.GRPCInferenceService"
    assert span.attributes["rpc.method"] == "ModelInfer"
    assert span.attributes["rpc.grpc.status_code"] == 0
    assert span.attributes["infertap.model.version"] == "1"
    assert span.status_code != 2
    assert_no_payload(spans)


def test_calls_decoded_from_tls_plaintext_say_https(receiver: OtlpReceiver) -> None:
    tracer = CallTracer(labels, is_tls=lambda connection: True)
    tracer.configure(TracingSpec(receiver.endpoint, link_window_s=0.1))
    tap(tracer, v2_rest_exchange([], ts=1_000, end=2_000), CLIENT_CG, MODEL_CG)
    spans = receiver.wait_for(lambda s: s if len(s) == 2 else None)
    tracer.stop()
    assert {s.attributes["url.scheme"] for s in spans} == {"https"}


def test_call_without_traceparent_is_a_root(receiver: OtlpReceiver) -> None:
    tracer = traced(receiver)
    tap(tracer, v2_rest_exchange([], ts=1_000, end=2_000), CLIENT_CG, MODEL_CG)
    spans = receiver.wait_for(lambda s: s if len(s) == 2 else None)
    tracer.stop()
    client = next(s for s in spans if s.kind == KIND_CLIENT)
    assert client.parent_span_id == ""
    assert next(s for s in spans if s.kind == KIND_SERVER).parent_span_id == client.span_id


def test_chain_is_followed_by_containment(receiver: OtlpReceiver) -> None:
    """client -> feature service -> model, no trace context anywhere: the feature pod's call to
    the model ran inside its inbound call, so it is that call's child."""
    tracer = traced(receiver)
    outbound = v2_rest_exchange([], ts=2_000_000, end=3_000_000)
    inbound = v2_rest_exchange([], ts=1_000_000, end=4_000_000)
    tap(tracer, outbound, FEATURE_CG, MODEL_CG)  # completes first
    tap(tracer, inbound, CLIENT_CG, FEATURE_CG)
    spans = receiver.wait_for(lambda s: s if len(s) == 4 else None)
    tracer.stop()
    by_pod = {(s.kind, s.attributes.get("k8s.pod.name")): s for s in spans}
    c1 = by_pod[(KIND_CLIENT, "client")]
    s1 = by_pod[(KIND_SERVER, "features")]
    c2 = by_pod[(KIND_CLIENT, "features")]
    s2 = by_pod[(KIND_SERVER, "fraud")]
    assert c1.parent_span_id == ""
    assert s1.parent_span_id == c1.span_id
    assert c2.parent_span_id == s1.span_id
    assert s2.parent_span_id == c2.span_id
    assert len({s.trace_id for s in spans}) == 1
    assert tracer.counters()["linker_parent_contained"] == 1


def record(start: int, end: int, client: int, server: int, parent: bool = False) -> CallRecord:
    ex = v2_rest_exchange(
        [("traceparent", f"00-{TRACE}-{SPAN}-01")] if parent else [], ts=start, end=end
    )
    event = to_inference_event(ex, SERVER, client_cgroup=client, server_cgroup=server)
    assert event is not None
    return call_record(ex, event, ("", ""), ("", ""))


def test_linker_refuses_to_guess_between_two_inbound_calls() -> None:
    linker = CallLinker(window_s=1.0)
    assert linker.add(record(200, 300, FEATURE_CG, MODEL_CG), 0.0) == []
    linker.add(record(100, 400, CLIENT_CG, FEATURE_CG), 0.1)
    linker.add(record(150, 500, CLIENT_CG, FEATURE_CG), 0.2)  # also contains the call
    roots = linker.due(5.0)
    assert len(roots) == 3 and all(not r.children for r in roots)
    assert linker.stats["ambiguous"] == 1 and linker.stats["parent_contained"] == 0


def test_linker_keeps_traceparent_over_containment_and_times_out() -> None:
    linker = CallLinker(window_s=1.0)
    linker.add(record(200, 300, FEATURE_CG, MODEL_CG, parent=True), 0.0)
    linker.add(record(100, 400, CLIENT_CG, FEATURE_CG), 0.1)
    assert linker.due(0.5) == []  # held for the window
    roots = linker.due(1.2)
    assert len(roots) == 2 and all(not r.children for r in roots)
    # A call made by another pod, or outside the inbound call's time, is not its child.
    linker.add(record(200, 300, MODEL_CG, CLIENT_CG), 2.0)
    linker.add(record(100, 250, CLIENT_CG, FEATURE_CG), 2.1)
    assert all(not r.children for r in linker.due(9.0))


def test_off_by_default_and_off_again(receiver: OtlpReceiver) -> None:
    tracer = CallTracer(labels)
    assert not tracer.enabled
    ex = v2_rest_exchange([], ts=1, end=2)
    tap(tracer, ex, CLIENT_CG, MODEL_CG)
    assert tracer.counters() == {}
    tracer.configure(TracingSpec(receiver.endpoint, link_window_s=0.1))
    tap(tracer, ex, CLIENT_CG, MODEL_CG)
    tracer.configure(TracingSpec())  # flushes what it holds, then stops
    assert not tracer.enabled
    assert len(receiver.wait_for(lambda s: s if len(s) == 2 else None)) == 2
