"""Batch inspection gives exactly what one-by-one inspection gives, on one recorded stream.

tritonclient (REST JSON, REST binary, gRPC) calls the testbed V2 server through the recording
proxy of test_kserve_v2_adapter.py: the fraud model with clean, NaN, infinite, out-of-range and
(later) shifted transactions, some with a customer detail in their parameters; the echo model
with an INT64 features matrix (a dtype finding), with one named input per feature (extract_
features' general path, which breaks a batch's matrix runs) and with text holding PII. The
recorded calls, decoded as the pipeline decodes them, are inspected by InspectionEngine.inspect
one at a time and by inspect_batch in batches of several sizes; findings (in order, per call),
drift gauges and drift's skip counters must be identical, and must hold every kind of finding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from prometheus_client import CollectorRegistry
from support import wired_pipeline
from test_kserve_v2_adapter import RecordingProxy, exchanges

from infertap.agent.demo import fraud_baseline
from infertap.agent.export.event_hub import AgentEvent, EventHub
from infertap.agent.export.metrics import InferenceMetrics, TrafficMetrics
from infertap.agent.flows.records import Endpoint
from infertap.agent.inspect.baseline import Baseline, build_baseline
from infertap.agent.inspect.drift import DriftConfig
from infertap.agent.inspect.engine import InspectionConfig, InspectionEngine, ModelInspection
from infertap.agent.inspect.findings import Finding
from infertap.agent.models.adapt import to_inference_event
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.pod_labels import PodDirectory
from infertap.agent.protocols.messages import HttpExchange
from infertap.agent.testbed.fraud_model import FEATURES, example_transactions
from infertap.agent.testbed.v2server import V2ServerHandle, start_v2_server

SERVICE = Endpoint("127.0.0.1", 8000)
SECRET = b"batch-test-secret"
LEAK = {"customer_email": "jane.doe@example.com"}


@pytest.fixture(scope="module")
def server() -> Iterator[V2ServerHandle]:
    h = start_v2_server("127.0.0.1", 0, 0)
    yield h
    h.stop()


def _transactions(i: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """1 to 4 rows; some with NaN, inf or an amount far outside training; shifted later on."""
    x = example_transactions(1 + i % 4, rng, fraud_rate=0.05)
    if i % 11 == 3:
        x[0, 1] = np.nan
    if i % 13 == 5:
        x[-1, 2] = np.inf
    if i % 7 == 2:
        x[0, 0] = 1e7
    if i >= 60:
        x[:, 0] *= 8.0  # amount drifts
        x[:, 7] = 3.0  # hour
    return x


def _record(proxy: RecordingProxy, proto: str) -> list[HttpExchange]:
    time.sleep(0.1)
    out = exchanges(proxy, proto)
    proxy.close()
    return out


def _rest(server: V2ServerHandle, rng: np.random.Generator) -> list[HttpExchange]:
    proxy = RecordingProxy(("127.0.0.1", server.http_port))
    client = thttp.InferenceServerClient(f"127.0.0.1:{proxy.port}")
    try:
        for i in range(90):
            binary = i % 3 == 1
            if i % 9 == 4:  # echo: one input per feature, the general extraction path
                x = _transactions(i, rng)
                inputs = []
                for j, name in enumerate(FEATURES):
                    inp = thttp.InferInput(name, [len(x)], "FP32")
                    inp.set_data_from_numpy(np.ascontiguousarray(x[:, j]), binary_data=binary)
                    inputs.append(inp)
                client.infer("echo", inputs)
            elif i % 9 == 7:  # echo: an INT64 matrix and a text tensor with an email in it
                m = np.rint(np.nan_to_num(_transactions(i, rng), posinf=1e6)).astype(np.int64)
                a = thttp.InferInput("features", list(m.shape), "INT64")
                a.set_data_from_numpy(m, binary_data=binary)
                t = thttp.InferInput("note", [1], "BYTES")
                t.set_data_from_numpy(np.array([b"call bob@example.org"], dtype=object))
                client.infer("echo", [a, t])
            else:
                x = _transactions(i, rng)
                inp = thttp.InferInput("features", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                client.infer("fraud", [inp], parameters=LEAK if i % 10 == 0 else None)
    finally:
        client.close()
    return _record(proxy, "http/1.1")


def _grpc(server: V2ServerHandle, rng: np.random.Generator) -> list[HttpExchange]:
    proxy = RecordingProxy(("127.0.0.1", server.grpc_port))
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{proxy.port}")
    try:
        for i in range(50):
            x = _transactions(i + 40, rng)
            inp = tgrpc.InferInput("features", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.infer("fraud", [inp], parameters=LEAK if i % 10 == 0 else None)
    finally:
        client.close()
    return [ex for ex in _record(proxy, "h2") if ex.request.path.endswith("/ModelInfer")]


@pytest.fixture(scope="module")
def recorded(server: V2ServerHandle) -> list[HttpExchange]:
    """REST and gRPC calls, interleaved in blocks, as one stream."""
    rng = np.random.default_rng(3)
    rest, grpc = _rest(server, rng), _grpc(server, rng)
    assert len(rest) == 90 and len(grpc) == 50
    out: list[HttpExchange] = []
    while rest or grpc:
        out += rest[:13] + grpc[:7]
        rest, grpc = rest[13:], grpc[7:]
    return out


@pytest.fixture(scope="module")
def events(recorded: list[HttpExchange]) -> list[InferenceEvent]:
    out = []
    for ex in recorded:
        ev = to_inference_event(ex, SERVICE)
        assert ev is not None and not ev.request_truncated and ev.inputs, ev
        out.append(ev)
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> InspectionConfig:
    d = tmp_path_factory.mktemp("baselines")
    fraud = Baseline.load(fraud_baseline(d))
    np.save(d / "echo.npy", example_transactions(5000, np.random.default_rng(1)))
    echo = build_baseline(d / "echo.npy", "echo", d / "echo.json", features=list(FEATURES))
    # Small windows judged often, so drift levels rise and fall many times in the stream.
    return InspectionConfig(
        models={
            "fraud": ModelInspection(fraud, DriftConfig(window=40, evaluate_every=3)),
            "echo": ModelInspection(
                echo,
                DriftConfig(window=12, min_samples=4, evaluate_every=2),
                features=("amount", "hour", "age"),
            ),
        }
    )


def _state(engine: InspectionEngine) -> tuple[Any, ...]:
    monitors = engine._drift  # the windows' own counters: nothing else exposes them
    return (
        engine.drift_values(),
        engine.bin_values(),
        {m: dict(mon.skipped) for m, mon in monitors.items()},
        {m: mon.current() for m, mon in monitors.items()},
    )


def test_batches_of_any_size_find_what_one_by_one_finds(
    events: list[InferenceEvent], config: InspectionConfig
) -> None:
    one = InspectionEngine(config, secret=SECRET)
    expected = [one.inspect(ev) for ev in events]
    kinds = {(f.kind, f.type) for found in expected for f in found}
    # Every path is exercised: PII in parameters and text, each schema check, drift both ways.
    assert {("pii", "email"), ("schema", "nan"), ("schema", "inf"), ("schema", "range")} <= kinds
    assert ("schema", "dtype") in kinds
    drift = [f for found in expected for f in found if f.kind == "drift"]
    assert {f.severity for f in drift} >= {"warn", "alert", "info"}
    assert {f.model for f in drift} == {"fraud", "echo"}
    for size in (1, 2, 7, 64, len(events)):
        batched = InspectionEngine(config, secret=SECRET)
        got: list[list[Finding]] = []
        for start in range(0, len(events), size):
            got += batched.inspect_batch(events[start : start + size])
        assert got == expected, f"batch size {size}"
        assert _state(batched) == _state(one), f"batch size {size}"


def _pipeline_findings(
    recorded: list[HttpExchange], config: InspectionConfig, batch_size: int
) -> list[AgentEvent]:
    reg = CollectorRegistry()
    hub = EventHub()
    sub = hub.subscribe(frozenset({"finding", "inference"}), maxlen=100_000)
    pipe = wired_pipeline(
        hub,
        TrafficMetrics(reg),
        InferenceMetrics(reg),
        PodDirectory(Path("/nonexistent")),
        engine=InspectionEngine(config, secret=SECRET),
        batch_size=batch_size,
    )
    for start in range(0, len(recorded), 10):  # ten exchanges per "drain"
        pipe._exchanges(recorded[start : start + 10])
        pipe.flush()
    out = []
    while (ev := sub.get(0)) is not None:
        out.append(ev)
    return out


def test_the_pipeline_publishes_the_same_findings_batched(
    recorded: list[HttpExchange], config: InspectionConfig
) -> None:
    one = _pipeline_findings(recorded, config, 1)
    assert sum(e.kind == "inference" for e in one) == len(recorded)
    assert sum(e.kind == "finding" for e in one) > 50
    assert _pipeline_findings(recorded, config, 512) == one


def test_events_are_built_for_their_subscribers_only() -> None:
    hub = EventHub()
    assert not hub.wants("http") and not hub.wants("inference")
    some = hub.subscribe(frozenset({"inference", "finding"}))
    assert hub.wants("inference") and hub.wants("finding") and not hub.wants("http")
    every = hub.subscribe()
    assert hub.wants("http")
    every.close()
    assert not hub.wants("http") and hub.wants("inference")
    some.close()
    assert not hub.wants("inference")
