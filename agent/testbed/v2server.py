"""A small but real KServe V2 model server: REST (HTTP/1.1 keep-alive) and gRPC.

Models:
- "fraud": logistic regression (fraud_model.py). Input "features" FP32 [N, 8]; outputs
  "probability" FP32 [N, 1] and "is_fraud" BOOL [N, 1].
- "echo": returns every input unchanged as an output of the same name and datatype (any datatype,
  any shape), so tests can check exact round trips.

REST: GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{m}[/versions/{v}] (metadata),
.../ready; POST .../infer with JSON or the binary tensor extension (outputs come back binary when
asked for with `binary_data`, or `binary_data_output` for all). gRPC: tritonclient's
inference.GRPCInferenceService (ServerLive, ServerReady, ServerMetadata, ModelReady,
ModelMetadata, ModelInfer, and bidirectional ModelStreamInfer: one response message per request
message, in order); replies carry raw_output_contents, as Triton's do.

In-process: `start_v2_server(host, http_port, grpc_port)` (port 0 picks a free one). As a
process: `python -m infertap.agent.testbed.v2server --host H --http-port P --grpc-port Q`, which
prints one "ready" line and runs until SIGTERM/SIGINT. Never logs tensor values.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy.typing as npt
from tritonclient.grpc import service_pb2, service_pb2_grpc

from infertap.agent.models import kserve_v2
from infertap.agent.models.kserve_v2 import V2DecodeError, V2Payload
from infertap.agent.testbed import fraud_model
from infertap.agent.testbed.lab import Pod

SERVER_NAME = "infertap-v2server"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data"]
MAX_BODY = 64 * 1024 * 1024  # refuse larger requests rather than buffer them


class ModelError(Exception):
    """A request the model cannot serve: 400 over REST, INVALID_ARGUMENT over gRPC."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


Outputs = dict[str, tuple[str, npt.NDArray[Any]]]  # name -> (datatype, array)


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    run: Callable[[V2Payload], Outputs]

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": self.platform,
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
        }


def _run_fraud(req: V2Payload) -> Outputs:
    x = req.tensors.get("features")
    if x is None or req.datatypes.get("features") != "FP32":
        raise ModelError("fraud expects one FP32 input named 'features'")
    if x.ndim != 2 or x.shape[1] != fraud_model.N_FEATURES:
        raise ModelError(f"'features' must have shape [N, {fraud_model.N_FEATURES}]")
    p, flagged = fraud_model.predict(x)
    return {"probability": ("FP32", p), "is_fraud": ("BOOL", flagged)}


def _run_echo(req: V2Payload) -> Outputs:
    return {name: (req.datatypes[name], arr) for name, arr in req.tensors.items()}


MODELS: dict[str, Model] = {
    "fraud": Model(
        name="fraud",
        versions=("1",),
        platform="numpy_logistic_regression",
        inputs=(TensorSpec("features", "FP32", (-1, fraud_model.N_FEATURES)),),
        outputs=(
            TensorSpec("probability", "FP32", (-1, 1)),
            TensorSpec("is_fraud", "BOOL", (-1, 1)),
        ),
        run=_run_fraud,
    ),
    # Echo accepts any tensors; the metadata lists the three it is usually called with.
    "echo": Model(
        name="echo",
        versions=("1",),
        platform="echo",
        inputs=(
            TensorSpec("fp32", "FP32", (-1,)),
            TensorSpec("int64", "INT64", (-1,)),
            TensorSpec("bytes", "BYTES", (-1,)),
        ),
        outputs=(
            TensorSpec("fp32", "FP32", (-1,)),
            TensorSpec("int64", "INT64", (-1,)),
            TensorSpec("bytes", "BYTES", (-1,)),
        ),
        run=_run_echo,
    ),
}


class NotFound(Exception):
    pass


def find_model(name: str, version: str) -> Model:
    model = MODELS.get(name)
    if model is None or (version and version not in model.versions):
        raise NotFound(f"model '{name}' version '{version}' is not served here")
    return model


def run_model(model: Model, req: V2Payload) -> Outputs:
    """Run a decoded request and keep only the requested outputs (all when none are named)."""
    if req.problems:
        raise ModelError("invalid input tensors: " + "; ".join(req.problems))
    outputs = model.run(req)
    if req.requested_outputs:
        missing = [n for n in req.requested_outputs if n not in outputs]
        if missing:
            raise ModelError(f"unknown output(s) requested: {', '.join(missing)}")
        outputs = {n: outputs[n] for n in req.requested_outputs}
    return outputs


def _is_true(value: object) -> bool:
    return value is True


# ---------------------------------------------------------------------------------------------
# REST


def rest_infer_response(model: Model, req: V2Payload, outputs: Outputs) -> tuple[bytes, int | None]:
    """(body, JSON header length or None) of a V2 REST infer response."""
    all_binary = _is_true(req.parameters.get("binary_data_output"))
    specs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, (datatype, arr) in outputs.items():
        spec: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        asked = req.requested_outputs.get(name, {})
        binary = _is_true(asked.get("binary_data")) if "binary_data" in asked else all_binary
        if binary:
            blob = kserve_v2.encode_raw_tensor(datatype, arr)
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            spec["data"] = kserve_v2.json_data(datatype, arr)
        specs.append(spec)
    doc: dict[str, Any] = {
        "model_name": model.name,
        "model_version": model.versions[-1],
        "outputs": specs,
    }
    if req.id:
        doc["id"] = req.id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every reply carries Content-Length
    # Headers and body go out in two writes; with Nagle on, a keep-alive client's next request
    # waits for the delayed ACK (about 40 ms per call).
    disable_nagle_algorithm = True
    server_version = SERVER_NAME

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: request lines are not interesting in tests and demo output

    def _reply(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._reply(status, json.dumps(obj, separators=(",", ":")).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts: list[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > MAX_BODY:
                    raise ModelError("request body too large")
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            body = b"".join(parts)
        else:
            length = int(self.headers.get("Content-Length", "0"))
            if length > MAX_BODY:
                raise ModelError("request body too large")
            body = self.rfile.read(length)
        encoding = self.headers.get("Content-Encoding", "").lower()
        if encoding == "gzip":
            body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        elif encoding not in ("", "identity"):
            raise ModelError(f"unsupported Content-Encoding {encoding}")
        return body

    def _model_path(self) -> tuple[str, str, str] | None:
        """(model, version, rest) for /v2/models/{m}[/versions/{v}][/rest]."""
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        if len(parts) < 3 or parts[:2] != ["v2", "models"]:
            return None
        name, rest = parts[2], parts[3:]
        version = ""
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        return name, version, "/".join(rest)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/v2/health/live", "/v2/health/ready"):
            self._reply(200)
            return
        if path == "/v2":
            self._json(
                200, {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}
            )
            return
        parsed = self._model_path()
        if parsed is None:
            self._error(404, "not found")
            return
        name, version, rest = parsed
        try:
            model = find_model(name, version)
        except NotFound as exc:
            self._error(404, str(exc))
            return
        if rest == "":
            self._json(200, model.metadata())
        elif rest == "ready":
            self._reply(200)
        else:
            self._error(404, "not found")

    def do_POST(self) -> None:
        parsed = self._model_path()
        try:
            body = self._read_body()
        except (ModelError, ValueError, zlib.error) as exc:
            self.close_connection = True  # the body may not have been read: resync impossible
            self._error(400, f"bad request body: {type(exc).__name__}")
            return
        if parsed is None or parsed[2] != "infer":
            self._error(404, "not found")
            return
        name, version, _ = parsed
        try:
            model = find_model(name, version)
            req = kserve_v2.decode_rest_request(
                body, self.headers.get("Inference-Header-Content-Length")
            )
            outputs = run_model(model, req)
            out, header_len = rest_infer_response(model, req, outputs)
        except NotFound as exc:
            self._error(404, str(exc))
            return
        except (V2DecodeError, ModelError) as exc:
            self._error(400, str(exc))
            return
        if header_len is None:
            self._reply(200, out)
        else:
            self._reply(
                200,
                out,
                content_type="application/octet-stream",
                extra={"Inference-Header-Content-Length": str(header_len)},
            )


# ---------------------------------------------------------------------------------------------
# gRPC


def grpc_infer_response(model: Model, req: V2Payload, outputs: Outputs) -> Any:
    resp = service_pb2.ModelInferResponse(
        model_name=model.name, model_version=model.versions[-1], id=req.id
    )
    for name, (datatype, arr) in outputs.items():
        resp.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        resp.raw_output_contents.append(kserve_v2.encode_raw_tensor(datatype, arr))
    return resp


class _Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return service_pb2.ServerReadyResponse(ready=True)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return service_pb2.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS
        )

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            find_model(request.name, request.version)
        except NotFound:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            model = find_model(request.name, request.version)
        except NotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        md = model.metadata()
        resp = service_pb2.ModelMetadataResponse(
            name=md["name"], versions=md["versions"], platform=md["platform"]
        )
        for t in model.inputs:
            resp.inputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        for t in model.outputs:
            resp.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        return resp

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            model = find_model(request.model_name, request.model_version)
            req = kserve_v2.decode_grpc_request(request)
            outputs = run_model(model, req)
        except NotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (V2DecodeError, ModelError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return grpc_infer_response(model, req, outputs)

    def ModelStreamInfer(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        """Bidirectional streaming, as Triton's: one response message per request message, in
        order; a request that fails gets a response with `error_message` and the stream goes on."""
        for request in request_iterator:
            try:
                model = find_model(request.model_name, request.model_version)
                req = kserve_v2.decode_grpc_request(request)
                outputs = run_model(model, req)
            except (NotFound, V2DecodeError, ModelError) as exc:
                yield service_pb2.ModelStreamInferResponse(error_message=str(exc))
                continue
            yield service_pb2.ModelStreamInferResponse(
                infer_response=grpc_infer_response(model, req, outputs)
            )


# ---------------------------------------------------------------------------------------------
# Lifecycle


class V2ServerHandle:
    """A running server; `stop()` ends both listeners."""

    def __init__(self, http: ThreadingHTTPServer, grpc_server: grpc.Server, grpc_port: int):
        self._http = http
        self._grpc = grpc_server
        self.host = str(http.server_address[0])
        self.http_port = int(http.server_address[1])
        self.grpc_port = grpc_port
        self._thread = threading.Thread(target=http.serve_forever, name="v2-http", daemon=True)
        self._thread.start()

    @property
    def http_url(self) -> str:
        """host:port, as tritonclient.http wants it."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._grpc.stop(grace=None).wait()
        self._thread.join(timeout=5)


def start_v2_server(
    host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0, tls_dir: Path | None = None
) -> V2ServerHandle:
    """Start the REST and gRPC listeners in background threads. Port 0 picks a free port.
    `tls_dir` (server.pem, server-key.pem, as `infertap certs dev-ca` writes them): both speak
    TLS, REST through Python's ssl (OpenSSL), gRPC through grpcio's own (BoringSSL)."""
    http = ThreadingHTTPServer((host, http_port), _Handler)
    http.daemon_threads = True
    grpc_creds = None
    if tls_dir is not None:
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_dir / "server.pem", tls_dir / "server-key.pem")
        http.socket = ctx.wrap_socket(http.socket, server_side=True)
        grpc_creds = grpc.ssl_server_credentials(
            [((tls_dir / "server-key.pem").read_bytes(), (tls_dir / "server.pem").read_bytes())]
        )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="v2-grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_BODY),
            ("grpc.max_send_message_length", MAX_BODY),
        ],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(), server)
    bind = f"[{host}]:{grpc_port}" if ":" in host else f"{host}:{grpc_port}"
    try:
        if grpc_creds is not None:
            bound = server.add_secure_port(bind, grpc_creds)
        else:
            bound = server.add_insecure_port(bind)
    except RuntimeError:
        http.server_close()
        raise
    if bound == 0:
        http.server_close()
        raise OSError(f"cannot bind gRPC to {bind}")
    server.start()
    return V2ServerHandle(http, server, bound)


def start_in_pod(pod: Pod, http_port: int, grpc_port: int, tls_dir: Path | None = None) -> str:
    """Run this server inside a test pod (its cgroup and network namespace) on all its addresses,
    and wait until it serves. Returns its ready line; raises if it does not come up."""
    proc = pod.popen(
        [
            sys.executable,
            "-m",
            "infertap.agent.testbed.v2server",
            "--host",
            "0.0.0.0",
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            *(["--tls-dir", str(tls_dir)] if tls_dir is not None else []),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip() if proc.stdout is not None else ""
    if not line.startswith("v2server ready"):
        raise RuntimeError(f"the V2 server did not start in pod {pod.name}: {line!r}")
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="KServe V2 test model server (fraud, echo)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--tls-dir", type=Path, default=None, help="serve TLS with server.pem")
    args = ap.parse_args(argv)
    done = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    handle = start_v2_server(args.host, args.http_port, args.grpc_port, args.tls_dir)
    print(
        f"v2server ready http={handle.http_url} grpc={handle.grpc_url} models={','.join(MODELS)}",
        flush=True,
    )
    while not done.wait(1.0):
        pass
    handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
