"""Helpers the tests share (imported as `support`: pytest puts tests/ on the path, never the
repository root, so `agent`/`cli` cannot be imported as a second copy of the package)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from infertap.agent.export.event_hub import EventHub
from infertap.agent.export.events import EventSink
from infertap.agent.export.metrics import FlowAccounting, InferenceMetrics, TrafficMetrics
from infertap.agent.export.pipeline_metrics import PipelineMetrics
from infertap.agent.flows.records import FlowEnd, Sample
from infertap.agent.inspect.engine import InspectionEngine
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.pipeline import Inspected, Pipeline, PipelineSink
from infertap.agent.pod_labels import PodDirectory

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="kernel tests need root (CI runs as root)")


@dataclass
class Recorder(PipelineSink):
    """Samples, flow ends and model calls seen by an agent's pipeline, in order, in-process."""

    samples: list[Sample] = field(default_factory=list)
    ends: list[FlowEnd] = field(default_factory=list)
    inferences: list[InferenceEvent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_sample(self, s: Sample) -> None:
        with self.lock:
            self.samples.append(s)

    def on_inference(self, inspected: Inspected) -> None:
        with self.lock:
            self.inferences.append(inspected.event)

    def on_flow_end(self, e: FlowEnd) -> None:
        with self.lock:
            self.ends.append(e)

    def wait_for(self, pred: Callable[[], Any], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                got = pred()
            if got:
                return got
            time.sleep(0.02)
        raise AssertionError("timed out waiting for the agent to see it")

    def samples_of(self, cookie: int) -> list[Sample]:
        return [s for s in self.samples if s.cookie == cookie]

    def end_of(self, cookie: int) -> FlowEnd | None:
        return next((e for e in self.ends if e.flow.cookie == cookie), None)


def start_recorded_agent(options: Any) -> Any:
    """Start an Agent with a Recorder on its pipeline (as `agent.recorder`)."""
    from infertap.agent.runtime import Agent

    a = Agent(options)
    a.start()
    recorder = Recorder()
    a.pipeline.add_sink(recorder)
    a.recorder = recorder  # type: ignore[attr-defined]  # tests read it as agent.recorder
    return a


class PeerClient:
    """Drives `infertap.agent.testbed.peer client` inside a pod, one command at a time."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == "connected", line

    def cmd(self, text: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.cmd("close")
        self.proc.wait(timeout=10)


PEER = [sys.executable, "-m", "infertap.agent.testbed.peer"]
INFERTAP = [sys.executable, "-m", "infertap.cli.main"]


def start_agent(
    cgroups: list[Path], api: Path, extra: list[str] | None = None
) -> subprocess.Popen[str]:
    """`infertap run` as a process on these cgroups, returned once it printed its ready line."""
    argv = [*INFERTAP, "run", "--metrics-addr", "127.0.0.1:0", "--api", f"unix:{api}"]
    for cg in cgroups:
        argv += ["--cgroup", str(cg)]
    argv += extra or []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("infertap ready:"):
        proc.wait(timeout=30)
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"agent did not start: {line!r} {err}")
    return proc


def start_server(pod: Any, port: int, echo: bool = False) -> subprocess.Popen[str]:
    proc: subprocess.Popen[str] = pod.popen(
        [*PEER, "serve", str(port), *(["--echo"] if echo else [])],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def start_client(pod: Any, host: str, port: int, nonblocking: bool = False) -> PeerClient:
    argv = [*PEER, "client", host, str(port), *(["--nonblocking"] if nonblocking else [])]
    proc: subprocess.Popen[str] = pod.popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    return PeerClient(proc)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def iptables_tables(netns: str | None) -> dict[str, str]:
    """The nat and filter tables as iptables-save prints them, without comments and counters
    (which move with any traffic)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    out = {}
    for table in ("nat", "filter"):
        text = subprocess.run(
            [*prefix, "iptables-save", "-t", table], capture_output=True, text=True, check=True
        ).stdout
        lines = [re.sub(r"\[\d+:\d+\]", "", ln) for ln in text.splitlines()]
        out[table] = "\n".join(ln for ln in lines if not ln.startswith("#"))
    return out


# --- Prometheus rules through promtool (Debian's prometheus package) ---------------------------

RULES_DIR = Path(__file__).resolve().parent.parent / "daemonset" / "prometheus"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool"


def promtool() -> str:
    import shutil

    path = shutil.which("promtool")
    assert path, "promtool not found: install Debian's prometheus (scripts/system-deps.sh)"
    return path


def rule_files() -> dict[str, dict[str, Any]]:
    """<name>.rules.yaml -> the plain rule file (`spec`) of each PrometheusRule in
    daemonset/prometheus/, which is what Prometheus and promtool read."""
    from infertap.agent.testbed.prometheus import plain_rule_files

    found = plain_rule_files(RULES_DIR)
    assert len(found) == len(list(RULES_DIR.glob("*.yaml"))), "not every file is a PrometheusRule"
    return found


def write_rules(directory: Path, change: dict[str, str] | None = None) -> list[Path]:
    """Rule files into directory; `change` replaces text in them (mutation tests)."""
    import yaml

    written = []
    for name, spec in rule_files().items():
        text = yaml.safe_dump(spec, sort_keys=False)
        for old, new in (change or {}).items():
            text = text.replace(old, new)
        (directory / name).write_text(text)
        written.append(directory / name)
    return written


def run_promtool(directory: Path, test_file: str) -> subprocess.CompletedProcess[str]:
    """`promtool test rules test_file` in directory (copied from tests/promtool/ if not there)."""
    import shutil

    if not (directory / test_file).exists():
        shutil.copy(PROMTOOL_TESTS / test_file, directory / test_file)
    return subprocess.run(
        [promtool(), "test", "rules", test_file],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def wired_pipeline(
    events: EventHub,
    traffic: TrafficMetrics,
    inference: InferenceMetrics,
    pods: PodDirectory,
    *,
    engine: InspectionEngine | None = None,
    sinks: Iterable[PipelineSink] = (),
    batch_size: int = 1,
) -> Pipeline:
    """A Pipeline with the metrics and event sinks as agent/runtime.py registers them, then
    `sinks` (the runtime's actions, mirror and tracer need a kernel or a policy)."""
    metrics = PipelineMetrics(traffic, FlowAccounting(), inference, pods)
    return Pipeline(
        pods,
        (metrics, EventSink(events, engine), *sinks),
        engine=engine,
        batch_size=batch_size,
    )
