"""Shared fixtures. Kernel tests share one lab (two pods) and one loaded agent per session:
a BCC compile costs about a second and the suite should stay well under ten minutes."""

from __future__ import annotations

import os

# grpc's fork handlers print warnings when tests start pod processes while the API serves.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from infertap.agent.flows.records import FlowEnd, Sample
from infertap.agent.models.events import InferenceEvent

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="kernel tests need root (CI runs as root)")


def pytest_configure(config: pytest.Config) -> None:
    if IS_ROOT and shutil.which("ip"):
        from infertap.agent.testbed.pods import cleanup_stale_labs

        cleanup_stale_labs()  # pods a killed earlier run left behind


@dataclass
class Recorder:
    """Samples and flow ends seen by the shared agent, in order, collected in-process."""

    samples: list[Sample] = field(default_factory=list)
    ends: list[FlowEnd] = field(default_factory=list)
    inferences: list[InferenceEvent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_sample(self, s: Sample) -> None:
        with self.lock:
            self.samples.append(s)

    def on_inference(self, e: InferenceEvent) -> None:
        with self.lock:
            self.inferences.append(e)

    def on_end(self, e: FlowEnd) -> None:
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


@pytest.fixture(scope="session")
def lab() -> Iterator[Any]:
    if not IS_ROOT:
        pytest.skip("kernel tests need root (CI runs as root)")
    from infertap.agent.testbed.pods import Lab

    with Lab() as lab:
        lab.add_pod("client")
        lab.add_pod("server")
        yield lab


@pytest.fixture(scope="session")
def agent(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from infertap.agent.runtime import Agent, AgentOptions

    # The instance registry stays the node-wide default (/run/infertap): every agent on a node
    # must see every other, or one's start-up sweep would remove another's programs.
    api_dir = tmp_path_factory.mktemp("agent-api")
    a = Agent(
        AgentOptions(
            cgroups=(str(lab.pods["client"].cgroup), str(lab.pods["server"].cgroup)),
            metrics_addr="127.0.0.1:0",
            api_addr=f"unix:{api_dir}/api.sock",
        )
    )
    a.start()
    recorder = Recorder()
    a.pipeline.sample_taps.append(recorder.on_sample)
    a.pipeline.flow_end_taps.append(recorder.on_end)
    a.pipeline.inference_taps.append(recorder.on_inference)
    a.recorder = recorder  # type: ignore[attr-defined]  # tests read it as agent.recorder
    yield a
    a.stop()


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
