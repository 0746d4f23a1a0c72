"""HTTP/2 and gRPC decoding from samples: genuine h2 client and server byte streams, cut,
truncated and lost, and exactly what the WireDecoder makes of them."""

from __future__ import annotations

import random
from collections import Counter

import hpack
from hyperframe.frame import Frame
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_streams import (
    CLIENT_COOKIE,
    SERVER_COOKIE,
    H2Call,
    H2Wire,
    Send,
    client_flow,
    random_sends,
    run_connection,
    samples_of,
    stream_sends,
)

from infertap.agent.flows.records import ConnectionId, Direction, Endpoint, Role, Sample
from infertap.agent.protocols.http2 import (
    MAX_REMEMBERED_BLOCKS,
    MAX_REMEMBERED_BYTES,
    Http2Connection,
    _plain_block_sid,
    _plain_frame_ok,
)
from infertap.agent.protocols.messages import HttpExchange
from infertap.agent.protocols.wire import WireDecoder


def wire_samples(
    wire: H2Wire, *, cap: int = 16384, rng: random.Random | None = None
) -> tuple[list[Sample], list[Sample]]:
    """Client sends at odd, server sends at even times, in the order h2 produced them."""
    client = stream_sends([(d, 2 * i + 1) for i, d in enumerate(wire.client_sends)])
    server = stream_sends([(d, 2 * i + 2) for i, d in enumerate(wire.server_sends)])
    if rng is not None:  # re-cut every send into random pieces
        client = [p for s in client for p in _recut(s, rng)]
        server = [p for s in server for p in _recut(s, rng)]
    return (
        samples_of(client, CLIENT_COOKIE, Role.CLIENT, cap),
        samples_of(server, SERVER_COOKIE, Role.SERVER, cap),
    )


def _recut(send: Send, rng: random.Random) -> list[Send]:
    return [
        Send(send.offset + p.offset, p.data, send.ts_ns)
        for p in random_sends(send.data, rng, 0, 40)
    ]


def unary_calls(n: int, *, size: int = 20, compress: bool = False) -> tuple[H2Wire, list[H2Call]]:
    wire = H2Wire()
    calls = [
        wire.call(
            H2Call(
                f"/inference.GRPCInferenceService/ModelInfer{i}",
                [bytes([i]) * size],
                [bytes([100 + i]) * (size * 2), b"second"],
                grpc_status=str(i % 3),
                compress=compress,
            )
        )
        for i in range(n)
    ]
    return wire, calls


def by_stream(out: list[HttpExchange]) -> dict[int, HttpExchange]:
    return {x.request.stream_id: x for x in out}


def assert_call(x: HttpExchange, call: H2Call) -> None:
    assert x.request.method == "POST" and x.request.path == call.path
    assert x.request.is_grpc and x.request.grpc_messages == call.request_messages
    assert x.response is not None and x.response.status == 200
    assert x.response.grpc_messages == call.response_messages
    assert x.response.grpc_status() == int(call.grpc_status)
    assert not x.request.headers_unknown and not x.response.headers_unknown


def test_grpc_unary_calls_pair_by_stream_id_with_messages_and_status() -> None:
    wire, calls = unary_calls(4)
    client, server = wire_samples(wire)
    out, dec = run_connection(client, server, end=False)
    assert len(out) == 4
    got = by_stream(out)
    for call in calls:
        assert_call(got[call.stream_id], call)
    assert dec.protocol_of(CLIENT_COOKIE) == "h2" == dec.protocol_of(SERVER_COOKIE)
    assert dec.stats["requests"] == 4 and dec.stats["responses"] == 4
    assert dec.stats["parse_errors"] == 0


def test_bytes_cut_into_tiny_random_sends_decode_the_same() -> None:
    wire, calls = unary_calls(3, size=300)
    client, server = wire_samples(wire, rng=random.Random(11))
    assert len(client) > 50
    out, _ = run_connection(client, server)
    got = by_stream(out)
    for call in calls:
        assert_call(got[call.stream_id], call)


def test_concurrent_streams_interleaved_and_answered_out_of_order() -> None:
    wire = H2Wire()
    calls = [H2Call(f"/svc/M{i}", [f"req{i}".encode()], [f"resp{i}".encode()]) for i in range(3)]
    for call in calls:
        wire.request_headers(call)
    for call in reversed(calls):
        wire.request_body(call)
    for call in (calls[1], calls[2], calls[0]):
        wire.response(call)
    client, server = wire_samples(wire)
    out, _ = run_connection(client, server, end=False)
    assert [x.request.path for x in out] == ["/svc/M1", "/svc/M2", "/svc/M0"]
    for x in out:
        n = x.request.path[-1]
        assert x.request.grpc_messages == [f"req{n}".encode()]
        assert x.response is not None and x.response.grpc_messages == [f"resp{n}".encode()]


def test_gzip_compressed_grpc_messages_are_decompressed() -> None:
    wire, calls = unary_calls(2, size=500, compress=True)
    client, server = wire_samples(wire)
    out, _ = run_connection(client, server)
    got = by_stream(out)
    for call in calls:
        assert_call(got[call.stream_id], call)
        assert got[call.stream_id].request.header("grpc-encoding") == "gzip"
        assert got[call.stream_id].request.body[0] == 1  # the compressed flag, on the wire


def test_large_data_frames_over_many_samples() -> None:
    wire = H2Wire()
    call = wire.call(H2Call("/svc/Big", [bytes(range(256)) * 200], [b"r" * 70_000]))
    client, server = wire_samples(wire, rng=random.Random(5))
    out, _ = run_connection(client, server)
    assert_call(out[0], call)


def test_data_cut_by_the_sample_limit_truncates_only_that_body_and_framing_survives() -> None:
    wire = H2Wire()
    big = H2Call("/svc/Big", [b"q" * 10_000], [b"ok"])
    wire.call(big)
    later = wire.call(H2Call("/svc/After", [b"small"], [b"fine"]))
    client, server = wire_samples(wire, cap=4096)
    assert any(s.truncated for s in client)
    out, dec = run_connection(client, server)
    got = by_stream(out)
    cut = got[big.stream_id]
    assert cut.request.body_truncated and cut.request.grpc_messages == []  # never a partial message
    assert not cut.request.headers_unknown and cut.request.path == "/svc/Big"
    assert cut.response is not None and cut.response.grpc_messages == [b"ok"]
    assert_call(got[later.stream_id], later)  # HPACK and framing intact after an exact skip
    assert dec.stats.get("h2_hpack_lost", 0) == 0 and dec.stats.get("h2_framing_lost", 0) == 0
    assert dec.losses.counts() == {("http2", "body_gap"): 1}


def test_lost_header_block_fails_closed_for_every_later_message_in_that_direction() -> None:
    wire, calls = unary_calls(4)
    client, server = wire_samples(wire)
    # Cut the send that carries call 1's request HEADERS to its first 12 bytes.
    i = calls[1].headers_send
    cut = client[i]
    assert cut.data[3] == 0x1  # a HEADERS frame
    client[i] = Sample(
        CLIENT_COOKIE, cut.ts_ns, cut.offset, cut.msg_len, cut.data[:12], Role.CLIENT, True
    )
    out, dec = run_connection(client, server)
    got = by_stream(out)
    assert_call(got[calls[0].stream_id], calls[0])
    for call in calls[1:]:
        x = got[call.stream_id]
        assert x.request.headers_unknown and x.request.headers == [] and x.request.path == ""
        # The response direction has its own HPACK state: still decoded, still paired.
        assert x.response is not None and x.response.grpc_messages == call.response_messages
        assert not x.response.headers_unknown and x.response.grpc_status() == int(call.grpc_status)
    assert dec.stats["h2_hpack_lost"] == 1
    # The cut block, then one per later request header block lost with the state.
    assert dec.losses.counts() == {("http2", "header_gap"): 1, ("http2", "hpack_lost"): 2}


def test_whole_sends_lost_lose_framing_then_resync_with_headers_unknown() -> None:
    wire, calls = unary_calls(5)
    client, server = wire_samples(wire)
    # Lose the server sends of call 1's response headers and first data.
    resp_heads = [i for i, s in enumerate(server) if s.data[3:4] == b"\x01"]
    lost = resp_heads[2]  # call 1's response HEADERS (0: call 0 headers, 1: call 0 trailers)
    del server[lost]
    out, dec = run_connection(client, server)
    got = by_stream(out)
    assert_call(got[calls[0].stream_id], calls[0])
    assert dec.stats["h2_framing_lost"] == 1 and dec.stats["h2_resyncs"] >= 1
    losses = dec.losses.counts()
    assert losses[("http2", "framing_lost")] == 1 and losses[("http2", "hpack_lost")] >= 1
    for call in calls[1:]:
        x = got[call.stream_id]
        assert not x.request.headers_unknown and x.request.path == call.path  # other direction
        if x.response is not None:
            assert x.response.headers_unknown and x.response.headers == []
            assert x.response.trailers == []
    # After the resync, later responses still pair by stream id and carry their messages.
    tail = got[calls[4].stream_id].response
    assert tail is not None and tail.grpc_messages == calls[4].response_messages


def test_only_the_client_flow_emits_requests_at_end_of_stream() -> None:
    wire, calls = unary_calls(2)
    client, _ = wire_samples(wire)
    dec = WireDecoder()
    dec.on_flow_start(client_flow())
    out: list[HttpExchange] = []
    for s in client:
        out.extend(dec.on_sample(s))
    assert [(x.request.path, x.response) for x in out] == [(c.path, None) for c in calls]
    assert out[0].request.grpc_messages == calls[0].request_messages


def test_reset_stream_closes_the_exchange() -> None:
    wire = H2Wire()
    call = H2Call("/svc/Cancel", [b"x"], [])
    wire.request_headers(call)
    wire.reset(call)
    client, server = wire_samples(wire)
    out, dec = run_connection(client, server, end=False)
    assert len(out) == 1 and out[0].request.path == "/svc/Cancel" and out[0].response is None
    assert dec.stats["h2_resets"] == 1


def test_flow_end_flushes_open_streams_as_truncated() -> None:
    wire = H2Wire()
    call = H2Call("/svc/Open", [b"x"], [])
    wire.request_headers(call)
    client, server = wire_samples(wire)
    out, _ = run_connection(client, server)
    assert len(out) == 1 and out[0].request.path == "/svc/Open" and out[0].request.body_truncated


def test_remembered_header_blocks_follow_the_dynamic_table() -> None:
    """A repeated header block is looked up only while the HPACK table is as it was: the same
    bytes (index 62, the newest entry) mean another header once a new entry moved the table."""
    conn = Http2Connection(
        ConnectionId(Endpoint("10.0.0.1", 1), Endpoint("10.0.0.2", 2)),
        Counter(),
        Counter(),
        expect_responses=True,
    )
    decoder = conn.consumer(Direction.REQUEST)
    enc = hpack.Encoder()
    newest = b"\xbe"  # indexed header field 62: the newest dynamic entry
    first = enc.encode([("x-a", "1")])  # literal with incremental indexing: adds x-a: 1
    second = enc.encode([("x-b", "2")])  # adds x-b: 2, which is then index 62
    reference = hpack.Decoder()
    seen = []
    for block in (first, newest, newest, second, newest, newest, first, newest):
        expected = [(bytes(k), bytes(v)) for k, v in reference.decode(block, raw=True)]
        got = decoder._decode_block(block)
        assert got == expected
        got.append((b"x-mutated", b"by the caller"))  # a caller's list is its own
        seen.append(expected)
    assert seen[1] == [(b"x-a", b"1")] and seen[4] == [(b"x-b", b"2")]
    # Memory stays bounded: big blocks are decoded every time, few blocks are kept.
    unindexed = hpack.NeverIndexedHeaderTuple  # literals that leave the table as it is
    for i in range(100):
        big = enc.encode([unindexed(b"x-big", b"v" * 5000)], huffman=False)
        assert decoder._decode_block(big) == [(b"x-big", b"v" * 5000)]
        decoder._decode_block(enc.encode([unindexed(f"x-{i}".encode(), b"1")]))
    assert 0 < len(decoder._decoded) <= MAX_REMEMBERED_BLOCKS
    assert all(len(k[1]) <= MAX_REMEMBERED_BYTES for k in decoder._decoded)


@settings(max_examples=1500, deadline=None)
@given(
    ftype=st.sampled_from([0x6, 0x8]),
    length=st.sampled_from([0, 3, 4, 5, 8, 9]),
    flags=st.integers(0, 255),
    sid=st.sampled_from([0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1]),
    body=st.binary(min_size=9, max_size=9),
    word=st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1]),
)
def test_ping_and_window_update_frames_pass_where_hyperframe_parses_them(
    ftype: int, length: int, flags: int, sid: int, body: bytes, word: int
) -> None:
    payload = (word.to_bytes(4, "big") + body)[:length]
    raw = memoryview(
        length.to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload
    )
    try:
        frame, _ = Frame.parse_frame_header(raw[:9])
        frame.parse_body(raw[9:])
        parses = True
    except Exception:
        parses = False
    assert _plain_frame_ok(raw, length) == parses


@settings(max_examples=1500, deadline=None)
@given(
    ftype=st.sampled_from([0x1, 0x9]),
    flags=st.integers(0, 255),
    sid=st.sampled_from([0, 1, 7, 2**31 - 1, 2**31, 2**31 + 3, 2**32 - 1]),
    payload=st.binary(max_size=40),
)
def test_headers_and_continuation_read_directly_only_as_hyperframe_parses_them(
    ftype: int, flags: int, sid: int, payload: bytes
) -> None:
    """The direct read of a plain HEADERS or CONTINUATION frame gives hyperframe's stream id
    and block fragment (its whole payload), and is taken for no frame hyperframe would parse
    otherwise (padding, priority) or refuse (stream 0)."""
    raw = memoryview(
        len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload
    )
    direct = _plain_block_sid(raw)
    try:
        frame, _ = Frame.parse_frame_header(raw[:9])
        frame.parse_body(raw[9:])
    except Exception:
        assert direct == 0
        return
    if direct:
        assert direct == frame.stream_id
        assert frame.data == payload  # type: ignore[attr-defined]
        assert ("END_HEADERS" in frame.flags) == bool(flags & 0x4)
        if ftype == 0x1:
            assert ("END_STREAM" in frame.flags) == bool(flags & 0x1)
    else:
        assert ftype == 0x1 and flags & 0x28  # only padded or prioritised HEADERS fall back
