"""The Polyfill unit: one rewriter process per client pod, and the kernel's polyfill map.

    with Steering() as steering:
        steering.attach(client_pod_cgroup)
        polyfill = Polyfill(steering)
        polyfill.set_rules([PolyfillRule(ClientPod(cgroup, netns), Endpoint("10.0.0.5", 8000),
                                         "fraud", None, {"threshold": 0.5})])
        ...
        polyfill.stop()

A client's connections are steered to its rewriter only while the rewriter is up: the map entry
is written after the rewriter reports its ports, and deleted when the rewriter is stopped or
exits (a watcher thread sees its stdout close). A client without an entry connects directly.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infertap.agent.flows.records import Endpoint
from infertap.agent.kernel import cgroups
from infertap.agent.kernel.steering import Steering, SteeringError

log = logging.getLogger(__name__)

READY_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class ClientPod:
    cgroup: Path  # the pod's cgroup v2 folder: its processes' connects are the ones polyfilled
    netns: str  # a name `ip netns exec` knows: where the rewriter listens


@dataclass(frozen=True, slots=True)
class PolyfillRule:
    client: ClientPod
    service: Endpoint  # IPv4 ip:port the client connects to
    model: str
    version: str | None
    set_parameters: Mapping[str, Any]


@dataclass
class RewriterStats:
    connections: int = 0
    requests: int = 0
    rewritten: int = 0
    errors: int = 0


@dataclass
class _Rewriter:
    client: ClientPod
    config: str
    proc: subprocess.Popen[str]
    ports: dict[Endpoint, int] = field(default_factory=dict)
    up: bool = False
    ready: threading.Event = field(default_factory=threading.Event)
    stats: RewriterStats = field(default_factory=RewriterStats)


def _config(rules: Iterable[PolyfillRule]) -> str:
    by_service: dict[str, list[dict[str, Any]]] = {}
    for r in rules:
        by_service.setdefault(f"{r.service.ip}:{r.service.port}", []).append(
            {"model": r.model, "version": r.version, "set_parameters": dict(r.set_parameters)}
        )
    services = [{"service": s, "rules": rs} for s, rs in sorted(by_service.items())]
    return json.dumps({"services": services}, sort_keys=True)


class Polyfill:
    def __init__(self, steering: Steering, python: str = sys.executable) -> None:
        self.steering = steering
        self.python = python
        self._lock = threading.Lock()
        self._rewriters: dict[ClientPod, _Rewriter] = {}

    def set_rules(self, rules: Iterable[PolyfillRule]) -> None:
        """Make `rules` the rules in force. A client whose rules are unchanged keeps its rewriter
        (and its connections); one whose rules changed gets a new rewriter (new connections go
        to it; connections already relayed by the old one are closed with it)."""
        rules = list(rules)
        for r in rules:
            if ":" in r.service.ip:
                raise SteeringError(f"polyfill {r.service}: only IPv4 services can be polyfilled")
        by_client: dict[ClientPod, list[PolyfillRule]] = {}
        for r in rules:
            by_client.setdefault(r.client, []).append(r)
        wanted = {client: _config(rs) for client, rs in by_client.items()}
        with self._lock:
            stale = [
                rw for c, rw in self._rewriters.items() if wanted.get(c) != rw.config or not rw.up
            ]
            for rw in stale:
                rw.up = False
                del self._rewriters[rw.client]
            self._sync_kernel()  # stale clients leave the kernel map before their rewriter goes
        for rw in stale:
            self._kill(rw)
        for client, config in wanted.items():
            if client in self._rewriters:
                continue
            rw = self._start(client, config)
            with self._lock:
                self._rewriters[client] = rw
                try:
                    self._sync_kernel()
                except Exception:
                    rw.up = False
                    del self._rewriters[client]
                    self._kill(rw)
                    raise

    def stop(self) -> None:
        with self._lock:
            rewriters = list(self._rewriters.values())
            for rw in rewriters:
                rw.up = False
            self._rewriters.clear()
            self._sync_kernel()
        for rw in rewriters:
            self._kill(rw)

    def stats(self) -> dict[ClientPod, RewriterStats]:
        with self._lock:
            return {c: RewriterStats(**vars(rw.stats)) for c, rw in self._rewriters.items()}

    def up(self, client: ClientPod) -> bool:
        rw = self._rewriters.get(client)
        return rw is not None and rw.up

    # ---- internals -------------------------------------------------------------------------

    def _start(self, client: ClientPod, config: str) -> _Rewriter:
        # Started by `ip netns exec` as our child: in the client's network namespace (so it
        # listens on the client's loopback) but in our cgroup (so the hook does not steer its
        # own connects to the service).
        argv = ["ip", "netns", "exec", client.netns, self.python, "-m", __package__ + ".rewriter"]
        proc = subprocess.Popen(
            [*argv, config], stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        rw = _Rewriter(client, config, proc)
        threading.Thread(target=self._watch, args=(rw,), daemon=True, name="polyfill").start()
        if not rw.ready.wait(READY_TIMEOUT) or not rw.up:
            self._kill(rw)
            raise SteeringError(f"polyfill rewriter for {client.cgroup} did not start")
        return rw

    def _watch(self, rw: _Rewriter) -> None:
        assert rw.proc.stdout is not None
        for line in rw.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("event")
            if kind == "ready":
                rw.ports = {
                    Endpoint(s.rpartition(":")[0], int(s.rpartition(":")[2])): int(p)
                    for s, p in ev["ports"].items()
                }
                rw.up = True
                rw.ready.set()
            elif kind == "conn":
                rw.stats.connections += 1
            elif kind == "done":
                rw.stats.requests += int(ev.get("requests", 0))
                rw.stats.rewritten += int(ev.get("rewritten", 0))
                rw.stats.errors += 1 if ev.get("error") else 0
        # stdout closed: the rewriter is gone. Fail open: its clients connect directly again.
        rw.ready.set()
        with self._lock:
            if rw.up:
                log.warning("polyfill rewriter for %s exited; steering stopped", rw.client.cgroup)
            rw.up = False
            if self._rewriters.get(rw.client) is rw:
                del self._rewriters[rw.client]
                self._sync_kernel()

    def _sync_kernel(self) -> None:
        targets: dict[tuple[int, Endpoint], int] = {}
        for rw in self._rewriters.values():
            if not rw.up:
                continue
            try:
                cg = cgroups.cgroup_id(rw.client.cgroup)
            except OSError:
                continue  # the pod is gone
            for svc, port in rw.ports.items():
                targets[(cg, svc)] = port
        self.steering.set_polyfill(targets)

    @staticmethod
    def _kill(rw: _Rewriter) -> None:
        if rw.proc.poll() is None:
            rw.proc.terminate()
            try:
                rw.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                rw.proc.kill()
                rw.proc.wait(timeout=5)
