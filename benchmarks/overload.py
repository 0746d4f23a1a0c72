"""Overload benchmark: the agent under 3x the load one inspection worker sustains, on real
interception, shedding whole requests instead of tearing them.

One Lab (client and server pods), nginx (Debian's nginx-light) in the server pod answering every
POST on port 8000 with a fixed KServe V2 JSON response, h2load (Debian's nghttp2-client) in the
client pod sending V2 REST infer requests over HTTP/1.1 keep-alive connections, and the real
Agent in this process intercepting both pods (default skb capture, default sampling, the
built-in policy: PII and drift on as in `infertap run`).

1. Calibration (same run): the agent with one worker and shedding held off takes an unthrottled
   load; what it decodes, over the time from the load's start until its ring has drained, is
   what one worker sustains (`capacity_per_s`).
2. Each case: a fresh agent (1 worker; 2 with `--workers 1 2`), shedding under its controller,
   h2load offering 3 x capacity (`--rps` per client) for `--seconds` (default 30). Measured over
   the window: model calls decoded per second (until the ring drained after the load), share
   skipped (infertap_inspection_skipped_total over skipped + decoded), decode errors (every
   decode loss, target 0), samples lost in the kernel (samples_lost + events_lost, target 0),
   the highest shed level, and the agent's peak RSS (this process plus its worker processes;
   target < 300 MB with 2 workers).

Run as root: .venv/bin/python -m benchmarks.overload [--seconds N] [--workers 1 2] [--json]

--json prints one top-level key per case, each with `events_per_s`:
  {"calibration": {events_per_s, seconds, decoded, samples_lost},
   "overload_1_worker": {events_per_s, offered_per_s, achieved_per_s, capacity_per_s, seconds,
                         decoded, skipped, skipped_share, decode_errors, samples_lost,
                         shed_level_max, agent_rss_mb (peak of the sum), agent_process_rss_mb
                         (this process: the agent, BCC and its LLVM), workers_rss_mb (the
                         worker processes' sum), workers, targets: {...}},
   "overload_2_workers": {... the same keys ...}}   (with --workers 1 2)
Keys are only ever added. Exit status 1 when the run is not valid (nothing decoded, or h2load
failed); PASS/MISS against the targets does not change it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infertap.agent.kernel.ringbuf import RingFill
from infertap.agent.runtime import Agent, AgentOptions
from infertap.agent.testbed.lab import Lab, Pod

PORT = 8000
OVERLOAD = 3.0  # offered load, times what one worker sustains
TARGET_RSS_MB = 300.0  # with 2 workers
REQUEST = {
    "inputs": [
        {
            "name": "features",
            "shape": [1, 8],
            "datatype": "FP32",
            "data": [0.5, 1.25, -3.0, 42.0, 0.01, 7.5, -0.25, 3.14],
        }
    ]
}
RESPONSE = (
    '{"model_name":"fraud","model_version":"1","outputs":[{"name":"score","shape":[1,1],'
    '"datatype":"FP32","data":[0.87]}]}'
)
PATH = "/v2/models/fraud/infer"


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # stdout is the result's with --json


def nginx_config(workdir: Path) -> str:
    tmp = workdir / "nginx"
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {PORT};
        location / {{
            default_type application/json;
            return 200 '{RESPONSE}';
        }}
    }}
}}
"""


def start_nginx(server: Pod, workdir: Path) -> subprocess.Popen[Any]:
    (workdir / "nginx").mkdir()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(workdir))
    proc = server.popen(
        ["nginx", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"nginx exited with {proc.returncode}")
        ss = server.run(["ss", "-Hltn", f"sport = :{PORT}"], capture_output=True, text=True)
        if ss.stdout.strip():
            return proc
        time.sleep(0.05)
    raise BenchError("nginx did not listen")


def h2load(
    client: Pod, server_ip: str, body: Path, clients: int, seconds: float, rps: float | None
) -> dict[str, float]:
    """Run h2load over HTTP/1.1; returns {requests, succeeded, req_per_s}."""
    argv = [
        "h2load",
        "--h1",
        "-c",
        str(clients),
        "-D",
        str(int(seconds)),
        "-d",
        str(body),
        "-H",
        "content-type: application/json",
    ]
    if rps is not None:
        argv += ["--rps", f"{max(1.0, rps):.0f}"]
    argv.append(f"http://{server_ip}:{PORT}{PATH}")
    done = client.run(argv, timeout=seconds + 60, capture_output=True, text=True)
    out = str(done.stdout)
    if done.returncode != 0:
        raise BenchError(f"h2load exited with {done.returncode}: {out[-1500:]}{done.stderr}")
    m = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    r = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded", out)
    if m is None or r is None:
        raise BenchError(f"no results in h2load output: {out[-1500:]}")
    return {"req_per_s": float(m.group(1)), "requests": int(r.group(1)), "ok": int(r.group(2))}


def metric_sum(agent: Agent, name: str) -> float:
    total = 0.0
    for family in agent.registry.collect():
        for s in family.samples:
            if s.name == name:
                total += s.value
    return total


def decoded(agent: Agent) -> float:
    return metric_sum(agent, "infertap_inference_requests_total")


def skipped(agent: Agent) -> float:
    return metric_sum(agent, "infertap_inspection_skipped_total")


def kernel_lost(agent: Agent) -> int:
    st = agent.sensor.stats()
    return st["samples_lost"] + st["events_lost"]


def decode_errors(agent: Agent) -> int:
    return sum(agent.state.decode_lost().values())


def rss_mb(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class Watch(threading.Thread):
    """Samples the agent's RSS and shed levels every 50 ms during a window."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(daemon=True)
        self.agent = agent
        self.stop_flag = threading.Event()
        self.rss_peak = 0.0
        self.parent_rss_peak = 0.0
        self.workers_rss_peak = 0.0
        self.level_max = 0

    def run(self) -> None:
        while not self.stop_flag.wait(0.05):
            parent = rss_mb([os.getpid()])
            workers = rss_mb(self.agent.pool.pids() if self.agent.pool else [])
            self.rss_peak = max(self.rss_peak, parent + workers)
            self.parent_rss_peak = max(self.parent_rss_peak, parent)
            self.workers_rss_peak = max(self.workers_rss_peak, workers)
            self.level_max = max(self.level_max, *(c.level for c in self.agent.shed_controllers))

    def stop(self) -> None:
        self.stop_flag.set()
        self.join()


def wait_drained(agent: Agent, timeout: float = 120.0) -> float:
    """Until every ring is empty and the decoded count stops moving; returns when that was."""
    fills = [RingFill(fd, agent.sensor.ring_size) for fd in agent.sensor.ring_fds]
    try:
        deadline = time.monotonic() + timeout
        last = decoded(agent)
        last_change = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now_decoded = decoded(agent)
            if now_decoded != last:
                last, last_change = now_decoded, time.monotonic()
            empty = all(f.fill == 0 for f in fills)
            # Workers report their metrics files as they go: settle for a second of no change.
            if empty and time.monotonic() - last_change >= 1.0:
                return last_change
        raise BenchError("the rings did not drain")
    finally:
        for f in fills:
            f.close()


def start_agent(client: Pod, server: Pod, workers: int) -> Agent:
    agent = Agent(
        AgentOptions(
            cgroups=(str(client.cgroup), str(server.cgroup)),
            ports=(PORT,),
            metrics_addr=None,
            api_addr=None,
            workers=workers,
        )
    )
    agent.start()
    return agent


def calibrate(lab: Lab, body: Path, clients: int, seconds: float) -> dict[str, Any]:
    client, server = lab.pods["client"], lab.pods["server"]
    agent = start_agent(client, server, 1)
    try:
        for ctl in agent.shed_controllers:
            ctl.hold = True  # no shedding: the worker takes all it can
        d0, lost0 = decoded(agent), kernel_lost(agent)
        t0 = time.monotonic()
        h2load(client, server.ip, body, clients, seconds, None)
        t_end = wait_drained(agent)
        n = decoded(agent) - d0
        busy = t_end - t0
        return {
            "events_per_s": n / busy,
            "seconds": busy,
            "decoded": n,
            "samples_lost": kernel_lost(agent) - lost0,
        }
    finally:
        agent.stop()


def overload(
    lab: Lab, body: Path, clients: int, seconds: float, capacity: float, workers: int
) -> dict[str, Any]:
    client, server = lab.pods["client"], lab.pods["server"]
    agent = start_agent(client, server, workers)
    try:
        offered = OVERLOAD * capacity
        d0, s0 = decoded(agent), skipped(agent)
        lost0, err0 = kernel_lost(agent), decode_errors(agent)
        watch = Watch(agent)
        watch.start()
        t0 = time.monotonic()
        load = h2load(client, server.ip, body, clients, seconds, offered / clients)
        t_end = wait_drained(agent)
        watch.stop()
        n, k = decoded(agent) - d0, skipped(agent) - s0
        result: dict[str, Any] = {
            "events_per_s": n / (t_end - t0),
            "offered_per_s": offered,
            "achieved_per_s": load["req_per_s"],
            "requests": load["requests"],
            "capacity_per_s": capacity,
            "seconds": seconds,
            "decoded": n,
            "skipped": k,
            "skipped_share": k / (n + k) if n + k else 0.0,
            "decode_errors": decode_errors(agent) - err0,
            "samples_lost": kernel_lost(agent) - lost0,
            "shed_level_max": watch.level_max,
            "agent_rss_mb": watch.rss_peak,
            "agent_process_rss_mb": watch.parent_rss_peak,
            "workers_rss_mb": watch.workers_rss_peak,
            "workers": workers,
        }
        result["targets"] = {
            "decode_errors_zero": result["decode_errors"] == 0,
            "samples_lost_zero": result["samples_lost"] == 0,
            "rss_under_300_mb": result["agent_rss_mb"] < TARGET_RSS_MB,
        }
        return result
    finally:
        agent.stop()


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| case | offered/s (achieved) | decoded/s | skipped | decode errors | samples lost |"
        " max shed level | agent RSS (process + workers) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if name == "calibration":
            continue
        lines.append(
            f"| {name} | {r['offered_per_s']:,.0f} ({r['achieved_per_s']:,.0f}) |"
            f" {r['events_per_s']:,.0f} | {100 * r['skipped_share']:.1f}% |"
            f" {r['decode_errors']} | {r['samples_lost']} | {r['shed_level_max']}% |"
            f" {r['agent_rss_mb']:.0f} MB ({r['agent_process_rss_mb']:.0f} +"
            f" {r['workers_rss_mb']:.0f}) |"
        )
    cal = results["calibration"]
    lines.append(
        f"\none worker sustains {cal['events_per_s']:,.0f} calls/s (calibration, unshed:"
        f" {cal['decoded']:,.0f} calls in {cal['seconds']:.1f} s, {cal['samples_lost']} samples"
        " lost)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overload",
        description="The agent under 3x what one inspection worker sustains: decoded, skipped, "
        "errors, losses and memory.",
    )
    parser.add_argument("--seconds", type=float, default=30, help="overload window (default 30)")
    parser.add_argument("--calibrate-seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=8, help="h2load connections (default 8)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1], help="cases by worker count (default 1)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks.overload: needs root (BPF and pods)", file=sys.stderr)
        return 2
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="infertap-overload-") as tmp, Lab() as lab:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        body = workdir / "request.json"
        body.write_text(json.dumps(REQUEST))
        lab.add_pod("client")
        server = lab.add_pod("server")
        try:
            start_nginx(server, workdir)
            log("calibrating: one worker, no shedding, unthrottled load")
            results["calibration"] = cal = calibrate(
                lab, body, args.clients, args.calibrate_seconds
            )
            if cal["decoded"] <= 0:
                raise BenchError("nothing decoded during calibration")
            log(f"one worker sustains {cal['events_per_s']:,.0f} calls/s")
            for w in args.workers:
                name = f"overload_{w}_worker" + ("s" if w > 1 else "")
                log(f"{name}: offering {OVERLOAD * cal['events_per_s']:,.0f} calls/s")
                results[name] = overload(
                    lab, body, args.clients, args.seconds, cal["events_per_s"], w
                )
        except BenchError as exc:
            print(f"benchmarks.overload: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
