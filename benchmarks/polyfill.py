"""Request polyfill's cost, measured side by side: the same V2 request loop against a real V2
server, from a pod whose connections go direct, and from a pod steered through the rewriter
(relayed unchanged, and rewritten). Interleaved rounds, medians. Root needed.

    .venv/bin/python -m benchmarks.polyfill [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from infertap.agent.flows.records import Endpoint
from infertap.agent.kernel.steering import Steering
from infertap.agent.polyfill.unit import ClientPod, Polyfill, PolyfillRule
from infertap.agent.testbed.lab import Lab, Pod
from infertap.agent.testbed.v2server import start_in_pod

PORT = 8000
# One keep-alive connection, N requests of the fraud model's [1, 8] input; prints p50/p99 in us.
LOOP = r"""
import http.client, json, socket, sys, time
host, port, model, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
body = json.dumps({"inputs": [{"name": "features", "shape": [1, 8], "datatype": "FP32",
                               "data": [50.0, 40, 24, 2, 0.2, 10.0, 0, 12]}]}).encode()
conn = http.client.HTTPConnection(host, port, timeout=10)
conn.connect()
conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for _ in range(n):
    t0 = time.perf_counter()
    conn.request("POST", f"/v2/models/{model}/infer", body=body,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status
    times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"p50": times[n // 2] * 1e6, "p99": times[int(n * 0.99)] * 1e6}))
"""


def loop(pod: Pod, server: Pod, model: str, n: int) -> dict[str, float]:
    done = pod.run(
        [sys.executable, "-c", LOOP, server.ip, str(PORT), model, str(n)],
        timeout=300,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-500:])
    result: dict[str, float] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    with Lab() as lab, Steering() as steering:
        direct, steered, server = lab.add_pod("direct"), lab.add_pod("steered"), lab.add_pod("v2")
        start_in_pod(server, PORT, 8001)
        for pod in (direct, steered):
            steering.attach(pod.cgroup)  # both carry the hook; only the rule's pod is steered
        unit = Polyfill(steering)
        try:
            # The rule adds a parameter to `fraud` calls; `echo` calls are relayed unchanged.
            unit.set_rules(
                [
                    PolyfillRule(
                        ClientPod(steered.cgroup, steered.netns),
                        Endpoint(server.ip, PORT),
                        "fraud",
                        None,
                        {"threshold": 0.5},
                    )
                ]
            )
            runs: dict[str, list[dict[str, float]]] = {"direct": [], "relayed": [], "rewritten": []}
            cases: list[tuple[str, Pod, str]] = [
                ("direct", direct, "fraud"),
                ("relayed", steered, "echo"),
                ("rewritten", steered, "fraud"),
            ]
            for r in range(args.rounds):
                for name, pod, model in cases[r % 3 :] + cases[: r % 3]:
                    runs[name].append(loop(pod, server, model, args.requests))
        finally:
            unit.stop()
    rows: list[dict[str, Any]] = []
    base = statistics.median(x["p50"] for x in runs["direct"])
    print(
        f"Request polyfill: {args.requests} V2 REST requests per run on one keep-alive "
        f"connection, median of {args.rounds} interleaved rounds\n"
    )
    print("| path | p50 (us) | p99 (us) | p50 ratio |\n|---|---:|---:|---:|")
    labels = {
        "direct": "direct (not steered)",
        "relayed": "steered, relayed unchanged",
        "rewritten": "steered, parameter added",
    }
    for name, label in labels.items():
        p50 = statistics.median(x["p50"] for x in runs[name])
        p99 = statistics.median(x["p99"] for x in runs[name])
        rows.append({"path": name, "p50_us": p50, "p99_us": p99})
        print(f"| {label} | {p50:.0f} | {p99:.0f} | {p50 / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
