"""`infertap top`: TopState numbers from a recorded event stream, and the Textual view driven
headless from the same stream through a stand-in TopSource.

The recorded stream (tests/fixtures/top/events.jsonl) is written by hand in the shapes the agent
publishes (agent/pipeline.py, agent/runtime.py); snapshot.json holds ListFlows, ListVerdicts,
ListModels and GetStatus replies in protobuf JSON. Two models, on a 10 s window ending at the last
event (t = 110 s):
- fraud: one call at 99.5 s (outside), then 10 calls at 100.5..109.5 s with latencies
  12 15 11 14 13 40 12 16 11 90 ms, the 40 ms (500) and 90 ms (503) ones failed;
- sentiment: 5 calls at 106..110 s, latencies 30 25 35 20 and none, 2 failed; then its circuit
  opens and the service is blocked.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import ParseDict
from textual.coordinate import Coordinate
from textual.pilot import Pilot
from textual.widgets import DataTable

from infertap.agent.api import infertap_pb2 as pb
from infertap.agent.api import infertap_pb2_grpc as pb_grpc
from infertap.cli.top.app import TopApp
from infertap.cli.top.source import ApiSource
from infertap.cli.top.state import (
    WINDOW_NS,
    Snapshot,
    TopState,
    circuit_name,
    percentile,
    sparkline,
    split_hostport,
)

FIXTURES = Path(__file__).parent / "fixtures" / "top"
S = 1_000_000_000
END_NS = 110 * S  # the last recorded event


def recorded_events() -> list[pb.Event]:
    out = []
    for line in (FIXTURES / "events.jsonl").read_text().splitlines():
        doc = json.loads(line)
        data = doc["data"]
        out.append(
            pb.Event(
                ts_ns=doc["ts_ns"],
                kind=doc["kind"],
                message=str(data.get("description", "")),
                data_json=json.dumps(data),
            )
        )
    return out


def recorded_snapshot() -> Snapshot:
    doc = json.loads((FIXTURES / "snapshot.json").read_text())
    return Snapshot(
        status=ParseDict(doc["status"], pb.Status()),
        flows=ParseDict(doc["flows"], pb.ListFlowsResponse()),
        verdicts=ParseDict(doc["verdicts"], pb.ListVerdictsResponse()),
        models=ParseDict(doc["models"], pb.ListModelsResponse()),
    )


class FakeClock:
    def __init__(self) -> None:
        self.ns = 5_000 * S  # our clock: unrelated to the agent's on purpose

    def __call__(self) -> int:
        return self.ns


def folded(clock: Callable[[], int] | None = None) -> TopState:
    state = TopState(clock=clock or FakeClock())
    state.apply_events(recorded_events())
    state.apply_snapshot(recorded_snapshot())
    return state


class AgentDown(grpc.RpcError):
    def details(self) -> str:
        return "failed to connect to all addresses"


class RecordedSource:
    """A TopSource that replays the recording: all events at the first poll, then none."""

    def __init__(self, fail_snapshot: bool = False) -> None:
        self._pending = recorded_events()
        self._snapshot = recorded_snapshot()
        self.fail_snapshot = fail_snapshot
        self.calls: list[tuple[str, pb.Target]] = []

    def snapshot(self) -> Snapshot:
        if self.fail_snapshot:
            raise AgentDown()
        return self._snapshot

    def events(self) -> list[pb.Event]:
        out, self._pending = self._pending, []
        return out

    def block(self, target: pb.Target) -> pb.VerdictReply:
        self.calls.append(("block", target))
        svc = target.service
        return pb.VerdictReply(changed=True, description=f"block service {svc.ip}:{svc.port}")

    def unblock(self, target: pb.Target) -> pb.VerdictReply:
        self.calls.append(("unblock", target))
        svc = target.service
        return pb.VerdictReply(changed=True, description=f"unblocked service {svc.ip}:{svc.port}")

    def problem(self) -> str:
        return ""

    def close(self) -> None:
        pass


def service_target(ip: str, port: int) -> pb.Target:
    return pb.Target(service=pb.Endpoint(ip=ip, port=port))


# -- TopState --


def test_rates_percentiles_and_error_rates_over_the_window() -> None:
    rows = {r.name: r for r in folded().model_rows()}
    fraud = rows["fraud"]
    # 10 of 11 calls in (100 s, 110 s]: the 200 ms call at 99.5 s is out of the window.
    assert fraud.window_calls == 10 and fraud.rate == 1.0
    assert (fraud.p50_ms, fraud.p99_ms) == (13.0, 90.0)  # sorted 11 11 12 12 13 14 15 16 40 90
    assert fraud.error_rate == 0.2
    assert (fraud.total, fraud.errors) == (11, 2)
    assert (fraud.service, fraud.protocol, fraud.circuit) == (
        "10.0.0.5:8000",
        "kserve-v2-rest",
        "closed",
    )
    sentiment = rows["sentiment"]
    assert sentiment.window_calls == 5 and sentiment.rate == 0.5
    assert (sentiment.p50_ms, sentiment.p99_ms) == (25.0, 35.0)  # the call without latency skipped
    assert sentiment.error_rate == 0.4
    assert sentiment.circuit == "open"


def test_the_window_follows_the_local_clock_between_events() -> None:
    clock = FakeClock()
    state = folded(clock)
    assert state.now_ns() == END_NS
    clock.ns += 5 * S  # no traffic for 5 s: the window is (105 s, 115 s]
    fraud = state.model_row("fraud")
    assert fraud.window_calls == 5 and fraud.rate == 0.5  # 105.5 .. 109.5 s
    assert (fraud.p50_ms, fraud.p99_ms, fraud.error_rate) == (16.0, 90.0, 0.4)
    clock.ns += 10 * S  # 15 s of silence: nothing left in the window
    quiet = state.model_row("fraud")
    assert (quiet.rate, quiet.p50_ms, quiet.p99_ms, quiet.error_rate) == (0.0, None, None, None)
    assert (quiet.total, quiet.errors) == (11, 2)  # totals are not windowed


def test_pii_counts_by_type_and_model_and_latest_examples() -> None:
    state = folded()
    assert dict(state.pii_by_type) == {"email": 3, "ssn": 1, "phone": 1, "credit_card": 1}
    assert dict(state.pii_by_model) == {"fraud": 2, "sentiment": 4}
    assert state.pii_counts() == [
        ("sentiment", "email", 2),
        ("fraud", "email", 1),
        ("fraud", "ssn", 1),
        ("sentiment", "credit_card", 1),
        ("sentiment", "phone", 1),
    ]
    recent = state.pii_recent()  # five kept, newest first: fraud's first email dropped out
    assert [(e.model, e.type, e.redacted, e.location) for e in recent] == [
        ("sentiment", "credit_card", "************1111", "$.inputs[0].data[1]"),
        ("sentiment", "phone", "(***) ***-**67", "$.inputs[0].data[0]"),
        ("sentiment", "email", "b***@g***.com", "$.inputs[0].data[0]"),
        ("sentiment", "email", "a***@m***.org", "$.inputs[0].data[0]"),
        ("fraud", "ssn", "***-**-6789", "$.inputs[0].data[2]"),
    ]
    assert [e.model for e in state.pii_recent("fraud")] == ["fraud"]


def test_drift_values_trends_and_levels() -> None:
    rows = {(r.model, r.feature): r for r in folded().drift_rows()}
    amount = rows[("fraud", "amount")]
    # Findings gave 0.12 then 0.31; ListModels repeats 0.31, which is no new point.
    assert (amount.psi, amount.ks, amount.js) == (0.31, 0.18, 0.09)
    assert (amount.trend_stat, amount.trend, amount.level) == ("psi", (0.12, 0.31), "alert")
    mc = rows[("fraud", "merchant_category")]  # from a finding only: js, no psi
    assert (mc.psi, mc.js, mc.trend_stat, mc.trend, mc.level) == (None, 0.22, "js", (0.22,), "warn")
    assert rows[("sentiment", "text_length")].level == "warn"  # psi 0.15 >= 0.1
    assert rows[("fraud", "hour")].level == "ok"
    # Worst first: what needs a look is at the top of a short panel.
    assert [(r.model, r.feature) for r in folded().drift_rows()] == [
        ("fraud", "amount"),
        ("fraud", "merchant_category"),
        ("sentiment", "text_length"),
        ("fraud", "hour"),
    ]


def test_drift_trend_grows_only_on_new_values() -> None:
    state = folded()
    snap = recorded_snapshot()
    for value in (0.31, 0.28, 0.28, 0.2):
        snap.models.models[0].drift[0].value = value  # fraud amount psi
        state.apply_snapshot(snap)
    amount = next(r for r in state.drift_rows() if r.feature == "amount")
    assert amount.trend == (0.12, 0.31, 0.28, 0.2)
    assert amount.level == "warn"


def test_circuit_state_from_events_and_snapshots() -> None:
    state = TopState(clock=FakeClock())
    state.apply_events(e for e in recorded_events() if e.kind == "circuit")
    assert state.models["sentiment"].circuit == "open"
    assert state.models["sentiment"].service == "10.0.0.7:8001"
    assert state.activity[-1] == "circuit sentiment: closed -> open (pii: 4 findings in 60s)"
    snap = recorded_snapshot()
    snap.models.models[1].circuit_state = 1
    state.apply_snapshot(snap)
    assert state.models["sentiment"].circuit == "half-open"
    assert [circuit_name(v) for v in (0, 1, 2, "HALF_OPEN", "Open")] == [
        "closed",
        "half-open",
        "open",
        "half-open",
        "open",
    ]


def test_flows_verdicts_schema_and_activity() -> None:
    state = folded()
    assert [(f.id, f.role, f.service, f.protocol, f.drops) for f in state.flow_rows()] == [
        (4101, "server", "10.0.0.5:8000", "http/1.1", 0),
        (4102, "server", "10.0.0.7:8001", "http2", 3),
        (4103, "client", "10.0.0.5:8000", "http/1.1", 0),  # a client's service is its remote
    ]
    assert [f.id for f in state.flow_rows("sentiment")] == [4102]  # by the model it serves
    assert [f.id for f in state.flow_rows("gateway")] == [4103]  # by pod cgroup
    (v,) = state.verdict_rows()
    assert (v.target, v.action, v.reason, v.service) == (
        "service 10.0.0.7:8001",
        "block",
        "circuit: sentiment",
        ("10.0.0.7", 8001),
    )
    assert state.models["fraud"].schema_findings == 1
    assert state.activity[-1] == "verdict: block service 10.0.0.7:8001"
    assert (state.events_seen, state.bad_events) == (30, 0)
    assert state.status is not None and state.status.ready
    assert state.policy_hash == "3f9a1c0d2b7e4a55"


def test_sort_and_filter_models() -> None:
    state = folded()
    assert [r.name for r in state.model_rows(sort="name")] == ["fraud", "sentiment"]
    assert [r.name for r in state.model_rows(sort="rate")] == ["fraud", "sentiment"]
    assert [r.name for r in state.model_rows(sort="p99")] == ["fraud", "sentiment"]
    assert [r.name for r in state.model_rows(sort="errors")] == ["sentiment", "fraud"]
    assert [r.name for r in state.model_rows(sort="circuit")] == ["sentiment", "fraud"]
    assert [r.name for r in state.model_rows("SENT")] == ["sentiment"]
    assert [r.name for r in state.model_rows("10.0.0.5")] == ["fraud"]  # by service
    assert [r.name for r in state.model_rows("fraud-6b8f9")] == ["fraud"]  # by pod
    assert state.model_rows("nothing-like-this") == []


def test_events_of_unknown_shape_are_counted_not_raised() -> None:
    state = TopState(clock=FakeClock())
    state.apply_event(pb.Event(ts_ns=1, kind="inference", data_json="{not json"))
    state.apply_event(pb.Event(ts_ns=2, kind="inference", data_json='{"no_model": 1}'))
    state.apply_event(pb.Event(ts_ns=3, kind="finding", data_json="[1, 2]"))
    state.apply_event(pb.Event(ts_ns=4, kind="http", data_json='{"request": {}}'))
    assert state.bad_events == 3 and state.models == {}


def test_helpers() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([float(v) for v in range(1, 101)], 50) == 50.0
    assert percentile([float(v) for v in range(1, 101)], 99) == 99.0
    assert sparkline([0.0, 0.1, 0.2, 0.4]) == "▁▃▅█"
    assert sparkline([0.0, 0.0]) == "▁▁"
    assert sparkline([float(v) for v in range(40)], 5) == "▇▇███"
    assert split_hostport("10.0.0.5:8000") == ("10.0.0.5", 8000)
    assert split_hostport("[fd00::5]:8000") == ("fd00::5", 8000)
    assert split_hostport("nonsense") is None
    assert WINDOW_NS == 10 * S


# -- the view, headless --


def run_app(
    size: tuple[int, int],
    steps: Callable[[Pilot[None], TopApp], Coroutine[Any, Any, None]],
    source: RecordedSource | None = None,
) -> TopApp:
    app = TopApp(source or RecordedSource(), refresh_s=60.0, state=TopState(clock=FakeClock()))

    async def go() -> None:
        async with app.run_test(size=size) as pilot:
            await settle(pilot, app)
            await steps(pilot, app)

    asyncio.run(go())
    return app


async def settle(pilot: Pilot[None], app: TopApp) -> None:
    """Let the poll (a thread worker) finish and the screen redraw."""
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


def snapshot_text(
    size: tuple[int, int], keys: tuple[str, ...] = (), source: RecordedSource | None = None
) -> str:
    shots: list[str] = []

    async def take(pilot: Pilot[None], app: TopApp) -> None:
        for key in keys:
            await pilot.press(key)
        await settle(pilot, app)
        app.export_screenshot()  # the SVG export works as well
        shots.append(app.screen_text())

    run_app(size, take, source)
    return shots[0]


def test_view_at_80x24_shows_models_circuit_and_pii() -> None:
    text = snapshot_text((80, 24))
    lines = text.splitlines()
    assert len(lines) == 24 and max(len(line) for line in lines) <= 80
    for words in ("fraud", "sentiment", "1.0", "13.0", "90", "20", "open", "closed"):
        assert words in text, words
    assert "10.0.0.5:8000" in text
    assert "email 3 ssn 1 phone 1 credit_card 1" in text  # the PII panel is the default detail
    assert "************1111" in text
    assert "verdict: block service 10.0.0.7:8001" in text  # the status line


def test_view_at_80x24_switches_the_detail_panel() -> None:
    drift = snapshot_text((80, 24), ("2",))
    assert "amount" in drift and "0.310" in drift and "▄█" in drift
    assert "email 3" not in drift  # one detail panel at a time on a small terminal
    flows = snapshot_text((80, 24), ("4",))
    assert "4102" in flows and "10.0.0.9:41240" in flows and "http2" in flows
    verdicts = snapshot_text((80, 24), ("5",))
    assert "service 10.0.0.7:8001" in verdicts and "circuit: sentiment" in verdicts


def test_view_at_200x50_shows_every_panel() -> None:
    text = snapshot_text((200, 50))
    lines = text.splitlines()
    assert len(lines) == 50 and max(len(line) for line in lines) <= 200
    for words in (
        "kserve-v2-rest",  # the wide models panel has the protocol column
        "drift (psi warn 0.1, alert 0.25)",
        "merchant_category",
        "text_length",
        "PII findings · 6",
        "a***@m***.org",
        "flows · 3",
        "cri-containerd-fraud.scope",  # pod cgroup, clipped from the left side
        "verdicts · 1",
        "circuit: sentiment",
        "policy 3f9a1c0d2b7e",
        "decode lost 9",  # what was not decoded or not seen, from the status
        "1 conns not inspected",
    ):
        assert words in text, words


@pytest.mark.parametrize("size", [(20, 5), (40, 10), (60, 15), (80, 12), (119, 31), (120, 32)])
def test_small_and_odd_sizes_do_not_crash(size: tuple[int, int]) -> None:
    text = snapshot_text(size)
    assert len(text.splitlines()) == size[1]


def test_block_key_sends_the_selected_models_service() -> None:
    source = RecordedSource()

    async def steps(pilot: Pilot[None], app: TopApp) -> None:
        await pilot.press("b")  # the cursor is on the first model by name: fraud
        assert "block service 10.0.0.5:8000 (model fraud)? y to confirm" in app.screen_text()
        await pilot.press("y")
        await settle(pilot, app)
        assert "block service 10.0.0.5:8000" in app.screen_text()

    run_app((80, 24), steps, source)
    assert source.calls == [("block", service_target("10.0.0.5", 8000))]


def test_unblock_key_on_a_verdict_sends_its_target() -> None:
    source = RecordedSource()

    async def steps(pilot: Pilot[None], app: TopApp) -> None:
        await pilot.press("5", "u", "y")
        await settle(pilot, app)
        assert "unblocked service 10.0.0.7:8001" in app.screen_text()

    run_app((80, 24), steps, source)
    assert source.calls == [("unblock", service_target("10.0.0.7", 8001))]


def test_block_on_a_client_flow_targets_the_service_it_calls() -> None:
    source = RecordedSource()

    async def steps(pilot: Pilot[None], app: TopApp) -> None:
        await pilot.press("4", "down", "down", "b", "y")  # flow 4103, a client of fraud
        await settle(pilot, app)

    run_app((200, 50), steps, source)
    assert source.calls == [("block", service_target("10.0.0.5", 8000))]


def test_block_waits_for_a_yes() -> None:
    source = RecordedSource()

    async def steps(pilot: Pilot[None], app: TopApp) -> None:
        await pilot.press("b", "n")
        await pilot.press("u", "escape")
        await settle(pilot, app)
        assert "cancelled" in app.screen_text()

    run_app((80, 24), steps, source)
    assert source.calls == []


def test_sort_key_and_filter_box() -> None:
    async def steps(pilot: Pilot[None], app: TopApp) -> None:
        table = app.query_one("#models", DataTable)

        def first() -> str | None:
            return table.coordinate_to_cell_key(Coordinate(0, 0)).row_key.value

        assert first() == "fraud\0kserve-v2-rest"  # rows are per model and protocol
        await pilot.press("s", "s", "s")  # name -> rate -> p99 -> errors
        assert app.sort == "errors" and first() == "sentiment\0kserve-v2-grpc"
        assert "sort errors" in app.screen_text()
        await pilot.press("slash", *"frau", "enter")
        assert app.filter_text == "frau" and table.row_count == 1
        assert first() == "fraud\0kserve-v2-rest"
        assert "filter 'frau'" in app.screen_text()
        await pilot.press("escape")
        assert app.filter_text == "" and table.row_count == 2

    run_app((80, 24), steps)


def test_an_agent_error_is_shown_not_raised() -> None:
    async def steps(pilot: Pilot[None], app: TopApp) -> None:
        assert "agent: failed to connect to all addresses" in app.screen_text()
        assert "fraud" in app.screen_text()  # the events that did arrive are still shown

    run_app((80, 24), steps, RecordedSource(fail_snapshot=True))


def test_top_without_an_agent_is_one_line_and_exit_1(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "infertap.cli.main", "top", "--api", f"unix:{tmp_path}/none.sock"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"infertap: error: no agent is running: {tmp_path}/none.sock does not exist "
        "(start one with 'infertap run')"
    ]


# -- the API-backed source, against a stand-in servicer on a real gRPC unix socket --


class RecordedServicer(pb_grpc.ControlServicer):
    def __init__(self) -> None:
        self.targets: list[pb.Target] = []

    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.Status:
        return recorded_snapshot().status

    def ListFlows(
        self, request: pb.ListFlowsRequest, context: grpc.ServicerContext
    ) -> pb.ListFlowsResponse:
        return recorded_snapshot().flows

    def ListVerdicts(
        self, request: pb.ListVerdictsRequest, context: grpc.ServicerContext
    ) -> pb.ListVerdictsResponse:
        return recorded_snapshot().verdicts

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return recorded_snapshot().models

    def Block(self, request: pb.Target, context: grpc.ServicerContext) -> pb.VerdictReply:
        self.targets.append(request)
        return pb.VerdictReply(changed=True, description="block service 10.0.0.5:8000")

    def StreamEvents(
        self, request: pb.StreamEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Event]:
        yield from recorded_events()
        while context.is_active():  # a live stream stays open
            time.sleep(0.05)


def test_api_source_polls_streams_and_blocks(tmp_path: Path) -> None:
    servicer = RecordedServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ControlServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    address = f"unix:{tmp_path}/api.sock"
    server.add_insecure_port(address)
    server.start()
    try:
        source = ApiSource(address)
        try:
            events: list[pb.Event] = []
            deadline = time.monotonic() + 10
            while len(events) < 30 and time.monotonic() < deadline:
                events += source.events()
                time.sleep(0.02)
            assert [e.kind for e in events] == [e.kind for e in recorded_events()]
            snap = source.snapshot()
            assert [m.name for m in snap.models.models] == ["fraud", "sentiment"]
            assert len(snap.flows.flows) == 3 and snap.status.ready
            reply = source.block(service_target("10.0.0.5", 8000))
            assert reply.changed and servicer.targets == [service_target("10.0.0.5", 8000)]
            assert source.problem() == ""
        finally:
            source.close()
    finally:
        server.stop(grace=None)


# -- one model over two protocols ---------------------------------------------------------------

# fraud is also called over gRPC (port 8001): 4 calls at 106..109 s, 5 6 7 8 ms, the last failed.
FRAUD_GRPC = [
    (
        (106 + i) * S,
        {
            "model": "fraud",
            "version": "3",
            "protocol": "kserve-v2-grpc",
            "service": "10.0.0.5:8001",
            "pod": "default/fraud-6b8f9",
            "status": "ok" if i < 3 else "UNAVAILABLE",
            "error": "",
            "latency_ms": 5.0 + i,
        },
    )
    for i in range(4)
]


class TwoProtocolSource(RecordedSource):
    def __init__(self) -> None:
        super().__init__()
        self._pending += [
            pb.Event(ts_ns=t, kind="inference", data_json=json.dumps(d)) for t, d in FRAUD_GRPC
        ]


def test_a_model_called_over_rest_and_grpc_has_a_row_for_each() -> None:
    state = folded()
    state.apply_events(TwoProtocolSource().events()[-len(FRAUD_GRPC) :])
    rows = [
        (r.name, r.protocol, r.window_calls, r.total, r.errors, r.service, r.p50_ms, r.p99_ms)
        for r in state.model_rows()
    ]
    assert rows == [
        ("fraud", "kserve-v2-grpc", 4, 4, 1, "10.0.0.5:8001", 6.0, 8.0),
        ("fraud", "kserve-v2-rest", 10, 11, 2, "10.0.0.5:8000", 13.0, 90.0),
        ("sentiment", "kserve-v2-grpc", 5, 5, 2, "10.0.0.7:8001", 25.0, 35.0),
    ]
    both = state.model_row("fraud")  # no protocol: every call of the model
    assert (both.window_calls, both.total, both.errors, both.p99_ms) == (14, 15, 3, 90.0)
    # The filter matches each row's own service.
    assert [(r.name, r.protocol) for r in state.model_rows("10.0.0.5:8001")] == [
        ("fraud", "kserve-v2-grpc")
    ]


def _models_lines(text: str) -> list[str]:
    # The models panel's fraud rows (the flows panel names fraud's cgroup, never a circuit).
    return [ln for ln in text.splitlines() if "fraud" in ln and "closed" in ln]


def test_view_shows_a_row_per_protocol_at_200x50() -> None:
    lines = _models_lines(snapshot_text((200, 50), source=TwoProtocolSource()))
    assert len(lines) == 2, lines
    grpc, rest = lines  # sorted by name, then protocol
    for words in ("kserve-v2-grpc", " 4 ", "0.4", "6.0", "8.0", "25", "10.0.0.5:8001"):
        assert words in grpc, (words, grpc)
    for words in ("kserve-v2-rest", " 11 ", "1.0", "13.0", "90", "20", "10.0.0.5:8000"):
        assert words in rest, (words, rest)


def test_view_shows_a_row_per_protocol_at_80x24() -> None:
    lines = _models_lines(snapshot_text((80, 24), source=TwoProtocolSource()))
    assert len(lines) == 2 and max(len(ln) for ln in lines) <= 80, lines
    assert " grpc " in lines[0] and "10.0.0.5:8001" in lines[0]
    assert " rest " in lines[1] and "10.0.0.5:8000" in lines[1]


def test_block_on_a_protocol_row_blocks_that_rows_service() -> None:
    source = TwoProtocolSource()

    async def steps(pilot: Pilot[None], app: TopApp) -> None:
        await pilot.press("b")  # the first row: fraud over gRPC
        assert "block service 10.0.0.5:8001 (model fraud)? y to confirm" in app.screen_text()
        await pilot.press("y")
        await settle(pilot, app)

    run_app((80, 24), steps, source)
    assert source.calls == [("block", service_target("10.0.0.5", 8001))]
