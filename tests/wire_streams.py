"""Genuine HTTP/1.1 and HTTP/2 wire bytes (h11, h2) and ways to cut them into kernel samples.

Shared by the wire-layer tests (test_reassembly, test_http1_decoding, test_http2_decoding,
test_wire_fuzz). A "send" is one sendmsg: a slice of a flow's byte stream; a sample is what the
kernel captured of it (its first `cap` bytes).
"""

from __future__ import annotations

import gzip
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.settings
import h11

from infertap.agent.flows.records import Endpoint, FlowInfo, Role, Sample
from infertap.agent.protocols.messages import HttpExchange
from infertap.agent.protocols.wire import WireDecoder

CLIENT = Endpoint("10.1.0.5", 41000)
SERVER = Endpoint("10.1.0.9", 8000)
CLIENT_COOKIE = 101
SERVER_COOKIE = 202


def client_flow(cookie: int = CLIENT_COOKIE, port: int = CLIENT.port) -> FlowInfo:
    return FlowInfo(cookie, Role.CLIENT, Endpoint(CLIENT.ip, port), SERVER, 7, 0, True)


def server_flow(cookie: int = SERVER_COOKIE, port: int = CLIENT.port) -> FlowInfo:
    return FlowInfo(cookie, Role.SERVER, SERVER, Endpoint(CLIENT.ip, port), 7, 0, True)


# -- samples ---------------------------------------------------------------------------------


@dataclass
class Send:
    """One sendmsg of a flow: stream bytes [offset, offset + len(data)) sent at ts_ns."""

    offset: int
    data: bytes
    ts_ns: int


def sends_of(data: bytes, cuts: Iterable[int], ts_ns: int, step_ns: int = 1) -> list[Send]:
    """Cut one message's bytes (or any stretch of stream) at the given positions."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    out = []
    start = 0
    for i, end in enumerate([*points, len(data)]):
        out.append(Send(start, data[start:end], ts_ns + i * step_ns))
        start = end
    return out


def stream_sends(pieces: Sequence[tuple[bytes, int]]) -> list[Send]:
    """One send per (bytes, ts_ns), back to back in the stream."""
    out = []
    offset = 0
    for data, ts in pieces:
        out.append(Send(offset, data, ts))
        offset += len(data)
    return out


def random_sends(data: bytes, rng: random.Random, ts_ns: int, max_send: int = 3000) -> list[Send]:
    cuts = []
    pos = 0
    while pos < len(data):
        pos += rng.randint(1, max_send)
        cuts.append(pos)
    return sends_of(data, cuts, ts_ns)


def sample_of(send: Send, cookie: int, role: Role, cap: int = 4096) -> Sample:
    return Sample(
        cookie=cookie,
        ts_ns=send.ts_ns,
        offset=send.offset,
        msg_len=len(send.data),
        data=send.data[:cap],
        role=role,
        truncated=len(send.data) > cap,
    )


def samples_of(sends: Iterable[Send], cookie: int, role: Role, cap: int = 4096) -> list[Sample]:
    return [sample_of(s, cookie, role, cap) for s in sends]


# -- HTTP/1.1 with h11 -----------------------------------------------------------------------


def h1_request(
    method: str,
    target: str,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    chunked: bool = False,
    chunks: int = 3,
) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    hdrs = [("Host", "model.svc"), *headers]
    if chunked:
        hdrs.append(("Transfer-Encoding", "chunked"))
    elif body or method in ("POST", "PUT"):
        hdrs.append(("Content-Length", str(len(body))))
    out = conn.send(h11.Request(method=method, target=target, headers=hdrs)) or b""
    out += _h11_body(conn, body, chunked, chunks)
    return out


def h1_response(
    status: int,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    chunked: bool = False,
    chunks: int = 3,
    for_method: str = "GET",
) -> bytes:
    """A response as a server's h11 writes it (after reading a request of `for_method`)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(h1_request(for_method, "/", b"x" if for_method == "POST" else b""))
    while conn.next_event() is not h11.NEED_DATA:
        pass
    hdrs = list(headers)
    if chunked:
        hdrs.append(("Transfer-Encoding", "chunked"))
    else:
        hdrs.append(("Content-Length", str(len(body))))
    out = conn.send(h11.Response(status_code=status, headers=hdrs)) or b""
    if for_method == "HEAD":
        return out + (conn.send(h11.EndOfMessage()) or b"")
    return out + _h11_body(conn, body, chunked, chunks)


def _h11_body(conn: h11.Connection, body: bytes, chunked: bool, chunks: int) -> bytes:
    out = b""
    if chunked and body:
        step = max(1, len(body) // chunks)
        for i in range(0, len(body), step):
            out += conn.send(h11.Data(data=body[i : i + step])) or b""
    elif body:
        out += conn.send(h11.Data(data=body)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


# -- HTTP/2 and gRPC with h2 -----------------------------------------------------------------


def grpc_frame(message: bytes, compress: bool = False) -> bytes:
    payload = gzipped(message) if compress else message
    return bytes([1 if compress else 0]) + len(payload).to_bytes(4, "big") + payload


@dataclass
class H2Call:
    """One request/response on a stream, as the test wants it on the wire."""

    path: str
    request_messages: list[bytes]
    response_messages: list[bytes]
    grpc_status: str = "0"
    compress: bool = False
    extra_headers: list[tuple[str, str]] = field(default_factory=list)
    stream_id: int = 0  # filled in by H2Wire
    headers_send: int = -1  # index in H2Wire.client_sends of the send with the request HEADERS


class H2Wire:
    """A real h2 client and server talking; collects the bytes each side sends, in sends."""

    def __init__(self) -> None:
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.client.initiate_connection()
        self.server.initiate_connection()
        # Big windows, so no test waits on flow control.
        for conn in (self.client, self.server):
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: (1 << 31) - 1})
            conn.increment_flow_control_window(1 << 30)
        self.client_sends: list[bytes] = []
        self.server_sends: list[bytes] = []
        self._flush()

    def _flush(self) -> None:
        # Each data_to_send() is one send; the peer reads it at once.
        for _ in range(4):
            moved = False
            c = self.client.data_to_send()
            if c:
                self.client_sends.append(c)
                self.server.receive_data(c)
                moved = True
            s = self.server.data_to_send()
            if s:
                self.server_sends.append(s)
                self.client.receive_data(s)
                moved = True
            if not moved:
                break

    def request_headers(self, call: H2Call, end_stream: bool = False) -> None:
        sid = self.client.get_next_available_stream_id()
        call.stream_id = sid
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", call.path),
            (":authority", "model.svc"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *call.extra_headers,
        ]
        if call.compress:
            headers.append(("grpc-encoding", "gzip"))
        self.client.send_headers(sid, headers, end_stream=end_stream)
        call.headers_send = len(self.client_sends)
        self._flush()

    def request_body(self, call: H2Call) -> None:
        body = b"".join(grpc_frame(m, call.compress) for m in call.request_messages)
        self._send_data(self.client, call.stream_id, body, end_stream=True)

    def response(self, call: H2Call) -> None:
        headers = [(":status", "200"), ("content-type", "application/grpc")]
        if call.compress:
            headers.append(("grpc-encoding", "gzip"))
        self.server.send_headers(call.stream_id, headers)
        self._flush()
        body = b"".join(grpc_frame(m, call.compress) for m in call.response_messages)
        self._send_data(self.server, call.stream_id, body, end_stream=False)
        self.server.send_headers(
            call.stream_id, [("grpc-status", call.grpc_status)], end_stream=True
        )
        self._flush()

    def reset(self, call: H2Call) -> None:
        self.client.reset_stream(call.stream_id)
        self._flush()

    def _send_data(
        self, conn: h2.connection.H2Connection, sid: int, body: bytes, end_stream: bool
    ) -> None:
        size = conn.max_outbound_frame_size
        for i in range(0, max(len(body), 1), size):
            last = i + size >= len(body)
            conn.send_data(sid, body[i : i + size], end_stream=end_stream and last)
            self._flush()

    def call(self, call: H2Call) -> H2Call:
        self.request_headers(call)
        self.request_body(call)
        self.response(call)
        return call


def joined(sends: Sequence[bytes]) -> bytes:
    return b"".join(sends)


# -- driving a WireDecoder -------------------------------------------------------------------


def feed_in_time_order(decoder: WireDecoder, samples: Iterable[Sample]) -> list[HttpExchange]:
    """Feed samples of all flows ordered by kernel time (ties: as given), as the ring buffer
    delivers them; return the exchanges that came out."""
    out: list[HttpExchange] = []
    for s in sorted(samples, key=lambda s: s.ts_ns):
        out.extend(decoder.on_sample(s))
    return out


def run_connection(
    client: Sequence[Sample],
    server: Sequence[Sample] = (),
    *,
    with_server_flow: bool = True,
    end: bool = True,
    decoder: WireDecoder | None = None,
) -> tuple[list[HttpExchange], WireDecoder]:
    """One connection, both flows started, samples fed in time order, then both flows ended."""
    dec = decoder or WireDecoder()
    dec.on_flow_start(client_flow())
    if with_server_flow:
        dec.on_flow_start(server_flow())
    out = feed_in_time_order(dec, [*client, *server])
    if end:
        if with_server_flow:
            out.extend(dec.on_flow_end(SERVER_COOKIE))
        out.extend(dec.on_flow_end(CLIENT_COOKIE))
    return out, dec
