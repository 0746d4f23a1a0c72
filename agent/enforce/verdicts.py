"""Block and allow flows and services through the kernel's verdict maps.

A verdict takes effect on the next sendmsg, on open connections too: sk_msg looks the flow and its
service up on every message (bpf/intercept.c). `verdicts_active` in the config map tells sk_msg
whether any verdict exists, so with none it skips both lookups.

sk_msg runs only on sockets in the sockhash. With skb capture most sockets are not, so setting a
verdict also puts the open sockets it targets into the sockhash (before the call returns), and
sockops puts new ones there at establishment; lifting it takes them out again. The kernel side
checks the verdict after writing the flow, and we list flows after writing the verdict, so a
connection being established meanwhile is caught by one side or the other.

The kernel removes a flow's verdict when the socket closes; `flow_ended` keeps our view in step.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from infertap.agent.export.event_hub import AgentEvent
from infertap.agent.flows.records import Endpoint, FlowInfo
from infertap.agent.kernel import decode, structs


class VerdictMaps(Protocol):
    """What the store needs from the sensor (a Protocol so tests of the logic are honest)."""

    def table(self, name: str, key: Any = None, leaf: Any = None) -> Any: ...

    def set_verdicts_active(self, count: int) -> None: ...

    def flows(self) -> list[FlowInfo]: ...

    def enforce_on(self, flow: FlowInfo, cgroup_hint: Path | None = None) -> bool: ...

    def release(self, flow: FlowInfo) -> bool: ...


@dataclass(frozen=True)
class Verdict:
    kind: Literal["flow", "service"]
    flow_id: int  # for kind == "flow"
    service: Endpoint | None  # for kind == "service"
    action: Literal["block"]
    reason: str
    since: float  # wall-clock seconds

    def describe(self) -> str:
        target = f"flow {self.flow_id}" if self.kind == "flow" else f"service {self.service}"
        return f"{self.action} {target}" + (f" ({self.reason})" if self.reason else "")


log = logging.getLogger(__name__)


class VerdictStore:
    def __init__(self, maps: VerdictMaps) -> None:
        self._maps = maps
        self._lock = threading.Lock()
        self._flows: dict[int, Verdict] = {}
        self._services: dict[Endpoint, Verdict] = {}

    def _flow_table(self) -> Any:
        return self._maps.table("itap_flow_verdicts", ct.c_uint64, ct.c_uint32)

    def _svc_table(self) -> Any:
        return self._maps.table("itap_svc_verdicts", structs.ServiceKey, ct.c_uint32)

    def _publish_count(self) -> None:
        self._maps.set_verdicts_active(len(self._flows) + len(self._services))

    def block_flow(self, flow_id: int, reason: str = "") -> Verdict | None:
        """Returns the new verdict, or None if the flow was already blocked."""
        with self._lock:
            if flow_id in self._flows:
                return None
            v = Verdict("flow", flow_id, None, "block", reason, time.time())
            table = self._flow_table()
            table[ct.c_uint64(flow_id)] = ct.c_uint32(structs.VERDICT_BLOCK)
            self._flows[flow_id] = v
            self._publish_count()
        self._enforce([f for f in self._maps.flows() if f.cookie == flow_id])
        return v

    def unblock_flow(self, flow_id: int) -> Verdict | None:
        """Returns the verdict removed, or None if there was none."""
        with self._lock:
            v = self._flows.pop(flow_id, None)
            if v is None:
                return None
            table = self._flow_table()
            with contextlib.suppress(KeyError):  # the kernel removed it when the socket closed
                del table[ct.c_uint64(flow_id)]
            self._publish_count()
        self._release([f for f in self._maps.flows() if f.cookie == flow_id])
        return v

    def block_service(self, service: Endpoint, reason: str = "") -> Verdict | None:
        with self._lock:
            if service in self._services:
                return None
            v = Verdict("service", 0, service, "block", reason, time.time())
            table = self._svc_table()
            table[decode.service_key(service)] = ct.c_uint32(structs.VERDICT_BLOCK)
            self._services[service] = v
            self._publish_count()
        self._enforce([f for f in self._maps.flows() if f.service == service])
        return v

    def unblock_service(self, service: Endpoint) -> Verdict | None:
        with self._lock:
            v = self._services.pop(service, None)
            if v is None:
                return None
            table = self._svc_table()
            with contextlib.suppress(KeyError):
                del table[decode.service_key(service)]
            self._publish_count()
        self._release([f for f in self._maps.flows() if f.service == service])
        return v

    def _enforce(self, flows: list[FlowInfo]) -> None:
        """Put the open sockets a new verdict targets where sk_msg sees their next send."""
        for f in flows:
            if not self._maps.enforce_on(f):
                log.warning("flow %d: socket not found; the verdict cannot stop it", f.cookie)

    def _release(self, flows: list[FlowInfo]) -> None:
        """Clear the drop verdict the kernel cached on the sockets, and take those that joined
        the sockhash for the verdict out of it."""
        for f in flows:
            if not self._still_blocked(f) and not self._maps.release(f):
                log.warning("flow %d: socket not found; it stays blocked until it closes", f.cookie)

    def _still_blocked(self, flow: FlowInfo) -> bool:
        with self._lock:
            return flow.cookie in self._flows or flow.service in self._services

    def flow_ended(self, flow_id: int) -> None:
        """The kernel dropped the flow's verdict with the socket; forget it here too."""
        with self._lock:
            if self._flows.pop(flow_id, None) is not None:
                self._publish_count()

    def is_service_blocked(self, service: Endpoint) -> bool:
        with self._lock:
            return service in self._services

    def list(self) -> list[Verdict]:
        with self._lock:
            return [*self._flows.values(), *self._services.values()]


def unblocked(v: Verdict) -> str:
    """How a lifted verdict is described: "unblocked service 10.0.0.7:8000 (reason)"."""
    return f"unblocked {v.describe().removeprefix('block ')}"


class AnnouncedVerdicts:
    """A VerdictStore whose every change is also published as a "verdict" event.

    The one way the breaker, the findings' actions and the API change verdicts, so each change is
    announced once, the same way, whoever made it.
    """

    def __init__(self, store: VerdictStore, publish: Callable[[AgentEvent], None]) -> None:
        self.store = store
        self._publish = publish

    def _announce(self, description: str, action: str) -> None:
        data = {"description": description, "action": action}
        self._publish(AgentEvent("verdict", time.monotonic_ns(), data))

    def block_flow(self, flow_id: int, reason: str = "") -> Verdict | None:
        v = self.store.block_flow(flow_id, reason)
        if v is not None:
            self._announce(v.describe(), "block")
        return v

    def unblock_flow(self, flow_id: int) -> Verdict | None:
        v = self.store.unblock_flow(flow_id)
        if v is not None:
            self._announce(unblocked(v), "unblock")
        return v

    def block_service(self, service: Endpoint, reason: str = "") -> Verdict | None:
        v = self.store.block_service(service, reason)
        if v is not None:
            self._announce(v.describe(), "block")
        return v

    def unblock_service(self, service: Endpoint) -> Verdict | None:
        v = self.store.unblock_service(service)
        if v is not None:
            self._announce(unblocked(v), "unblock")
        return v

    def flow_ended(self, flow_id: int) -> None:
        """Not announced: the kernel dropped the verdict with the socket."""
        self.store.flow_ended(flow_id)

    def list(self) -> list[Verdict]:
        return self.store.list()
