"""Tracing over real interception: client -> feature service -> V2 model, three pods, spans to an
OTLP TraceService receiver. The services know nothing of tracing; the kernel sees the chain."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from otlp_receiver import KIND_CLIENT, KIND_SERVER, OtlpReceiver, ReceivedSpan
from support import needs_root, repo_root

from infertap.agent.export.tracing_spec import TracingSpec
from infertap.agent.testbed.v2server import start_in_pod

pytestmark = [needs_root, pytest.mark.kernel]

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
EMAIL = "maria.rossi@example.org"
FEATURE_PORT = 9410

CLIENT_SCRIPT = f"""
import sys, numpy as np, tritonclient.http as httpclient
c = httpclient.InferenceServerClient(url=sys.argv[1])
def call(headers):
    a = httpclient.InferInput("amount", [1], "FP32")
    a.set_data_from_numpy(np.array([42.0], dtype=np.float32), binary_data=False)
    who = httpclient.InferInput("customer", [1], "BYTES")
    who.set_data_from_numpy(np.array([b"{EMAIL}"], dtype=object), binary_data=False)
    r = c.infer("scorer", [a, who], headers=headers)
    assert r.as_numpy("probability").shape == (1,)
call({{"traceparent": "00-{TRACE}-{SPAN}-01", "tracestate": "vendor=opaque"}})
call({{}})
c.close()
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def chain(agent: Any, lab: Any) -> Iterator[dict[str, Any]]:
    pods = {name: lab.add_pod(f"tr-{name}") for name in ("client", "feature", "model")}
    for pod in pods.values():
        agent.sensor.attach(pod.cgroup)
    try:
        start_in_pod(pods["model"], 9400, 9401)
        feature = pods["feature"].popen(
            [
                sys.executable,
                str(repo_root() / "tests" / "feature_service_script.py"),
                str(FEATURE_PORT),
                pods["model"].ip,
                "9401",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert feature.stdout is not None and feature.stdout.readline().strip() == "ready"
        yield pods
    finally:
        for pod in pods.values():
            pod.stop_all()
            agent.sensor.detach(pod.cgroup)


@pytest.fixture
def receiver(agent: Any) -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    agent.tracer.configure(TracingSpec(r.endpoint, link_window_s=0.5))
    yield r
    agent.tracer.configure(agent.options.tracing(agent.policy.policy.tracing))  # off again
    r.stop()


def test_chain_of_three_pods_is_one_trace_per_request(
    agent: Any, chain: dict[str, Any], receiver: OtlpReceiver
) -> None:
    url = f"{chain['feature'].ip}:{FEATURE_PORT}"
    r = chain["client"].run(
        [sys.executable, "-c", CLIENT_SCRIPT, url], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]

    def pod(s: ReceivedSpan) -> str:
        return str(s.attributes.get("k8s.pod.name") or s.attributes.get("infertap.cgroup", ""))

    # Two requests, each: client->feature (CLIENT + SERVER span), feature->model (the same).
    spans = receiver.wait_for(lambda s: s if len(s) >= 8 else None, timeout=20)
    assert len(spans) == 8, [(s.name, s.kind, pod(s)) for s in spans]
    traces: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        traces.setdefault(s.trace_id, []).append(s)
    assert len(traces) == 2 and TRACE in traces
    for trace_id, members in traces.items():
        c1 = next(s for s in members if s.kind == KIND_CLIENT and "scorer" in s.name)
        s1 = next(s for s in members if s.kind == KIND_SERVER and "scorer" in s.name)
        c2 = next(s for s in members if s.kind == KIND_CLIENT and s.name.endswith("ModelInfer"))
        s2 = next(s for s in members if s.kind == KIND_SERVER and s.name.endswith("ModelInfer"))
        assert len(members) == 4
        # The chain, from parent/child links alone.
        assert s1.parent_span_id == c1.span_id
        assert c2.parent_span_id == s1.span_id
        assert s2.parent_span_id == c2.span_id
        assert c1.parent_span_id == (SPAN if trace_id == TRACE else "")
        assert "tr-client" in pod(c1) and "tr-feature" in pod(s1)
        assert "tr-feature" in pod(c2) and "tr-model" in pod(s2)
        assert c1.name == "POST /v2/models/scorer/infer"
        assert c1.attributes["http.response.status_code"] == 200
        assert c2.attributes["rpc.system"] == "grpc"
        assert c2.attributes["rpc.grpc.status_code"] == 0
        assert s2.attributes["infertap.model.name"] == "fraud"
        assert s2.attributes["server.address"] == chain["model"].ip
        assert s2.attributes["server.port"] == 9401
        # Time nests too: the model call ran inside the feature service's inbound call.
        assert s1.start_ns <= c2.start_ns <= c2.end_ns <= s1.end_ns
    for s in spans:
        for key, value in s.attributes.items():
            text = str(value)
            assert EMAIL not in text and "opaque" not in text and SPAN not in text, (key, value)
