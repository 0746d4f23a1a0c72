"""What the HTTP/2 frame walk costs (skb capture keeps every header block whole, see
bpf/intercept.c sample_h2): bulk HTTP/2 throughput between two pods with no agent, with the
agent and the walk on (the default), and with the agent and the walk off, side by side in one
run, interleaved rounds, medians. Root needed.

    .venv/bin/python -m benchmarks.h2walk [--seconds N] [--rounds R] [--json]

The client writes the HTTP/2 client preface and then, as fast as one TCP stream takes them,
pre-encoded frames in one of two mixes; the server reads and discards. The preface is what makes
the kernel walk the flow's frames.

  bulk   16 KiB DATA frames (a large tensor): a few frames per skb, one piece each beyond the sample
  calls  a 120-byte HEADERS and a 1 KiB DATA frame per call (concurrent small gRPC calls): dozens
         of frames per skb, the walk's worst common case (up to 16 pieces per skb)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from infertap.agent.testbed.lab import Lab, Pod

PORT = 8443
MIXES = ("bulk", "calls")

# Reads and discards until the client closes; prints the bytes it got.
SERVER = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(8)
print("ready", flush=True)
buf = bytearray(1 << 20)
while True:
    conn, _ = srv.accept()
    while conn.recv_into(buf):
        pass
    conn.close()
"""

# Sends the preface, then the mix's frames for N seconds; prints bytes sent per second.
CLIENT = r"""
import os, socket, struct, sys, time
host, port, mix, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
def frame(ftype, flags, sid, payload):
    n = len(payload)
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, ftype, flags, sid) + payload
parts = []
if mix == "bulk":
    data = os.urandom(16384)
    parts = [frame(0, 0, 1, data) for _ in range(64)]
else:
    block = os.urandom(120)
    data = os.urandom(1024)
    for i in range(900):
        sid = 2 * i + 1
        parts += [frame(1, 4, sid, block), frame(0, 1, sid, data)]
chunk = b"".join(parts)
s = socket.create_connection((host, port))
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b""))
sent, t0 = 0, time.monotonic()
while time.monotonic() - t0 < seconds:
    s.sendall(chunk)
    sent += len(chunk)
elapsed = time.monotonic() - t0
s.close()
print(sent * 8 / elapsed / 1e9)
"""


def serve(pod: Pod) -> None:
    import subprocess

    proc = pod.popen([sys.executable, "-c", SERVER, str(PORT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the discard server did not start in pod {pod.name}")


def send(client: Pod, server: Pod, mix: str, seconds: int) -> float:
    done = client.run(
        [sys.executable, "-c", CLIENT, server.ip, str(PORT), mix, str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-1000:])
    return float(done.stdout.strip())


@contextlib.contextmanager
def started_agent(client: Pod, server: Pod, walk: bool) -> Iterator[Any]:
    from infertap.agent.runtime import Agent, AgentOptions

    agent = Agent(
        AgentOptions(
            cgroups=(str(client.cgroup), str(server.cgroup)),
            ports=(PORT,),
            metrics_addr=None,
            api_addr=None,
        )
    )
    agent.start()
    try:
        agent.sensor.set_http2_frames(walk)
        yield agent
    finally:
        agent.stop()


COUNTERS = ("samples", "samples_lost", "h2_frames", "h2_pieces", "h2_walk_lost")


def run(seconds: int, rounds: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(Lab())
        pods = {k: (lab.add_pod(f"h2{k}-c"), lab.add_pod(f"h2{k}-s")) for k in ("n", "w", "o")}
        walk = stack.enter_context(started_agent(*pods["w"], walk=True))
        nowalk = stack.enter_context(started_agent(*pods["o"], walk=False))
        for _, server in pods.values():
            serve(server)
        configs = [
            ("none", "no agent", pods["n"]),
            ("walk", "agent, skb capture, HTTP/2 frame walk on (default)", pods["w"]),
            ("no_walk", "agent, skb capture, frame walk off", pods["o"]),
        ]
        results: dict[str, dict[str, list[float]]] = {
            k: {m: [] for m in MIXES} for k, _, _ in configs
        }
        for r in range(rounds):
            shift = r % len(configs)
            for key, _label, (client, server) in configs[shift:] + configs[:shift]:
                for mix in MIXES:
                    gbps = send(client, server, mix, seconds)
                    results[key][mix].append(gbps)
                    print(
                        f"round {r + 1}/{rounds} {key:8} {mix:6} {gbps:6.2f} Gbit/s",
                        file=sys.stderr,
                    )
        counters = {
            key: {k: a.sensor.stats().get(k, 0) for k in COUNTERS}
            for key, a in (("walk", walk), ("no_walk", nowalk))
        }
    base = {m: statistics.median(results["none"][m]) for m in MIXES}
    rows: list[dict[str, Any]] = []
    for key, label, _ in configs:
        med = {m: statistics.median(results[key][m]) for m in MIXES}
        rows.append(
            {
                "config": key,
                "label": label,
                "gbps": med,
                "ratio": {m: med[m] / base[m] for m in MIXES},
                "rounds": results[key],
            }
        )
    return {
        "seconds": seconds,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "configs": rows,
        "agent_counters": counters,
        # The walk row measured nothing if the kernel never walked a frame.
        "valid": counters["walk"]["h2_frames"] > 0 and counters["no_walk"]["h2_frames"] == 0,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"HTTP/2 throughput, client pod -> server pod, one TCP stream, median of {result['rounds']}"
        f" interleaved rounds of {result['seconds']} s ({result['cpus']} CPUs, kernel "
        f"{result['kernel']}).",
        "",
        "| configuration | bulk (Gbit/s) | bulk ratio | calls (Gbit/s) | calls ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["configs"]:
        g, r = row["gbps"], row["ratio"]
        lines.append(
            f"| {row['label']} | {g['bulk']:.2f} | {r['bulk']:.2f}x | {g['calls']:.2f} "
            f"| {r['calls']:.2f}x |"
        )
    lines.append("")
    for key, c in result["agent_counters"].items():
        lines.append(
            f"Kernel counters, {key}: {c['samples']:,} samples, {c['samples_lost']:,} lost (ring "
            f"full), {c['h2_frames']:,} frame headers walked, {c['h2_pieces']:,} extra pieces, "
            f"{c['h2_walk_lost']:,} walks lost."
        )
    if not result["valid"]:
        lines += ["", "INVALID: the walk row walked no frame (or the walk-off row did)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("must run as root (BPF programs, network namespaces, cgroups)")
    result = run(args.seconds, args.rounds)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0 if result["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
