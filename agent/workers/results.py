"""What the agent makes of its inspection state: one interface over the in-process pipeline
(one worker: today's path) and over the workers' reports and snapshots (several).

The API's views and /metrics read an InspectionState; with workers, their snapshots (sent every
WorkerSetup.report_interval_s) are merged: counts summed, flow tables joined (each flow lives in
one worker), drift values the worst any worker sees (each worker's window holds its share of a
model's traffic), bin counts summed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

from infertap.agent.enforce.actions import FindingActions
from infertap.agent.export.event_hub import AgentEvent, EventHub
from infertap.agent.export.metrics import FlowAccounting
from infertap.agent.inspect.drift import FeatureBins
from infertap.agent.inspect.engine import InspectionEngine
from infertap.agent.pipeline import Pipeline
from infertap.agent.pod_labels import PodDirectory
from infertap.agent.workers.messages import Report, WorkerSnapshot


class InspectionState(Protocol):
    def decode_lost(self) -> dict[tuple[str, str], int]: ...

    def skipped(self) -> dict[tuple[str, str], int]:
        """Calls skipped under overload, by (model, reason)."""
        ...

    def uninspected_counts(self) -> dict[str, int]: ...

    def flow_states(self) -> tuple[dict[int, str], dict[int, str]]:
        """(flow cookie -> protocol, flow cookie -> why it is not decoded)."""
        ...

    def drift_values(self) -> dict[tuple[str, str, str], float]: ...

    def bin_values(self) -> Mapping[tuple[str, str], FeatureBins]: ...


class LocalState:
    """One worker: the agent's own pipeline and engine."""

    def __init__(self, pipeline: Pipeline, engine: InspectionEngine) -> None:
        self._pipeline = pipeline
        self._engine = engine

    def decode_lost(self) -> dict[tuple[str, str], int]:
        return self._pipeline.decoder.losses.counts()

    def skipped(self) -> dict[tuple[str, str], int]:
        return self._pipeline.skipped_counts()

    def uninspected_counts(self) -> dict[str, int]:
        return self._pipeline.decoder.uninspected_counts()

    def flow_states(self) -> tuple[dict[int, str], dict[int, str]]:
        snap = self._pipeline.snapshot()  # the caller's thread: never the decoder itself
        return snap.protocols, snap.uninspected

    def drift_values(self) -> dict[tuple[str, str, str], float]:
        return self._engine.drift_values()

    def bin_values(self) -> Mapping[tuple[str, str], FeatureBins]:
        return self._engine.bin_values()


class MergedState:
    """Several workers: their latest snapshots, merged."""

    def __init__(self, snapshots: Callable[[], list[WorkerSnapshot]]) -> None:
        self._snapshots = snapshots

    def decode_lost(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for s in self._snapshots():
            for k, n in s.decode_lost.items():
                out[k] = out.get(k, 0) + n
        return out

    def skipped(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for s in self._snapshots():
            for k, n in s.skipped.items():
                out[k] = out.get(k, 0) + n
        return out

    def uninspected_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self._snapshots():
            for k, n in s.uninspected_counts.items():
                out[k] = out.get(k, 0) + n
        return out

    def flow_states(self) -> tuple[dict[int, str], dict[int, str]]:
        protocols: dict[int, str] = {}
        uninspected: dict[int, str] = {}
        for s in self._snapshots():
            protocols.update(s.protocols)
            uninspected.update(s.uninspected)
        return protocols, uninspected

    def drift_values(self) -> dict[tuple[str, str, str], float]:
        out: dict[tuple[str, str, str], float] = {}
        for s in self._snapshots():
            for k, v in s.drift.items():
                out[k] = max(v, out.get(k, v))
        return out

    def bin_values(self) -> Mapping[tuple[str, str], FeatureBins]:
        out: dict[tuple[str, str], FeatureBins] = {}
        for s in self._snapshots():
            for k, fb in s.bins.items():
                have = out.get(k)
                if have is None:
                    out[k] = fb
                else:
                    seen = tuple(a + b for a, b in zip(have.seen, fb.seen, strict=True))
                    out[k] = FeatureBins(have.baseline_share, seen)
        return out


class ReportRouter:
    """A worker's report, put where the agent keeps it: events on the hub, findings to the
    policy's actions and the circuit breaker, flow ends to verdicts and per-pod accounting.
    Called on the worker's relay thread (one per worker): everything here is thread-safe."""

    def __init__(
        self,
        hub: EventHub,
        actions: FindingActions,
        accounting: FlowAccounting,
        pods: PodDirectory,
        note_model: Callable[[str], object],
    ) -> None:
        self._hub = hub
        self._actions = actions
        self._accounting = accounting
        self._pods = pods
        self._note_model = note_model  # the agent's bounded model label (circuit gauge)

    def __call__(self, index: int, report: Report) -> None:
        for event in report.events:
            self._hub.publish(event)
        for call in report.calls:
            self._note_model(call.model)
            self._actions.on_call(call.model, call.service, list(call.findings), call.client_flow)
        for end in report.ends:
            self._accounting.flow_ended(self._pods.labels(end.flow.cgroup_id), end.flow)
            self._actions.on_flow_end(end)
        if report.policy_error:
            self._hub.publish(
                AgentEvent(
                    "policy_error",
                    time.monotonic_ns(),
                    {"description": f"worker {index}: {report.policy_error}", "kept": ""},
                )
            )
