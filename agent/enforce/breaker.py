"""A circuit breaker per model: stop a model's traffic in the kernel while it misbehaves.

States and transitions (one circuit per model name; it covers every service endpoint the model
has been seen on):

  closed --trip--> open --cooldown over--> half-open --probe clean--> closed
                    ^                          |
                    +---trip, or drift still at alert after the probe (cooldown doubles)

A *trip* is a finding whose policy action is `circuit_break`: one drift or schema finding opens
the circuit; PII findings open it once `pii_hits` of them arrive within `pii_window_s`.

The kernel's service verdicts are a plain block/allow map, so half-open cannot pass "one message
in N". Instead it allows all traffic for a short probe (`probe_s`) and then judges: any trip
during the probe re-opens at once, with the cooldown doubled (up to `max_cooldown_s`); at the
end of the probe the circuit closes unless a drift statistic that tripped it is still at its
level. Drift findings report level *changes* (agent/inspect/drift.py), so the breaker keeps, per
model, the (feature, statistic) pairs last reported at a tripping level and clears one when a
finding reports that pair back under it: a model closes only once its drift window recovered.
If the probe is too short for the drift window to be judged again, the pair stays and the
circuit re-opens: failing safe.

Pure logic: time comes from injected clocks and verdicts go through a VerdictPort, so tests need
no kernel. Findings (pipeline thread) and tick() (timer thread) may run concurrently; one lock
orders everything, port calls included, so the kernel sees blocks and unblocks in the order of
the transitions that caused them.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from infertap.agent.flows.records import Endpoint
from infertap.agent.inspect.findings import Finding
from infertap.agent.policy.schema import ActionsSpec, CircuitSpec, Policy

log = logging.getLogger(__name__)

# A closed circuit whose model has sent nothing for this long is forgotten (it would be closed
# again when the model returns): model names come from clients, and one circuit per name ever
# seen grew without bound. Never shorter than the PII window, whose hits it would lose.
IDLE_S = 600.0
# And at most this many circuits at once: a flood of distinct names within IDLE_S evicts the
# least recently seen closed circuits that hold nothing (no PII hits in the window, no drift).
MAX_CIRCUITS = 10_000


class CircuitState(enum.IntEnum):
    """Values are those of the infertap_circuit_state gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        """ "closed", "half-open" or "open": the spelling events and the CLI use."""
        return self.name.lower().replace("_", "-")


class VerdictPort(Protocol):
    """What the breaker needs from agent/enforce/verdicts.py's VerdictStore."""

    def block_service(self, service: Endpoint, reason: str) -> object: ...

    def unblock_service(self, service: Endpoint) -> object: ...


@dataclass(frozen=True, slots=True)
class CircuitEvent:
    model: str
    services: tuple[Endpoint, ...]  # the endpoints blocked or unblocked by this transition
    from_state: CircuitState
    to_state: CircuitState
    reason: str
    at: float  # wall-clock seconds

    @property
    def service(self) -> Endpoint | None:
        """The first endpoint (most models run on one): for consumers that show one."""
        return self.services[0] if self.services else None

    def to_data(self) -> dict[str, object]:
        """Plain values for a "circuit" event on the event hub (agent/export/events.py)."""
        return {
            "model": self.model,
            "service": str(self.service) if self.service is not None else "",
            "services": [str(s) for s in self.services],
            "from_state": self.from_state.label,
            "to_state": self.to_state.label,
            "reason": self.reason,
            "at": self.at,
        }


@dataclass(slots=True)
class _Circuit:
    cooldown_s: float
    state: CircuitState = CircuitState.CLOSED
    services: dict[Endpoint, None] = field(default_factory=dict)  # a set that keeps order
    pii_times: deque[float] = field(default_factory=deque)  # when PII trips arrived
    drift_alerts: dict[tuple[str, str], None] = field(default_factory=dict)  # (feature, stat)
    until: float = 0.0  # open: when the probe starts; half-open: when the probe ends
    last_seen: float = 0.0  # the model's last inference event or finding


class CircuitBreaker:
    def __init__(
        self,
        settings: CircuitSpec,
        actions: ActionsSpec,
        port: VerdictPort,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        idle_s: float = IDLE_S,
        max_circuits: int = MAX_CIRCUITS,
    ) -> None:
        self._settings = settings
        self._idle_s = idle_s
        self._max_circuits = max_circuits
        self._actions = actions
        self._port = port
        self._clock = clock  # for cooldowns and windows: must not jump
        self._wall_clock = wall_clock  # for CircuitEvent.at only
        self._lock = threading.Lock()
        self._circuits: dict[str, _Circuit] = {}  # least recently seen first

    @classmethod
    def from_policy(
        cls,
        policy: Policy,
        port: VerdictPort,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> CircuitBreaker:
        return cls(policy.circuit, policy.actions, port, clock, wall_clock)

    def reconfigure(self, policy: Policy) -> None:
        """A reloaded policy: applies to what happens next; running cooldowns keep their end."""
        with self._lock:
            self._settings = policy.circuit
            self._actions = policy.actions

    # --- reading state ---

    def state(self, model: str) -> CircuitState:
        with self._lock:
            c = self._circuits.get(model)
            return c.state if c is not None else CircuitState.CLOSED

    def states(self) -> dict[str, CircuitState]:
        """Every model seen lately (idle closed circuits are forgotten): the
        infertap_circuit_state{model} gauge."""
        with self._lock:
            return {model: c.state for model, c in self._circuits.items()}

    # --- input ---

    def note_service(self, model: str, service: Endpoint) -> None:
        """The model is served at `service` (call per inference event): an open circuit blocks
        every endpoint of its model, including ones first seen while it is open."""
        with self._lock:
            c = self._circuit(model)
            c.last_seen = self._clock()
            self._add_service(model, c, service)

    def record(self, finding: Finding, service: Endpoint | None = None) -> list[CircuitEvent]:
        """Account for one finding (any kind or severity; only trips count). `service` is the
        endpoint of the traffic it came from, when known. Returns the transitions it caused."""
        with self._lock:
            now = self._clock()
            c = self._circuit(finding.model)
            c.last_seen = now
            events = self._advance(finding.model, c, now)
            if service is not None:
                self._add_service(finding.model, c, service)
            trip = self._actions.action_for(finding.kind, finding.severity) == "circuit_break"
            reason = self._trip_reason(c, finding, trip, now)
            if reason is not None:
                events += self._trip(finding.model, c, now, reason)
            return events

    def tick(self) -> list[CircuitEvent]:
        """Time-driven transitions (cooldown over, probe over): call about once a second."""
        with self._lock:
            now = self._clock()
            events: list[CircuitEvent] = []
            for model, c in self._circuits.items():
                events += self._advance(model, c, now)
            idle = max(self._idle_s, self._settings.pii_window_s)
            for model, c in list(self._circuits.items()):
                if c.state is CircuitState.CLOSED and now - c.last_seen > idle:
                    del self._circuits[model]
            return events

    # --- logic (called with the lock held) ---

    def _circuit(self, model: str) -> _Circuit:
        c = self._circuits.pop(model, None)  # re-inserted last: the dict stays in seen order
        if c is None:
            c = _Circuit(cooldown_s=self._settings.cooldown_s, last_seen=self._clock())
            if len(self._circuits) >= self._max_circuits:
                self._evict_one()
        self._circuits[model] = c
        return c

    def _evict_one(self) -> None:
        """Forget the least recently seen circuit that holds nothing (closed, no PII hits in
        the window, no drift at a tripping level); none such: keep them all."""
        for model, c in self._circuits.items():
            if c.state is CircuitState.CLOSED and not c.pii_times and not c.drift_alerts:
                del self._circuits[model]
                return

    def _add_service(self, model: str, c: _Circuit, service: Endpoint) -> None:
        if service in c.services:
            return
        c.services[service] = None
        if c.state is CircuitState.OPEN:
            self._block(model, service, "circuit open")

    def _trip_reason(self, c: _Circuit, f: Finding, trip: bool, now: float) -> str | None:
        """Why this finding opens (or re-opens) the circuit; None when it does not."""
        if f.kind == "drift":
            key = (f.location, f.type)
            if not trip:
                c.drift_alerts.pop(key, None)  # the statistic went back under the level
                return None
            c.drift_alerts[key] = None
            what = f"drift {f.type} {f.severity} on {f.location}"
        elif not trip:
            return None
        elif f.kind == "pii":
            c.pii_times.append(now)
            horizon = now - self._settings.pii_window_s
            while c.pii_times and c.pii_times[0] <= horizon:
                c.pii_times.popleft()
            n = len(c.pii_times)
            what = f"PII {f.type} at {f.location}"
            if c.state is CircuitState.CLOSED and n < self._settings.pii_hits:
                return None
            if c.state is CircuitState.CLOSED:
                window = self._settings.pii_window_s
                what = f"{n} PII findings within {window:g}s (last: {f.type} at {f.location})"
        else:
            what = f"schema {f.type} {f.severity} at {f.location}"
        # An open circuit only takes note: the finding came from traffic already in flight.
        return what if c.state is not CircuitState.OPEN else None

    def _trip(self, model: str, c: _Circuit, now: float, reason: str) -> list[CircuitEvent]:
        if c.state is CircuitState.HALF_OPEN:
            c.cooldown_s = min(c.cooldown_s * 2, self._settings.max_cooldown_s)
            reason = f"{reason} during the probe"
        else:
            c.cooldown_s = self._settings.cooldown_s
        return [self._open(model, c, now, reason)]

    def _open(self, model: str, c: _Circuit, now: float, reason: str) -> CircuitEvent:
        event = self._move(model, c, CircuitState.OPEN, f"{reason}; open for {c.cooldown_s:g}s")
        c.until = now + c.cooldown_s
        for service in c.services:
            self._block(model, service, reason)
        return event

    def _advance(self, model: str, c: _Circuit, now: float) -> list[CircuitEvent]:
        if c.state is CircuitState.OPEN and now >= c.until:
            probe = self._settings.probe_s
            event = self._move(model, c, CircuitState.HALF_OPEN, f"cooldown over; probe {probe:g}s")
            c.until = now + probe
            c.pii_times.clear()  # the probe is judged on its own traffic
            for service in c.services:
                self._unblock(service)
            return [event]
        if c.state is CircuitState.HALF_OPEN and now >= c.until:
            if c.drift_alerts:
                stats = ", ".join(f"{stat} on {feature}" for feature, stat in c.drift_alerts)
                c.cooldown_s = min(c.cooldown_s * 2, self._settings.max_cooldown_s)
                return [
                    self._open(model, c, now, f"drift still at its level after the probe: {stats}")
                ]
            c.cooldown_s = self._settings.cooldown_s
            return [self._move(model, c, CircuitState.CLOSED, "probe clean")]
        return []

    def _move(self, model: str, c: _Circuit, to: CircuitState, reason: str) -> CircuitEvent:
        event = CircuitEvent(model, tuple(c.services), c.state, to, reason, self._wall_clock())
        c.state = to
        log.info("circuit %s: %s -> %s (%s)", model, event.from_state.name, to.name, reason)
        return event

    def _block(self, model: str, service: Endpoint, reason: str) -> None:
        try:
            self._port.block_service(service, f"circuit {model}: {reason}")
        except Exception as e:  # a full or missing kernel map must not stop the pipeline
            log.error("circuit %s: cannot block %s: %s", model, service, e)

    def _unblock(self, service: Endpoint) -> None:
        try:
            self._port.unblock_service(service)
        except Exception as e:
            log.error("circuit: cannot unblock %s: %s", service, e)
