"""What crosses between the agent and its inspection workers: plain, picklable data.

Sent over a socket pair as multiprocessing.connection messages. Nothing here carries payload
bytes or raw PII: call summaries hold findings (redacted by construction, agent/inspect/
findings.py), events are the hub's redacted events, snapshots hold counts and drift values.
"""

from __future__ import annotations

import copyreg
from dataclasses import dataclass, field
from types import MappingProxyType

from infertap.agent.export.event_hub import AgentEvent
from infertap.agent.flows.records import Endpoint, FlowEnd
from infertap.agent.inspect.drift import FeatureBins
from infertap.agent.inspect.findings import Finding
from infertap.agent.pod_labels import PodLabels
from infertap.agent.policy.schema import Policy


def _read_only(mapping: dict[object, object]) -> MappingProxyType[object, object]:
    return MappingProxyType(mapping)


def _mapping_proxy(proxy: MappingProxyType[object, object]) -> tuple[object, tuple[object]]:
    return _read_only, (dict(proxy),)


# A Policy holds read-only mappings (the discovery selector's labels), which pickle cannot take
# as they are: they cross as a dict and are made read-only again on the other side.
copyreg.pickle(MappingProxyType, _mapping_proxy)  # type: ignore[arg-type]

# ---- agent -> worker ------------------------------------------------------------------------


@dataclass(frozen=True)
class Wants:
    """Which events the agent's subscribers take (EventHub.wants): workers build only those."""

    all: bool = False
    kinds: frozenset[str] = frozenset()


@dataclass(frozen=True)
class WorkerSetup:
    """The first message a worker gets: everything it needs to start inspecting."""

    index: int  # its ring (flow.ring) and its place in the pool
    ring_size: int  # bytes (the reader maps it with this size)
    cgroup_mount: str
    policy: Policy  # in force in the agent (already applied there: known good)
    pods: dict[str, PodLabels]  # cgroup path -> (namespace, pod), from discovery
    wants: Wants
    batch_size: int
    read_interval_s: float
    report_interval_s: float  # snapshots at least this often
    otlp_endpoint: str | None  # the command line's tracing flags (they win over the policy)
    trace_sample_ratio: float | None
    log_level: int


@dataclass(frozen=True)
class PolicyInForce:
    """A reload the agent put in force; a worker that cannot take it keeps its current one."""

    policy: Policy


@dataclass(frozen=True)
class PodNames:
    """Discovery's pod names changed: the whole table."""

    pods: dict[str, PodLabels]


@dataclass(frozen=True)
class Stop:
    """Drain the ring, flush, send a last report and exit."""


# ---- worker -> agent ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallSummary:
    """One inspected model call, as the circuit breaker and the policy's actions need it."""

    model: str  # redacted where the event was made
    service: Endpoint
    pod: PodLabels
    findings: tuple[Finding, ...]
    client_flow: int | None  # for block_flow


@dataclass
class WorkerSnapshot:
    """A worker's state for the agent's views (API, /metrics), replaced whole each time."""

    index: int
    pid: int
    records: int = 0
    exchanges: int = 0
    flows_started: int = 0  # FLOW_START records this worker got
    calls: int = 0  # model calls inspected
    protocols: dict[int, str] = field(default_factory=dict)  # flow cookie -> protocol
    uninspected: dict[int, str] = field(default_factory=dict)  # flow cookie -> reason
    uninspected_counts: dict[str, int] = field(default_factory=dict)
    decode_lost: dict[tuple[str, str], int] = field(default_factory=dict)
    skipped: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, reason): overload
    drift: dict[tuple[str, str, str], float] = field(default_factory=dict)
    bins: dict[tuple[str, str], FeatureBins] = field(default_factory=dict)
    policy_hash: str = ""


@dataclass
class Report:
    """What a worker sends after a drain (batched: one message per read interval at most)."""

    events: list[AgentEvent] = field(default_factory=list)
    calls: list[CallSummary] = field(default_factory=list)
    ends: list[FlowEnd] = field(default_factory=list)
    snapshot: WorkerSnapshot | None = None
    policy_error: str = ""  # a policy the worker could not take (it kept the one it had)

    def __bool__(self) -> bool:
        return bool(self.events or self.calls or self.ends or self.snapshot or self.policy_error)
