"""`run --workers 2` against the real kernel: one agent with two inspection worker processes on
its own pair of lab pods, real V2 traffic (tritonclient, and the standard library's HTTP client
where a test needs to choose which worker a connection goes to), checked through what users see:
/metrics, status, events, the circuit breaker's verdicts in the kernel."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import needs_root, start_agent

from infertap.agent.defaults import DEFAULT_RUN_DIR
from infertap.agent.kernel import bpfsys, rings
from infertap.agent.kernel.sensor import SWEPT_ATTACH_TYPES
from infertap.agent.testbed.v2server import start_in_pod

pytestmark = [needs_root, pytest.mark.kernel]

HTTP_PORT, GRPC_PORT = 9210, 9211

POLICY = """\
version: 1
services:
  - {name: v2, port: 9210}
  - {name: v2-grpc, port: 9211}
actions:
  pii: {info: log, warn: log, alert: circuit_break}
circuit: {pii_hits: 4, pii_window: 60s, cooldown: 60s, probe: 2s}
"""

# Calls of the fraud model over `connections` connections (a new tritonclient client each).
FRAUD_CALLS = r"""
import sys
import numpy as np
import tritonclient.http as httpclient
host, connections, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(connections):
    client = httpclient.InferenceServerClient(url=f"{host}:9210", network_timeout=5.0)
    for _ in range(calls):
        inp = httpclient.InferInput("features", [2, 8], "FP32")
        inp.set_data_from_numpy(np.ones((2, 8), dtype=np.float32), binary_data=False)
        client.infer("fraud", [inp])
    client.close()
print("ok")
"""

# One echo call carrying a US SSN per connection, each from a source port the test chose.
PII_CALLS = r"""
import http.client, json, sys
host, me, ports = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3].split(",")]
body = json.dumps({
    "inputs": [{"name": "fp32", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}],
    "parameters": {"customer": "ssn 123-45-6789"},
})
for port in ports:
    conn = http.client.HTTPConnection(host, 9210, timeout=5, source_address=(me, port))
    conn.request("POST", "/v2/models/echo/infer", body, {"Content-Type": "application/json"})
    assert conn.getresponse().status == 200
    conn.close()
print("ok")
"""


@pytest.fixture(scope="module")
def setup(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Any]]:
    from support import start_recorded_agent

    from infertap.agent.runtime import AgentOptions

    client, server = lab.add_pod("wk-client"), lab.add_pod("wk-server")
    policy = tmp_path_factory.mktemp("workers") / "policy.yaml"
    policy.write_text(POLICY)
    agent = start_recorded_agent(
        AgentOptions(
            cgroups=(str(client.cgroup), str(server.cgroup)),
            metrics_addr="127.0.0.1:0",
            api_addr=None,
            policy=policy,
            workers=2,
        )
    )
    try:
        start_in_pod(server, HTTP_PORT, GRPC_PORT)
        yield agent, client, server
    finally:
        agent.stop()


def scrape(agent: Any) -> dict[str, list[Any]]:
    assert agent.metrics is not None
    url = f"http://127.0.0.1:{agent.metrics.port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, []).extend(family.samples)
    return out


def fraud_requests(agent: Any) -> float:
    samples = scrape(agent).get("infertap_inference_requests", [])
    return float(sum(s.value for s in samples if s.labels.get("model") == "fraud"))


def run_fraud(client: Any, server: Any, connections: int, calls: int) -> None:
    run = client.run(
        [sys.executable, "-c", FRAUD_CALLS, server.ip, str(connections), str(calls)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def wait_until(pred: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_connections_are_split_over_both_workers_and_metrics_merge(
    setup: tuple[Any, Any, Any],
) -> None:
    agent, client, server = setup
    assert agent.pool is not None and len(agent.pool.pids()) == 2
    assert agent.recorder.samples == []  # the agent's own pipeline reads no ring
    # 16 connections: all on one ring has odds 1 in 32768.
    run_fraud(client, server, 16, 3)
    wait_until(lambda: fraud_requests(agent) == 48)
    snaps = wait_until(
        lambda: (s := agent.pool.snapshots()) and sum(x.calls for x in s) == 48 and s
    )
    assert [s.index for s in snaps] == [0, 1]
    assert all(s.flows_started > 0 and s.calls > 0 for s in snaps), snaps
    # Both ends of a connection went to the same worker: each worker's flows come in pairs.
    assert all(s.flows_started % 2 == 0 for s in snaps)
    metrics = scrape(agent)
    requests = [
        s for s in metrics["infertap_inference_requests"] if s.labels.get("model") == "fraud"
    ]
    # One merged series (labels as with one process: no pid label), whichever worker counted.
    assert len(requests) == 1
    assert set(requests[0].labels) == {"namespace", "pod", "model", "version", "protocol", "code"}
    latency = [
        s for s in metrics["infertap_inference_latency_seconds"] if s.name.endswith("_count")
    ]
    assert sum(s.value for s in latency) == 48
    http = metrics["infertap_http_requests"]
    assert sum(s.value for s in http if s.labels.get("service", "").endswith(":9210")) == 48
    # The agent's views: status and flows name the workers' results.
    status = agent.status()
    assert status.workers == 2 and status.worker_restarts == 0


def test_a_killed_worker_is_restarted_and_counted_while_traffic_flows(
    setup: tuple[Any, Any, Any],
) -> None:
    agent, client, server = setup
    pool = agent.pool
    before = fraud_requests(agent)
    old = pool.pids()[0]
    os.kill(old, signal.SIGKILL)
    run_fraud(client, server, 8, 2)  # the data path does not notice: every call succeeds
    wait_until(lambda: agent.worker_restarts() == 1 and len(pool.pids()) == 2)
    assert old not in pool.pids()
    assert wait_until(lambda: len(pool.snapshots()) == 2)
    assert agent.status().worker_restarts == 1
    assert scrape(agent)["infertap_worker_restarts"][0].value == 1
    assert agent.healthy()
    # Counts never go backwards (the dead worker's metric files stay merged), and traffic after
    # the restart is inspected by both workers again.
    mid = fraud_requests(agent)
    assert mid >= before
    run_fraud(client, server, 16, 2)
    wait_until(lambda: fraud_requests(agent) >= mid + 32)


def skipped_total(agent: Any) -> float:
    samples = scrape(agent).get("infertap_inspection_skipped", [])
    return float(sum(s.value for s in samples if s.name.endswith("_total")))


def test_shedding_on_both_rings_is_counted_through_the_workers(
    setup: tuple[Any, Any, Any],
) -> None:
    """Each ring has its own controller; held at 100 on both, every new request is skipped in
    the kernel, and the workers' counts reach the agent's /metrics and status, exactly."""
    agent, client, server = setup
    controllers = agent.shed_controllers
    assert len(controllers) == 2
    before_metric, before_calls = skipped_total(agent), fraud_requests(agent)
    before_status = sum(agent.status().inspection_skipped.values())
    for c in controllers:
        c.hold = True
        c.set_level(100)
    try:
        assert agent.sensor.shed_levels(2) == [100, 100]
        run_fraud(client, server, 16, 2)  # 16 connections: both rings, odds as above
    finally:
        for c in controllers:
            c.set_level(0)
            c.hold = False
    wait_until(lambda: skipped_total(agent) == before_metric + 32)
    wait_until(lambda: sum(agent.status().inspection_skipped.values()) == before_status + 32)
    assert fraud_requests(agent) == before_calls  # none decoded: all shed whole
    snaps = agent.pool.snapshots()
    assert all(sum(s.skipped.values()) > 0 for s in snaps), snaps  # both workers counted
    # The level is back at 0: calls are inspected again.
    run_fraud(client, server, 4, 2)
    wait_until(lambda: fraud_requests(agent) == before_calls + 8)


def test_pii_in_both_workers_trips_the_agents_breaker(setup: tuple[Any, Any, Any]) -> None:
    agent, client, server = setup
    sub = agent.events.subscribe(frozenset({"circuit", "finding"}))
    # Two connections to each worker: the breaker (pii_hits 4) opens only if it counts the
    # findings of both.
    chosen: dict[int, list[int]] = {0: [], 1: []}
    port = 42000
    while min(len(v) for v in chosen.values()) < 2:
        ring = rings.ring_for((client.ip, port), (server.ip, HTTP_PORT), 2)
        if len(chosen[ring]) < 2:
            chosen[ring].append(port)
        port += 1
    ports = chosen[0][:1] + chosen[1][:1] + chosen[0][1:] + chosen[1][1:]
    run = client.run(
        [sys.executable, "-c", PII_CALLS, server.ip, client.ip, ",".join(map(str, ports))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    events = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ev = sub.get(0.5)
        if ev is not None:
            events.append(ev)
            if ev.kind == "circuit" and ev.data["to_state"] == "open":
                break
    sub.close()
    findings = [e for e in events if e.kind == "finding"]
    assert len(findings) >= 4 and all(e.data["type"] == "ssn" for e in findings)
    # Findings reach the agent redacted only.
    assert "123-45-6789" not in json.dumps([e.data for e in events])
    opened = [e for e in events if e.kind == "circuit" and e.data["to_state"] == "open"]
    assert opened and opened[0].data["model"] == "echo", events
    assert agent.actions.states()["echo"] == 2
    # The breaker's verdict is in the kernel: the echo service is blocked.
    blocked = [v for v in agent.verdicts.list() if v.service and v.service.port == HTTP_PORT]
    assert blocked, agent.verdicts.list()


def test_clean_stop_leaves_no_worker_program_or_file(setup: tuple[Any, Any, Any]) -> None:
    agent, client, server = setup
    pids = agent.pool.pids()
    progs = agent.sensor.prog_ids
    metrics_dir = agent._metrics_dir
    assert metrics_dir is not None and any(metrics_dir.iterdir())
    agent.stop()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    assert all(bpfsys.prog_info_by_id(p) is None for p in progs)
    assert not metrics_dir.exists()
    for cg in (client.cgroup, server.cgroup):
        for attach_type in SWEPT_ATTACH_TYPES:
            assert bpfsys.query_cgroup(str(cg), attach_type) == []
    bpffs = Path("/sys/fs/bpf")
    if bpffs.is_dir():
        assert not list(bpffs.rglob("*itap*"))


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_workers_die_with_a_killed_agent(lab: Any, tmp_path: Path) -> None:
    client, server = lab.add_pod("wk-kill-c"), lab.add_pod("wk-kill-s")
    cgroups = [client.cgroup, server.cgroup]
    proc = start_agent(cgroups, tmp_path / "api.sock", ["--workers", "2"])
    try:
        workers = wait_until(lambda: len(c := _children(proc.pid)) == 2 and c)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # PR_SET_PDEATHSIG: the kernel kills them with their agent.
        wait_until(lambda: all(not Path(f"/proc/{w}").exists() for w in workers), timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # What kill -9 leaves (the next agent would sweep it): its metrics directory, programs.
        shutil.rmtree(DEFAULT_RUN_DIR / "metrics" / str(proc.pid), ignore_errors=True)
        for cg in cgroups:
            for attach_type in SWEPT_ATTACH_TYPES:
                for prog_id in bpfsys.query_cgroup(str(cg), attach_type):
                    bpfsys.detach_by_id(str(cg), attach_type, prog_id)
