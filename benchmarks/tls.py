"""What TLS plaintext capture costs per TLS call, measured side by side in one run.

Between two pods, a TLS echo (Python's ssl, so OpenSSL's libssl.so.3 on both ends) does 512-byte
ping-pongs on one connection: each round trip is four TLS calls (client SSL_write_ex and
SSL_read_ex, server SSL_read_ex and SSL_write_ex). Three configurations, interleaved per round:

- none: no program on the pods;
- agent: the agent intercepting both pods (sockops, sk_msg sampling the ciphertext);
- agent_tls: the same plus the TLS unit (uprobes and uretprobes on libssl, the socket
  tracepoints, plaintext copied to the ring and decoded).

Reported: round trips/s and per-round-trip latency (p50, p99), ratios to "none", and the
uprobes' own cost per TLS call: (agent_tls p50 - agent p50) / 4. Root needed.

    .venv/bin/python -m benchmarks.tls [--round-trips N] [--rounds R] [--json]

--json prints one object: {"round_trips", "rounds", "tls_calls_per_round_trip",
"configs": {name: {"p50_us", "p99_us", "round_trips_per_s", "runs": [{"p50_us", "p99_us",
"round_trips_per_s"}]}}, "ratios": {name: {"p50", "p99", "round_trips_per_s"}},
"uprobe_us_per_tls_call", "tls_kernel_counters": {calls, bytes, samples, samples_lost,
no_socket, untracked}}. Keys are only ever added.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from infertap.agent.api.tls import make_dev_ca
from infertap.agent.runtime import Agent, AgentOptions
from infertap.agent.testbed.lab import Lab, Pod

PORT = 9443
SIZE = 512
TLS_CALLS_PER_ROUND_TRIP = 4
CONFIGS = ("none", "agent", "agent_tls")

SERVER = r"""
import socket, ssl, sys, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1] + "/server.pem", sys.argv[1] + "/server-key.pem")
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", int(sys.argv[2])))
ls.listen(16)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        s = ctx.wrap_socket(c, server_side=True)
        while True:
            data = s.recv(65536)
            if not data:
                break
            s.sendall(data)
    except (OSError, ssl.SSLError):
        pass
print("ready", flush=True)
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import json, socket, ssl, sys, time
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
n, size = int(sys.argv[4]), int(sys.argv[5])
ctx = ssl.create_default_context(cafile=ca)
raw = socket.create_connection((host, port))
raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s = ctx.wrap_socket(raw, server_hostname=host)
msg = b"x" * size
def once():
    s.sendall(msg)
    got = 0
    while got < size:
        got += len(s.recv(size - got))
for _ in range(200):
    once()
times = []
start = time.perf_counter()
for _ in range(n):
    t0 = time.perf_counter()
    once()
    times.append(time.perf_counter() - t0)
elapsed = time.perf_counter() - start
s.close()
times.sort()
print(json.dumps({"p50_us": times[n // 2] * 1e6, "p99_us": times[int(n * 0.99)] * 1e6,
                  "round_trips_per_s": n / elapsed}))
"""


def run_client(client: Pod, server: Pod, ca: Path, n: int) -> dict[str, float]:
    done = client.run(
        [sys.executable, "-c", CLIENT, server.ip, str(PORT), str(ca), str(n), str(SIZE)],
        timeout=600,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-800:])
    result: dict[str, float] = json.loads(done.stdout)
    return result


def set_config(agent: Agent, pods: tuple[Pod, Pod], name: str) -> None:
    attached = {str(p) for p in agent.sensor.attached}
    for pod in pods:
        want = name != "none"
        if want and str(pod.cgroup) not in attached:
            agent.sensor.attach(pod.cgroup)
        elif not want and str(pod.cgroup) in attached:
            agent.sensor.detach(pod.cgroup)
    if name == "agent_tls":
        agent.start_tls()  # its first scan hooks the echo server's libssl before returning
    else:
        agent.stop_tls()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--round-trips", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="one JSON object (shape in the doc)")
    args = ap.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    counters: dict[str, int] = {}
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        client, server = lab.add_pod("tls-bench-c"), lab.add_pod("tls-bench-s")
        certs = Path(tmp)
        make_dev_ca(certs, [server.ip], force=True)
        proc = server.popen(
            [sys.executable, "-c", SERVER, str(certs), str(PORT)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        agent = Agent(AgentOptions(cgroups=(str(client.cgroup),), metrics_addr=None, api_addr=None))
        agent.start()
        try:
            agent.sensor.detach(client.cgroup)
            for r in range(args.rounds):
                order = CONFIGS[r % 3 :] + CONFIGS[: r % 3]
                for name in order:
                    set_config(agent, (client, server), name)
                    runs[name].append(
                        run_client(client, server, certs / "ca.pem", args.round_trips)
                    )
                    if name == "agent_tls" and agent.tls is not None:
                        for key, value in agent.tls.stats().items():
                            counters[key] = counters.get(key, 0) + value
        finally:
            agent.stop()
    summary: dict[str, Any] = {
        "round_trips": args.round_trips,
        "rounds": args.rounds,
        "tls_calls_per_round_trip": TLS_CALLS_PER_ROUND_TRIP,
        "configs": {},
        "ratios": {},
        "tls_kernel_counters": counters,
    }
    for name in CONFIGS:
        summary["configs"][name] = {
            key: statistics.median(x[key] for x in runs[name])
            for key in ("p50_us", "p99_us", "round_trips_per_s")
        } | {"runs": runs[name]}
    base = summary["configs"]["none"]
    for name in CONFIGS:
        c = summary["configs"][name]
        summary["ratios"][name] = {
            "p50": c["p50_us"] / base["p50_us"],
            "p99": c["p99_us"] / base["p99_us"],
            "round_trips_per_s": c["round_trips_per_s"] / base["round_trips_per_s"],
        }
    added = summary["configs"]["agent_tls"]["p50_us"] - summary["configs"]["agent"]["p50_us"]
    summary["uprobe_us_per_tls_call"] = added / TLS_CALLS_PER_ROUND_TRIP
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"TLS echo, {SIZE}-byte ping-pong on one connection, {args.round_trips} round trips per"
        f" run ({TLS_CALLS_PER_ROUND_TRIP} TLS calls each), median of {args.rounds} interleaved"
        " rounds\n"
    )
    print("| configuration | p50 (us) | p99 (us) | round trips/s | p50 ratio | rate ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    labels = {
        "none": "TLS, no agent",
        "agent": "agent (ciphertext sampled)",
        "agent_tls": "agent + TLS uprobes (plaintext)",
    }
    for name in CONFIGS:
        c, ratio = summary["configs"][name], summary["ratios"][name]
        rate, rate_ratio = c["round_trips_per_s"], ratio["round_trips_per_s"]
        print(
            f"| {labels[name]} | {c['p50_us']:.1f} | {c['p99_us']:.1f} |"
            f" {rate:.0f} | {ratio['p50']:.2f}x | {rate_ratio:.2f}x |"
        )
    print(
        f"\nUprobe cost per TLS call (p50 difference / {TLS_CALLS_PER_ROUND_TRIP}):"
        f" {summary['uprobe_us_per_tls_call']:.2f} us"
    )
    print(f"TLS unit kernel counters over its rounds: {counters}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
