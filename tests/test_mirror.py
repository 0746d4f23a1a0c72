"""Shadow mirroring and the mirror sink, on real wire bytes (no kernel).

Two real V2 servers (agent/testbed/v2server.py) run on 127.0.0.1 as primary and shadow.
tritonclient talks to the primary through the recording proxy of test_kserve_v2_adapter.py;
the recorded exchanges, decoded as the pipeline decodes them, are fed to the Mirror, which
replays them to the shadow (whose own recording proxy counts what arrived) and compares.
"""

from __future__ import annotations

import json
import math
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from prometheus_client import CollectorRegistry, generate_latest
from test_kserve_v2_adapter import RecordingProxy, exchanges

from infertap.agent.export.event_hub import EventHub
from infertap.agent.flows.records import Endpoint
from infertap.agent.mirror.compare import compare_outputs
from infertap.agent.mirror.mirror import Mirror
from infertap.agent.mirror.shadow import rewrite_rest_path
from infertap.agent.mirror.sink import FILE_PREFIX, MirrorSink
from infertap.agent.mirror.spec import MirrorSpec, ShadowSpec, SinkSpec
from infertap.agent.models.adapt import to_inference_event
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.pipeline import Inspected, Pipeline, PipelineSink
from infertap.agent.pod_labels import PodDirectory
from infertap.agent.policy.loader import PolicyError, load_policy_text, render_policy
from infertap.agent.protocols.messages import HttpExchange
from infertap.agent.testbed import fraud_model, v2server
from infertap.agent.testbed.v2server import V2ServerHandle, start_v2_server

SERVICE = Endpoint("127.0.0.1", 8000)
POD = ("ml", "fraud-0")

# ---------------------------------------------------------------------------------------------
# Servers, recordings


@pytest.fixture(scope="module")
def primary() -> Iterator[V2ServerHandle]:
    h = start_v2_server("127.0.0.1", 0, 0)
    yield h
    h.stop()


@pytest.fixture(scope="module")
def shadow() -> Iterator[V2ServerHandle]:
    h = start_v2_server("127.0.0.1", 0, 0)
    yield h
    h.stop()


Call = tuple[HttpExchange, InferenceEvent]


def _calls(exs: list[HttpExchange]) -> list[Call]:
    out = []
    for ex in exs:
        ev = to_inference_event(ex, SERVICE)
        if ev is not None:
            assert ev.status == "ok" and not ev.error, ev.error
            out.append((ex, ev))
    return out


def _batches(n: int, rows: int, seed: int = 7) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return [fraud_model.example_transactions(rows, rng, fraud_rate=0.3) for _ in range(n)]


@pytest.fixture(scope="module")
def rest_calls(primary: V2ServerHandle) -> list[Call]:
    """Fraud calls over REST, JSON and binary alternately, recorded off the wire."""
    proxy = RecordingProxy(("127.0.0.1", primary.http_port))
    client = thttp.InferenceServerClient(f"127.0.0.1:{proxy.port}")
    try:
        for i, x in enumerate(_batches(20, 16)):
            binary = i % 2 == 1
            inp = thttp.InferInput("features", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            outs = [
                thttp.InferRequestedOutput(n, binary_data=binary)
                for n in ("probability", "is_fraud")
            ]
            client.infer("fraud", [inp], outputs=outs, request_id=f"r-{i}")
    finally:
        client.close()
    time.sleep(0.1)
    calls = _calls(exchanges(proxy, "http/1.1"))
    proxy.close()
    assert len(calls) == 20
    return calls


@pytest.fixture(scope="module")
def grpc_calls(primary: V2ServerHandle) -> list[Call]:
    proxy = RecordingProxy(("127.0.0.1", primary.grpc_port))
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{proxy.port}")
    try:
        for i, x in enumerate(_batches(12, 16, seed=11)):
            inp = tgrpc.InferInput("features", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.infer("fraud", [inp], request_id=f"g-{i}")
    finally:
        client.close()
    time.sleep(0.1)
    calls = [c for c in _calls(exchanges(proxy, "h2")) if c[0].request.path.endswith("/ModelInfer")]
    proxy.close()
    assert len(calls) == 12
    return calls


@pytest.fixture(scope="module")
def echo_calls(primary: V2ServerHandle) -> list[Call]:
    """Echo calls carrying text (BYTES, PII), numbers and request parameters."""
    proxy = RecordingProxy(("127.0.0.1", primary.http_port))
    client = thttp.InferenceServerClient(f"127.0.0.1:{proxy.port}")
    try:
        for i in range(30):
            tensors: list[tuple[str, npt.NDArray[Any], str]] = [
                ("fp32", np.array([1.5, -2.25, i], dtype=np.float32), "FP32"),
                ("int64", np.array([i, 2**40], dtype=np.int64), "INT64"),
                (
                    "bytes",
                    np.array([b"alice@example.com", "héllo".encode()], dtype=object),
                    "BYTES",
                ),
            ]
            inputs = []
            for name, arr, dt in tensors:
                x = thttp.InferInput(name, list(arr.shape), dt)
                x.set_data_from_numpy(arr, binary_data=i % 2 == 0)
                inputs.append(x)
            client.infer("echo", inputs, parameters={"customer": "bob@example.org"})
    finally:
        client.close()
    time.sleep(0.1)
    calls = _calls(exchanges(proxy, "http/1.1"))
    proxy.close()
    assert len(calls) == 30
    return calls


def _shadow_spec(shadow: V2ServerHandle, protocol: str = "rest", **kw: Any) -> ShadowSpec:
    port = shadow.http_port if protocol == "rest" else shadow.grpc_port
    return ShadowSpec("fraud", Endpoint("127.0.0.1", port), protocol, **kw)  # type: ignore[arg-type]


def _mirror(spec: MirrorSpec, seed: int | None = None) -> tuple[Mirror, CollectorRegistry, Any]:
    reg = CollectorRegistry()
    hub = EventHub()
    sub = hub.subscribe(frozenset({"shadow"}), maxlen=100_000)
    m = Mirror(hub, reg, seed=seed)
    m.configure(spec)
    m.start()
    return m, reg, sub


def _wait(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def _done(m: Mirror) -> int:
    c = m.shadows.counts
    return c.get("agree", 0) + c.get("disagree", 0) + c.get("error", 0)


def _events(sub: Any) -> list[dict[str, Any]]:
    out = []
    while (e := sub.get(0.0)) is not None:
        out.append(e.data)
    return out


def _metric(reg: CollectorRegistry, line_start: str) -> float:
    for line in generate_latest(reg).decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def _infer_requests(proxy: RecordingProxy, proto: str) -> int:
    paths = [e.request.path for e in exchanges(proxy, proto)]
    return sum(p.endswith("/infer") or p.endswith("/ModelInfer") for p in paths)


# ---------------------------------------------------------------------------------------------
# Agreement


def test_rest_share_one_mirrors_every_request_and_agrees(
    shadow: V2ServerHandle, rest_calls: list[Call]
) -> None:
    counter = RecordingProxy(("127.0.0.1", shadow.http_port))
    spec = ShadowSpec("fraud", Endpoint("127.0.0.1", counter.port), "rest", share=1.0)
    m, reg, sub = _mirror(MirrorSpec(shadows=(spec,)))
    try:
        for ex, ev in rest_calls:
            m.tap(ex, ev, POD)
        _wait(lambda: _done(m) == len(rest_calls))
        assert m.shadows.counts.get("agree") == len(rest_calls), m.shadows.counts
        _wait(lambda: _infer_requests(counter, "http/1.1") == len(rest_calls))
        # The shadow got the same bodies and the headers that give them meaning (two workers,
        # two connections: in any order).
        hl = "inference-header-content-length"
        sent = sorted(
            (ex.request.path, ex.request.header(hl) or "", ex.request.body) for ex, _ in rest_calls
        )
        got = sorted(
            (sx.request.path, sx.request.header(hl) or "", sx.request.body)
            for sx in exchanges(counter, "http/1.1")
        )
        assert got == sent
        assert _metric(reg, 'infertap_shadow_requests_total{model="fraud",result="agree"}') == 20
        assert _metric(reg, 'infertap_shadow_max_abs_diff_count{model="fraud"}') == 20
        assert _metric(reg, 'infertap_shadow_max_abs_diff_bucket{le="0.0",model="fraud"}') == 20
        events = _events(sub)
        assert len(events) == 20
        for e in events:
            assert e["result"] == "agree" and e["max_abs_diff"] == 0.0 and e["rows"] == 16
            assert set(e) <= {
                "model", "shadow_model", "shadow", "protocol", "result", "agree",
                "max_abs_diff", "latency_ms", "rows", "rows_disagree", "missing_outputs", "error",
            }  # fmt: skip
    finally:
        m.stop()
        counter.close()


def test_grpc_share_one_mirrors_every_request_and_agrees(
    shadow: V2ServerHandle, grpc_calls: list[Call]
) -> None:
    counter = RecordingProxy(("127.0.0.1", shadow.grpc_port))
    spec = ShadowSpec("fraud", Endpoint("127.0.0.1", counter.port), "grpc", share=1.0)
    m, _reg, sub = _mirror(MirrorSpec(shadows=(spec,)))
    try:
        for ex, ev in grpc_calls:
            m.tap(ex, ev, POD)
        _wait(lambda: _done(m) == len(grpc_calls))
        assert m.shadows.counts.get("agree") == len(grpc_calls), m.shadows.counts
        _wait(lambda: _infer_requests(counter, "h2") == len(grpc_calls))
        assert all(e["protocol"] == "grpc" and e["agree"] for e in _events(sub))
    finally:
        m.stop()
        counter.close()


def test_share_is_binomial(shadow: V2ServerHandle, rest_calls: list[Call]) -> None:
    n, share = 1000, 0.1
    spec = MirrorSpec(shadows=(_shadow_spec(shadow, share=share),), queue=1000, workers=4)
    m, _reg, _ = _mirror(spec)
    try:
        queued = sum(m.shadows.offer(*rest_calls[i % len(rest_calls)]) for i in range(n))
        sd = math.sqrt(n * share * (1 - share))
        assert abs(queued - n * share) <= 5 * sd, queued  # 5 sigma: a flake once in millions
        _wait(lambda: _done(m) == queued)
        assert m.shadows.counts.get("agree") == queued
        assert m.shadows.counts.get("skipped", 0) == 0
        print(f"share {share}: {queued} of {n} mirrored")
    finally:
        m.stop()


def test_a_model_with_another_threshold_disagrees_row_by_row(
    shadow: V2ServerHandle, rest_calls: list[Call], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shadow serves "fraud_strict": the same scores, flagged from 0.2 instead of 0.5."""

    def strict(req: Any) -> v2server.Outputs:
        p = fraud_model.predict_proba(req.tensors["features"])
        return {"probability": ("FP32", p), "is_fraud": ("BOOL", p >= 0.2)}

    monkeypatch.setitem(
        v2server.MODELS,
        "fraud_strict",
        replace(v2server.MODELS["fraud"], name="fraud_strict", run=strict),
    )
    spec = _shadow_spec(shadow, shadow_model="fraud_strict")
    m, reg, sub = _mirror(MirrorSpec(shadows=(spec,)))
    try:
        for ex, ev in rest_calls:
            m.tap(ex, ev, POD)
        _wait(lambda: _done(m) == len(rest_calls))
        events = _events(sub)
        want_rows = []
        for _, ev in rest_calls:
            p = fraud_model.predict_proba(ev.inputs["features"]).ravel()
            want_rows.append(int(((p >= 0.2) != (p >= 0.5)).sum()))
        assert sum(want_rows) > 0 and 0 in want_rows  # some requests flip, some do not
        got = {e["result"] for e in events}
        assert [e["rows_disagree"] for e in events] != [] and got <= {"agree", "disagree"}
        assert sum(e["rows_disagree"] for e in events) == sum(want_rows)
        assert m.shadows.counts.get("disagree", 0) == sum(1 for w in want_rows if w)
        assert all(e["max_abs_diff"] == 0.0 for e in events)  # same scores, other decisions
        assert all(e["shadow_model"] == "fraud_strict" for e in events)
        dis = _metric(reg, 'infertap_shadow_requests_total{model="fraud",result="disagree"}')
        assert dis == sum(1 for w in want_rows if w) > 0
        print(f"threshold shadow: {int(dis)} of {len(rest_calls)} requests disagree")
    finally:
        m.stop()


def test_a_different_model_disagrees(shadow: V2ServerHandle, grpc_calls: list[Call]) -> None:
    spec = _shadow_spec(shadow, "grpc", shadow_model="echo")  # echo returns "features" only
    m, _reg, sub = _mirror(MirrorSpec(shadows=(spec,)))
    try:
        for ex, ev in grpc_calls:
            m.tap(ex, ev, POD)
        _wait(lambda: _done(m) == len(grpc_calls))
        assert m.shadows.counts.get("disagree") == len(grpc_calls)
        for e in _events(sub):
            assert e["missing_outputs"] == ["is_fraud", "probability"]
            assert e["rows_disagree"] == 16
    finally:
        m.stop()


def test_unknown_shadow_model_is_an_error(shadow: V2ServerHandle, rest_calls: list[Call]) -> None:
    m, _reg, sub = _mirror(MirrorSpec(shadows=(_shadow_spec(shadow, shadow_model="nope"),)))
    try:
        for ex, ev in rest_calls[:3]:
            m.tap(ex, ev, POD)
        _wait(lambda: _done(m) == 3)
        assert m.shadows.counts.get("error") == 3
        assert [e["error"] for e in _events(sub)] == ["http_404"] * 3
    finally:
        m.stop()


def test_rest_path_rewrite() -> None:
    base = ShadowSpec("m", Endpoint("127.0.0.1", 1), "rest")
    assert rewrite_rest_path("/v2/models/m/infer", base) == "/v2/models/m/infer"
    assert rewrite_rest_path("/v2/models/m/versions/1/infer?x=1", base) == (
        "/v2/models/m/versions/1/infer?x=1"
    )
    other = replace(base, shadow_model="m v2")
    assert rewrite_rest_path("/v2/models/m/versions/1/infer", other) == "/v2/models/m%20v2/infer"
    pinned = replace(base, shadow_version="2")
    assert rewrite_rest_path("/v2/models/m/versions/1/infer", pinned) == (
        "/v2/models/m/versions/2/infer"
    )
    assert rewrite_rest_path("/v1/models/m:predict", base) is None


def test_compare_modes() -> None:
    p = {"score": np.array([[0.1, 0.9], [0.6, 0.4]], dtype=np.float32)}
    s = {"score": np.array([[0.2, 0.8], [0.45, 0.55]], dtype=np.float32)}
    values = compare_outputs(p, s)
    assert not values.agree and values.rows_disagree == 2
    assert values.max_abs_diff == pytest.approx(0.15, abs=1e-6)
    argmax = compare_outputs(p, s, mode="argmax")
    assert not argmax.agree and (argmax.rows, argmax.rows_disagree) == (2, 1)
    thr = compare_outputs(p, s, mode="threshold", threshold=0.5)
    assert not thr.agree and thr.rows_disagree == 1
    assert compare_outputs(p, {"score": p["score"] + 1e-7}).agree
    nan = {"x": np.array([np.nan, 1.0])}
    assert compare_outputs(nan, {"x": np.array([np.nan, 1.0])}).agree
    assert compare_outputs(nan, {"x": np.array([0.0, 1.0])}).max_abs_diff == math.inf
    assert not compare_outputs({"x": np.zeros(3)}, {"x": np.zeros(4)}).agree
    b = {"t": np.array([b"a", b"b"], dtype=object)}
    assert compare_outputs(b, {"t": np.array([b"a", b"b"], dtype=object)}).agree
    assert not compare_outputs(b, {"t": np.array([b"a", b"c"], dtype=object)}).agree
    ints = {"i": np.array([1, 2], dtype=np.int64)}
    assert not compare_outputs(ints, {"i": np.array([1, 3], dtype=np.int64)}, atol=10).agree
    assert not compare_outputs({}, {}).agree  # nothing compared is not agreement
    only = compare_outputs(p, {**s, "extra": np.zeros(1)}, names=["score"], mode="argmax")
    assert only.rows_disagree == 1


# ---------------------------------------------------------------------------------------------
# Skips, and a shadow that is down


def test_truncated_and_other_protocol_requests_are_skipped(
    shadow: V2ServerHandle, rest_calls: list[Call], grpc_calls: list[Call]
) -> None:
    m, reg, _ = _mirror(MirrorSpec(shadows=(_shadow_spec(shadow),)))
    try:
        ex, ev = rest_calls[0]
        cut = HttpExchange(
            replace(ex.request, body=ex.request.body[:100], body_truncated=True), ex.response
        )
        assert not m.shadows.offer(cut, ev)
        assert not m.shadows.offer(ex, replace(ev, request_truncated=True))
        assert not m.shadows.offer(*grpc_calls[0])  # gRPC call, REST shadow
        assert not m.shadows.offer(ex, replace(ev, status="500"))
        assert not m.shadows.offer(ex, replace(ev, model="other"))  # not mirrored: not counted
        c = m.shadows.counts
        assert (c["skipped_truncated"], c["skipped_protocol"], c["skipped_primary_unusable"]) == (
            2,
            1,
            1,
        )
        assert _metric(reg, 'infertap_shadow_requests_total{model="fraud",result="skipped"}') == 4
        assert _done(m) == 0
    finally:
        m.stop()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def _offer_latencies(m: Mirror, calls: list[Call], n: int) -> list[float]:
    out = []
    for i in range(n):
        ex, ev = calls[i % len(calls)]
        t0 = time.perf_counter_ns()
        m.tap(ex, ev, POD)
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def _report(what: str, lat: list[float]) -> tuple[float, float]:
    lat = sorted(lat)
    p50, p99 = statistics.median(lat), lat[int(len(lat) * 0.99)]
    print(f"offer() {what}: p50 {p50:.1f} us, p99 {p99:.1f} us, max {lat[-1]:.1f} us")
    return p50, p99


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_dead_shadow_never_blocks_the_caller(
    protocol: str, rest_calls: list[Call], grpc_calls: list[Call]
) -> None:
    calls = rest_calls if protocol == "rest" else grpc_calls
    spec = ShadowSpec("fraud", Endpoint("127.0.0.1", _closed_port()), protocol)  # type: ignore[arg-type]
    m, _reg, _sub = _mirror(MirrorSpec(shadows=(spec,), queue=64, timeout_s=1.0))
    try:
        lat = _offer_latencies(m, calls, 3000)
        p50, p99 = _report(f"{protocol} shadow refusing connections", lat)
        assert p50 < 100 and p99 < 1000
        _wait(lambda: _done(m) + m.shadows.counts.get("skipped", 0) == 3000)
        assert m.shadows.counts.get("error", 0) > 0
        assert m.shadows.counts.get("agree", 0) == 0
    finally:
        t0 = time.monotonic()
        m.stop()
        assert time.monotonic() - t0 < 5


def test_a_hanging_shadow_fills_the_queue_and_is_skipped(rest_calls: list[Call]) -> None:
    """A shadow that accepts connections and never answers: workers wait out their timeout,
    the queue fills, offers keep returning at once and are counted skipped."""
    hole = socket.create_server(("127.0.0.1", 0), backlog=64)
    spec = ShadowSpec("fraud", Endpoint("127.0.0.1", hole.getsockname()[1]), "rest")
    m, reg, _ = _mirror(MirrorSpec(shadows=(spec,), queue=8, workers=2, timeout_s=0.5))
    try:
        lat = _offer_latencies(m, rest_calls, 3000)
        p50, p99 = _report("hanging rest shadow", lat)
        assert p50 < 100 and p99 < 1000
        assert m.shadows.counts["skipped_queue_full"] >= 3000 - 8 - 2
        assert _metric(reg, 'infertap_shadow_requests_total{model="fraud",result="skipped"}') > 0
    finally:
        m.stop()
        hole.close()


def test_offer_latency_with_a_live_shadow(shadow: V2ServerHandle, rest_calls: list[Call]) -> None:
    m, _, _ = _mirror(MirrorSpec(shadows=(_shadow_spec(shadow),), queue=256))
    try:
        p50, p99 = _report("live rest shadow", _offer_latencies(m, rest_calls, 2000))
        assert p50 < 100 and p99 < 1000
    finally:
        m.stop()  # what is still queued is dropped and counted, not waited for
    c = m.shadows.counts
    assert _done(m) + c.get("skipped", 0) == 2000
    assert c.get("error", 0) == 0 and c.get("disagree", 0) == 0


# ---------------------------------------------------------------------------------------------
# The pipeline hook


class Seen(PipelineSink):
    def __init__(self) -> None:
        self.calls: list[Inspected] = []

    def on_inference(self, inspected: Inspected) -> None:
        self.calls.append(inspected)


def test_the_pipeline_hands_exchange_event_and_pod_to_its_sinks(rest_calls: list[Call]) -> None:
    seen = Seen()
    pipe = Pipeline(PodDirectory(Path("/nonexistent")), (seen,))
    ex, _ = rest_calls[0]
    pipe._exchanges([ex])
    assert len(seen.calls) == 1 and seen.calls[0].exchange is ex
    assert seen.calls[0].event.model == "fraud" and seen.calls[0].event.outputs


# ---------------------------------------------------------------------------------------------
# The sink


def _lines(directory: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(directory.iterdir()):
        out += [json.loads(line) for line in f.read_text().splitlines()]
    return out


def test_sink_rotates_redacts_and_survives_restarts(
    tmp_path: Path, echo_calls: list[Call], rest_calls: list[Call]
) -> None:
    spec = SinkSpec(str(tmp_path / "mirror"), max_bytes=2048, max_files=3, values=True)
    sink = MirrorSink(spec)
    sink.start()
    for _ex, ev in echo_calls + rest_calls:
        sink.offer(ev, "ml/fraud-0")
    assert sink.flush()
    sink.stop()
    files = sorted((tmp_path / "mirror").iterdir())
    assert len(files) == 3 and all(f.name.startswith(FILE_PREFIX) for f in files)
    for f in files:
        text = f.read_text()
        assert f.stat().st_mode & 0o077 == 0
        assert "alice" not in text and "héllo" not in text and "h\\u00e9llo" not in text
        assert "bob@example.org" not in text and "customer" not in text and "parameters" not in text
    records = _lines(tmp_path / "mirror")
    for f in files:  # a file holds more than one record only while under max_bytes
        if len(f.read_text().splitlines()) > 1:
            assert f.stat().st_size <= 2048
    fraud = [r for r in records if r["model"] == "fraud"]
    assert fraud, "the newest records survive rotation"
    r = fraud[-1]
    assert r["inputs"][0]["name"] == "features" and r["inputs"][0]["shape"] == [16, 8]
    assert np.array(r["inputs"][0]["values"]).shape == (16, 8)
    assert {o["name"] for o in r["outputs"]} == {"probability", "is_fraud"}
    assert r["pod"] == "ml/fraud-0" and r["status"] == "ok" and r["protocol"] == "kserve-v2-rest"
    seqs = [int(f.name[len(FILE_PREFIX) : -len(".jsonl")]) for f in files]

    # Restart: a new file after the highest sequence, still at most max_files.
    again = MirrorSink(spec)
    again.start()
    for _ex, ev in echo_calls[:3]:
        again.offer(ev, "")
    assert again.flush()
    again.stop()
    files2 = sorted((tmp_path / "mirror").iterdir())
    assert len(files2) == 3
    assert int(files2[-1].name[len(FILE_PREFIX) : -len(".jsonl")]) == max(seqs) + 1
    echo = [x for x in _lines(tmp_path / "mirror") if x["model"] == "echo"][-1]
    by_name = {t["name"]: t for t in echo["inputs"]}
    assert "values" not in by_name["bytes"] and by_name["bytes"]["datatype"] == "BYTES"
    assert by_name["fp32"]["values"][:2] == [1.5, -2.25]
    assert by_name["int64"]["values"][1] == 2**40


def test_sink_without_values_writes_only_names_shapes_and_types(
    tmp_path: Path, rest_calls: list[Call]
) -> None:
    sink = MirrorSink(SinkSpec(str(tmp_path), values=False))
    sink.start()
    sink.offer(rest_calls[0][1], "")
    assert sink.flush()
    sink.stop()
    (rec,) = _lines(tmp_path)
    assert all("values" not in t for t in rec["inputs"] + rec["outputs"])


def test_mirror_tap_feeds_the_sink_and_a_bad_directory_is_a_policy_error(
    tmp_path: Path, rest_calls: list[Call]
) -> None:
    m = Mirror()
    m.configure(MirrorSpec(sink=SinkSpec(str(tmp_path / "s"))))
    m.start()
    m.tap(*rest_calls[0], POD)
    assert m.sink is not None and m.sink.flush()
    m.stop()
    assert _lines(tmp_path / "s")[0]["pod"] == "ml/fraud-0"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PolicyError, match=r"mirror\.sink\.directory"):
        Mirror().configure(MirrorSpec(sink=SinkSpec(str(blocker / "sub"))))


# ---------------------------------------------------------------------------------------------
# Policy


MIRROR_POLICY = """\
version: 1
mirror:
  queue: 100
  timeout: 500ms
  models:
    - model: fraud
      endpoint: 10.0.0.7:8001
      protocol: grpc
      share: 0.1
      shadow_model: fraud
      shadow_version: "2"
      outputs: [is_fraud]
      agreement: threshold
      threshold: 0.5
  sink:
    directory: mirror-out
    max_bytes: 67108864
    max_files: 5
"""


def test_policy_mirror_section(tmp_path: Path) -> None:
    p = load_policy_text(MIRROR_POLICY, "policy.yaml", tmp_path)
    (s,) = p.mirror.shadows
    assert s.endpoint == Endpoint("10.0.0.7", 8001) and s.protocol == "grpc" and s.share == 0.1
    assert (s.shadow_model, s.shadow_version, s.outputs) == ("fraud", "2", ("is_fraud",))
    assert p.mirror.timeout_s == 0.5 and p.mirror.queue == 100
    assert p.mirror.sink is not None and p.mirror.sink.directory == str(tmp_path / "mirror-out")
    # Part of the hash; policies without it keep theirs; the rendering loads back equal.
    plain = load_policy_text("version: 1\n")
    assert p.hash != plain.hash
    assert load_policy_text(MIRROR_POLICY.replace("0.1", "0.2"), "p", tmp_path).hash != p.hash
    again = load_policy_text(render_policy(p), "p", tmp_path)
    assert again == p and again.hash == p.hash
    v6 = load_policy_text(MIRROR_POLICY.replace("10.0.0.7:8001", "'[::1]:8001'"), "p", tmp_path)
    assert v6.mirror.shadows[0].endpoint == Endpoint("::1", 8001)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("share: 0.1", "share: 1.5", "9: mirror.models[0].share: must be a number from 0 to 1"),
        ("10.0.0.7:8001", "fraud-v2:8001", "7: mirror.models[0].endpoint: must be ip:port"),
        ("protocol: grpc", "protocol: http", "8: mirror.models[0].protocol: must be one of"),
        ("agreement: threshold", "agreement: x", "13: mirror.models[0].agreement: must be one"),
        ("max_files: 5", "max_files: 0", "18: mirror.sink.max_files: must be an integer from 1"),
        ("  queue: 100", "  queue: 100\n  colour: red", "4: mirror.colour: unknown key"),
        ("    directory: mirror-out\n", "", "16: mirror.sink.directory: required"),
        ("share: 0.1\n", "share: 0.1\n      shadow: x\n", "10: mirror.models[0].shadow: unknown"),
    ],
)
def test_policy_mirror_errors_name_line_and_field(old: str, new: str, expected: str) -> None:
    text = MIRROR_POLICY.replace(old, new)
    assert text != MIRROR_POLICY
    with pytest.raises(PolicyError) as err:
        load_policy_text(text, "policy.yaml")
    assert any(m.startswith(f"policy.yaml:{expected}") for m in err.value.messages), err.value


def test_policy_duplicate_mirrored_model() -> None:
    text = MIRROR_POLICY.replace(
        "  sink:",
        "    - {model: fraud, endpoint: '10.0.0.8:8000', protocol: rest}\n  sink:",
    )
    with pytest.raises(
        PolicyError, match=r"mirror.models\[1\].model: duplicate of mirror.models\[0\]"
    ):
        load_policy_text(text, "policy.yaml")
