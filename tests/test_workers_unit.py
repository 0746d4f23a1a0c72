"""The pure parts of inspection workers (agent/workers), without a kernel: a Worker fed ring
records gives redacted summaries, flow ends and snapshots; a policy it cannot take leaves the one
it has; the agent's side merges snapshots and feeds every worker's findings to one breaker."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

from wire_streams import h1_request, h1_response

from infertap.agent.enforce.actions import FindingActions
from infertap.agent.enforce.verdicts import Verdict
from infertap.agent.export.event_hub import EventHub
from infertap.agent.export.metrics import FlowAccounting
from infertap.agent.flows.records import Endpoint, FlowEnd, FlowInfo, Role
from infertap.agent.inspect.drift import FeatureBins
from infertap.agent.inspect.findings import Finding
from infertap.agent.kernel import decode, structs
from infertap.agent.pod_labels import PodDirectory
from infertap.agent.policy.loader import default_policy, load_policy_text
from infertap.agent.workers.messages import (
    CallSummary,
    PolicyInForce,
    Report,
    Wants,
    WorkerSetup,
    WorkerSnapshot,
)
from infertap.agent.workers.pool import clean_metrics_dirs, metrics_dir
from infertap.agent.workers.results import MergedState, ReportRouter
from infertap.agent.workers.worker import Worker

CLIENT, SERVER = ("10.9.0.2", 40000), ("10.9.0.3", 8000)
SSN = "123-45-6789"
BODY = json.dumps(
    {
        "inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.5, -2.0]}],
        "parameters": {"customer": f"ssn {SSN}"},
    }
).encode()
OUT = json.dumps(
    {"model_name": "fraud", "outputs": [{"name": "y", "shape": [1], "datatype": "FP32",
                                          "data": [0.25]}]}
).encode()  # fmt: skip


def flow_record(kind: int, cookie: int, role: int, ts: int) -> bytes:
    local, remote = (CLIENT, SERVER) if role == structs.ROLE_CLIENT else (SERVER, CLIENT)
    flow = structs.Flow()
    flow.cookie, flow.start_ns, flow.role, flow.sampled = cookie, ts, role, 1
    flow.key.family = socket.AF_INET
    flow.key.local_port, flow.key.remote_port = local[1], remote[1]
    flow.key.local_ip[0] = int.from_bytes(socket.inet_aton(local[0]), "little")
    flow.key.remote_ip[0] = int.from_bytes(socket.inet_aton(remote[0]), "little")
    return decode.RECORD.pack(kind, 0, ts, cookie, 0, 0, role, 0, 0) + bytes(flow)


def sample_record(cookie: int, role: int, data: bytes, ts: int) -> bytes:
    head = decode.RECORD.pack(structs.REC_SAMPLE, len(data), ts, cookie, 0, len(data), role, 0, 0)
    return head + data


def one_call() -> list[bytes]:
    """Ring records of one connection with one V2 REST call carrying an SSN."""
    req = h1_request("POST", "/v2/models/fraud/infer", BODY, [("Content-Type", "application/json")])
    resp = h1_response(200, OUT, [("Content-Type", "application/json")], for_method="POST")
    return [
        flow_record(structs.REC_FLOW_START, 1, structs.ROLE_CLIENT, 10),
        flow_record(structs.REC_FLOW_START, 2, structs.ROLE_SERVER, 11),
        sample_record(1, structs.ROLE_CLIENT, req, 20),
        sample_record(2, structs.ROLE_SERVER, resp, 30),
        flow_record(structs.REC_FLOW_END, 1, structs.ROLE_CLIENT, 40),
        flow_record(structs.REC_FLOW_END, 2, structs.ROLE_SERVER, 41),
    ]


NOBODY = Wants()  # no subscriber in the agent


def setup(tmp_path: Path, wants: Wants = NOBODY) -> WorkerSetup:
    return WorkerSetup(
        index=1,
        ring_size=0,
        cgroup_mount=str(tmp_path),
        policy=default_policy(),
        pods={},
        wants=wants,
        batch_size=64,
        read_interval_s=0.02,
        report_interval_s=0.5,
        otlp_endpoint=None,
        trace_sample_ratio=None,
        log_level=30,
    )


def feed(worker: Worker, records: list[bytes]) -> None:
    for rec in records:
        worker.pipeline.handle(memoryview(rec))
    worker.pipeline.flush()


def test_a_worker_reports_redacted_summaries_flow_ends_and_a_snapshot(tmp_path: Path) -> None:
    worker = Worker(setup(tmp_path))
    feed(worker, one_call())
    report = worker.report(with_snapshot=True)
    with_findings = [c for c in report.calls if c.findings]
    assert len(with_findings) == 1
    call = with_findings[0]
    assert call.model == "fraud" and call.service == Endpoint(*SERVER) and call.client_flow == 1
    assert [f.type for f in call.findings if f.kind == "pii"] == ["ssn"]
    # Every call names its model's service (the breaker blocks all of them when it opens).
    assert {(c.model, c.service) for c in report.calls} == {("fraud", Endpoint(*SERVER))}
    assert [e.flow.cookie for e in report.ends] == [1, 2]
    assert report.events == []  # nobody in the agent subscribed
    snap = report.snapshot
    assert snap is not None and snap.index == 1 and snap.pid == os.getpid()
    assert snap.calls == 1 and snap.flows_started == 2 and snap.exchanges == 1
    # What goes to the agent never holds the raw value.
    assert SSN.encode() not in pickle.dumps(report)
    assert not worker.report(with_snapshot=False)  # nothing new since


def test_events_are_built_only_when_the_agent_wants_them(tmp_path: Path) -> None:
    worker = Worker(setup(tmp_path, Wants(kinds=frozenset({"finding"}))))
    feed(worker, one_call())
    events = worker.report(with_snapshot=False).events
    assert {e.kind for e in events} == {"finding"}
    assert SSN not in json.dumps([e.data for e in events])
    worker.control(Wants(all=True))
    feed(worker, one_call())
    kinds = {e.kind for e in worker.report(with_snapshot=False).events}
    assert {"flow_start", "flow_end", "finding", "inference"} <= kinds


def test_a_policy_a_worker_cannot_take_leaves_the_one_it_has(tmp_path: Path) -> None:
    worker = Worker(setup(tmp_path))
    before = worker.policy_hash
    missing = tmp_path / "gone.baseline.json"
    missing.write_text("{}")
    text = f"version: 1\nmodels:\n  - name: fraud\n    baseline: {missing}\n"
    bad = load_policy_text(text, "bad.yaml")
    missing.unlink()
    reply = worker.control(PolicyInForce(bad))
    assert reply is not None and reply.policy_error
    assert worker.policy_hash == before
    feed(worker, one_call())  # still inspecting with the good one
    assert any(c.findings for c in worker.report(with_snapshot=False).calls)


def test_snapshots_merge_summed_joined_and_worst_drift() -> None:
    a = WorkerSnapshot(
        0, 10, protocols={1: "http/1.1"}, uninspected={5: "not_http"},
        uninspected_counts={"not_http": 1}, decode_lost={("http1", "gap"): 2},
        drift={("m", "f", "psi"): 0.1}, bins={("m", "f"): FeatureBins((0.5, 0.5), (1, 2))},
    )  # fmt: skip
    b = WorkerSnapshot(
        1, 11, protocols={2: "h2"}, uninspected_counts={"not_http": 2},
        decode_lost={("http1", "gap"): 1, ("http2", "hpack"): 1},
        drift={("m", "f", "psi"): 0.4}, bins={("m", "f"): FeatureBins((0.5, 0.5), (3, 4))},
    )  # fmt: skip
    state = MergedState(lambda: [a, b])
    assert state.decode_lost() == {("http1", "gap"): 3, ("http2", "hpack"): 1}
    assert state.uninspected_counts() == {"not_http": 3}
    assert state.flow_states() == ({1: "http/1.1", 2: "h2"}, {5: "not_http"})
    assert state.drift_values() == {("m", "f", "psi"): 0.4}
    assert state.bin_values()[("m", "f")].seen == (4, 6)


class Verdicts:
    def __init__(self) -> None:
        self.blocked: list[Endpoint] = []
        self.ended: list[int] = []

    def block_flow(self, flow_id: int, reason: str = "") -> Verdict | None:
        return None

    def block_service(self, service: Endpoint, reason: str = "") -> Verdict | None:
        self.blocked.append(service)
        return None

    def unblock_service(self, service: Endpoint) -> Verdict | None:
        return None

    def flow_ended(self, flow_id: int) -> None:
        self.ended.append(flow_id)


def test_the_breaker_counts_the_findings_of_every_worker(tmp_path: Path) -> None:
    policy = load_policy_text(
        "version: 1\nactions:\n  pii: {alert: circuit_break}\ncircuit: {pii_hits: 2}\n", "p.yaml"
    )
    verdicts = Verdicts()
    hub = EventHub()
    sub = hub.subscribe(frozenset({"circuit"}))
    actions = FindingActions(policy, verdicts, hub.publish)
    accounting = FlowAccounting()
    noted: list[str] = []
    route = ReportRouter(hub, actions, accounting, PodDirectory(tmp_path), noted.append)
    svc = Endpoint(*SERVER)
    hit = Finding("pii", "fraud", "ssn", "$.parameters.customer", "alert", "***-**-6789")
    route(0, Report(calls=[CallSummary("fraud", svc, ("", "p"), (hit,), 1)]))
    assert actions.states().get("fraud", 0) == 0 and verdicts.blocked == []
    flow = FlowInfo(7, Role.CLIENT, Endpoint(*CLIENT), svc, 0, 0, True, messages=3, bytes=99)
    route(1, Report(calls=[CallSummary("fraud", svc, ("", "p"), (hit,), 2)],
                    ends=[FlowEnd(flow, 5)]))  # fmt: skip
    assert actions.states()["fraud"] == 2 and verdicts.blocked == [svc]
    ev = sub.get(1.0)
    assert ev is not None and ev.data["to_state"] == "open"
    assert noted == ["fraud", "fraud"]
    assert verdicts.ended == [7]
    assert sum(t.bytes for t in accounting.totals().values()) == 99


def test_metrics_dirs_of_dead_agents_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "metrics" / str(dead.pid)).mkdir(parents=True)
    live = tmp_path / "metrics" / "1"  # pid 1 never goes away
    live.mkdir()
    own = clean_metrics_dirs(tmp_path)
    assert own == metrics_dir(tmp_path) and own.is_dir() and not any(own.iterdir())
    assert not (tmp_path / "metrics" / str(dead.pid)).exists()
    assert live.exists()


def test_the_daemonset_policy_crosses_to_a_worker(tmp_path: Path) -> None:
    from infertap.agent.policy.loader import load_policy

    policy = load_policy(Path(__file__).parent.parent / "daemonset" / "base" / "policy.yaml")
    back = pickle.loads(pickle.dumps(PolicyInForce(policy))).policy
    assert back == policy and back.hash == policy.hash
    Worker(setup(tmp_path)).control(PolicyInForce(back))
