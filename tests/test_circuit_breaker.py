"""The circuit breaker state machine, with a fake clock and a port that records kernel calls."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from infertap.agent.enforce.breaker import CircuitBreaker, CircuitEvent, CircuitState
from infertap.agent.flows.records import Endpoint
from infertap.agent.inspect.findings import Finding, FindingKind, Severity
from infertap.agent.policy.loader import default_policy, load_policy_text
from infertap.agent.policy.schema import ActionsSpec, CircuitSpec, SeverityActions

CLOSED, HALF_OPEN, OPEN = CircuitState.CLOSED, CircuitState.HALF_OPEN, CircuitState.OPEN
S1 = Endpoint("10.0.0.1", 8000)
S2 = Endpoint("10.0.0.2", 8000)
S3 = Endpoint("10.0.0.3", 8000)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Port:
    calls: list[tuple[str, Endpoint]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def block_service(self, service: Endpoint, reason: str) -> None:
        with self.lock:
            self.calls.append(("block", service))
            self.reasons.append(reason)

    def unblock_service(self, service: Endpoint) -> None:
        with self.lock:
            self.calls.append(("unblock", service))


def finding(
    kind: FindingKind,
    severity: Severity,
    model: str = "fraud",
    type_: str = "psi",
    location: str = "amount",
) -> Finding:
    return Finding(kind=kind, model=model, type=type_, location=location, severity=severity)


def drift(severity: Severity, model: str = "fraud", stat: str = "psi") -> Finding:
    return finding("drift", severity, model, stat, "amount")


def pii(severity: Severity = "alert", model: str = "fraud") -> Finding:
    return finding("pii", severity, model, "ssn", "$.inputs[0].data[1]")


SETTINGS = CircuitSpec(pii_hits=3, pii_window_s=10.0, cooldown_s=30.0, max_cooldown_s=100.0,
                       probe_s=5.0)  # fmt: skip


def make(settings: CircuitSpec = SETTINGS) -> tuple[CircuitBreaker, Clock, Port]:
    clock, port = Clock(), Port()
    # Wall clock = the fake clock too, so event times are exact.
    return CircuitBreaker(settings, ActionsSpec(), port, clock, clock), clock, port


def moves(events: list[CircuitEvent]) -> list[tuple[str, CircuitState, CircuitState]]:
    return [(e.model, e.from_state, e.to_state) for e in events]


def test_full_cycle_drift_alert_probe_recovers() -> None:
    b, clock, port = make()
    b.note_service("fraud", S1)
    assert b.state("fraud") is CLOSED
    assert b.record(drift("warn"), S1) == []  # warn's action is alert: no trip
    assert port.calls == []

    events = b.record(drift("alert"), S2)
    assert events == [
        CircuitEvent(
            "fraud", (S1, S2), CLOSED, OPEN, "drift psi alert on amount; open for 30s", 1000.0
        )
    ]
    assert port.calls == [("block", S1), ("block", S2)]
    assert port.reasons == ["circuit fraud: drift psi alert on amount"] * 2
    assert b.states() == {"fraud": OPEN}
    assert int(b.state("fraud")) == 2

    clock.now = 1029.9
    assert b.tick() == []
    clock.now = 1030.0
    assert b.tick() == [
        CircuitEvent("fraud", (S1, S2), OPEN, HALF_OPEN, "cooldown over; probe 5s", 1030.0)
    ]
    assert port.calls[2:] == [("unblock", S1), ("unblock", S2)]
    assert int(b.state("fraud")) == 1

    clock.now = 1032.0
    assert b.record(drift("info"), S1) == []  # the window recovered under traffic
    clock.now = 1034.9
    assert b.tick() == []
    clock.now = 1035.0
    assert b.tick() == [CircuitEvent("fraud", (S1, S2), HALF_OPEN, CLOSED, "probe clean", 1035.0)]
    assert port.calls == [("block", S1), ("block", S2), ("unblock", S1), ("unblock", S2)]
    assert b.state("fraud") is CLOSED
    clock.now = 2000.0
    assert b.tick() == []
    assert events[0].to_data() == {
        "model": "fraud",
        "service": "10.0.0.1:8000",
        "services": ["10.0.0.1:8000", "10.0.0.2:8000"],
        "from_state": "closed",
        "to_state": "open",
        "reason": "drift psi alert on amount; open for 30s",
        "at": 1000.0,
    }
    assert [s.label for s in CircuitState] == ["closed", "half-open", "open"]


def test_pii_hits_within_the_window_open() -> None:
    b, clock, port = make()
    for t in (0.0, 5.0):
        clock.now = 1000.0 + t
        assert b.record(pii(), S1) == []
    clock.now = 1010.0  # the first hit is exactly window-old: out
    assert b.record(pii(), S1) == []
    clock.now = 1010.5
    assert b.record(pii("info"), S1) == []  # info's action is log: not counted
    assert b.record(pii("warn"), S1) == []  # warn's action is alert: not counted
    assert port.calls == []
    clock.now = 1011.0  # hits at 5, 10, 11
    events = b.record(pii(), S1)
    assert moves(events) == [("fraud", CLOSED, OPEN)]
    assert events[0].reason == (
        "3 PII findings within 10s (last: ssn at $.inputs[0].data[1]); open for 30s"
    )
    assert port.calls == [("block", S1)]
    # Further hits while open only take note.
    assert b.record(pii(), S1) == []
    assert port.calls == [("block", S1)]


def test_half_open_reopen_doubles_cooldown_up_to_max_then_resets() -> None:
    b, clock, port = make()
    assert moves(b.record(drift("alert"), S1)) == [("fraud", CLOSED, OPEN)]
    clock.now += 30
    assert moves(b.tick()) == [("fraud", OPEN, HALF_OPEN)]

    clock.now += 1  # one PII trip during the probe is enough: not pii_hits
    (reopen,) = b.record(pii(), S1)
    assert (reopen.from_state, reopen.to_state) == (HALF_OPEN, OPEN)
    assert reopen.reason == "PII ssn at $.inputs[0].data[1] during the probe; open for 60s"
    clock.now += 59.9
    assert b.tick() == []
    clock.now += 0.1
    assert moves(b.tick()) == [("fraud", OPEN, HALF_OPEN)]

    # The drift alert was never reported recovered: the probe fails at its end.
    clock.now += 5
    (again,) = b.tick()
    assert (again.from_state, again.to_state) == (HALF_OPEN, OPEN)
    assert again.reason == (
        "drift still at its level after the probe: psi on amount; open for 100s"  # not 120
    )
    clock.now += 100
    assert moves(b.tick()) == [("fraud", OPEN, HALF_OPEN)]
    b.record(drift("warn"), S1)  # back under the alert level
    clock.now += 5
    assert moves(b.tick()) == [("fraud", HALF_OPEN, CLOSED)]

    # Closed again: the next trip starts from the base cooldown.
    (fresh,) = b.record(drift("alert"), S1)
    assert fresh.reason == "drift psi alert on amount; open for 30s"
    assert port.calls == [
        ("block", S1),
        ("unblock", S1),
        ("block", S1),
        ("unblock", S1),
        ("block", S1),
        ("unblock", S1),
        ("block", S1),
    ]


def test_a_drift_alert_on_two_statistics_needs_both_to_recover() -> None:
    b, clock, _ = make()
    b.record(drift("alert", stat="psi"), S1)
    b.record(drift("alert", stat="js"), S1)  # arrives while open: noted
    clock.now += 30
    b.tick()
    b.record(drift("info", stat="psi"), S1)
    clock.now += 5
    (event,) = b.tick()
    assert (event.to_state, event.reason) == (
        OPEN,
        "drift still at its level after the probe: js on amount; open for 60s",
    )


def test_models_are_independent() -> None:
    b, clock, port = make()
    b.note_service("fraud", S1)
    b.note_service("churn", S2)
    assert moves(b.record(drift("alert", model="fraud"), S1)) == [("fraud", CLOSED, OPEN)]
    for _ in range(2):
        assert b.record(pii(model="churn"), S2) == []
    assert b.states() == {"fraud": OPEN, "churn": CLOSED}
    clock.now += 30
    assert moves(b.tick()) == [("fraud", OPEN, HALF_OPEN)]
    # churn's first two hits are out of its window by now: it takes three fresh ones.
    assert b.record(pii(model="churn"), S2) == []
    clock.now += 1
    assert b.record(pii(model="churn"), S2) == []
    assert moves(b.record(pii(model="churn"), S2)) == [("churn", CLOSED, OPEN)]
    assert port.calls == [("block", S1), ("unblock", S1), ("block", S2)]
    assert b.states() == {"fraud": HALF_OPEN, "churn": OPEN}


def test_service_seen_while_open_is_blocked_and_unblocked_with_the_rest() -> None:
    b, clock, port = make()
    b.record(drift("alert"), S1)
    b.note_service("fraud", S2)
    b.note_service("fraud", S2)  # once is enough
    b.note_service("other", S3)
    assert port.calls == [("block", S1), ("block", S2)]
    assert port.reasons[1] == "circuit fraud: circuit open"
    clock.now += 30
    (event,) = b.tick()
    assert event.services == (S1, S2)
    assert port.calls[2:] == [("unblock", S1), ("unblock", S2)]


def test_actions_decide_what_trips() -> None:
    clock, port = Clock(), Port()
    actions = ActionsSpec(
        pii=SeverityActions("log", "log", "log"),
        drift=SeverityActions("log", "alert", "alert"),
        schema=SeverityActions("log", "circuit_break", "block_flow"),
    )
    b = CircuitBreaker(SETTINGS, actions, port, clock, clock)
    for _ in range(5):
        assert b.record(pii(), S1) == []
    assert b.record(drift("alert"), S1) == []
    assert b.record(finding("schema", "alert", type_="shape"), S1) == []
    (event,) = b.record(finding("schema", "warn", type_="nan", location="amount"), S1)
    assert event.reason == "schema nan warn at amount; open for 30s"


def test_from_policy_and_reconfigure() -> None:
    clock, port = Clock(), Port()
    b = CircuitBreaker.from_policy(default_policy(), port, clock, clock)
    for _ in range(4):
        assert b.record(pii(), S1) == []  # default: 5 hits
    b.reconfigure(load_policy_text("version: 1\ncircuit: {pii_hits: 2, cooldown: 1m}\n"))
    (event,) = b.record(pii(), S1)
    assert event.reason.endswith("; open for 60s")


def test_port_failures_do_not_stop_the_state_machine(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def block_service(self, service: Endpoint, reason: str) -> None:
            raise OSError("map full")

        def unblock_service(self, service: Endpoint) -> None:
            raise OSError("map gone")

    clock = Clock()
    b = CircuitBreaker(SETTINGS, ActionsSpec(), Broken(), clock, clock)
    assert moves(b.record(drift("alert"), S1)) == [("fraud", CLOSED, OPEN)]
    clock.now += 30
    assert moves(b.tick()) == [("fraud", OPEN, HALF_OPEN)]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        "circuit fraud: cannot block 10.0.0.1:8000: map full",
        "circuit: cannot unblock 10.0.0.1:8000: map gone",
    ]


def test_concurrent_findings_and_ticks() -> None:
    settings = CircuitSpec(pii_hits=50, pii_window_s=1e6, cooldown_s=1e6, max_cooldown_s=1e6)
    b, _, port = make(settings)
    models = ["m0", "m1", "m2", "m3"]
    events: list[CircuitEvent] = []
    events_lock = threading.Lock()
    start = threading.Barrier(9)
    stop = threading.Event()

    def feed(i: int) -> None:
        start.wait()
        for n in range(200):
            model = models[(i + n) % 4]
            service = Endpoint(f"10.0.{models.index(model)}.{n % 3}", 8000)
            got = b.record(pii(model=model), service)
            with events_lock:
                events.extend(got)

    def ticker() -> None:
        start.wait()
        while not stop.is_set():
            assert b.tick() == []

    threads = [threading.Thread(target=feed, args=(i,)) for i in range(8)]
    tick_thread = threading.Thread(target=ticker)
    for t in [*threads, tick_thread]:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    tick_thread.join()

    # 400 hits per model: each opens exactly once, on its 50th.
    assert sorted(moves(events)) == [(m, CLOSED, OPEN) for m in models]
    assert b.states() == dict.fromkeys(models, OPEN)
    # Every endpoint blocked exactly once, never unblocked.
    assert sorted(port.calls, key=lambda c: (c[1].ip, c[0])) == [
        ("block", Endpoint(f"10.0.{m}.{k}", 8000)) for m in range(4) for k in range(3)
    ]


def test_circuits_of_names_not_seen_for_a_while_are_forgotten() -> None:
    b, clock, _ = make()
    svc = Endpoint("10.0.0.5", 8000)
    for i in range(100):
        b.note_service(f"junk-{i}", svc)
    b.record(drift("alert", "fraud"), svc)  # open: an open circuit is never forgotten
    clock.now += 601
    b.note_service("live", svc)
    b.tick()
    assert set(b.states()) == {"fraud", "live"}


def test_a_flood_of_names_keeps_the_breaker_bounded_and_spares_circuits_that_hold_hits() -> None:
    clock, port = Clock(), Port()
    b = CircuitBreaker(SETTINGS, ActionsSpec(), port, clock, clock, max_circuits=50)
    svc = Endpoint("10.0.0.5", 8000)
    b.record(pii("alert", "fraud"), svc)  # one PII hit of three: fraud holds state
    for i in range(20_000):
        b.note_service(f"junk-{i}", svc)
    states = b.states()
    assert len(states) == 50 and "fraud" in states
    assert "junk-19999" in states and "junk-0" not in states  # the least recently seen went
    b.record(pii("alert", "fraud"), svc)
    events = b.record(pii("alert", "fraud"), svc)  # the third hit in the window still counts
    assert moves(events) == [("fraud", CircuitState.CLOSED, CircuitState.OPEN)]
