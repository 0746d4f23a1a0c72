"""KServe V2 adapter on real wire bytes.

tritonclient (http and grpc) talks to the testbed V2 server through a recording TCP proxy; the
recorded bytes are parsed into HttpMessage/HttpExchange (httptools for HTTP/1.1, h2 for gRPC)
the way the wire layer will, and fed to to_inference_event. Tensors must come out exactly as
sent (values, shape, dtype). Truncated bodies are flagged and never decoded wrong; garbage never
raises.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import httptools
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from infertap.agent.flows.records import ConnectionId, Direction, Endpoint
from infertap.agent.models import kserve_v2
from infertap.agent.models.adapt import adapter_counters, to_inference_event, to_inference_events
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.protocols.messages import HttpExchange, HttpMessage
from infertap.agent.testbed.v2server import V2ServerHandle, start_v2_server

# ---------------------------------------------------------------------------------------------
# Recording proxy


@dataclass
class Recording:
    client_port: int
    server: Endpoint
    c2s: bytearray = field(default_factory=bytearray)
    s2c: bytearray = field(default_factory=bytearray)


class RecordingProxy:
    """Forwards TCP connections to `upstream`, keeping each direction's bytes."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.recordings: list[Recording] = []
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                client, addr = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            rec = Recording(client_port=addr[1], server=Endpoint(*self.upstream))
            with self.lock:
                self.recordings.append(rec)
                self.sockets += [client, server]
            for src, dst, buf in ((client, server, rec.c2s), (server, client, rec.s2c)):
                threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            with self.lock:
                buf += data  # recorded before forwarding: once the peer has it, so do we
            try:
                dst.sendall(data)
            except OSError:
                return

    def snapshot(self) -> list[Recording]:
        with self.lock:
            return [
                Recording(r.client_port, r.server, bytearray(r.c2s), bytearray(r.s2c))
                for r in self.recordings
            ]

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                s.close()


# ---------------------------------------------------------------------------------------------
# Wire bytes -> HttpMessage


@dataclass
class _Parsed:
    method: str = ""
    path: str = ""
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    done: bool = False


class _H1Callbacks:
    def __init__(self, requests: bool) -> None:
        self.messages: list[_Parsed] = []
        self.current = _Parsed()
        kind = httptools.HttpRequestParser if requests else httptools.HttpResponseParser
        self.parser: Any = kind(self)  # binds the on_* methods below

    def on_message_begin(self) -> None:
        self.current = _Parsed()

    def on_url(self, url: bytes) -> None:
        self.current.path += url.decode()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name.decode().lower(), value.decode()))

    def on_headers_complete(self) -> None:
        if isinstance(self.parser, httptools.HttpRequestParser):
            self.current.method = self.parser.get_method().decode()
        else:
            self.current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.current.done = True
        self.messages.append(self.current)


def parse_http1(data: bytes | bytearray, requests: bool) -> list[_Parsed]:
    cb = _H1Callbacks(requests)
    cb.parser.feed_data(bytes(data))
    return cb.messages


def _open_h2(client_side: bool) -> h2.connection.H2Connection:
    """An h2 connection that accepts whatever the real peers negotiated (big frames, windows)."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
    )
    big = {
        h2.settings.SettingCodes.MAX_FRAME_SIZE: 2**24 - 1,
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1,
    }
    conn.local_settings = h2.settings.Settings(client=client_side, initial_values=big)
    conn.max_inbound_frame_size = 2**24 - 1
    conn.initiate_connection()
    conn.increment_flow_control_window(2**31 - 1 - 65535)
    return conn


def _grpc_deframe(body: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 5 <= len(body):
        flag, n = struct.unpack_from(">BI", body, pos)
        assert flag == 0, "tests do not compress"
        out.append(bytes(body[pos + 5 : pos + 5 + n]))
        pos += 5 + n
    return out


def parse_h2(rec: Recording) -> list[tuple[_Parsed, _Parsed]]:
    """(request, response) per stream, from the two recorded directions of one connection."""
    srv = _open_h2(client_side=False)
    reqs: dict[int, _Parsed] = {}
    for ev in srv.receive_data(bytes(rec.c2s)):
        if isinstance(ev, h2.events.RequestReceived) and ev.stream_id is not None:
            hdrs = [(str(k), str(v)) for k, v in ev.headers or []]
            d = dict(hdrs)
            reqs[ev.stream_id] = _Parsed(method=d[":method"], path=d[":path"], headers=hdrs)
        elif isinstance(ev, h2.events.DataReceived) and ev.stream_id is not None:
            reqs[ev.stream_id].body += ev.data or b""
        elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in reqs:
            reqs[ev.stream_id].done = True
    cli = _open_h2(client_side=True)
    for sid, r in sorted(reqs.items()):
        cli.send_headers(sid, r.headers, end_stream=True)  # open the stream to accept a reply
    resps: dict[int, _Parsed] = {}
    for ev in cli.receive_data(bytes(rec.s2c)):
        if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id is not None:
            hdrs = [(str(k), str(v)) for k, v in ev.headers or []]
            resps[ev.stream_id] = _Parsed(status=int(dict(hdrs)[":status"]), headers=hdrs)
        elif isinstance(ev, h2.events.DataReceived) and ev.stream_id is not None:
            resps[ev.stream_id].body += ev.data or b""
        elif isinstance(ev, h2.events.TrailersReceived) and ev.stream_id is not None:
            resps[ev.stream_id].trailers = [(str(k), str(v)) for k, v in ev.headers or []]
        elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in resps:
            resps[ev.stream_id].done = True
    return [(reqs[s], resps[s]) for s in sorted(reqs) if s in resps]


def _message(rec: Recording, p: _Parsed, direction: Direction, proto: str, ts: int) -> HttpMessage:
    conn = ConnectionId(client=Endpoint("127.0.0.1", rec.client_port), server=rec.server)
    msg = HttpMessage(
        connection=conn,
        direction=direction,
        protocol=proto,
        ts_ns=ts,
        end_ts_ns=ts + 10,
        method=p.method,
        path=p.path,
        status=p.status,
        headers=list(p.headers),
        trailers=list(p.trailers),
        body=bytes(p.body),
    )
    cl = msg.header("content-length")
    msg.content_length = int(cl) if cl is not None else -1
    if proto == "h2" and msg.is_grpc:
        msg.grpc_messages = _grpc_deframe(msg.body)
    return msg


def exchanges(proxy: RecordingProxy, proto: str) -> list[HttpExchange]:
    """Every complete exchange the proxy saw, in order, built as the wire layer builds them."""
    out: list[HttpExchange] = []
    ts = 1_000_000
    for rec in proxy.snapshot():
        if proto == "h2":
            pairs = parse_h2(rec)
        else:
            pairs = list(zip(parse_http1(rec.c2s, True), parse_http1(rec.s2c, False), strict=False))
        for req, resp in pairs:
            out.append(
                HttpExchange(
                    _message(rec, req, Direction.REQUEST, proto, ts),
                    _message(rec, resp, Direction.RESPONSE, proto, ts + 5000),
                )
            )
            ts += 1_000_000
    return out


SERVICE = Endpoint("127.0.0.1", 8000)


def _only_infer(exs: list[HttpExchange]) -> HttpExchange:
    infer = [
        e
        for e in exs
        if e.request.path.endswith("/infer") or e.request.path.endswith("/ModelInfer")
    ]
    assert len(infer) == 1, [e.request.path for e in exs]
    return infer[0]


def _event(ex: HttpExchange) -> InferenceEvent:
    ev = to_inference_event(ex, SERVICE, client_cgroup=11, server_cgroup=22)
    assert ev is not None
    return ev


def assert_exact(got: npt.NDArray[Any] | None, want: npt.NDArray[Any]) -> None:
    assert got is not None
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=want.dtype.kind == "f")
    if want.dtype == object:
        assert all(type(a) is type(b) for a, b in zip(got.ravel(), want.ravel(), strict=True))


# ---------------------------------------------------------------------------------------------
# Fixtures and data


@pytest.fixture(scope="module")
def server() -> Iterator[V2ServerHandle]:
    h = start_v2_server("127.0.0.1", 0, 0)
    yield h
    h.stop()


@pytest.fixture
def http_proxy(server: V2ServerHandle) -> Iterator[RecordingProxy]:
    p = RecordingProxy(("127.0.0.1", server.http_port))
    yield p
    p.close()


@pytest.fixture
def grpc_proxy(server: V2ServerHandle) -> Iterator[RecordingProxy]:
    p = RecordingProxy(("127.0.0.1", server.grpc_port))
    yield p
    p.close()


FP32 = np.array([[1.5, -2.25, 3.1415927], [np.float32(1e-30), -0.0, 65504.0]], dtype=np.float32)
INT64 = np.array([1, -(2**62), 2**40 + 7, -1], dtype=np.int64)
BYTES = np.array(["héllo wörld".encode(), b"", b"alice@example.com", b"x" * 300], dtype=object)
ECHO = (("fp32", FP32, "FP32"), ("int64", INT64, "INT64"), ("bytes", BYTES, "BYTES"))


def _http_infer(
    url: str, model: str, tensors: Any, binary: bool, version: str = "", outputs: Any = None
) -> Any:
    client = thttp.InferenceServerClient(url)
    try:
        inputs = []
        for name, arr, dt in tensors:
            x = thttp.InferInput(name, list(arr.shape), dt)
            x.set_data_from_numpy(arr, binary_data=binary)
            inputs.append(x)
        outs = (
            [thttp.InferRequestedOutput(n, binary_data=binary) for n in outputs]
            if outputs is not None
            else None
        )
        return client.infer(model, inputs, model_version=version, outputs=outs, request_id="r-1")
    finally:
        client.close()


def _grpc_infer(url: str, model: str, tensors: Any, version: str = "") -> Any:
    client = tgrpc.InferenceServerClient(url)
    try:
        inputs = []
        for name, arr, dt in tensors:
            x = tgrpc.InferInput(name, list(arr.shape), dt)
            x.set_data_from_numpy(arr)
            inputs.append(x)
        return client.infer(model, inputs, model_version=version, request_id="g-1")
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------
# REST


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_rest_echo_tensors_exact(http_proxy: RecordingProxy, binary: bool) -> None:
    names = [n for n, _, _ in ECHO]
    _http_infer(f"127.0.0.1:{http_proxy.port}", "echo", ECHO, binary, outputs=names)
    ex = _only_infer(exchanges(http_proxy, "http/1.1"))
    if binary:
        assert ex.request.header("inference-header-content-length") is not None
        assert ex.response is not None
        assert ex.response.header("inference-header-content-length") is not None
    ev = _event(ex)
    assert ev.protocol == "kserve-v2-rest"
    assert (ev.model, ev.version, ev.status, ev.error) == ("echo", "", "ok", "")
    assert ev.endpoint == "/v2/models/echo/infer"
    assert ev.request_id == "r-1"
    assert ev.requested_outputs == names
    assert (ev.client_cgroup, ev.server_cgroup) == (11, 22)
    assert ev.latency_ns == 5000
    assert not ev.request_truncated and not ev.response_truncated
    assert ev.payload_bytes == len(ex.request.body) > 0
    for name, arr, dt in ECHO:
        assert_exact(ev.inputs.get(name), arr)
        assert_exact(ev.outputs.get(name), arr)
        assert ev.input_datatypes[name] == dt
        assert ev.output_datatypes[name] == dt
    assert ev.texts == ["héllo wörld", "", "alice@example.com", "x" * 300]


ALL_TYPES = [
    ("BOOL", np.array([[True, False, True]], dtype=np.bool_)),
    ("UINT8", np.array([0, 1, 255], dtype=np.uint8)),
    ("UINT16", np.array([0, 65535], dtype=np.uint16)),
    ("UINT32", np.array([0, 2**32 - 1], dtype=np.uint32)),
    ("UINT64", np.array([0, 2**64 - 1], dtype=np.uint64)),
    ("INT8", np.array([-128, 0, 127], dtype=np.int8)),
    ("INT16", np.array([-(2**15), 2**15 - 1], dtype=np.int16)),
    ("INT32", np.array([[-(2**31)], [2**31 - 1]], dtype=np.int32)),
    ("INT64", np.array([-(2**63), 2**63 - 1], dtype=np.int64)),
    ("FP16", np.array([0.5, -65504.0, 6.1e-5], dtype=np.float16)),
    ("FP32", np.array([np.nan, np.inf, -np.inf, 1.17549435e-38], dtype=np.float32)),
    ("FP64", np.array([[np.pi, -1e308], [5e-324, 0.1]], dtype=np.float64)),
    ("BYTES", np.array([[b"\x00\xff\xfe"], [b"plain"]], dtype=object)),
]


@pytest.mark.parametrize(("datatype", "arr"), ALL_TYPES, ids=[t for t, _ in ALL_TYPES])
def test_rest_binary_every_datatype_exact(
    http_proxy: RecordingProxy, datatype: str, arr: npt.NDArray[Any]
) -> None:
    _http_infer(f"127.0.0.1:{http_proxy.port}", "echo", [("t", arr, datatype)], True, outputs=["t"])
    ev = _event(_only_infer(exchanges(http_proxy, "http/1.1")))
    assert ev.error == ""
    assert_exact(ev.inputs["t"], arr)
    assert_exact(ev.outputs["t"], arr)
    assert ev.input_datatypes["t"] == datatype


JSON_TYPES = [(t, a) for t, a in ALL_TYPES if t not in ("FP32", "BYTES", "FP16")] + [
    ("FP32", np.array([1.5, -3.4028235e38, 1e-45], dtype=np.float32)),
    ("BYTES", np.array([["text ✓", "more"]], dtype=object)),
]


@pytest.mark.parametrize(("datatype", "arr"), JSON_TYPES, ids=[t for t, _ in JSON_TYPES])
def test_rest_json_every_datatype_exact(
    http_proxy: RecordingProxy, datatype: str, arr: npt.NDArray[Any]
) -> None:
    _http_infer(f"127.0.0.1:{http_proxy.port}", "echo", [("t", arr, datatype)], False)
    ev = _event(_only_infer(exchanges(http_proxy, "http/1.1")))
    assert ev.error == ""
    want = arr
    if datatype == "BYTES":  # JSON carries BYTES as UTF-8 strings; the event holds bytes
        want = np.array([[s.encode() for s in row] for row in arr], dtype=object)
    assert_exact(ev.inputs["t"], want)
    assert_exact(ev.outputs["t"], want)


def test_rest_fraud_with_version_and_keepalive(http_proxy: RecordingProxy) -> None:
    rng = np.random.default_rng(7)
    from infertap.agent.testbed.fraud_model import example_transactions, predict_proba

    x = example_transactions(5, rng)
    client = thttp.InferenceServerClient(f"127.0.0.1:{http_proxy.port}")
    try:
        assert client.is_server_ready()
        assert client.get_model_metadata("fraud")["name"] == "fraud"
        for binary in (False, True):
            i = thttp.InferInput("features", [5, 8], "FP32")
            i.set_data_from_numpy(x, binary_data=binary)
            o = thttp.InferRequestedOutput("probability", binary_data=binary)
            r = client.infer("fraud", [i], model_version="1", outputs=[o])
            assert np.array_equal(r.as_numpy("probability"), predict_proba(x))
    finally:
        client.close()
    recs = http_proxy.snapshot()
    assert len(recs) == 1, "all four requests rode one keep-alive connection"
    exs = exchanges(http_proxy, "http/1.1")
    assert [e.request.path for e in exs] == [
        "/v2/health/ready",
        "/v2/models/fraud",
        "/v2/models/fraud/versions/1/infer",
        "/v2/models/fraud/versions/1/infer",
    ]
    assert to_inference_event(exs[0], SERVICE) is None  # health: not a model call
    assert to_inference_event(exs[1], SERVICE) is None  # metadata: not a model call
    for ex in exs[2:]:
        ev = _event(ex)
        assert (ev.model, ev.version, ev.status) == ("fraud", "1", "ok")
        assert_exact(ev.inputs["features"], x)
        assert_exact(ev.outputs["probability"], predict_proba(x))
        assert ev.requested_outputs == ["probability"]


def test_rest_errors_are_reported(http_proxy: RecordingProxy) -> None:
    url = f"127.0.0.1:{http_proxy.port}"
    bad = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(Exception, match="features"):
        _http_infer(url, "fraud", [("features", bad, "FP32")], False)
    with pytest.raises(Exception, match="not served"):
        _http_infer(url, "nosuch", [("x", bad, "FP32")], True)
    first, second = exchanges(http_proxy, "http/1.1")
    ev = _event(first)
    assert ev.status == "400" and "features" in ev.error
    assert_exact(ev.inputs["features"], bad)  # the request still decodes exactly
    ev2 = _event(second)
    assert ev2.status == "404" and ev2.model == "nosuch"
    assert_exact(ev2.inputs["x"], bad)


# ---------------------------------------------------------------------------------------------
# gRPC


def test_grpc_echo_raw_contents_exact(grpc_proxy: RecordingProxy) -> None:
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_proxy.port}")
    try:
        assert client.is_server_live() and client.is_model_ready("echo")
        inputs = []
        for name, arr, dt in ECHO:
            x = tgrpc.InferInput(name, list(arr.shape), dt)
            x.set_data_from_numpy(arr)
            inputs.append(x)
        r = client.infer("echo", inputs, request_id="g-1")
        for name, arr, _ in ECHO:
            assert_exact(r.as_numpy(name), arr)
    finally:
        client.close()
    exs = exchanges(grpc_proxy, "h2")
    assert {e.request.path for e in exs} == {
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ModelReady",
        "/inference.GRPCInferenceService/ModelInfer",
    }
    for e in exs:
        if not e.request.path.endswith("/ModelInfer"):
            assert to_inference_event(e, SERVICE) is None
    ex = _only_infer(exs)
    assert ex.request.is_grpc
    ev = _event(ex)
    assert ev.protocol == "kserve-v2-grpc"
    assert (ev.model, ev.status, ev.error, ev.request_id) == ("echo", "ok", "", "g-1")
    for name, arr, dt in ECHO:
        assert_exact(ev.inputs[name], arr)
        assert_exact(ev.outputs[name], arr)
        assert ev.input_datatypes[name] == dt
    assert "alice@example.com" in ev.texts


@pytest.mark.parametrize(("datatype", "arr"), ALL_TYPES, ids=[t for t, _ in ALL_TYPES])
def test_grpc_raw_every_datatype_exact(
    grpc_proxy: RecordingProxy, datatype: str, arr: npt.NDArray[Any]
) -> None:
    _grpc_infer(f"127.0.0.1:{grpc_proxy.port}", "echo", [("t", arr, datatype)], version="1")
    ev = _event(_only_infer(exchanges(grpc_proxy, "h2")))
    assert (ev.error, ev.version) == ("", "1")
    assert_exact(ev.inputs["t"], arr)
    assert_exact(ev.outputs["t"], arr)


TYPED: list[tuple[str, str, npt.NDArray[Any]]] = [
    ("BOOL", "bool_contents", np.array([True, False], dtype=np.bool_)),
    ("INT8", "int_contents", np.array([[-128, 127]], dtype=np.int8)),
    ("INT32", "int_contents", np.array([-(2**31), 5], dtype=np.int32)),
    ("INT64", "int64_contents", np.array([[2**62], [-3]], dtype=np.int64)),
    ("UINT16", "uint_contents", np.array([65535, 0], dtype=np.uint16)),
    ("UINT64", "uint64_contents", np.array([2**64 - 1], dtype=np.uint64)),
    ("FP32", "fp32_contents", np.array([0.1, -7.5], dtype=np.float32)),
    ("FP64", "fp64_contents", np.array([0.1, 1e300], dtype=np.float64)),
    ("BYTES", "bytes_contents", np.array([b"a\x00b", "ü".encode()], dtype=object)),
]


def test_grpc_typed_contents_exact(grpc_proxy: RecordingProxy) -> None:
    req = service_pb2.ModelInferRequest(model_name="echo", id="typed")
    for datatype, field_name, arr in TYPED:
        t = req.inputs.add(name=datatype.lower(), datatype=datatype, shape=list(arr.shape))
        getattr(t.contents, field_name).extend(arr.ravel().tolist())
    with grpc.insecure_channel(f"127.0.0.1:{grpc_proxy.port}") as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        resp = stub.ModelInfer(req)
    assert len(resp.raw_output_contents) == len(TYPED)
    ev = _event(_only_infer(exchanges(grpc_proxy, "h2")))
    assert ev.error == "" and ev.request_id == "typed"
    for datatype, _, arr in TYPED:
        assert_exact(ev.inputs[datatype.lower()], arr)
        assert_exact(ev.outputs[datatype.lower()], arr)


def test_grpc_typed_output_contents_decode() -> None:
    """Servers may answer with typed output contents (ours answers raw): decoded exactly too."""
    resp = service_pb2.ModelInferResponse(model_name="m", model_version="3")
    for datatype, field_name, arr in TYPED:
        t = resp.outputs.add(name=datatype, datatype=datatype, shape=list(arr.shape))
        getattr(t.contents, field_name).extend(arr.ravel().tolist())
    payload = kserve_v2.decode_grpc_response(resp)
    assert payload.problems == []
    for datatype, _, arr in TYPED:
        assert_exact(payload.tensors[datatype], arr)


def test_grpc_error_status(grpc_proxy: RecordingProxy) -> None:
    bad = np.zeros((1, 2), dtype=np.int64)
    with pytest.raises(Exception, match="INVALID_ARGUMENT"):
        _grpc_infer(f"127.0.0.1:{grpc_proxy.port}", "fraud", [("features", bad, "INT64")])
    ev = _event(_only_infer(exchanges(grpc_proxy, "h2")))
    assert ev.status == "INVALID_ARGUMENT"
    assert "features" in ev.error
    assert ev.outputs == {}
    assert_exact(ev.inputs["features"], bad)


# ---------------------------------------------------------------------------------------------
# Truncation and garbage


def _captured(http_proxy: RecordingProxy, binary: bool) -> HttpExchange:
    _http_infer(f"127.0.0.1:{http_proxy.port}", "echo", ECHO, binary, outputs=["fp32"])
    return exchanges(http_proxy, "http/1.1")[-1]  # the call just made


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_truncated_request_flagged_and_not_decoded(
    http_proxy: RecordingProxy, binary: bool
) -> None:
    ex = _captured(http_proxy, binary)
    body = ex.request.body
    for cut in (1, len(body) // 3, len(body) // 2, len(body) - 1):
        ex.request.body, ex.request.body_truncated = body[:cut], True
        ev = _event(ex)
        assert ev.request_truncated
        assert ev.inputs == {}  # missing is fine; a tensor from partial bytes is not
        assert (ev.model, ev.status) == ("echo", "ok")
        assert ev.payload_bytes == len(body)  # Content-Length still says what was sent
        assert_exact(ev.outputs["fp32"], FP32)
    assert adapter_counters()["request_truncated"] >= 4


def test_response_truncated_flagged(http_proxy: RecordingProxy) -> None:
    ex = _captured(http_proxy, True)
    assert ex.response is not None
    ex.response.body, ex.response.body_truncated = ex.response.body[:10], True
    ev = _event(ex)
    assert ev.response_truncated and ev.outputs == {}
    assert_exact(ev.inputs["int64"], INT64)


def test_binary_cut_without_flag_never_decodes_wrong(http_proxy: RecordingProxy) -> None:
    """If bytes go missing unflagged, every tensor that comes out is still exactly what was sent."""
    ex = _captured(http_proxy, True)
    body = ex.request.body
    want = {n: a for n, a, _ in ECHO}
    header = int(ex.request.header("inference-header-content-length") or 0)
    for cut in range(header, len(body)):
        ex.request.body = body[:cut]
        ev = _event(ex)
        assert ev.error  # the shortfall is reported
        for name, got in ev.inputs.items():
            assert_exact(got, want[name])


def test_grpc_truncated_request(grpc_proxy: RecordingProxy) -> None:
    _grpc_infer(f"127.0.0.1:{grpc_proxy.port}", "echo", ECHO)
    ex = _only_infer(exchanges(grpc_proxy, "h2"))
    ex.request.body = ex.request.body[:40]
    ex.request.grpc_messages = []
    ex.request.body_truncated = True
    ev = _event(ex)
    assert ev.request_truncated and ev.inputs == {}
    assert_exact(ev.outputs["int64"], INT64)  # the response was whole


def test_grpc_cut_bodies_still_name_the_model_from_their_first_bytes(
    grpc_proxy: RecordingProxy,
) -> None:
    """A ModelInfer request cut after its first bytes (the kernel keeps the head of every DATA
    frame) still says which model it called; cut before the name ends, it names none."""
    _grpc_infer(f"127.0.0.1:{grpc_proxy.port}", "echo", ECHO)
    ex = _only_infer(exchanges(grpc_proxy, "h2"))
    assert ex.response is not None
    whole, whole_response = ex.request.body, ex.response.body
    for cut, model in ((64, "echo"), (12, "echo"), (10, ""), (3, "")):
        for msg, body in ((ex.request, whole), (ex.response, whole_response)):
            msg.body, msg.grpc_messages, msg.body_truncated = body[:cut], [], True
        ev = _event(ex)
        assert ev.request_truncated and ev.response_truncated, cut
        assert ev.inputs == {} and ev.outputs == {} and ev.model == model, cut
    assert kserve_v2.names_in_prefix(b"\x00\x00\x00\x00\x09\x0a\x04echo\x12\x01") == ("echo", "")
    assert kserve_v2.names_in_prefix(b"\x00\x00\x00\x00\x09\x0a\x02\xff\xfe") == ("", "")


def _mutations(body: bytes, rnd: random.Random, n: int) -> Iterator[bytes]:
    for _ in range(n):
        b = bytearray(body)
        kind = rnd.randrange(4)
        if kind == 0 and b:
            for _ in range(rnd.randint(1, 8)):
                b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif kind == 1 and b:
            del b[rnd.randrange(len(b)) :]
        elif kind == 2 and b:
            i = rnd.randrange(len(b))
            del b[i : i + rnd.randint(1, 64)]
        else:
            b[rnd.randrange(len(b) + 1) : 0] = rnd.randbytes(rnd.randint(1, 32))
        yield bytes(b)


def _check_consistent(ev: InferenceEvent | None) -> None:
    """Whatever decoded from garbage is at least a well-formed tensor of its declared type."""
    if ev is None:
        return
    for name, arr in ev.inputs.items():
        dt = ev.input_datatypes.get(name)
        assert dt in kserve_v2.DTYPES
        assert arr.dtype == kserve_v2.DTYPES[dt]


def test_mutated_real_bodies_never_raise(
    http_proxy: RecordingProxy, grpc_proxy: RecordingProxy
) -> None:
    rnd = random.Random(1234)
    rest = [_captured(http_proxy, b) for b in (False, True)]
    _grpc_infer(f"127.0.0.1:{grpc_proxy.port}", "echo", ECHO)
    g = _only_infer(exchanges(grpc_proxy, "h2"))
    for ex in rest:
        body = ex.request.body
        for m in _mutations(body, rnd, 300):
            ex.request.body = m
            _check_consistent(to_inference_event(ex, SERVICE))
    body = g.request.grpc_messages[0]
    for m in _mutations(body, rnd, 300):
        g.request.grpc_messages = [m]
        _check_consistent(to_inference_event(g, SERVICE))
    assert adapter_counters().get("adapter_failures", 0) == 0


def _bare(path: str, body: bytes, proto: str = "http/1.1", grpc_ct: bool = False) -> HttpExchange:
    conn = ConnectionId(Endpoint("10.0.0.1", 5555), SERVICE)
    headers = [("content-type", "application/grpc")] if grpc_ct else []
    if "binary" in path:
        headers.append(("inference-header-content-length", str(len(body) // 2)))
    req = HttpMessage(
        conn, Direction.REQUEST, proto, 1, 2, method="POST", path=path, headers=headers, body=body
    )
    resp = HttpMessage(
        conn, Direction.RESPONSE, proto, 3, 4, status=200, headers=list(headers), body=body
    )
    if grpc_ct:
        req.grpc_messages = [body]
        resp.trailers = [("grpc-status", "0")]
    return HttpExchange(req, resp)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=400))
def test_random_bytes_never_raise(body: bytes) -> None:
    for path in ("/v2/models/m/infer", "/v2/models/m/versions/2/infer?binary"):
        ev = to_inference_event(_bare(path, body), SERVICE)
        assert ev is not None
        _check_consistent(ev)
    ev = to_inference_event(
        _bare("/inference.GRPCInferenceService/ModelInfer", body, "h2", True), SERVICE
    )
    assert ev is not None
    _check_consistent(ev)


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5))
_json = st.recursive(
    _json_leaf,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    inputs=st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "name": _json,
                "shape": st.lists(st.integers(-2, 4), max_size=3) | _json,
                "datatype": st.sampled_from(sorted(kserve_v2.DTYPES)) | _json,
                "data": _json,
                "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-5, 50)})
                | _json,
            },
        ),
        max_size=3,
    )
)
def test_v2_json_garbage_never_raises(inputs: list[dict[str, Any]]) -> None:
    import json

    body = json.dumps({"inputs": inputs}).encode()
    ev = to_inference_event(_bare("/v2/models/m/infer", body), SERVICE)
    assert ev is not None
    _check_consistent(ev)


def test_headers_unknown_and_non_model() -> None:
    ex = _bare("/v2/models/m/infer", b"{}")
    ex.request.headers_unknown = True
    assert to_inference_event(ex, SERVICE) is None
    assert to_inference_event(_bare("/api/users", b"{}"), SERVICE) is None
    get = _bare("/v2/models/m/infer", b"")
    get.request.method = "GET"
    assert to_inference_event(get, SERVICE) is None
    assert (
        to_inference_event(
            _bare("/inference.GRPCInferenceService/ServerLive", b"", "h2", True), SERVICE
        )
        is None
    )
    counters = adapter_counters()
    assert counters["headers_unknown"] >= 1 and counters["not_model"] >= 3


def test_raw_binary_request_without_json_header() -> None:
    """Inference-Header-Content-Length: 0 means one unnamed raw input: reported, not guessed."""
    ex = _bare("/v2/models/m/infer", b"\x00\x00\x80\x3f")
    ex.request.headers = [("inference-header-content-length", "0")]
    ev = _event(ex)
    assert ev.inputs == {} and "input name unknown" in ev.error


def test_grpc_stream_infer_first_message() -> None:
    """ModelStreamInfer: the first request and response messages are decoded."""
    req = service_pb2.ModelInferRequest(model_name="echo", model_version="1", id="s1")
    t = req.inputs.add(name="fp32", datatype="FP32", shape=list(FP32.shape))
    req.raw_input_contents.append(kserve_v2.encode_raw_tensor("FP32", FP32))
    out = service_pb2.ModelStreamInferResponse()
    o = out.infer_response.outputs.add(name="fp32", datatype="FP32", shape=list(FP32.shape))
    out.infer_response.raw_output_contents.append(kserve_v2.encode_raw_tensor("FP32", FP32))
    assert t.name == o.name
    ex = _bare("/inference.GRPCInferenceService/ModelStreamInfer", b"", "h2", True)
    ex.request.grpc_messages = [req.SerializeToString(), b"second message ignored"]
    assert ex.response is not None
    ex.response.grpc_messages = [out.SerializeToString()]
    ev = _event(ex)
    assert (ev.model, ev.version, ev.request_id, ev.status, ev.error) == (
        "echo",
        "1",
        "s1",
        "ok",
        "",
    )
    assert_exact(ev.inputs["fp32"], FP32)
    assert_exact(ev.outputs["fp32"], FP32)
    out.error_message = "model failed"
    ex.response.grpc_messages = [out.SerializeToString()]
    assert _event(ex).error == "model failed"


def test_grpc_body_deframed_when_wire_layer_did_not() -> None:
    req = service_pb2.ModelInferRequest(model_name="echo")
    req.inputs.add(name="i", datatype="INT64", shape=[4])
    req.raw_input_contents.append(kserve_v2.encode_raw_tensor("INT64", INT64))
    data = req.SerializeToString()
    ex = _bare("/inference.GRPCInferenceService/ModelInfer", b"", "h2", True)
    ex.request.grpc_messages = []
    ex.request.body = struct.pack(">BI", 0, len(data)) + data
    assert_exact(_event(ex).inputs["i"], INT64)
    ex.request.body = struct.pack(">BI", 1, len(data)) + data  # compressed, not decompressed
    ev = _event(ex)
    assert ev.inputs == {} and "compressed" in ev.error


def _stream_request(i: int, rid: str = "") -> bytes:
    req = service_pb2.ModelInferRequest(model_name="echo", id=rid)
    req.inputs.add(name="x", datatype="INT64", shape=[1])
    req.raw_input_contents.append(kserve_v2.encode_raw_tensor("INT64", np.array([i])))
    return bytes(req.SerializeToString())


def _stream_response(i: int, rid: str = "", error: str = "") -> bytes:
    out = service_pb2.ModelStreamInferResponse(error_message=error)
    out.infer_response.model_name = "echo"
    out.infer_response.id = rid
    out.infer_response.outputs.add(name="x", datatype="INT64", shape=[1])
    out.infer_response.raw_output_contents.append(
        kserve_v2.encode_raw_tensor("INT64", np.array([i]))
    )
    return bytes(out.SerializeToString())


def _stream(requests: list[bytes], responses: list[bytes]) -> list[InferenceEvent]:
    ex = _bare("/inference.GRPCInferenceService/ModelStreamInfer", b"", "h2", True)
    ex.request.grpc_messages = requests
    ex.request.grpc_message_ts = [100 * i for i in range(len(requests))]
    assert ex.response is not None
    ex.response.grpc_messages = responses
    ex.response.grpc_message_ts = [100 * i + 7 for i in range(len(responses))]
    return to_inference_events(ex, SERVICE)


def test_grpc_stream_every_message_is_a_call_paired_in_order_or_by_id() -> None:
    events = _stream(
        [_stream_request(i) for i in range(5)], [_stream_response(i) for i in range(5)]
    )
    assert [e.stream_index for e in events] == [0, 1, 2, 3, 4]
    for i, e in enumerate(events):
        assert e.inputs["x"].tolist() == [i] and e.outputs["x"].tolist() == [i]
        assert e.status == "ok" and not e.unpaired and e.latency_ns == 7 and e.ts_ns == 100 * i
    # With distinct ids, answers that come out of order still pair with their own request.
    ids = ["a", "b", "c"]
    events = _stream(
        [_stream_request(i, r) for i, r in enumerate(ids)],
        [_stream_response(i, ids[i]) for i in (2, 0, 1)],
    )
    assert [(e.inputs["x"].tolist(), e.outputs["x"].tolist()) for e in events] == [
        ([i], [i]) for i in range(3)
    ]
    # Latency from each pair's own messages (c's answer came first here: never negative).
    assert [e.latency_ns for e in events] == [107, 107, 0]


def test_grpc_stream_messages_that_cannot_be_paired_are_marked_incomplete() -> None:
    # Three requests, two answers (the stream ended): the last request is unanswered.
    events = _stream(
        [_stream_request(i) for i in range(3)], [_stream_response(i) for i in range(2)]
    )
    assert [e.unpaired for e in events] == [False, False, True]
    assert events[2].response_truncated and events[2].outputs == {} and events[2].error
    # An answer with no request (its request was not seen): its own event, request side missing.
    events = _stream([_stream_request(0)], [_stream_response(0), _stream_response(1)])
    assert [e.unpaired for e in events] == [False, True]
    assert events[1].request_truncated and events[1].outputs["x"].tolist() == [1]
    # A per-message error fails that call only.
    events = _stream(
        [_stream_request(i) for i in range(2)],
        [_stream_response(0, error="bad input"), _stream_response(1)],
    )
    assert [e.status for e in events] == ["error", "ok"] and events[0].error == "bad input"


# ---------------------------------------------------------------------------------------------
# The fast paths decide exactly what the general ones decide


def _outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        arr = fn(*args)
    except kserve_v2.V2DecodeError as exc:
        return "error", str(exc)
    return "tensor", (arr.dtype, arr.shape, arr.tolist())


def _general_json_tensor(datatype: object, shape: object, data: object) -> Any:
    """decode_json_tensor as it was before its flat-data fast path: every leaf walked."""
    datatype, dt = kserve_v2._dtype(datatype)
    dims, n = kserve_v2.element_count(shape)
    leaves = kserve_v2._flatten(data)
    if len(leaves) != n:
        raise kserve_v2.V2DecodeError("JSON element count does not match the shape")
    kserve_v2._check_json_leaves(datatype, leaves)
    if datatype == "BYTES":
        return kserve_v2._object_array([v.encode("utf-8") for v in leaves], dims)
    try:
        return np.array(leaves, dtype=dt).reshape(dims)
    except (OverflowError, ValueError, TypeError) as exc:
        raise kserve_v2.V2DecodeError("JSON data out of range for the datatype") from exc


_leaf = st.one_of(
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, width=64),
    st.text(max_size=3),
    st.none(),
)


@st.composite
def _json_tensor_args(draw: st.DrawFn) -> tuple[str, Any, Any]:
    datatype = draw(
        st.sampled_from(["BOOL", "INT8", "INT64", "UINT32", "FP16", "FP32", "FP64", "BYTES"])
    )
    data = draw(st.one_of(_leaf, st.lists(_leaf, max_size=6), st.lists(st.lists(_leaf))))
    n = len(kserve_v2._flatten(data))
    shape = draw(
        st.one_of(
            st.just([n]),  # mostly a shape that fits, so the leaf checks decide
            st.just([1, n]),
            st.lists(st.integers(-1, 6), max_size=3),
            st.just([True, n]),
            st.just((n,)),
        )
    )
    return datatype, data, shape


@settings(max_examples=800, deadline=None)
@given(args=_json_tensor_args())
def test_json_tensors_decode_as_the_general_path_decodes(args: tuple[str, Any, Any]) -> None:
    datatype, data, shape = args
    with np.errstate(over="ignore"):  # FP16 from big numbers: inf, on both paths
        fast = _outcome(kserve_v2.decode_json_tensor, datatype, shape, data)
        general = _outcome(_general_json_tensor, datatype, shape, data)
    assert repr(fast) == repr(general)


class _RefuseAll:
    def decode(self, doc: bytes) -> Any:
        raise ValueError("refused")


def test_msgspec_bodies_decode_as_json_decodes(
    http_proxy: RecordingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real bodies, and their mutations, decode the same through msgspec as through json."""
    rnd = random.Random(99)
    bodies: list[tuple[bytes, str | None]] = []
    for ex in [_captured(http_proxy, b) for b in (False, True)]:
        header = ex.request.header(kserve_v2.HEADER_LENGTH)
        bodies.append((bytes(ex.request.body), header))
        bodies += [(m, header) for m in _mutations(bytes(ex.request.body), rnd, 400)]
    doc = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [%s]}]}'
    for leaves in (b"1, 2.5, 1e400", b"NaN, 1, 2", b"1, true, 2", b'"\\ud800", 1, 2', b"1,2,3"):
        bodies.append((doc % leaves, None))
    bodies.append((b"\xef\xbb\xbf" + doc % b"1,2,3", None))  # a BOM: json takes it, msgspec not

    def run() -> list[Any]:
        out: list[Any] = []
        for body, header in bodies:
            try:
                p = kserve_v2.decode_rest_request(body, header)
            except kserve_v2.V2DecodeError as exc:
                out.append(("error", str(exc)))
                continue
            tensors = {k: (v.dtype, v.shape, v.tolist()) for k, v in p.tensors.items()}
            out.append((tensors, p.datatypes, p.parameters, p.problems, p.id))
        return out

    fast = run()
    monkeypatch.setattr(kserve_v2, "_JSON", _RefuseAll())
    assert repr(fast) == repr(run())  # repr: NaN equals NaN
    assert sum(o[0] != "error" for o in fast) > 50  # many decoded, not only errors compared
