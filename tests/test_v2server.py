"""The testbed KServe V2 server, driven by the real tritonclient over REST and gRPC."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from infertap.agent.testbed import fraud_model
from infertap.agent.testbed.v2server import V2ServerHandle, start_v2_server


@pytest.fixture(scope="module")
def server() -> Iterator[V2ServerHandle]:
    h = start_v2_server("127.0.0.1", 0, 0)
    yield h
    h.stop()


@pytest.fixture
def hc(server: V2ServerHandle) -> Iterator[Any]:
    c = thttp.InferenceServerClient(server.http_url)
    yield c
    c.close()


@pytest.fixture
def gc(server: V2ServerHandle) -> Iterator[Any]:
    c = tgrpc.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


FP32 = np.array([[0.25, -1.5e-7], [3.4e38, -0.0]], dtype=np.float32)
INT64 = np.array([[-(2**63)], [2**63 - 1], [0]], dtype=np.int64)
BYTES = np.array([b"hello", "naïve".encode(), b""], dtype=object)
ECHO = (("fp32", FP32, "FP32"), ("int64", INT64, "INT64"), ("bytes", BYTES, "BYTES"))


def _exact(got: npt.NDArray[Any], want: npt.NDArray[Any]) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


def test_fraud_model_is_a_real_deterministic_model() -> None:
    x = fraud_model.example_transactions(4000, np.random.default_rng(3), fraud_rate=0.1)
    p, flagged = fraud_model.predict(x)
    assert p.shape == (4000, 1) and p.dtype == np.float32
    assert np.all((p >= 0) & (p <= 1))
    assert 0.02 < flagged.mean() < 0.3
    assert np.array_equal(p, fraud_model.predict_proba(x))  # deterministic
    legit = fraud_model.example_transactions(2000, np.random.default_rng(4), fraud_rate=0.0)
    fraud = fraud_model.example_transactions(2000, np.random.default_rng(5), fraud_rate=1.0)
    assert fraud_model.predict_proba(fraud).mean() > 5 * fraud_model.predict_proba(legit).mean()
    with pytest.raises(ValueError):
        fraud_model.predict_proba(np.zeros((2, 3)))


def test_health_and_metadata(hc: Any, gc: Any) -> None:
    assert hc.is_server_live() and hc.is_server_ready()
    assert gc.is_server_live() and gc.is_server_ready()
    for model in ("fraud", "echo"):
        assert hc.is_model_ready(model) and gc.is_model_ready(model)
    assert not hc.is_model_ready("nosuch") and not gc.is_model_ready("nosuch")
    assert not hc.is_model_ready("fraud", "2")
    md = hc.get_model_metadata("fraud")
    assert md["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 8]}]
    assert [o["name"] for o in md["outputs"]] == ["probability", "is_fraud"]
    gmd = gc.get_model_metadata("fraud", as_json=True)
    assert gmd["inputs"][0]["name"] == "features" and gmd["versions"] == ["1"]
    assert "binary_tensor_data" in hc.get_server_metadata()["extensions"]
    with pytest.raises(InferenceServerException):
        gc.get_model_metadata("nosuch")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_http_fraud_scores_match_the_model(hc: Any, binary: bool) -> None:
    x = fraud_model.example_transactions(16, np.random.default_rng(1))
    i = thttp.InferInput("features", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    outs = [thttp.InferRequestedOutput(n, binary_data=binary) for n in ("probability", "is_fraud")]
    r = hc.infer("fraud", [i], outputs=outs)
    p, flagged = fraud_model.predict(x)
    _exact(r.as_numpy("probability"), p)
    _exact(r.as_numpy("is_fraud"), flagged)
    assert r.get_response()["model_name"] == "fraud"


def test_grpc_fraud_scores_match_the_model(gc: Any) -> None:
    x = fraud_model.example_transactions(16, np.random.default_rng(2))
    i = tgrpc.InferInput("features", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    r = gc.infer("fraud", [i], model_version="1")
    p, flagged = fraud_model.predict(x)
    _exact(r.as_numpy("probability"), p)
    _exact(r.as_numpy("is_fraud"), flagged)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_http_echo_round_trip(hc: Any, binary: bool) -> None:
    inputs = []
    for name, arr, dt in ECHO:
        x = thttp.InferInput(name, list(arr.shape), dt)
        x.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(x)
    outs = [thttp.InferRequestedOutput(n, binary_data=binary) for n, _, _ in ECHO]
    r = hc.infer("echo", inputs, outputs=outs, request_id="abc")
    assert r.get_response()["id"] == "abc"
    for name, arr, _ in ECHO:
        got = r.as_numpy(name)
        if name == "bytes" and not binary:
            # tritonclient turns JSON BYTES into str; the server sent the same text back
            got = np.array([s.encode() for s in got], dtype=object)
        _exact(got, arr)


def test_http_echo_only_requested_outputs_and_gzip(server: V2ServerHandle) -> None:
    c = thttp.InferenceServerClient(server.http_url)
    try:
        inputs = []
        for name, arr, dt in ECHO:
            x = thttp.InferInput(name, list(arr.shape), dt)
            x.set_data_from_numpy(arr, binary_data=True)
            inputs.append(x)
        r = c.infer(
            "echo",
            inputs,
            outputs=[thttp.InferRequestedOutput("int64", binary_data=True)],
            request_compression_algorithm="gzip",
        )
        _exact(r.as_numpy("int64"), INT64)
        assert r.as_numpy("fp32") is None
    finally:
        c.close()


def test_grpc_echo_round_trip(gc: Any) -> None:
    inputs = []
    for name, arr, dt in ECHO:
        x = tgrpc.InferInput(name, list(arr.shape), dt)
        x.set_data_from_numpy(arr)
        inputs.append(x)
    r = gc.infer("echo", inputs, outputs=[tgrpc.InferRequestedOutput("bytes")])
    _exact(r.as_numpy("bytes"), BYTES)
    assert r.as_numpy("fp32") is None
    r = gc.infer("echo", inputs)
    for name, arr, _ in ECHO:
        _exact(r.as_numpy(name), arr)


def test_grpc_bidirectional_stream_answers_each_message_in_order(gc: Any) -> None:
    import queue

    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    gc.start_stream(callback=lambda result, error: results.put((result, error)))
    for i in range(20):
        x = tgrpc.InferInput("x", [1, 2], "FP32")
        x.set_data_from_numpy(np.array([[i, -i]], dtype=np.float32))
        gc.async_stream_infer("echo", [x], request_id=f"r{i}")
    x = tgrpc.InferInput("features", [1, 3], "FP32")  # fraud wants 8 features: an error
    x.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    gc.async_stream_infer("fraud", [x], request_id="bad")
    got = [results.get(timeout=10) for _ in range(21)]
    gc.stop_stream()
    for i, (result, error) in enumerate(got[:20]):
        assert error is None and result.get_response().id == f"r{i}"
        _exact(result.as_numpy("x"), np.array([[i, -i]], dtype=np.float32))
    assert got[20][0] is None and got[20][1] is not None  # the stream survived the bad message


def test_errors(hc: Any, gc: Any) -> None:
    bad = np.zeros((1, 3), dtype=np.float32)
    for client, mod in ((hc, thttp), (gc, tgrpc)):
        i = mod.InferInput("features", [1, 3], "FP32")
        i.set_data_from_numpy(bad)
        with pytest.raises(InferenceServerException, match="shape"):
            client.infer("fraud", [i])
        with pytest.raises(InferenceServerException, match="not served"):
            client.infer("nosuch", [i])
        with pytest.raises(InferenceServerException, match="not served"):
            client.infer("fraud", [i], model_version="9")
        with pytest.raises(InferenceServerException, match="unknown output"):
            client.infer("echo", [i], outputs=[mod.InferRequestedOutput("nope")])
    i = tgrpc.InferInput("features", [1, 3], "FP32")
    i.set_data_from_numpy(bad)
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
        gc.infer("fraud", [i])


def test_http_keepalive_and_bad_requests(server: V2ServerHandle) -> None:
    conn = http.client.HTTPConnection(server.host, server.http_port, timeout=10)
    try:
        conn.request("GET", "/v2/health/ready")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b""
        sock = conn.sock
        body = json.dumps(
            {
                "inputs": [
                    {"name": "a", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}
                ]
            }
        )
        conn.request("POST", "/v2/models/echo/infer", body=body)
        r = conn.getresponse()
        out = json.loads(r.read())
        assert r.status == 200 and out["outputs"][0]["data"] == [1, 2, 3, 4]
        assert conn.sock is sock, "second request reused the connection"
        for bad in (
            b"{not json",
            b'{"inputs": [{"name": "a", "shape": [3], "datatype": "INT8", "data": [1, 2, 999]}]}',
        ):
            conn.request("POST", "/v2/models/echo/infer", body=bad)
            r = conn.getresponse()
            err = json.loads(r.read())
            assert r.status == 400 and "error" in err
            assert "999" not in err["error"], "errors never quote tensor values"
        conn.request("GET", "/v2/nothing")
        r = conn.getresponse()
        r.read()
        assert r.status == 404
    finally:
        conn.close()


def test_concurrent_clients(server: V2ServerHandle) -> None:
    x = fraud_model.example_transactions(3, np.random.default_rng(9))
    want = fraud_model.predict_proba(x)
    errors: list[BaseException] = []

    def worker(use_grpc: bool) -> None:
        try:
            mod: Any = tgrpc if use_grpc else thttp
            c = mod.InferenceServerClient(server.grpc_url if use_grpc else server.http_url)
            try:
                for _ in range(10):
                    i = mod.InferInput("features", [3, 8], "FP32")
                    i.set_data_from_numpy(x)
                    _exact(c.infer("fraud", [i]).as_numpy("probability"), want)
            finally:
                c.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k % 2 == 0,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors


def test_runs_as_a_module() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infertap.agent.testbed.v2server",
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"http=(\S+) grpc=(\S+)", line)
        assert m, line
        hc = thttp.InferenceServerClient(m.group(1))
        gc = tgrpc.InferenceServerClient(m.group(2))
        try:
            assert hc.is_server_ready() and gc.is_model_ready("fraud")
        finally:
            hc.close()
            gc.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
