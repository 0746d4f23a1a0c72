"""Property tests for the wire layer: random, truncated, lost and interleaved byte streams.

Whatever comes in: nothing escapes WireDecoder, nothing is swallowed either (internal_errors
stays 0: a bug would be counted there, not raised), accounted memory stays within its limits,
and what is decoded is either right or flagged (pairs never shift, headers never move between
requests).
"""

from __future__ import annotations

import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_streams import (
    CLIENT_COOKIE,
    SERVER_COOKIE,
    H2Call,
    H2Wire,
    Send,
    client_flow,
    h1_request,
    h1_response,
    random_sends,
    sample_of,
    server_flow,
    stream_sends,
)

from infertap.agent.flows.records import Endpoint, FlowInfo, Role, Sample
from infertap.agent.protocols.messages import HttpExchange
from infertap.agent.protocols.wire import WireDecoder

# WIRE_FUZZ_EXAMPLES raises the count for a longer hunt (CI keeps the default).
FUZZ = settings(
    max_examples=int(os.environ.get("WIRE_FUZZ_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PER_FLOW = 2048
TOTAL = 6000


def lossy(sends: list[Send], rng: random.Random, loss: float) -> list[Send]:
    return [s for s in sends if rng.random() >= loss]


def feed_checked(
    dec: WireDecoder,
    samples: list[Sample],
    cookies: list[int],
    final_offsets: dict[int, int] | None = None,
) -> list[HttpExchange]:
    out: list[HttpExchange] = []
    for s in sorted(samples, key=lambda s: s.ts_ns):
        out.extend(dec.on_sample(s))
        assert dec.buffered_bytes <= TOTAL
        assert all(dec.flow_buffered_bytes(c) <= PER_FLOW for c in cookies)
    for c in cookies:
        out.extend(dec.on_flow_end(c, (final_offsets or {}).get(c)))
    assert dec.buffered_bytes == 0 and dec.stats["flows"] == 0 and dec.stats["connections"] == 0
    assert dec.stats.get("internal_errors", 0) == 0
    return out


prefixes = st.sampled_from(
    [
        b"",
        b"GET / HTTP/1.1\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x00\x00\x06\x04\x00\x00\x00\x00\x00",
        b"POST /x HTTP/1.1\r\nContent-Length: 99999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffff\r\n",
    ]
)


@FUZZ
@given(
    streams=st.lists(st.tuples(prefixes, st.binary(max_size=3000)), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
    cap=st.integers(1, 4096),
    loss=st.floats(0, 0.5),
)
def test_random_interleaved_streams_never_raise_and_stay_bounded(
    streams: list[tuple[bytes, bytes]], seed: int, cap: int, loss: float
) -> None:
    rng = random.Random(seed)
    dec = WireDecoder(per_flow_limit=PER_FLOW, total_limit=TOTAL)
    samples: list[Sample] = []
    cookies = []
    for n, (prefix, tail) in enumerate(streams):
        cookie = 1000 + n
        role = Role.CLIENT if n % 2 == 0 else Role.SERVER
        here, there = Endpoint("10.0.0.1", 5000 + n // 2), Endpoint("10.0.0.2", 80)
        dec.on_flow_start(
            FlowInfo(
                cookie,
                role,
                here if role is Role.CLIENT else there,
                there if role is Role.CLIENT else here,
                1,
                0,
                True,
            )
        )
        cookies.append(cookie)
        sends = lossy(random_sends(prefix + tail, rng, 0, 600), rng, loss)
        for send in sends:
            send.ts_ns = rng.randint(0, 10_000)
        samples.extend(sample_of(send, cookie, role, cap) for send in sends)
    # Samples of one flow stay in order (the kernel guarantees that); flows interleave.
    by_flow: dict[int, list[Sample]] = {}
    for s in samples:
        by_flow.setdefault(s.cookie, []).append(s)
    ordered = [sorted(v, key=lambda s: s.offset) for v in by_flow.values()]
    merged: list[Sample] = []
    while any(ordered):
        lane = rng.choice([o for o in ordered if o])
        merged.append(lane.pop(0))
    retimed = [
        Sample(s.cookie, i, s.offset, s.msg_len, s.data, s.role, s.truncated)
        for i, s in enumerate(merged)
    ]
    feed_checked(dec, retimed, cookies)


def http1_truth(n: int, rng: random.Random) -> list[tuple[bytes, bytes, str, bytes, bytes]]:
    out = []
    for i in range(n):
        path = f"/m/{i}"
        body = bytes([65 + i % 26]) * rng.randint(0, 6000)
        answer = f"answer for {path} ".encode() * rng.randint(1, 300)
        chunked = rng.random() < 0.3
        out.append(
            (
                h1_request("POST", path, body),
                h1_response(200, answer, chunked=chunked),
                path,
                body,
                answer,
            )
        )
    return out


@FUZZ
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 8),
    cap=st.sampled_from([64, 512, 4096, 16384]),
    loss=st.floats(0, 0.4),
    max_send=st.integers(1, 5000),
    tell_final=st.booleans(),
)
def test_http1_under_cuts_truncation_and_loss_is_right_or_flagged(
    seed: int, n: int, cap: int, loss: float, max_send: int, tell_final: bool
) -> None:
    rng = random.Random(seed)
    truth = http1_truth(n, rng)
    client: list[Send] = []
    server: list[Send] = []
    for i, (req, resp, *_rest) in enumerate(truth):
        for sends, data, ts in ((client, req, 1000 * i + 1), (server, resp, 1000 * i + 500)):
            base = sends[-1].offset + len(sends[-1].data) if sends else 0
            for k, p in enumerate(random_sends(data, rng, ts, max_send)):
                sends.append(Send(base + p.offset, p.data, ts + k))
    samples = [sample_of(s, CLIENT_COOKIE, Role.CLIENT, cap) for s in lossy(client, rng, loss)]
    samples += [sample_of(s, SERVER_COOKIE, Role.SERVER, cap) for s in lossy(server, rng, loss)]
    dec = WireDecoder(per_flow_limit=PER_FLOW, total_limit=TOTAL)
    dec.on_flow_start(client_flow())
    dec.on_flow_start(server_flow())
    finals = {
        CLIENT_COOKIE: client[-1].offset + len(client[-1].data),
        SERVER_COOKIE: server[-1].offset + len(server[-1].data),
    }
    out = feed_checked(dec, samples, [SERVER_COOKIE, CLIENT_COOKIE], finals if tell_final else None)
    expected = {path: (body, answer) for _q, _r, path, body, answer in truth}
    seen = [x.request.path for x in out]
    assert len(seen) == len(set(seen))  # no request twice
    for x in out:
        body, answer = expected[x.request.path]
        if not x.request.body_truncated:
            assert x.request.body == body
        else:
            assert body.startswith(x.request.body)
        if x.response is not None:  # paired with its own response, never a neighbour's
            if x.response.body_truncated:
                assert answer.startswith(x.response.body)
            else:
                assert x.response.body == answer
    if loss == 0 and cap == 16384:
        assert [(x.request.path, x.response is not None) for x in out] == [
            (p, True) for *_r, p, _b, _a in truth
        ]


@FUZZ
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 6),
    cap=st.sampled_from([16, 200, 4096, 16384]),
    loss=st.floats(0, 0.4),
    compress=st.booleans(),
)
def test_h2_under_truncation_and_loss_never_misattributes(
    seed: int, n: int, cap: int, loss: float, compress: bool
) -> None:
    rng = random.Random(seed)
    wire = H2Wire()
    calls = [
        H2Call(
            f"/pkg.Svc/Call{i}",
            [f"req {i} ".encode() * rng.randint(1, 2000)],
            [f"resp {i} ".encode() * rng.randint(1, 2000)],
            grpc_status=str(i),
            compress=compress,
            extra_headers=[("x-call", str(i))],
        )
        for i in range(n)
    ]
    for call in calls:  # concurrent streams: all requests, then the answers
        wire.request_headers(call)
        wire.request_body(call)
    for call in calls:
        wire.response(call)
    client = lossy(
        stream_sends([(d, 2 * i + 1) for i, d in enumerate(wire.client_sends)]), rng, loss
    )
    server = lossy(
        stream_sends([(d, 2 * i + 2) for i, d in enumerate(wire.server_sends)]), rng, loss
    )
    samples = [sample_of(s, CLIENT_COOKIE, Role.CLIENT, cap) for s in client]
    samples += [sample_of(s, SERVER_COOKIE, Role.SERVER, cap) for s in server]
    dec = WireDecoder(per_flow_limit=PER_FLOW * 16, total_limit=TOTAL * 16)
    dec.on_flow_start(client_flow())
    dec.on_flow_start(server_flow())
    out: list[HttpExchange] = []
    for s in sorted(samples, key=lambda s: s.ts_ns):
        out.extend(dec.on_sample(s))
    out.extend(dec.on_flow_end(SERVER_COOKIE))
    out.extend(dec.on_flow_end(CLIENT_COOKIE))
    assert dec.stats.get("internal_errors", 0) == 0 and dec.buffered_bytes == 0
    truth = {c.stream_id: c for c in calls}
    for x in out:
        call = truth[x.request.stream_id]
        i = calls.index(call)
        if not x.request.headers_unknown:
            assert x.request.path == call.path and x.request.header("x-call") == str(i)
        else:
            assert x.request.headers == [] and x.request.path == ""
        if x.request.grpc_messages and not x.request.body_truncated:
            assert x.request.grpc_messages == call.request_messages
        if x.response is not None:
            if not x.response.headers_unknown:
                assert x.response.status == 200
            if x.response.trailers and not x.response.trailers_unknown:
                assert x.response.grpc_status() == i
            if x.response.grpc_messages and not x.response.body_truncated:
                assert x.response.grpc_messages == call.response_messages
    if loss == 0 and cap == 16384:
        assert sorted(x.request.stream_id for x in out) == sorted(truth)
        for x in out:
            assert x.response is not None and x.response.grpc_status() == calls.index(
                truth[x.request.stream_id]
            )


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), max_send=st.integers(1, 200))
def test_h2_recut_at_arbitrary_points_decodes_exactly(seed: int, max_send: int) -> None:
    rng = random.Random(seed)
    wire = H2Wire()
    calls = [
        wire.call(H2Call(f"/s/M{i}", [bytes([i]) * 300], [bytes([i + 1]) * 500])) for i in range(3)
    ]
    client = random_sends(b"".join(wire.client_sends), rng, 1, max_send)
    server = random_sends(b"".join(wire.server_sends), rng, 1, max_send)
    for k, send in enumerate(client):
        send.ts_ns = 2 * k
    for k, send in enumerate(server):
        send.ts_ns = 2 * k + 1 + 10 * len(client)
    samples = [sample_of(send, CLIENT_COOKIE, Role.CLIENT) for send in client]
    samples += [sample_of(send, SERVER_COOKIE, Role.SERVER) for send in server]
    dec = WireDecoder()
    dec.on_flow_start(client_flow())
    dec.on_flow_start(server_flow())
    out: list[HttpExchange] = []
    for s in sorted(samples, key=lambda s: s.ts_ns):
        out.extend(dec.on_sample(s))
    got = {x.request.stream_id: x for x in out}
    for call in calls:
        x = got[call.stream_id]
        assert x.request.path == call.path and x.request.grpc_messages == call.request_messages
        assert x.response is not None and x.response.grpc_messages == call.response_messages
