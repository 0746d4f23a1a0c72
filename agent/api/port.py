"""What the control API needs from the agent: plain views and the verdicts, nothing else.

The API serves from its own threads, so every method here must be safe to call from any thread
and return data the caller owns (copies, never the agent's live structures).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from infertap.agent.enforce.verdicts import Verdict
from infertap.agent.export.event_hub import Subscription
from infertap.agent.flows.records import Endpoint, FlowInfo


@dataclass(frozen=True)
class AgentStatus:
    ready: bool
    mode: str
    cgroups: list[str]
    ports: list[int]
    kernel_stats: dict[str, int]
    flows_active: int
    headers: str  # where the kernel headers came from; "" before start
    sample_bytes: int = 0  # the sampling in force (the kernel's config map); 0 before start
    sample_one_in: int = 0
    decode_lost: dict[str, int] = field(default_factory=dict)  # "protocol/reason" -> count
    connections_uninspected: dict[str, int] = field(default_factory=dict)  # reason -> count
    workers: int = 1  # inspection processes (run --workers)
    worker_restarts: int = 0  # workers restarted after they died
    inspection_skipped: dict[str, int] = field(default_factory=dict)  # "model/reason" -> count
    shed_levels: list[int] = field(default_factory=list)  # per ring: percent of requests shed


@dataclass(frozen=True)
class FlowRow:
    """An intercepted flow with what the agent knows about it."""

    flow: FlowInfo
    cgroup: str  # the pod's cgroup path, "" when unknown
    protocol: str  # "http/1.1", "h2", "unknown", or "" when not detected (yet)
    # Why its traffic is not inspected, "" when it is: "pre_existing" for a connection that was
    # open before the agent attached to its pod (found from /proc; it has no kernel counters).
    uninspected: str = ""


@dataclass(frozen=True)
class ModelsView:
    circuit_states: dict[str, int] = field(default_factory=dict)  # model -> CircuitState value
    drift: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (model, feature, stat)
    policy_hash: str = ""


class ApiVerdicts(Protocol):
    """Verdict changes from the API; each change is announced as an event by the implementation."""

    def block_flow(self, flow_id: int, reason: str = "") -> Verdict | None: ...

    def unblock_flow(self, flow_id: int) -> Verdict | None: ...

    def block_service(self, service: Endpoint, reason: str = "") -> Verdict | None: ...

    def unblock_service(self, service: Endpoint) -> Verdict | None: ...

    def list(self) -> list[Verdict]: ...


class ControlPort(Protocol):
    @property
    def verdicts(self) -> ApiVerdicts: ...

    def status(self) -> AgentStatus: ...

    def flow_rows(self) -> list[FlowRow]: ...

    def models(self) -> ModelsView: ...

    def subscribe(self, kinds: frozenset[str]) -> Subscription: ...
