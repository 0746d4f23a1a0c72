"""Runs inside the client pod: tritonclient.grpc async_infer calls, CONCURRENCY at a time on one
channel, for ROUNDS rounds, against the echo model (issue #11's busy channel).

    python tests/grpc_busy_channel_script.py HOST GRPC_PORT ROUNDS CONCURRENCY FLOATS

Each call sends one FP32 tensor of FLOATS values (seeded by the call's number, so the test knows
what was sent) named `busy<FLOATS>_<n>`. Prints `done N` with the number of calls that succeeded.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any

import numpy as np
import numpy.typing as npt


def tensor(n: int, floats: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(n).standard_normal(floats).astype(np.float32)


def _callback(results: list[Any], done: threading.Semaphore, result: Any, error: Any) -> None:
    results.append(error)
    done.release()


def main() -> None:
    import tritonclient.grpc as grpcclient

    host, port = sys.argv[1], sys.argv[2]
    rounds, concurrency, floats = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    client = grpcclient.InferenceServerClient(url=f"{host}:{port}")
    ok = 0
    for r in range(rounds):
        done = threading.Semaphore(0)
        results: list[Any] = []

        callback = functools.partial(_callback, results, done)
        for c in range(concurrency):
            n = r * concurrency + c
            inp = grpcclient.InferInput(f"busy{floats}_{n}", [floats], "FP32")
            inp.set_data_from_numpy(tensor(n, floats))
            client.async_infer("echo", [inp], callback)
        for _ in range(concurrency):
            if not done.acquire(timeout=30):
                raise SystemExit("a call did not complete")
        ok += sum(1 for e in results if e is None)
    client.close()
    print(f"done {ok}", flush=True)


if __name__ == "__main__":
    main()
