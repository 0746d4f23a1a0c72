"""`infertap demo`: the embedded default, end to end on one machine.

Two pods (cgroup + network namespace + veth): `fraud-model` runs a real KServe V2 server (REST and
gRPC); `feature-store` calls it with tritonclient through three phases (normal traffic, PII
leaking into requests, drifted features). The agent intercepts both pods from the kernel with a
baseline of the model's training data, and either opens `infertap top` or, with `--no-tui`, runs
for a while and prints what it saw. A real Prometheus (Debian's, on loopback) scrapes the agent
and evaluates daemonset/prometheus/'s alert and recording rules meanwhile; the summary ends with
what it holds. Everything is removed on exit, Ctrl-C included.
"""

from __future__ import annotations

import collections
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from infertap.agent.export.event_hub import AgentEvent
from infertap.agent.inspect.baseline import build_baseline
from infertap.agent.runtime import Agent, AgentOptions
from infertap.agent.testbed.fraud_model import FEATURES, example_transactions
from infertap.agent.testbed.lab import Lab
from infertap.agent.testbed.prometheus import LocalPrometheus, PrometheusError
from infertap.agent.testbed.v2server import start_in_pod

log = logging.getLogger(__name__)
HTTP_PORT, GRPC_PORT = 8000, 8001


@dataclass
class Tally:
    """What the demo saw, folded from the agent's event stream (already redacted)."""

    calls: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    pii: collections.Counter[str] = field(default_factory=collections.Counter)
    pii_examples: dict[str, str] = field(default_factory=dict)
    drift_alerts: set[str] = field(default_factory=set)
    circuit: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)

    def add(self, ev: AgentEvent) -> None:
        d = ev.data
        if ev.kind == "inference":
            self.calls[(d["model"], d["protocol"], d["status"] or "none")] += 1
            if d.get("latency_ms") is not None:
                self.latencies[d["protocol"]].append(float(d["latency_ms"]))
        elif ev.kind == "finding" and d["kind"] == "pii":
            self.pii[d["type"]] += 1
            self.pii_examples.setdefault(d["type"], f"{d['redacted']} at {d['location']}")
        elif ev.kind == "finding" and d["kind"] == "drift" and d["severity"] == "alert":
            self.drift_alerts.add(d["location"])
        elif ev.kind == "circuit":
            self.circuit.append(
                f"{d['model']}: {d['from_state']} -> {d['to_state']} ({d['reason']})"
            )
        elif ev.kind == "verdict":
            self.verdicts.append(str(d.get("description", "")))


# The demo's policy: the fraud model's two endpoints, its baseline, and a circuit breaker quick
# enough to open and recover within a short run. PII in requests and drift alerts trip it.
DEMO_POLICY = """\
version: 1
services:
  - {{name: fraud-rest, port: 8000}}
  - {{name: fraud-grpc, port: 8001}}
models:
  - name: fraud
    baseline: {baseline}
    drift: {{window: 200}}
sampling: {{sample_bytes: 16384, sample_one_in: 1}}
actions:
  pii: {{info: log, warn: alert, alert: circuit_break}}
  drift: {{info: log, warn: alert, alert: circuit_break}}
circuit: {{pii_hits: 5, pii_window: 30s, cooldown: 3s, max_cooldown: 12s, probe: 2s}}
"""


def fraud_baseline(workdir: Path) -> Path:
    """The fraud model's training distribution, as a baseline file (what `baseline build` makes)."""
    data = example_transactions(20000, np.random.default_rng(0), fraud_rate=0.05)
    npy = workdir / "fraud-training.npy"
    np.save(npy, data)
    out = workdir / "fraud.baseline.json"
    build_baseline(npy, "fraud", out, features=list(FEATURES))
    return out


def run_demo(
    duration: float,
    tui: bool,
    console: Console,
    metrics_addr: str = "127.0.0.1:0",
    api: str = "unix:/run/infertap/demo-api.sock",
    prometheus: bool = True,
    linger: float = 0.0,
) -> int:
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="infertap-demo-") as tmp, Lab() as lab:
        workdir = Path(tmp)
        server = lab.add_pod("fraud-model")
        client = lab.add_pod("feature-store")
        console.print(
            f"pods: feature-store {client.ip} -> fraud-model {server.ip} "
            f"(V2 REST :{HTTP_PORT}, gRPC :{GRPC_PORT})",
            highlight=False,
        )
        baseline_path = fraud_baseline(workdir)
        policy = workdir / "policy.yaml"
        policy.write_text(DEMO_POLICY.format(baseline=baseline_path))
        agent = Agent(
            AgentOptions(
                cgroups=(str(client.cgroup), str(server.cgroup)),
                metrics_addr=metrics_addr,
                api_addr=api,
                policy=policy,
            )
        )
        tally = Tally()
        prom: LocalPrometheus | None = None
        try:
            agent.start()
            sub = agent.events.subscribe(frozenset({"inference", "finding", "circuit", "verdict"}))
            stop = threading.Event()

            def fold() -> None:
                while not stop.is_set():
                    ev = sub.get(0.2)
                    if ev is not None:
                        tally.add(ev)

            folder = threading.Thread(target=fold, daemon=True)
            folder.start()
            console.print(start_in_pod(server, HTTP_PORT, GRPC_PORT), highlight=False)
            port = agent.metrics.port if agent.metrics else 0
            console.print(
                f"agent ready: metrics http://127.0.0.1:{port}/metrics, api {api}", highlight=False
            )
            if prometheus and port:
                prom = start_prometheus(workdir / "prometheus", port, console)
            fs = client.popen(
                [
                    py,
                    "-m",
                    "infertap.agent.testbed.feature_store",
                    server.ip,
                    str(HTTP_PORT),
                    str(GRPC_PORT),
                    str(duration),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            if tui:
                # The operator's view, as its own process: exactly what `infertap top` shows.
                subprocess.run([py, "-m", "infertap.cli.main", "top", "--api", api], check=False)
            else:
                assert fs.stdout is not None
                for line in fs.stdout:
                    console.print(f"feature-store: {line.strip()}", highlight=False)
                fs.wait(timeout=duration + 60)
                time.sleep(1.0)  # let the last samples through the ring
            stop.set()
            folder.join(timeout=2)
            summary(console, agent, tally)
            if prom is not None:
                time.sleep(2.5)  # a scrape and a rule evaluation after the last call
                prometheus_summary(console, prom)
                if linger > 0:
                    console.print(
                        f"prometheus: lingering {linger:.0f} s at {prom.url} (Ctrl-C ends it)",
                        highlight=False,
                    )
                    time.sleep(linger)
        finally:
            if prom is not None:
                prom.stop()
            agent.stop()
    return 0


def summary(console: Console, agent: Agent, tally: Tally) -> None:
    stats = agent.sensor.stats()
    console.print(
        f"\nkernel: {stats['flows_opened']} flows, {stats['msgs']} messages, "
        f"{stats['bytes']} bytes, {stats['samples']} samples "
        f"({stats['samples_lost']} lost), {stats['verdict_drops']} sends dropped by "
        "verdicts",
        highlight=False,
    )
    t = Table(title="model calls seen from the kernel")
    for col in ("model", "protocol", "status", "calls"):
        t.add_column(col)
    for (model, proto, status), n in sorted(tally.calls.items()):
        t.add_row(model, proto, status, str(n))
    console.print(t)
    for proto, lat in sorted(tally.latencies.items()):
        q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else lat * 99
        console.print(
            f"latency {proto}: p50 {q[49]:.2f} ms, p99 {q[98]:.2f} ms ({len(lat)} calls)",
            highlight=False,
        )
    p = Table(title="PII found in requests (redacted)")
    for col in ("type", "count", "example"):
        p.add_column(col)
    for kind, n in sorted(tally.pii.items()):
        p.add_row(kind, str(n), tally.pii_examples[kind])
    console.print(p)
    d = Table(title="feature drift (fraud model, current window)")
    for col in ("feature", "psi", "ks", "js", "alert"):
        d.add_column(col)
    values: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for (model, feature, stat), v in agent.engine.drift_values().items():
        if model == "fraud":
            values[feature][stat] = v
    for feature in FEATURES:
        row = values.get(feature, {})
        d.add_row(
            feature,
            *(f"{row[s]:.3f}" if s in row else "-" for s in ("psi", "ks", "js")),
            "ALERT" if feature in tally.drift_alerts else "",
        )
    console.print(d)
    for line in tally.circuit:
        console.print(f"circuit breaker: {line}", highlight=False)
    for line in tally.verdicts:
        console.print(f"verdict: {line}", highlight=False)


def start_prometheus(workdir: Path, agent_port: int, console: Console) -> LocalPrometheus | None:
    """A real Prometheus on loopback scraping the agent, with daemonset/prometheus/'s rules."""
    try:
        prom = LocalPrometheus(workdir, [f"127.0.0.1:{agent_port}"])
    except PrometheusError as exc:
        console.print(f"prometheus: not started: {exc}", highlight=False)
        return None
    console.print(
        f"prometheus: {prom.url} scrapes the agent every second and evaluates "
        f"{', '.join(prom.rule_files) or 'no rule files'}",
        highlight=False,
    )
    return prom


def _value(sample: dict[str, object]) -> float:
    return float(sample["value"][1])  # type: ignore[index]


def prometheus_summary(console: Console, prom: LocalPrometheus) -> None:
    """What the real Prometheus holds now: the scrape, calls, PII, cluster drift and alerts."""
    try:
        up = prom.query('up{job="infertap"}')
        t = Table(title=f"in Prometheus ({prom.url}, from scraping the agent)")
        for col in ("query", "series", "value"):
            t.add_column(col)
        t.add_row("agent target up", ", ".join(s["metric"]["instance"] for s in up), "")
        for title, expr, label in (
            (
                "calls, last 5 min",
                "sum by (model, protocol) (increase(infertap_inference_requests_total[5m]))",
                "protocol",
            ),
            (
                "PII findings, last 5 min",
                "sum by (type) (increase(infertap_pii_findings_total[5m]))",
                "type",
            ),
            (
                "cluster-wide PSI, last hour",
                "model_feature:infertap_feature_psi:increase1h",
                "feature",
            ),
            ("circuit state (2 = open)", "max by (model) (infertap_circuit_state)", "model"),
        ):
            for s in sorted(prom.query(expr), key=lambda s: str(s["metric"].get(label))):
                t.add_row(title, str(s["metric"].get(label, "")), f"{_value(s):.3g}")
        console.print(t)
        for alert in prom.alerts():
            labels = alert["labels"]
            where = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "alertname")
            console.print(
                f"prometheus alert {alert['state']}: {labels['alertname']} ({where})",
                highlight=False,
            )
    except PrometheusError as exc:
        console.print(f"prometheus: query failed: {exc}", highlight=False)
