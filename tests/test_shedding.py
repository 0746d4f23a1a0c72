"""Overload shedding without a kernel: the controller's hysteresis, the reassembler's SHED gaps,
and the decoders' handling of them (whole messages skipped on purpose: nothing lost, pairs
right). The kernel side is tests/kernel/test_overload_shedding.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_http1_decoding import conversation
from test_reassembly import Recorder, sample
from wire_streams import (
    CLIENT_COOKIE,
    SERVER_COOKIE,
    client_flow,
    h1_request,
    h1_response,
    server_flow,
)

from infertap.agent.flows.reassembly import FlowReassembler, GapCause
from infertap.agent.flows.records import Role, Sample, Shed
from infertap.agent.kernel import decode, structs
from infertap.agent.kernel.shedding import ShedController, ShedThresholds
from infertap.agent.pipeline import SKIP_OVERLOAD, SKIP_OVERLOAD_CONNECTION, Pipeline
from infertap.agent.pod_labels import PodDirectory
from infertap.agent.protocols.messages import HttpExchange
from infertap.agent.protocols.wire import WireDecoder

# --- the controller ---------------------------------------------------------------------------


def test_controller_raises_on_a_filling_ring_holds_between_and_lowers_when_drained() -> None:
    applied: list[int] = []
    t = ShedThresholds(high=0.5, low=0.2, panic=0.85, step_up=10, step_down=5, panic_level=50)
    ctl = ShedController(applied.append, t)
    assert ctl.observe(0.1) == 0 and applied == []  # quiet: the map is never written
    assert ctl.observe(0.6) == 10
    assert ctl.observe(0.7) == 20  # still filling: up again
    assert ctl.observe(0.65) == 20  # high but draining: holds (no wind-up)
    assert ctl.observe(0.35) == 20  # between the thresholds: holds (hysteresis)
    assert ctl.observe(0.9) == 50  # about to overflow: at once to the panic level
    assert ctl.observe(0.1) == 45  # drained: down by step_down per reading
    while ctl.observe(0.0):
        pass
    assert applied[:4] == [10, 20, 50, 45] and applied[-1] == 0
    assert applied.count(0) == 1  # written only when the level moves


def test_controller_caps_at_full_and_hold_keeps_a_level_set_by_hand() -> None:
    applied: list[int] = []
    ctl = ShedController(applied.append)
    for _ in range(30):
        ctl.observe(1.0)
    assert ctl.level == structs.SHED_FULL
    ctl.hold = True
    ctl.set_level(30)
    ctl.feed(0.0)  # the read loop's reading changes nothing while held
    assert ctl.level == 30 and applied[-1] == 30
    ctl.hold = False
    ctl.feed(0.0)
    assert ctl.level == 30 - ctl.thresholds.step_down


@pytest.mark.parametrize(
    "kwargs", [{"low": 0.6, "high": 0.5}, {"step_up": 0}, {"panic_level": 101}, {"panic": 0.3}]
)
def test_controller_refuses_thresholds_that_cannot_work(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ShedThresholds(**kwargs)  # type: ignore[arg-type]


# --- the reassembler --------------------------------------------------------------------------


def test_shed_gap_runs_from_the_shed_offset_to_the_next_sample_and_is_no_loss() -> None:
    r = FlowReassembler(1024, 4096)
    rec = Recorder()
    r.push(sample(0, b"abcd"), rec)
    r.shed(1, 4, 5, rec)
    r.shed(1, 40, 6, rec)  # the next request shed too: one run
    assert r.shedding(1)
    r.push(sample(100, b"next", ts=9), rec)
    assert rec.events[1] == ("gap", (b"", 96, GapCause.SHED))
    assert not r.shedding(1)
    assert r.stats.gaps == 0 and r.stats.lost_bytes == 0
    assert r.stats.shed_gaps == 1 and r.stats.shed_bytes == 96


def test_bytes_lost_before_shedding_began_stay_a_loss_and_a_shed_tail_ends_the_flow() -> None:
    r = FlowReassembler(1024, 4096)
    rec = Recorder()
    r.push(sample(0, b"abcd"), rec)
    r.shed(1, 10, 5, rec)  # 4..10 went missing before shedding started: lost
    assert rec.events[1] == ("gap", (b"", 6, GapCause.LOST))
    assert r.finish(1, 50, rec, 7)
    assert rec.events[2] == ("gap", (b"", 40, GapCause.SHED))
    assert r.stats.lost_bytes == 6 and r.stats.shed_bytes == 40


# --- HTTP/1 -----------------------------------------------------------------------------------


def shed_messages(
    samples: list[Sample], indexes: set[int], cookie: int, role: Role
) -> list[Sample | Shed]:
    """Message i's sample replaced by a Shed record at its offset, as the kernel writes it."""
    out: list[Sample | Shed] = []
    for i, s in enumerate(samples):
        out.append(Shed(cookie, s.ts_ns, s.offset, role) if i in indexes else s)
    return out


def feed(dec: WireDecoder, records: list[Sample | Shed]) -> list[HttpExchange]:
    out: list[HttpExchange] = []
    for rec in sorted(records, key=lambda r: r.ts_ns):
        out.extend(dec.on_shed(rec) if isinstance(rec, Shed) else dec.on_sample(rec))
    return out


def run(client: list[Sample | Shed], server: list[Sample | Shed]) -> tuple[list[Any], WireDecoder]:
    dec = WireDecoder()
    dec.on_flow_start(client_flow())
    dec.on_flow_start(server_flow())
    out = feed(dec, [*client, *server])
    client_end = max((s.end for s in client if isinstance(s, Sample)), default=0)
    server_end = max((s.end for s in server if isinstance(s, Sample)), default=0)
    # The kernel's stream lengths: the last message may have been shed.
    client_end = max(client_end, *(s.offset + 1 for s in client if isinstance(s, Shed)), 0)
    server_end = max(server_end, *(s.offset + 1 for s in server if isinstance(s, Shed)), 0)
    out.extend(dec.on_flow_end(SERVER_COOKIE, server_end))
    out.extend(dec.on_flow_end(CLIENT_COOKIE, client_end))
    return out, dec


MSGS = [
    (h1_request("POST", f"/q{i}", b"in %d" % i), h1_response(200, b"out %d" % i)) for i in range(6)
]


def pairs(out: list[HttpExchange]) -> list[tuple[str, bytes | None]]:
    return [(x.request.path, x.response.body if x.response else None) for x in out]


@pytest.mark.parametrize("shed", [{1, 2}, {0}, {5}, {0, 2, 4}])
def test_shed_requests_and_their_responses_leave_the_others_whole_and_paired(
    shed: set[int],
) -> None:
    client, server = conversation(MSGS)
    out, dec = run(
        shed_messages(client, shed, CLIENT_COOKIE, Role.CLIENT),
        shed_messages(server, shed, SERVER_COOKIE, Role.SERVER),
    )
    kept = [i for i in range(6) if i not in shed]
    assert pairs(out) == [(f"/q{i}", b"out %d" % i) for i in kept]
    assert not any(x.request.body_truncated or x.response.body_truncated for x in out)
    assert dec.losses.counts() == {}
    assert dec.stats.get("http1_resyncs", 0) == 0 and dec.stats.get("responses_unmatched", 0) == 0
    assert dec.stats["shed_records"] == 2 * len(shed)


def test_a_shed_response_whose_request_was_decoded_leaves_it_unanswered_never_mispaired() -> None:
    client, server = conversation(MSGS)
    out, dec = run(list(client), shed_messages(server, {2}, SERVER_COOKIE, Role.SERVER))
    assert pairs(out) == [
        *((f"/q{i}", b"out %d" % i) for i in range(2)),
        ("/q2", None),
        *((f"/q{i}", b"out %d" % i) for i in range(3, 6)),
    ]
    assert dec.losses.counts() == {}


def test_a_connection_shed_from_its_first_byte_is_neither_lost_nor_uninspected() -> None:
    dec = WireDecoder()
    dec.on_flow_start(client_flow())
    dec.on_flow_start(server_flow())
    dec.on_shed(Shed(CLIENT_COOKIE, 1, 0, Role.CLIENT, connection=True))
    dec.on_shed(Shed(SERVER_COOKIE, 2, 0, Role.SERVER, connection=True))
    assert dec.uninspected_counts() == {}
    assert dec.on_flow_end(SERVER_COOKIE, 5000) == []
    assert dec.on_flow_end(CLIENT_COOKIE, 9000) == []
    assert dec.losses.counts() == {}


# --- the record and the pipeline's count ------------------------------------------------------


def shed_record(cookie: int, offset: int, role: Role, flags: int = 0) -> memoryview:
    raw = decode.RECORD.pack(structs.REC_SHED, 0, 77, cookie, offset, 0, int(role), flags, 0)
    return memoryview(raw)


def test_the_shed_record_decodes_and_each_skipped_call_is_counted_once_under_its_model() -> None:
    assert decode.decode_record(shed_record(5, 123, Role.SERVER, structs.SHED_CONNECTION)) == Shed(
        5, 77, 123, Role.SERVER, connection=True
    )
    pipe = Pipeline(PodDirectory(Path("/nonexistent")))
    pipe.decoder.on_flow_start(client_flow())
    pipe.decoder.on_flow_start(server_flow())
    pipe._remember_model(client_flow().connection, "fraud")  # a call of this connection decoded
    pipe.handle(shed_record(CLIENT_COOKIE, 0, Role.CLIENT))
    pipe.handle(shed_record(SERVER_COOKIE, 0, Role.SERVER))  # its response: the same call
    assert pipe.snapshot().skipped == {("fraud", SKIP_OVERLOAD): 1}
    # Only the server end intercepted: its records count.
    alone = Pipeline(PodDirectory(Path("/nonexistent")))
    alone.decoder.on_flow_start(server_flow())
    alone.handle(shed_record(SERVER_COOKIE, 0, Role.SERVER, structs.SHED_CONNECTION))
    assert alone.snapshot().skipped == {("", SKIP_OVERLOAD_CONNECTION): 1}
