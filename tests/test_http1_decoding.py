"""HTTP/1.x decoding from samples: h11-made wire bytes, cut, truncated and lost like the kernel
would, and exactly what the WireDecoder makes of them."""

from __future__ import annotations

import json
import logging
import random

import pytest
from wire_streams import (
    CLIENT_COOKIE,
    SERVER,
    SERVER_COOKIE,
    Send,
    client_flow,
    feed_in_time_order,
    gzipped,
    h1_request,
    h1_response,
    random_sends,
    run_connection,
    sample_of,
    samples_of,
    server_flow,
)

from infertap.agent.flows.records import FlowInfo, Role, Sample
from infertap.agent.protocols.messages import HttpExchange
from infertap.agent.protocols.wire import WireDecoder


def conversation(
    messages: list[tuple[bytes, bytes]],
    *,
    rng: random.Random | None = None,
    cap: int = 4096,
    max_send: int = 3000,
) -> tuple[list[Sample], list[Sample]]:
    """Request i is sent at 1000*i+1, its response at 1000*i+500 (one request at a time).
    With rng, every message goes out in several sends of random sizes."""
    client: list[Send] = []
    server: list[Send] = []
    for i, (req, resp) in enumerate(messages):
        for sends, data, ts in ((client, req, 1000 * i + 1), (server, resp, 1000 * i + 500)):
            base = sum(len(s.data) for s in sends)
            parts = random_sends(data, rng, ts, max_send) if rng else [Send(0, data, ts)]
            sends.extend(Send(base + p.offset, p.data, p.ts_ns) for p in parts)
    return (
        samples_of(client, CLIENT_COOKIE, Role.CLIENT, cap),
        samples_of(server, SERVER_COOKIE, Role.SERVER, cap),
    )


def paths_and_statuses(out: list[HttpExchange]) -> list[tuple[str, int | None]]:
    return [(x.request.path, x.response.status if x.response else None) for x in out]


def test_keep_alive_exchanges_pair_in_order_with_bodies_and_latency() -> None:
    msgs = [
        (
            h1_request("POST", f"/v1/models/m{i}:predict", json.dumps({"i": i}).encode()),
            h1_response(
                200, json.dumps({"out": i * 10}).encode(), [("content-type", "application/json")]
            ),
        )
        for i in range(3)
    ]
    client, server = conversation(msgs)
    out, dec = run_connection(client, server, end=False)
    assert paths_and_statuses(out) == [(f"/v1/models/m{i}:predict", 200) for i in range(3)]
    for i, x in enumerate(out):
        assert x.request.method == "POST"
        assert json.loads(x.request.body) == {"i": i}
        assert x.response is not None and json.loads(x.response.body) == {"out": i * 10}
        assert x.latency_ns == 499
        assert (
            x.request.protocol == "http/1.1"
            and x.response.header("content-type") == "application/json"
        )
        assert not x.request.body_truncated and not x.response.body_truncated
    assert dec.protocol_of(CLIENT_COOKIE) == "http/1.1" == dec.protocol_of(SERVER_COOKIE)
    assert dec.stats["requests"] == 3 and dec.stats["responses"] == 3
    assert dec.requests_by_service[SERVER] == 3


def test_messages_spread_over_many_random_sends_decode_the_same() -> None:
    body = bytes(random.Random(1).randbytes(20_000))
    msgs = [
        (h1_request("PUT", f"/blob/{i}", body[: 5000 * (i + 1)]), h1_response(201, b"ok"))
        for i in range(4)
    ]
    client, server = conversation(msgs, rng=random.Random(7), max_send=700)
    assert len(client) > 20
    out, _ = run_connection(client, server)
    assert paths_and_statuses(out) == [(f"/blob/{i}", 201) for i in range(4)]
    assert [x.request.body for x in out] == [body[: 5000 * (i + 1)] for i in range(4)]


def test_pipelined_requests_in_one_send_pair_in_order() -> None:
    reqs = b"".join(h1_request("GET", f"/p{i}") for i in range(3))
    resps = b"".join(h1_response(200, f"r{i}".encode()) for i in range(3))
    out, _ = run_connection(
        [sample_of(Send(0, reqs, 10), CLIENT_COOKIE, Role.CLIENT)],
        [sample_of(Send(0, resps, 20), SERVER_COOKIE, Role.SERVER)],
    )
    assert [(x.request.path, x.response.body if x.response else None) for x in out] == [
        ("/p0", b"r0"),
        ("/p1", b"r1"),
        ("/p2", b"r2"),
    ]


def test_chunked_gzip_response_is_dechunked_and_decompressed() -> None:
    doc = json.dumps({"choices": [{"text": "x" * 3000}]}).encode()
    resp = h1_response(200, gzipped(doc), [("Content-Encoding", "gzip")], chunked=True, chunks=5)
    client, server = conversation(
        [(h1_request("POST", "/v1/completions", b"{}"), resp)], rng=random.Random(3), max_send=200
    )
    out, _ = run_connection(client, server)
    assert len(out) == 1 and out[0].response is not None
    assert out[0].response.body == doc
    assert out[0].response.header("transfer-encoding") == "chunked"


def test_chunked_request_with_trailers() -> None:
    conn = (
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n"
    )
    out, _ = run_connection(
        [sample_of(Send(0, conn, 1), CLIENT_COOKIE, Role.CLIENT)], with_server_flow=False
    )
    assert out[0].request.body == b"abcde"
    assert out[0].request.trailers == [("x-sum", "5")]


def test_body_cut_by_the_sample_limit_is_flagged_and_the_next_message_resyncs_exactly() -> None:
    big = bytes(range(256)) * 40  # 10240 bytes: one send, only 4096 captured
    msgs = [
        (h1_request("POST", "/big", big), h1_response(200, b"first")),
        (h1_request("POST", "/small", b"tiny"), h1_response(200, b"second")),
    ]
    client, server = conversation(msgs)
    assert client[0].truncated
    out, dec = run_connection(client, server)
    first, second = out
    assert first.request.body_truncated and first.request.path == "/big"
    head = len(h1_request("POST", "/big", big)) - len(big)
    assert first.request.body == big[: 4096 - head]  # the captured prefix, nothing guessed
    assert first.response is not None and first.response.body == b"first"
    assert second.request.path == "/small" and second.request.body == b"tiny"
    assert not second.request.body_truncated
    assert second.response is not None and second.response.body == b"second"
    assert dec.stats.get("http1_resyncs", 0) == 0  # the skip was exact
    assert dec.stats["truncated_bytes"] == len(msgs[0][0]) - 4096
    assert dec.losses.counts() == {("http1", "body_gap"): 1}


def test_gap_inside_a_gzip_body_keeps_the_decodable_prefix_and_flags_it() -> None:
    doc = b"".join(f"line {i}\n".encode() for i in range(3000))
    packed = gzipped(doc)
    resp = h1_response(200, packed, [("Content-Encoding", "gzip")])
    client, server = conversation([(h1_request("GET", "/doc"), resp)], cap=2048)
    out, _ = run_connection(client, server)
    r = out[0].response
    assert r is not None and r.body_truncated
    assert doc.startswith(r.body) and 0 < len(r.body) < len(doc)


def test_lost_request_header_block_resyncs_and_never_shifts_pairs() -> None:
    msgs = [
        (h1_request("GET", f"/q{i}"), h1_response(200, f"answer {i}".encode())) for i in range(4)
    ]
    client, server = conversation(msgs)
    client[1] = Sample(
        CLIENT_COOKIE,
        client[1].ts_ns,
        client[1].offset,
        client[1].msg_len,
        client[1].data[:12],
        Role.CLIENT,
        True,
    )
    out, dec = run_connection(client, server)
    pairs = [(x.request.path, x.response.body if x.response else None) for x in out]
    assert pairs == [("/q0", b"answer 0"), ("/q2", b"answer 2"), ("/q3", b"answer 3")]
    assert dec.stats["responses_unmatched"] == 1  # answer 1 had no request to go to
    assert dec.losses.counts() == {("http1", "header_gap"): 1}


def test_each_loss_is_logged_once_per_connection_without_payload(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = b"alice@example.com"
    msgs = [
        (h1_request("GET", f"/q{i}", headers=[("x-user", secret.decode())]), h1_response(200, b"a"))
        for i in range(4)
    ]
    client, server = conversation(msgs)
    for i in (1, 3):  # two header blocks cut on one connection, a whole request between
        s = client[i]
        client[i] = Sample(
            CLIENT_COOKIE, s.ts_ns, s.offset, s.msg_len, s.data[:12], Role.CLIENT, True
        )
    with caplog.at_level(logging.WARNING, logger="infertap.agent.protocols.losses"):
        _out, dec = run_connection(client, server)
        _again, dec = run_connection(client, server, decoder=dec)  # the same addresses, reopened
    assert dec.losses.counts() == {("http1", "header_gap"): 4}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # once per connection, not once per loss
    assert "http1" in lines[0] and "header_gap" in lines[0] and str(SERVER) in lines[0]
    assert not any(secret.decode() in ln or "/q" in ln for ln in lines)


def test_lost_response_samples_leave_that_request_unanswered_and_later_pairs_right() -> None:
    msgs = [
        (h1_request("GET", f"/q{i}"), h1_response(200, f"answer {i}".encode())) for i in range(4)
    ]
    client, server = conversation(msgs)
    del server[1]  # a whole response send lost: the next sample's offset jumps
    out, dec = run_connection(client, server)
    pairs = [(x.request.path, x.response.body if x.response else None) for x in out]
    assert pairs == [
        ("/q0", b"answer 0"),
        ("/q1", None),
        ("/q2", b"answer 2"),
        ("/q3", b"answer 3"),
    ]
    assert dec.stats["lost_bytes"] == len(msgs[1][1])


def test_head_response_has_no_body_even_with_content_length() -> None:
    msgs = [
        (h1_request("HEAD", "/m"), h1_response(200, b"x" * 50, for_method="HEAD")),
        (h1_request("GET", "/m"), h1_response(200, b"y" * 7)),
    ]
    assert b"Content-Length: 50" in msgs[0][1]
    reqs = b"".join(m[0] for m in msgs)
    resps = b"".join(m[1] for m in msgs)
    out, _ = run_connection(
        [sample_of(Send(0, reqs, 1), CLIENT_COOKIE, Role.CLIENT)],
        [sample_of(Send(0, resps, 2), SERVER_COOKIE, Role.SERVER)],
    )
    assert [(x.request.method, x.response.body if x.response else None) for x in out] == [
        ("HEAD", b""),
        ("GET", b"y" * 7),
    ]


def test_interim_100_continue_is_not_taken_for_the_answer() -> None:
    req = b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"
    resp = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok"
    out, dec = run_connection(
        [sample_of(Send(0, req, 1), CLIENT_COOKIE, Role.CLIENT)],
        [sample_of(Send(0, resp, 2), SERVER_COOKIE, Role.SERVER)],
    )
    assert len(out) == 1 and out[0].response is not None
    assert out[0].response.status == 202 and out[0].response.body == b"ok"
    assert dec.stats["http1_interim_responses"] == 1


def test_response_delimited_by_close_completes_when_the_server_flow_ends() -> None:
    req = h1_request("GET", "/stream")
    resp = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, part two"
    dec = WireDecoder()
    dec.on_flow_start(client_flow())
    dec.on_flow_start(server_flow())
    assert dec.on_sample(sample_of(Send(0, req, 1), CLIENT_COOKIE, Role.CLIENT)) == []
    assert dec.on_sample(sample_of(Send(0, resp, 2), SERVER_COOKIE, Role.SERVER)) == []
    out = dec.on_flow_end(SERVER_COOKIE)
    assert len(out) == 1 and out[0].response is not None
    assert out[0].response.body == b"part one, part two" and not out[0].response.body_truncated
    assert out[0].response.protocol == "http/1.0"


def test_only_the_client_flow_intercepted_emits_each_request_when_complete() -> None:
    client, _ = conversation([(h1_request("POST", f"/c{i}", b"{}"), b"") for i in range(2)])
    dec = WireDecoder()
    dec.on_flow_start(client_flow())
    first = dec.on_sample(client[0])
    assert [(x.request.path, x.response) for x in first] == [("/c0", None)]
    assert [x.request.path for x in dec.on_sample(client[1])] == ["/c1"]


def test_requests_unanswered_at_flow_end_come_out_alone() -> None:
    client, server = conversation(
        [(h1_request("GET", f"/u{i}"), h1_response(200, b"k")) for i in range(3)]
    )
    out, _ = run_connection(client, server[:1])
    assert [(x.request.path, x.response is not None) for x in out] == [
        ("/u0", True),
        ("/u1", False),
        ("/u2", False),
    ]


def test_flow_that_starts_mid_stream_resyncs_on_the_next_request_line() -> None:
    stream = b"".join(h1_request("POST", f"/m{i}", b"z" * 30) for i in range(3))
    first = len(h1_request("POST", "/m0", b"z" * 30))
    dec = WireDecoder()
    dec.on_flow_start(client_flow())
    out: list[HttpExchange] = []
    # The agent started after 10 bytes of the stream had gone by.
    for s in [Send(10, stream[10:first], 1), Send(first, stream[first:], 2)]:
        out.extend(dec.on_sample(sample_of(s, CLIENT_COOKIE, Role.CLIENT)))
    assert [x.request.path for x in out] == ["/m1", "/m2"]


def test_non_http_flow_is_ignored_cheaply() -> None:
    tls = bytes([0x16, 0x03, 0x01, 0x02, 0x00]) + b"\x01" * 300
    dec = WireDecoder()
    dec.on_flow_start(client_flow())
    for i in range(5):
        assert (
            dec.on_sample(Sample(CLIENT_COOKIE, i, i * len(tls), len(tls), tls, Role.CLIENT, False))
            == []
        )
    assert dec.protocol_of(CLIENT_COOKIE) == ""
    assert dec.stats["flows_unknown"] == 1 and dec.stats["samples_ignored"] == 4
    assert dec.buffered_bytes == 0
    # Reported, not silent: the connection is not inspected, until it closes.
    assert dec.uninspected_counts() == {"not_http": 1}
    assert dec.uninspected_reason(CLIENT_COOKIE) == "not_http"
    # TLS: when the same connection's plaintext decodes on another (virtual) flow, the
    # ciphertext flow no longer makes the connection uninspected.
    plain = FlowInfo(999, Role.CLIENT, client_flow().local, SERVER, 7, 0, True)
    dec.on_flow_start(plain)
    req = h1_request("GET", "/v2/health/ready")
    dec.on_sample(Sample(999, 10, 0, len(req), req, Role.CLIENT, False))
    assert dec.uninspected_counts() == {} and dec.uninspected_reason(CLIENT_COOKIE) == ""
    dec.on_flow_end(999)
    dec.on_flow_end(CLIENT_COOKIE)
    assert dec.uninspected_counts() == {}


def test_requests_only_mode_never_decodes_the_server_side() -> None:
    client, server = conversation([(h1_request("GET", "/r"), h1_response(200, b"body"))])
    dec = WireDecoder(requests_only=True)
    dec.on_flow_start(client_flow())
    dec.on_flow_start(server_flow())
    out = feed_in_time_order(dec, [*client, *server])
    assert [(x.request.path, x.response) for x in out] == [("/r", None)]
    assert dec.stats["responses"] == 0 and dec.protocol_of(SERVER_COOKIE) == ""


def test_capture_bodies_off_still_counts_and_pairs() -> None:
    client, server = conversation([(h1_request("POST", "/n", b"secret"), h1_response(200, b"s"))])
    out, dec = run_connection(client, server, decoder=WireDecoder(capture_bodies=False))
    assert (
        out[0].request.body == b"" and out[0].response is not None and out[0].response.status == 200
    )
    assert dec.requests_by_service[SERVER] == 1


def test_idle_eviction_emits_what_is_pending() -> None:
    client, _ = conversation([(h1_request("GET", "/idle"), b"")])
    dec = WireDecoder(idle_timeout_s=1.0)
    dec.on_flow_start(client_flow())
    dec.on_flow_start(server_flow())
    assert dec.on_sample(client[0]) == []  # waits for the response
    assert dec.evict_idle(now_ns=500_000_000) == []
    out = dec.evict_idle(now_ns=5_000_000_000)
    assert [(x.request.path, x.response) for x in out] == [("/idle", None)]
    assert dec.stats["flows"] == 0 and dec.stats["evictions"] >= 1


def test_conflicting_content_length_and_transfer_encoding_is_reported_never_dropped() -> None:
    # What a smuggling probe sends: both headers, in either order, or two lengths. llhttp refuses
    # the block; the request still comes out, flagged, paired with the answer the server gave.
    bodies = b"5\r\nhello\r\n0\r\n\r\n"
    conflicting = [
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: m\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + bodies,
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n" + bodies,
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: m\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\nhello!",
    ]
    for raw in conflicting:
        msgs = [
            (raw, h1_response(200, b"served")),
            (h1_request("GET", "/after"), h1_response(200, b"next")),
        ]
        client, server = conversation(msgs)
        out, dec = run_connection(client, server)
        assert paths_and_statuses(out) == [("/v2/models/m/infer", 200), ("/after", 200)], raw
        first, second = out
        assert first.request.framing_ambiguous and first.request.method == "POST"
        assert first.request.body_truncated and first.request.body == b""  # never guessed
        assert first.response is not None and first.response.body == b"served"
        assert not second.request.framing_ambiguous and second.response is not None
        assert dec.losses.counts() == {("http1", "ambiguous_framing"): 1}
        assert dec.stats["http1_ambiguous_framing"] == 1
