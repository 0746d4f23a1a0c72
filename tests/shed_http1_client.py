"""Runs inside the client pod: V2 REST calls to the echo model over ONE keep-alive connection
(httpx), in batches the test asks for on stdin, so it can change the kernel's shed level between
them.

    python tests/shed_http1_client.py HOST PORT
    stdin:  "N START"  -> N calls, call i sending x = [START + i]; prints "ok N" when done
            "quit"

Each call's input is unique, and the echo model answers with it: a decoded call whose output is
not its input was paired with another call's response.
"""

from __future__ import annotations

import sys

import httpx


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as client:
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            n, start = (int(x) for x in line.split())
            for i in range(start, start + n):
                body = {"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [i]}]}
                r = client.post("/v2/models/echo/infer", json=body)
                r.raise_for_status()
                assert r.json()["outputs"][0]["data"] == [i]
            print(f"ok {n}", flush=True)


if __name__ == "__main__":
    main()
