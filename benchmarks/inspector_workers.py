"""The workers case of benchmarks/inspector.py: one inspection worker against two, side by side
in one run, each worker the real one (agent/workers/worker.py: Worker built from its
WorkerSetup, its run() loop, its sinks, its reports to the agent over a socket pair) in its own
process, pinned to its own core.

What feeds them is recorded, not live: the same recorded tritonclient <-> v2server connections
as part 1 (rest-small and grpc-small, PII in one request in ten, drift and schema on against the
fraud baseline, as a policy file says), replayed as ring-buffer records. A worker reads them
through the RingReader drain it uses on the kernel's ring (over memory here: user space cannot
produce into a BPF ring buffer). With two workers each takes the connections the kernel would
give its ring (agent/kernel/rings.py ring_for of the connection's endpoints), so together they
do exactly the one worker's work. Rounds are built before the clock starts; then every worker
runs for the same wall-clock window and counts the calls it inspected. Throughput is calls per
wall-clock second summed over the workers (what the node gets), the best of 3 interleaved runs
each; speedup two over one. The agent
side (this process) only receives and discards the reports; it runs on whichever core is free.

On a 2-core machine the two workers take both cores, so background load (other sessions, the
report receiver) shows up as less than 2x.
"""

from __future__ import annotations

import heapq
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.inspector import (
    BenchError,
    Conversation,
    MemoryRing,
    Pods,
    Replay,
    make_pods,
    record_cases,
    ring_area,
)
from infertap.agent.demo import fraud_baseline
from infertap.agent.flows.records import FlowStart
from infertap.agent.kernel import rings
from infertap.agent.kernel.decode import decode_record
from infertap.agent.policy.loader import load_policy
from infertap.agent.runtime import INSPECT_BATCH, READ_INTERVAL_S

CASES = ("rest-small", "grpc-small")
TARGET_SPEEDUP = 1.7
REPETITIONS = 3  # runs of each worker count, interleaved; the best of each is reported
DISTINCT_ROUNDS = 64  # rounds built per worker, then drained again in turn (a few MB)

POLICY = """\
version: 1
services:
  - {{name: fraud-rest, port: 8000}}
  - {{name: fraud-grpc, port: 8001}}
models:
  - name: fraud
    baseline: {baseline}
    drift: {{window: 200}}
"""


@dataclass
class ChildSpec:
    case: str
    index: int  # its ring
    n_rings: int
    cpu: int
    seconds: float
    conversations: list[Conversation]
    port: int
    pods: Pods
    policy: str  # path


class Rounds:
    """A RingReader stand-in for Worker.run: each wait() has a prebuilt round ready, each
    drain() walks it with the real RingReader.drain; past the deadline the worker stops. Rounds
    are drained in turn, again and again: a round's flows have all ended (FLOW_END) long before
    their cookies come round again, so each pass is new connections to the pipeline."""

    def __init__(self, areas: list[bytearray], stop: Any) -> None:
        self._areas = areas
        self._next = 0
        self._stop = stop
        self.deadline = float("inf")

    def wait(self, timeout_s: float) -> bool:
        if time.monotonic() >= self.deadline:
            self._stop()
            return False
        return True

    def drain(self, handle: Any, limit: int = 1 << 30) -> int:
        area = self._areas[self._next % len(self._areas)]
        self._next += 1
        ring = MemoryRing(area)
        n = ring.drain(handle, limit)
        ring.close()  # releases only the view: the area is drained again later
        return n

    def close(self) -> None:
        pass


def _round_for(replay: Replay, index: int, n_rings: int) -> bytearray:
    """The next round, only the connections the kernel would put in ring `index`."""
    base = (replay.rounds + 1) * replay.span_ns
    replay.rounds += 1
    streams = []
    for conv in replay.conversations:
        stream = list(replay._connection(conv, base))
        start = decode_record(memoryview(stream[0][2]))
        assert isinstance(start, FlowStart)  # a connection's first record: its client flow
        flow = start.flow
        ring = rings.ring_for(
            (flow.local.ip, flow.local.port), (flow.remote.ip, flow.remote.port), n_rings
        )
        if ring == index:
            streams.append(stream)
    merged = heapq.merge(*streams, key=lambda r: (r[0], r[1]))
    return ring_area([rec for _ts, _seq, rec in merged])


def child(spec: ChildSpec) -> dict[str, Any]:
    """One worker process: build its rounds, say ready, wait for go, run the real Worker."""
    from infertap.agent.workers.messages import Wants, WorkerSetup
    from infertap.agent.workers.worker import Worker

    os.sched_setaffinity(0, {spec.cpu})
    replay = Replay(spec.conversations, spec.port, spec.pods)
    areas = [_round_for(replay, spec.index, spec.n_rings) for _ in range(DISTINCT_ROUNDS)]
    setup = WorkerSetup(
        index=spec.index,
        ring_size=0,
        cgroup_mount=str(spec.pods.mount),
        policy=load_policy(Path(spec.policy)),
        pods={},
        wants=Wants(),  # nobody subscribed: as an agent without `top` open
        batch_size=INSPECT_BATCH,
        read_interval_s=READ_INTERVAL_S,
        report_interval_s=0.5,
        otlp_endpoint=None,
        trace_sample_ratio=None,
        log_level=30,
    )
    worker = Worker(setup)
    # Warm up on two rounds, untimed (regex and numpy first calls, metric children).
    for area in areas[:2]:
        MemoryRing(area).drain(worker.pipeline.handle)
        worker.pipeline.flush()
    worker.report(with_snapshot=False)
    conn = Connection(int(os.environ["BENCH_CONN_FD"]))
    reader = Rounds(areas, worker.request_stop)
    print("ready", flush=True)
    sys.stdin.readline()  # go
    t0 = time.monotonic()
    reader.deadline = t0 + spec.seconds
    base = worker.forward.inspected
    worker.run(reader, conn)  # type: ignore[arg-type]
    wall = time.monotonic() - t0
    events = worker.forward.inspected - base
    return {"events": events, "wall_s": wall}


def _receive(conn: Connection) -> None:
    """The agent's side, reduced to taking the reports off the socket."""
    try:
        while True:
            conn.recv()
    except (EOFError, OSError):
        pass


def run_workers(specs: list[ChildSpec], metrics_dir: Path) -> dict[str, Any]:
    procs, threads = [], []
    for spec in specs:
        ours, theirs = socket.socketpair()
        with tempfile.NamedTemporaryFile(delete=False, suffix=".pickle") as blob:
            pickle.dump(spec, blob)
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "BENCH_CONN_FD": str(theirs.fileno()),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.inspector_workers", blob.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        conn = Connection(ours.detach())
        t = threading.Thread(target=_receive, args=(conn,), daemon=True)
        t.start()
        procs.append((proc, blob.name))
        threads.append(t)
    for proc, _ in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise BenchError(f"worker benchmark child did not start: {line!r}")
    for proc, _ in procs:  # go, all at once
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc, path in procs:
        assert proc.stdout is not None
        out = proc.stdout.read()
        if proc.wait(timeout=120) != 0:
            raise BenchError(f"worker benchmark child failed: {out[-500:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
        os.unlink(path)
    return {
        "events": sum(r["events"] for r in results),
        "events_per_s": sum(r["events"] / r["wall_s"] for r in results),
        "per_worker": [round(r["events"] / r["wall_s"]) for r in results],
    }


def workers_case(seconds: float, log: Any) -> dict[str, Any]:
    rng = np.random.default_rng(11)
    cpus = sorted(os.sched_getaffinity(0) | {0, 1})[:2]
    with tempfile.TemporaryDirectory(prefix="infertap-bench-workers-") as tmp:
        work = Path(tmp)
        log("workers: building the fraud baseline, recording tritonclient <-> v2server")
        policy = work / "policy.yaml"
        policy.write_text(POLICY.format(baseline=fraud_baseline(work)))
        recorded = record_cases(rng)
        pods = make_pods(work / "cgroup")
        out: dict[str, Any] = {}
        for case in CASES:
            convs, port = recorded[case]
            row: dict[str, Any] = {}
            for run, n in enumerate((1, 2) * REPETITIONS):  # interleaved: a shared VM drifts
                mdir = work / f"metrics-{case}-{run}"
                mdir.mkdir()
                specs = [
                    ChildSpec(case, i, n, cpus[i], seconds, convs, port, pods, str(policy))
                    for i in range(n)
                ]
                got = run_workers(specs, mdir)
                key = "one_worker" if n == 1 else "two_workers"
                if got["events_per_s"] > row.get(key, {}).get("events_per_s", 0):
                    row[key] = got
            one = row["one_worker"]["events_per_s"]
            two = row["two_workers"]["events_per_s"]
            out[case] = {
                "one_worker_events_per_s": round(one),
                "two_workers_events_per_s": round(two),
                "speedup": round(two / one, 2),
                "two_workers_per_worker": row["two_workers"]["per_worker"],
            }
            log(f"  {case:<10} 1 worker {one:>8,.0f}/s  2 workers {two:>8,.0f}/s  {two / one:.2f}x")
    head = out["rest-small"]
    return {
        "source": "recorded records through the real worker (agent/workers/worker.py)",
        "cpus": cpus,
        "seconds": seconds,
        "one_worker_events_per_s": head["one_worker_events_per_s"],
        "two_workers_events_per_s": head["two_workers_events_per_s"],
        "speedup": head["speedup"],
        "target_speedup": TARGET_SPEEDUP,
        "cases": out,
    }


def workers_table(report: dict[str, Any]) -> str:
    lines = [
        "case        1 worker /s  2 workers /s  speedup  (target >= "
        f"{report['target_speedup']}x; cpus {report['cpus']})"
    ]
    for case, row in report["cases"].items():
        lines.append(
            f"{case:<11} {row['one_worker_events_per_s']:>11,}  "
            f"{row['two_workers_events_per_s']:>12,}  {row['speedup']:>6.2f}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        spec = pickle.load(f)
    print(json.dumps(child(spec)), flush=True)
