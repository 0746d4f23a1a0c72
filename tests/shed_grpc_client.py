"""Runs inside the client pod: V2 gRPC calls to the echo model (tritonclient.grpc), each batch on
new connections, in batches the test asks for on stdin.

    python tests/shed_grpc_client.py HOST PORT
    stdin:  "CONNS CALLS START" -> CONNS connections one after the other, CALLS calls on each;
            connection c's call i sends x = [START + c * CALLS + i]; prints "ok" when done
            "quit"
"""

from __future__ import annotations

import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        conns, calls, start = (int(x) for x in line.split())
        for c in range(conns):
            # A local subchannel pool: a new TCP connection per client, not grpcio's shared one.
            client = grpcclient.InferenceServerClient(
                url=f"{host}:{port}", channel_args=[("grpc.use_local_subchannel_pool", 1)]
            )
            for i in range(calls):
                value = start + c * calls + i
                inp = grpcclient.InferInput("x", [1], "INT64")
                inp.set_data_from_numpy(np.array([value], dtype=np.int64))
                result = client.infer("echo", [inp])
                assert int(result.as_numpy("x")[0]) == value
            client.close()
        print("ok", flush=True)


if __name__ == "__main__":
    main()
