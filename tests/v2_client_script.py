"""Runs inside the client pod: tritonclient (the real one) sends V2 requests to the echo model.

    python tests/v2_client_script.py HOST HTTP_PORT GRPC_PORT SEED [--big]

Tensors come from `tensors(seed)`, which the test calls too, so it knows exactly what was sent.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import numpy.typing as npt


def tensors(seed: int, big: bool = False) -> dict[str, tuple[str, npt.NDArray[Any]]]:
    rng = np.random.default_rng(seed)
    if big:  # far larger than one sample
        return {"big_fp32": ("FP32", rng.standard_normal((64, 1024)).astype(np.float32))}
    return {
        "x_fp32": ("FP32", rng.standard_normal((2, 3)).astype(np.float32)),
        "x_int64": ("INT64", rng.integers(-(10**12), 10**12, size=(4,), dtype=np.int64)),
        "x_bytes": ("BYTES", np.array([b"alpha", b"b\x00eta", "\u00fcml".encode()], dtype=object)),
    }


def main() -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    host, http_port, grpc_port, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    big = "--big" in sys.argv
    data = tensors(seed, big)

    http = httpclient.InferenceServerClient(url=f"{host}:{http_port}")
    for binary in (False, True):
        inputs = []
        for name, (dtype, arr) in data.items():
            inp = httpclient.InferInput(name, list(arr.shape), dtype)
            inp.set_data_from_numpy(arr, binary_data=binary)
            inputs.append(inp)
        http.infer("echo", inputs)
    http.close()
    if not big:
        grpc = grpcclient.InferenceServerClient(url=f"{host}:{grpc_port}")
        inputs = []
        for name, (dtype, arr) in data.items():
            ginp = grpcclient.InferInput(name, list(arr.shape), dtype)
            ginp.set_data_from_numpy(arr)
            inputs.append(ginp)
        grpc.infer("echo", inputs)
        grpc.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
