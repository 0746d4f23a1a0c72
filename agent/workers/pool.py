"""The agent's side of its inspection workers: spawn one per ring, feed them what changes
(policy, pod names, which events are wanted), route their reports, restart the ones that die.

One thread per worker owns it: spawns it (a fresh interpreter: `python -m
infertap.agent.workers.worker`, never a fork of this threaded process), passes its ring's
descriptor and one end of a socket pair, sends its setup, then relays messages both ways until
it exits. A worker that dies is counted, its metrics marked dead (prometheus-client's
mark_process_dead) and started again on the same ring, which meanwhile just fills and counts
its losses: the kernel never waits. The threads must live as long as their workers: a worker's
PR_SET_PDEATHSIG is tied to the thread that started it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from prometheus_client import multiprocess

from infertap.agent.policy.schema import Policy
from infertap.agent.workers.messages import (
    PodNames,
    PolicyInForce,
    Report,
    Stop,
    Wants,
    WorkerSetup,
    WorkerSnapshot,
)

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often a worker's thread looks at what changed on the agent's side
STOP_WAIT_S = 5.0  # a worker that has not ended by then after Stop is killed
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
STABLE_S = 10.0  # a worker that ran this long before dying restarts without waiting long
WORKER_MODULE = "infertap.agent.workers.worker"


def metrics_dir(run_dir: Path) -> Path:
    """This agent's prometheus-client multiprocess directory (one per agent on the node)."""
    return run_dir / "metrics" / str(os.getpid())


def clean_metrics_dirs(run_dir: Path) -> Path:
    """Empty this agent's directory, and remove those agents that are gone left behind."""
    base = run_dir / "metrics"
    if base.is_dir():
        for child in base.iterdir():
            if child.name.isdigit() and not _alive(int(child.name)):
                shutil.rmtree(child, ignore_errors=True)
    own = metrics_dir(run_dir)
    shutil.rmtree(own, ignore_errors=True)
    own.mkdir(parents=True, mode=0o700)
    return own


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


@dataclass
class _Slot:
    index: int
    ring_fd: int
    control: queue.SimpleQueue[object] = field(default_factory=queue.SimpleQueue)
    pid: int = 0
    started: int = 0  # times spawned
    thread: threading.Thread | None = None


class WorkerPool:
    def __init__(
        self,
        ring_fds: list[int],
        metrics_path: Path,
        setup: Callable[[int], WorkerSetup],
        on_report: Callable[[int, Report], None],
        wants: Callable[[], Wants],
        pods: Callable[[], dict[str, tuple[str, str]]],
    ) -> None:
        """`setup(i)`: worker i's first message (made when it starts, so a restarted worker
        gets the policy in force now). `on_report(i, report)` runs on worker i's thread."""
        self._slots = [_Slot(i, fd) for i, fd in enumerate(ring_fds)]
        self._metrics_path = metrics_path
        self._setup = setup
        self._on_report = on_report
        self._wants = wants
        self._pods = pods
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._snapshots: dict[int, WorkerSnapshot] = {}
        self.restarts = 0
        self.policy_errors = 0

    def __len__(self) -> int:
        return len(self._slots)

    def start(self) -> None:
        for slot in self._slots:
            slot.thread = threading.Thread(
                target=self._own, args=(slot,), name=f"worker-{slot.index}", daemon=True
            )
            slot.thread.start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Every worker sent its first report (it reads its ring)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self._snapshots) == len(self._slots):
                    return True
            time.sleep(0.02)
        return False

    def policy_in_force(self, policy: Policy) -> None:
        """A policy the agent put in force (known good): every worker takes it."""
        for slot in self._slots:
            slot.control.put(PolicyInForce(policy))

    def snapshots(self) -> list[WorkerSnapshot]:
        with self._lock:
            return [self._snapshots[i] for i in sorted(self._snapshots)]

    def pids(self) -> list[int]:
        return [s.pid for s in self._slots if s.pid]

    def alive(self) -> bool:
        """Every worker's thread runs (a worker being restarted counts as alive)."""
        return all(s.thread is not None and s.thread.is_alive() for s in self._slots)

    def stop(self) -> None:
        self._stopping.set()
        for slot in self._slots:
            if slot.thread is not None:
                slot.thread.join(timeout=STOP_WAIT_S + 2)
                slot.thread = None

    # ---- one worker's thread -----------------------------------------------------------------

    def _own(self, slot: _Slot) -> None:
        backoff = BACKOFF_MIN_S
        while not self._stopping.is_set():
            try:
                proc, conn = self._spawn(slot)
            except Exception:
                log.exception("could not start inspection worker %d", slot.index)
                if self._stopping.wait(BACKOFF_MAX_S):
                    return
                continue
            began = time.monotonic()
            try:
                self._relay(slot, proc, conn)
            except Exception:
                log.exception("inspection worker %d: relay failed", slot.index)
            finally:
                conn.close()
            self._reap(slot, proc)
            if self._stopping.is_set():
                return
            with self._lock:
                self.restarts += 1
                self._snapshots.pop(slot.index, None)
            log.warning(
                "inspection worker %d (pid %d) exited with %s: restarting it (its ring keeps"
                " filling meanwhile; what does not fit is counted lost)",
                slot.index,
                proc.pid,
                proc.returncode,
            )
            backoff = BACKOFF_MIN_S if time.monotonic() - began > STABLE_S else backoff
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _spawn(self, slot: _Slot) -> tuple[subprocess.Popen[bytes], Connection]:
        ours, theirs = socket.socketpair()
        try:
            argv = [
                sys.executable,
                "-m",
                WORKER_MODULE,
                "--ring-fd",
                str(slot.ring_fd),
                "--conn-fd",
                str(theirs.fileno()),
                "--parent",
                str(os.getpid()),
            ]
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self._metrics_path)}
            proc = subprocess.Popen(argv, pass_fds=(slot.ring_fd, theirs.fileno()), env=env)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        slot.pid = proc.pid
        slot.started += 1
        while not slot.control.empty():  # the setup carries the policy in force now
            slot.control.get_nowait()
        with contextlib.suppress(OSError):  # it died at once: the relay sees the closed socket
            conn.send(self._setup(slot.index))
        return proc, conn

    def _relay(self, slot: _Slot, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        """Until the worker's socket closes: its reports in, the agent's changes out."""
        wants, pods = self._wants(), self._pods()
        stop_sent = 0.0
        while True:
            if self._stopping.is_set() and not stop_sent:
                conn.send(Stop())
                stop_sent = time.monotonic()
            if stop_sent and time.monotonic() - stop_sent > STOP_WAIT_S:
                log.warning("inspection worker %d did not stop in time: killed", slot.index)
                proc.kill()
                return
            if not stop_sent:
                while not slot.control.empty():
                    conn.send(slot.control.get_nowait())
                now_wants, now_pods = self._wants(), self._pods()
                if now_wants != wants:
                    wants = now_wants
                    conn.send(wants)
                if now_pods != pods:
                    pods = now_pods
                    conn.send(PodNames(pods))
            if conn.poll(POLL_S):
                try:
                    report = conn.recv()
                except EOFError:
                    return
                self._handle(slot, report)
            elif proc.poll() is not None and not conn.poll(0):
                return

    def _handle(self, slot: _Slot, report: Report) -> None:
        if report.snapshot is not None:
            with self._lock:
                self._snapshots[slot.index] = report.snapshot
        if report.policy_error:
            with self._lock:
                self.policy_errors += 1
        try:
            self._on_report(slot.index, report)
        except Exception:  # a bug: never let it take the worker's relay down
            log.exception("handling a report of worker %d failed", slot.index)

    def _reap(self, slot: _Slot, proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(timeout=STOP_WAIT_S if self._stopping.is_set() else 1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        multiprocess.mark_process_dead(proc.pid, str(self._metrics_path))  # type: ignore[no-untyped-call]
        slot.pid = 0
