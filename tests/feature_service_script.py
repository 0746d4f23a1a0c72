"""Runs inside a test pod: a feature service that is itself a KServe V2 REST model ("scorer").

    python tests/feature_service_script.py PORT MODEL_HOST MODEL_GRPC_PORT

For each infer call it turns the request into 8 features and asks the "fraud" model over gRPC
(tritonclient.grpc, one channel opened at start), then answers with the fraud probability. It
knows nothing of tracing: it forwards no header, so only the kernel can see the chain.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

MODEL: Any = None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        doc = json.loads(body)
        amount = next(float(i["data"][0]) for i in doc["inputs"] if i["name"] == "amount")
        features = np.full((1, 8), amount / 100.0, dtype=np.float32)
        inp = grpcclient.InferInput("features", [1, 8], "FP32")
        inp.set_data_from_numpy(features)
        result = MODEL.infer("fraud", [inp])
        p = float(result.as_numpy("probability")[0][0])
        out = json.dumps(
            {
                "model_name": "scorer",
                "outputs": [{"name": "probability", "shape": [1], "datatype": "FP32", "data": [p]}],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def main() -> None:
    global MODEL
    port, host, grpc_port = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    MODEL = grpcclient.InferenceServerClient(url=f"{host}:{grpc_port}")
    assert MODEL.is_server_ready()  # opens the channel now, while the agent watches
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
