"""What the policy says to do with findings: log, alert, block the flow, or feed the model's
circuit breaker (which blocks and unblocks the model's services).

Given narrow ports, never the agent: verdicts (announced: every change is an event) and a way to
publish events. Findings arrive on the pipeline's thread; the breaker's timer runs on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from infertap.agent.enforce.breaker import CircuitBreaker, CircuitEvent
from infertap.agent.enforce.verdicts import Verdict
from infertap.agent.export.event_hub import AgentEvent
from infertap.agent.flows.records import Endpoint, FlowEnd
from infertap.agent.inspect.findings import Finding
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.pipeline import Inspected, PipelineSink
from infertap.agent.policy.schema import Policy

log = logging.getLogger(__name__)

TICK_S = 0.25  # how often the breaker's clocks (cooldown, probe) are looked at


class ActionVerdicts(Protocol):
    """What the actions change in the kernel (AnnouncedVerdicts: each change is published)."""

    def block_flow(self, flow_id: int, reason: str = "") -> Verdict | None: ...

    def block_service(self, service: Endpoint, reason: str = "") -> Verdict | None: ...

    def unblock_service(self, service: Endpoint) -> Verdict | None: ...

    def flow_ended(self, flow_id: int) -> None: ...


class FindingActions(PipelineSink):
    def __init__(
        self,
        policy: Policy,
        verdicts: ActionVerdicts,
        publish: Callable[[AgentEvent], None],
    ) -> None:
        self.policy = policy
        self._verdicts = verdicts
        self._publish_event = publish
        self.breaker = CircuitBreaker.from_policy(policy, verdicts)
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def reconfigure(self, policy: Policy) -> None:
        """A new policy is in force: its actions and circuit settings from now on."""
        self.breaker.reconfigure(policy)
        self.policy = policy

    # ---- the pipeline's sink (reader thread) ----

    def on_inference(self, inspected: Inspected) -> None:
        self.on_inspected(inspected.event, inspected.findings, inspected.client_flow)

    def on_flow_end(self, end: FlowEnd) -> None:
        self._verdicts.flow_ended(end.flow.cookie)  # the kernel dropped its verdict with it

    def on_inspected(
        self, event: InferenceEvent, findings: list[Finding], client_flow: int | None
    ) -> None:
        """Every inference event, with its findings (often none). Runs on the reader thread."""
        self.on_call(event.model, event.service, findings, client_flow)

    def on_call(
        self,
        model: str,
        service: Endpoint,
        findings: list[Finding],
        client_flow: int | None,
    ) -> None:
        """One model call of `model` served at `service`, with its findings: from the agent's
        own pipeline, or summarised by an inspection worker (agent/workers). Any thread."""
        self.breaker.note_service(model, service)
        policy = self.policy
        for f in findings:
            # Every finding goes to the breaker: it trips only on those whose action is
            # circuit_break, but needs the others too (a drift level falling back to "info" is
            # what lets an open circuit close).
            self._circuit(self.breaker.record(f, service))
            action = policy.action_for(f.kind, f.severity)
            if action == "block_flow" and client_flow is not None:
                self._verdicts.block_flow(client_flow, f"{f.kind} {f.type}")
            elif action == "alert":
                log.warning(
                    "%s %s finding on model %s at %s", f.severity, f.type, f.model, f.location
                )

    def states(self) -> dict[str, int]:
        """Circuit state per model, as the infertap_circuit_state gauge's values."""
        return {m: int(s) for m, s in self.breaker.states().items()}

    def _circuit(self, events: list[CircuitEvent]) -> None:
        for ev in events:
            data = ev.to_data()
            log.warning(
                "circuit %s: %s -> %s (%s)",
                ev.model,
                data["from_state"],
                data["to_state"],
                ev.reason,
            )
            self._publish_event(AgentEvent("circuit", time.monotonic_ns(), dict(data)))

    # ---- the breaker's timer ----

    def start(self) -> None:
        def tick() -> None:
            while not self._stop.wait(TICK_S):
                try:
                    self._circuit(self.breaker.tick())
                except Exception:
                    log.exception("circuit breaker tick failed")

        self._ticker = threading.Thread(target=tick, name="breaker", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
            self._ticker = None
