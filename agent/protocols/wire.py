"""The wire layer's entry point: samples in, HTTP exchanges out.

`WireDecoder` is driven from the ring-buffer reader thread. Per flow it reassembles the sampled
byte stream (agent/flows/reassembly.py), recognises the protocol from the first bytes, and hands
the stream to the connection's decoder (http1.py or http2.py), which pairs requests with
responses. Both flows of one TCP connection share one decoder, joined by FlowInfo.connection.

When exchanges come out:
- request and response, when the response completes;
- request alone (response None) as soon as it completes when no server flow of its connection
  is intercepted (or `requests_only`), and for requests still unanswered when the connection's
  flows end or go idle.

Costs: a flow whose first bytes are not HTTP is ignored from then on with one dict lookup per
sample. Requests are counted per service (`requests_by_service`) when their headers complete.
Nothing raises out of here on bad input: errors are counted in `stats` and logged at debug
level, by name only; payload bytes and header values are never logged.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict

from infertap.agent.flows.reassembly import Chunk, FlowReassembler, GapCause, StreamConsumer
from infertap.agent.flows.records import (
    ConnectionId,
    Direction,
    Endpoint,
    FlowInfo,
    Role,
    Sample,
    Shed,
)
from infertap.agent.flows.table import FlowTable
from infertap.agent.protocols.connection import ConnectionDecoder
from infertap.agent.protocols.http1 import (
    REQUEST_LINE,
    REQUEST_START,
    STATUS_LINE,
    STATUS_START,
    Http1Connection,
)
from infertap.agent.protocols.http2 import FRAME_HEADER_LEN, PREFACE, Http2Connection
from infertap.agent.protocols.losses import HTTP1 as LOSS_HTTP1
from infertap.agent.protocols.losses import HTTP2 as LOSS_HTTP2
from infertap.agent.protocols.losses import UNKNOWN as LOSS_UNKNOWN
from infertap.agent.protocols.losses import DecodeLosses
from infertap.agent.protocols.messages import HttpExchange

log = logging.getLogger(__name__)

HTTP1 = "http/1.1"
H2 = "h2"
UNKNOWN = "unknown"

# Mid-stream (the flow's first bytes were not seen): how far to look for a start line.
DETECT_SCAN_LIMIT = 64 * 1024
_LONGEST_METHOD = len(b"OPTIONS ")
_STATUS_PREFIX = b"HTTP/1.1 "
_SETTINGS_TYPE = 0x4
_NO_CONNECTION = Endpoint("", 0)


# Why a flow's traffic is not decoded at all (its connection is reported not inspected), by the
# stats key it is counted under. A fixed set: the metric label `reason`.
UNINSPECTED_REASONS = {
    "flows_unknown": "not_http",  # TLS ciphertext, or another protocol
    "flows_protocol_mismatch": "not_http",
    "flows_mid_stream_h2": "mid_stream",  # HTTP/2 whose start was not seen
    "flows_failed": "decoder_failed",
}


class _Connection:
    """One TCP connection: its decoder (once a flow's protocol is known) and its flows."""

    __slots__ = ("decoder", "flows", "id", "key", "server_flows")

    def __init__(self, key: ConnectionId | int, conn_id: ConnectionId) -> None:
        self.key = key  # the ConnectionId, or the cookie of a flow we know nothing about
        self.id = conn_id
        self.decoder: ConnectionDecoder | None = None
        self.flows: set[int] = set()
        self.server_flows = 0  # intercepted server flows now open


class _Flow:
    """One intercepted socket: protocol detection, then its connection decoder's consumer."""

    __slots__ = (
        "conn",
        "consumer",
        "cookie",
        "direction",
        "ignored",
        "ignored_why",
        "last_ts_ns",
        "mid_stream",
        "owner",
        "protocol",
        "role",
        "scanned",
        "target",
    )

    def __init__(self, owner: WireDecoder, cookie: int, role: Role, conn: _Connection, ts: int):
        self.owner = owner
        self.cookie = cookie
        self.role = role
        self.direction = role.direction
        self.conn = conn
        self.protocol = ""
        self.ignored = False
        self.ignored_why = ""  # UNINSPECTED_REASONS value once ignored by _ignore
        self.last_ts_ns = ts
        self.mid_stream = False  # the first bytes were lost: look for a start line
        self.scanned = 0
        self.target: ConnectionDecoder | None = None
        self.consumer: StreamConsumer | None = None  # the target's decoder for this flow

    def active(self) -> bool:
        return not self.ignored

    # -- StreamConsumer --------------------------------------------------------------------

    def on_data(self, chunk: Chunk) -> int:
        consumer = self.consumer
        if consumer is not None:
            return consumer.on_data(chunk)
        if self.ignored:
            return len(chunk.data)
        return self._detect(chunk)

    def on_gap(self, stranded: memoryview, length: int, cause: GapCause, ts_ns: int) -> None:
        consumer = self.consumer
        if consumer is not None:
            consumer.on_gap(stranded, length, cause, ts_ns)
        elif cause is GapCause.SHED:
            pass  # whole messages shed before detection: the next sample starts one
        elif not self.ignored:
            self.mid_stream = True  # detection restarts after the gap, looking for a start line

    # -- detection -------------------------------------------------------------------------

    def _detect(self, chunk: Chunk) -> int:
        data = chunk.data
        if self.mid_stream:
            return self._detect_mid_stream(chunk)
        verdict = self._first_bytes_verdict(bytes(data[: FRAME_HEADER_LEN + len(PREFACE)]))
        if verdict == "":
            return 0  # not enough bytes yet: keep them
        if verdict == UNKNOWN:
            self.owner._ignore(self, "flows_unknown")
            return len(data)
        self._attach(verdict, resync=False)
        if self.consumer is None:
            return len(data)
        return self.consumer.on_data(chunk)

    def _first_bytes_verdict(self, head: bytes) -> str:
        """HTTP1, H2, UNKNOWN, or "" when more bytes are needed to tell."""
        decoder = self.conn.decoder
        if decoder is not None and self.direction is Direction.RESPONSE:
            return decoder.protocol if decoder.protocol == H2 else self._http1_verdict(head)
        if self.direction is Direction.REQUEST:
            if head[: len(PREFACE)] == PREFACE[: len(head)]:
                return H2 if len(head) >= len(PREFACE) else ""
            return self._http1_verdict(head)
        # A server's first bytes: a status line, or an HTTP/2 SETTINGS frame on stream 0.
        if len(head) >= FRAME_HEADER_LEN and head[3] == _SETTINGS_TYPE and not any(head[5:9]):
            length = int.from_bytes(head[0:3], "big")
            if length % 6 == 0 and head[4] in (0, 1):
                return H2
        if len(head) < FRAME_HEADER_LEN and head[:1] == b"\x00":
            return ""
        return self._http1_verdict(head)

    def _http1_verdict(self, head: bytes) -> str:
        if self.direction is Direction.REQUEST:
            if REQUEST_START.match(head):
                return HTTP1
            if len(head) < _LONGEST_METHOD and head.isalpha() and head.isupper():
                return ""
            return UNKNOWN
        if STATUS_START.match(head):
            return HTTP1
        if len(head) < len(_STATUS_PREFIX) and _STATUS_PREFIX.startswith(head[:5]):
            return ""
        return UNKNOWN

    def _detect_mid_stream(self, chunk: Chunk) -> int:
        data = chunk.data
        pattern = REQUEST_LINE if self.direction is Direction.REQUEST else STATUS_LINE
        decoder = self.conn.decoder
        if isinstance(decoder, Http2Connection):
            # HPACK state cannot be rebuilt mid-stream: nothing of this flow is trustworthy.
            self.owner._lost(self, "mid_stream")
            self.owner._ignore(self, "flows_mid_stream_h2")
            return len(data)
        if pattern.search(data) is not None:
            self._attach(HTTP1, resync=True)
            if self.consumer is not None:
                return self.consumer.on_data(chunk)
        self.scanned += len(data)
        if self.scanned > DETECT_SCAN_LIMIT:
            self.owner._ignore(self, "flows_unknown")
        return len(data)

    def _attach(self, protocol: str, *, resync: bool) -> None:
        conn = self.conn
        owner = self.owner
        if conn.decoder is None:
            conn.decoder = owner._new_decoder(conn, protocol)
        elif conn.decoder.protocol != protocol:
            owner._lost(self, "parse_error")
            owner._ignore(self, "flows_protocol_mismatch")
            return
        self.protocol = protocol
        self.target = conn.decoder
        self.consumer = conn.decoder.consumer(self.direction, resync=resync)
        owner.stats_counter[f"flows_{protocol}"] += 1


class WireDecoder:
    """Samples to HTTP exchanges, for every intercepted flow. Not thread-safe: one caller."""

    def __init__(
        self,
        per_flow_limit: int = 256 * 1024,
        total_limit: int = 64 * 1024 * 1024,
        idle_timeout_s: float = 120.0,
        *,
        requests_only: bool = False,
        capture_bodies: bool = True,
        max_body: int = 1024 * 1024,
    ) -> None:
        """`requests_only`: never decode server flows; every request comes out alone as soon as
        it completes (a per-pod agent that sees one side, or plain request counting).
        `capture_bodies` False keeps no body bytes (counting only). `max_body` caps the bytes
        kept per message body (after decompression too)."""
        self._reassembler = FlowReassembler(per_flow_limit, total_limit)
        self._idle_ns = int(idle_timeout_s * 1e9)
        self._requests_only = requests_only
        self._capture = capture_bodies
        self._max_body = max_body
        self._flows: dict[int, _Flow] = {}  # decoding state per flow (may go idle, and come back)
        # What the kernel told of each flow, FlowStart to FlowEnd: the agent's one flow table.
        self.flows = FlowTable()
        self._connections: dict[ConnectionId | int, _Connection] = {}
        self.stats_counter: Counter[str] = Counter()
        self.requests_by_service: Counter[Endpoint] = Counter()
        # Every decode loss by (protocol, reason), logged once per connection (losses.py).
        self.losses = DecodeLosses()
        # Connections with a flow ignored (not decoded), and why: read from other threads
        # through a copy (dict.copy is atomic under the GIL).
        self._ignored: dict[ConnectionId | int, tuple[_Connection, str]] = {}

    # -- the runtime's calls ---------------------------------------------------------------

    def on_flow_start(self, flow: FlowInfo, *, virtual: bool = False) -> None:
        """`virtual`: a flow of the agent's own making (TLS plaintext, agent/flows/tls_streams.py),
        decoded like any other but kept out of the flow table, which holds the kernel's flows:
        its exchanges name the connection's real sockets."""
        if not virtual:
            self.flows.start(flow)
        try:
            self._start(flow.cookie, flow.role, flow.connection, flow.start_ns)
        except Exception as err:
            self._internal_error("flow_start", err)

    def on_sample(self, sample: Sample) -> list[HttpExchange]:
        flow = self._flows.get(sample.cookie)
        if flow is None:
            # No flow start seen: decode it alone (nothing to pair it with).
            self.stats_counter["samples_without_flow"] += 1
            flow = self._start(sample.cookie, sample.role, None, sample.ts_ns)
        if flow.ignored:
            self.stats_counter["samples_ignored"] += 1
            return []
        flow.last_ts_ns = max(flow.last_ts_ns, sample.ts_ns)
        try:
            self._reassembler.push(sample, flow)
        except Exception as err:
            self._internal_error("sample", err)
            self._lost(flow, "internal_error")
            self._ignore(flow, "flows_failed")
        if not flow.active():
            # Free its bytes now (not from inside push, which still holds its stream state).
            self._reassembler.close(sample.cookie)
        return self._stamped(self._take_ready(flow.conn))

    def on_shed(self, shed: Shed) -> list[HttpExchange]:
        """The kernel shed the flow from a message boundary on (overload): the gap up to its
        next sample is intentional (agent/flows/reassembly.py GapCause.SHED)."""
        flow = self._flows.get(shed.cookie)
        if flow is None:
            flow = self._start(shed.cookie, shed.role, None, shed.ts_ns)
        self.stats_counter["shed_records"] += 1
        if flow.ignored:
            return []
        flow.last_ts_ns = max(flow.last_ts_ns, shed.ts_ns)
        try:
            self._reassembler.shed(shed.cookie, shed.offset, shed.ts_ns, flow)
        except Exception as err:
            self._internal_error("shed", err)
        return self._stamped(self._take_ready(flow.conn))

    def on_flow_end(self, cookie: int, final_offset: int | None = None) -> list[HttpExchange]:
        """The flow's socket closed. `final_offset`, when known (FlowInfo.bytes of the FlowEnd),
        is how many bytes it sent in all: samples lost at the very end then count as a gap, and
        pairing can trust the end of the stream instead of failing closed on it."""
        flow = self._flows.get(cookie)
        if flow is None:
            self.flows.end(cookie)
            return []
        complete = False
        if final_offset is not None and flow.active():
            try:
                complete = self._reassembler.finish(cookie, final_offset, flow, flow.last_ts_ns)
            except Exception as err:
                self._internal_error("flow_end", err)
        self._reassembler.close(cookie)
        out = self._stamped(self._end(flow, complete=complete))
        self.flows.end(cookie)  # after stamping: its exchanges still name it
        return out

    def evict_idle(self, now_ns: int) -> list[HttpExchange]:
        """End flows with no sample for idle_timeout_s; now_ns on the samples' clock
        (CLOCK_MONOTONIC, as time.monotonic_ns())."""
        limit = now_ns - self._idle_ns
        out: list[HttpExchange] = []
        for flow in [f for f in self._flows.values() if f.last_ts_ns < limit]:
            self._reassembler.evict(flow.cookie)
            self.stats_counter["flows_evicted_idle"] += 1
            out.extend(self._end(flow))
        return self._stamped(out)

    def protocols(self) -> dict[int, str]:
        """Flow cookie -> protocol detected ("" not yet), for every flow being decoded."""
        return {cookie: f.protocol for cookie, f in self._flows.items()}

    def protocol_of(self, cookie: int) -> str:
        flow = self._flows.get(cookie)
        return flow.protocol if flow is not None else ""

    @property
    def stats(self) -> dict[str, int]:
        out = dict(self.stats_counter)
        out.update(asdict(self._reassembler.stats))
        out["flows"] = len(self._flows)
        out["connections"] = len(self._connections)
        out["buffered_bytes"] = self._reassembler.buffered_bytes
        for key in ("parse_errors", "requests", "responses", "gaps", "bytes_over_limit"):
            out.setdefault(key, 0)
        return out

    @property
    def buffered_bytes(self) -> int:
        """Bytes held by the reassembler over all flows (bounded by total_limit)."""
        return self._reassembler.buffered_bytes

    def flow_buffered_bytes(self, cookie: int) -> int:
        """Bytes held by the reassembler for one flow (bounded by per_flow_limit)."""
        return self._reassembler.flow_buffered(cookie)

    # -- internals -------------------------------------------------------------------------

    def _stamped(self, out: list[HttpExchange]) -> list[HttpExchange]:
        """Each exchange with its connection's intercepted flows, from the flow table."""
        for ex in out:
            ex.client_flow, ex.server_flow = self.flows.ends(ex.request.connection)
        return out

    def _start(self, cookie: int, role: Role, conn_id: ConnectionId | None, ts: int) -> _Flow:
        existing = self._flows.get(cookie)
        if existing is not None:
            return existing
        key: ConnectionId | int = conn_id if conn_id is not None else cookie
        conn = self._connections.get(key)
        if conn is None:
            conn = self._connections[key] = _Connection(
                key, conn_id or ConnectionId(_NO_CONNECTION, _NO_CONNECTION)
            )
        flow = _Flow(self, cookie, role, conn, ts)
        self._flows[cookie] = flow
        conn.flows.add(cookie)
        self.stats_counter["flows_started"] += 1
        if role is Role.SERVER:
            if self._requests_only:
                flow.ignored = True
                return flow
            conn.server_flows += 1
            if conn.decoder is not None:
                conn.decoder.expect_responses = True
        self._reassembler.open(cookie, ts)
        return flow

    def _new_decoder(self, conn: _Connection, protocol: str) -> ConnectionDecoder:
        cls = Http2Connection if protocol == H2 else Http1Connection
        return cls(
            conn.id,
            self.stats_counter,
            self.requests_by_service,
            expect_responses=conn.server_flows > 0,
            capture_bodies=self._capture,
            max_body=self._max_body,
            losses=self.losses,
        )

    def _lost(self, flow: _Flow, reason: str) -> None:
        decoder = flow.conn.decoder
        protocol = decoder.protocol if decoder is not None else flow.protocol
        label = {HTTP1: LOSS_HTTP1, H2: LOSS_HTTP2}.get(protocol, LOSS_UNKNOWN)
        self.losses.lost(label, reason, flow.conn.id)

    def _ignore(self, flow: _Flow, reason: str) -> None:
        if not flow.ignored:
            self.stats_counter[reason] += 1
            log.debug("flow %d ignored: %s", flow.cookie, reason)
            why = UNINSPECTED_REASONS.get(reason, "")
            if why:
                flow.ignored_why = why
                self._ignored.setdefault(flow.conn.key, (flow.conn, why))
        flow.ignored = True
        flow.consumer = None

    @staticmethod
    def _uninspected(conn: _Connection, why: str) -> bool:
        # Bytes that are not HTTP on a connection some other flow decodes (TLS plaintext from
        # the library's calls, or the other direction) leave the connection inspected.
        return why != "not_http" or conn.decoder is None

    def uninspected_counts(self) -> dict[str, int]:
        """Open connections with a flow that is not decoded at all, by reason (any thread)."""
        out: dict[str, int] = {}
        for conn, why in self._ignored.copy().values():
            if self._uninspected(conn, why):
                out[why] = out.get(why, 0) + 1
        return out

    def uninspected_reasons(self) -> dict[int, str]:
        """Flow cookie -> why it is not decoded, for the flows that are not."""
        out: dict[int, str] = {}
        for cookie, flow in self._flows.items():
            if flow.ignored_why and self._uninspected(flow.conn, flow.ignored_why):
                out[cookie] = flow.ignored_why
        return out

    def uninspected_reason(self, cookie: int) -> str:
        """Why a flow is not decoded, or "" (any thread)."""
        flow = self._flows.get(cookie)
        if flow is None or not flow.ignored_why:
            return ""
        return flow.ignored_why if self._uninspected(flow.conn, flow.ignored_why) else ""

    def _end(self, flow: _Flow, *, complete: bool = False) -> list[HttpExchange]:
        del self._flows[flow.cookie]
        conn = flow.conn
        conn.flows.discard(flow.cookie)
        if flow.role is Role.SERVER and not self._requests_only:
            conn.server_flows = max(0, conn.server_flows - 1)
        decoder = conn.decoder
        out: list[HttpExchange] = []
        try:
            if decoder is not None:
                # Also for a flow never decoded: a server flow's end means no response comes.
                decoder.finish(flow.direction, flow.last_ts_ns, complete=complete)
                if conn.server_flows == 0:
                    decoder.expect_responses = False
                out = decoder.take_ready()
                if not conn.flows:
                    out.extend(decoder.flush())
        except Exception as err:
            self._internal_error("flow_end", err)
        if not conn.flows:
            self._connections.pop(conn.key, None)
            self._ignored.pop(conn.key, None)
            self.losses.connection_closed(conn.id)
        return out

    def _take_ready(self, conn: _Connection) -> list[HttpExchange]:
        decoder = conn.decoder
        if decoder is None or not decoder.ready:
            return []
        return decoder.take_ready()

    def _internal_error(self, where: str, err: Exception) -> None:
        self.stats_counter["internal_errors"] += 1
        log.debug("wire decoder error in %s: %s", where, type(err).__name__, exc_info=False)
