"""Model traffic decoded from real kernel interception, with real clients nobody here wrote:
tritonclient over HTTP (JSON and binary tensors) and gRPC, against a V2 server in the server pod."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
from support import needs_root, repo_root
from v2_client_script import tensors

from infertap.agent.testbed.v2server import start_in_pod

pytestmark = [needs_root, pytest.mark.kernel]


@pytest.fixture(scope="module")
def v2server(lab: Any) -> Any:
    server = lab.pods["server"]
    start_in_pod(server, 8000, 8001)
    return server


def run_client(lab: Any, server: Any, seed: int, big: bool = False) -> None:
    script = str(repo_root() / "tests" / "v2_client_script.py")
    r = lab.pods["client"].run(
        [sys.executable, script, server.ip, "8000", "8001", str(seed), *(["--big"] if big else [])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]


def test_tritonclient_tensors_are_decoded_exactly(agent: Any, lab: Any, v2server: Any) -> None:
    run_client(lab, v2server, seed=11)
    rec = agent.recorder

    def echo_events() -> list[Any]:
        return [e for e in rec.inferences if e.model == "echo" and "x_fp32" in e.inputs]

    events = rec.wait_for(lambda: echo_events() if len(echo_events()) >= 3 else None)
    sent = tensors(11)
    protocols = sorted(e.protocol for e in events)
    assert protocols == ["kserve-v2-grpc", "kserve-v2-rest", "kserve-v2-rest"]
    for e in events:
        assert not e.request_truncated
        assert e.service.port in (8000, 8001) and e.service.ip == v2server.ip
        assert e.status == "ok" and e.latency_ns is not None and e.latency_ns > 0, (
            e.protocol,
            e.status,
            e.latency_ns,
            e.error,
            e.response_truncated,
        )
        for name, (dtype, arr) in sent.items():
            got = e.inputs[name]
            assert e.input_datatypes[name] == dtype
            assert got.shape == arr.shape
            if dtype == "BYTES":
                assert [bytes(x) for x in got.ravel()] == list(arr.ravel())
            else:
                assert got.dtype == arr.dtype and np.array_equal(got, arr)
        assert e.client_cgroup == lab.pods["client"].cgroup_id


def test_bodies_larger_than_a_sample_are_flagged_not_decoded_wrong(
    agent: Any, lab: Any, v2server: Any
) -> None:
    run_client(lab, v2server, seed=12, big=True)
    rec = agent.recorder
    big = rec.wait_for(
        lambda: [
            e
            for e in rec.inferences
            if e.model == "echo" and e.protocol == "kserve-v2-rest" and e.request_truncated
        ]
    )
    sent = tensors(12, big=True)["big_fp32"][1]
    for e in big:
        # Missing is fine; wrong is not.
        got = e.inputs.get("big_fp32")
        assert got is None or np.array_equal(got, sent)


def test_inference_metrics_count_per_model(agent: Any, lab: Any, v2server: Any) -> None:
    import urllib.request

    assert agent.metrics is not None
    body = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics.port}/metrics").read().decode()
    lines = [ln for ln in body.splitlines() if ln.startswith("infertap_inference_requests_total")]
    echo = [ln for ln in lines if 'model="echo"' in ln and 'protocol="kserve-v2-grpc"' in ln]
    assert echo and float(echo[0].rsplit(" ", 1)[1]) >= 1
    assert 'pod="/' in echo[0]
    # The first classifier's count: HTTP requests per service, method and status.
    http = [
        ln
        for ln in body.splitlines()
        if ln.startswith("infertap_http_requests_total")
        and f'service="{v2server.ip}:8000"' in ln
        and 'method="POST"' in ln
        and 'code="200"' in ln
    ]
    assert http and float(http[0].rsplit(" ", 1)[1]) >= 2


PII_MODEL = "jane.doe@example.com"
PII_VERSION = "4111111111111111"
PII_CALLS = f"""
import sys
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

host = sys.argv[1]
x = np.ones((1, 2), dtype=np.float32)
http = httpclient.InferenceServerClient(url=f"{{host}}:8000")
hin = httpclient.InferInput("x", [1, 2], "FP32")
hin.set_data_from_numpy(x)
grpc = grpcclient.InferenceServerClient(url=f"{{host}}:8001")
gin = grpcclient.InferInput("x", [1, 2], "FP32")
gin.set_data_from_numpy(x)
for call in (
    lambda: http.infer({PII_MODEL!r}, [hin], model_version={PII_VERSION!r}),
    lambda: grpc.infer({PII_MODEL!r}, [gin], model_version={PII_VERSION!r}),
):
    try:
        call()
    except InferenceServerException:
        pass  # no such model: the server says so, quoting the name
print("done", flush=True)
"""


def test_a_model_named_like_an_email_never_leaves_raw(agent: Any, lab: Any, v2server: Any) -> None:
    """Real tritonclient calls (REST and gRPC) to a model named like an email, version like a
    card number: metric labels, events, the breaker and the decoded events carry only the
    redacted forms."""
    import json
    import urllib.request

    sub = agent.events.subscribe(maxlen=100_000)
    try:
        r = lab.pods["client"].run(
            [sys.executable, "-c", PII_CALLS, v2server.ip],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]
        rec = agent.recorder
        redacted = "<email:j***@e***.com>"
        ours = rec.wait_for(
            lambda: (lambda es: es if len(es) >= 2 else None)(
                [e for e in rec.inferences if e.model == redacted]
            )
        )
        assert sorted(e.protocol for e in ours) == ["kserve-v2-grpc", "kserve-v2-rest"]
        assert {e.version for e in ours} == {"<credit_card:************1111>"}
        published: list[Any] = []
        while (ev := sub.get(timeout=0.5)) is not None:
            published.append({"kind": ev.kind, "data": ev.data})
    finally:
        sub.close()
    events_text = json.dumps(published)
    assert redacted in events_text
    assert agent.metrics is not None
    page = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics.port}/metrics").read().decode()
    assert f'model="{redacted}"' in page
    assert redacted in agent.actions.breaker.states()
    for raw in (PII_MODEL, PII_VERSION, "jane.doe"):
        assert raw not in events_text, raw
        assert raw not in page, raw
        assert all(raw not in e.model + e.version + e.endpoint + e.error for e in rec.inferences)
