"""HTTP/2 and gRPC from reassembled byte streams: frames, HPACK, streams, gRPC messages.

One `Http2StreamDecoder` per flow (direction) turns bytes into frames (hyperframe) and header
blocks into headers (hpack, one decoder per direction, fed every block from the first byte of the
connection: HPACK state is a function of every block before). One `Http2Connection` per TCP
connection holds the streams and pairs request and response by stream id.

Gaps, by what the decoder knows at the time:
- inside a DATA frame, or inside any frame whose header was seen: the frame's length says
  exactly where the next frame starts, so framing survives. A lost DATA payload only truncates
  that stream's body; a lost header block breaks HPACK.
- anywhere else (a frame header cut, or whole frames lost): framing is lost. The decoder waits for
  a send that starts with a plausible chain of frame headers and takes up framing there.
Once HPACK state is broken it stays broken for that direction: every later header block is
reported `headers_unknown`, never decoded against a table that may be missing entries (which
would attribute one request's headers to another).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import logging
import struct
from dataclasses import dataclass, field

import hpack
from hpack.table import HeaderTable
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    HeadersFrame,
    PushPromiseFrame,
    RstStreamFrame,
)

from infertap.agent.flows.reassembly import Chunk, GapCause
from infertap.agent.flows.records import Direction
from infertap.agent.protocols.connection import ConnectionDecoder
from infertap.agent.protocols.content import (
    GRPC_PREFIX_LEN,
    decode_content,
    split_grpc_messages,
)
from infertap.agent.protocols.grpc_stream import GrpcMessageSplitter
from infertap.agent.protocols.losses import HTTP2
from infertap.agent.protocols.messages import HttpExchange, HttpMessage

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_LEN = 9
MAX_TABLE_SIZE = 64 * 1024  # HPACK dynamic table cap per direction (memory bound)
MAX_HEADER_BLOCK = 256 * 1024  # a HEADERS + CONTINUATION block past this breaks HPACK
MAX_STREAMS = 1024  # open streams per connection; the oldest is given up past this
MAX_GRPC_MESSAGES = 4096
MAX_PLAUSIBLE_FRAME = 1 << 20  # resync: frame lengths past this are taken for noise
# Bidirectional gRPC methods whose request and response messages pair one to one, in order:
# their messages are handed out as they pair, while the stream is open (grpc_stream.py).
STREAMING_PATHS = frozenset({"/inference.GRPCInferenceService/ModelStreamInfer"})

_TYPE_DATA = 0x0
_TYPE_HEADERS = 0x1
_TYPE_PUSH_PROMISE = 0x5
_TYPE_CONTINUATION = 0x9
_TYPE_PING = 0x6
_TYPE_WINDOW_UPDATE = 0x8
_PLAIN_TYPES = frozenset({_TYPE_PING, _TYPE_WINDOW_UPDATE})  # change nothing we decode
_HEADER_BEARING = frozenset({_TYPE_HEADERS, _TYPE_PUSH_PROMISE, _TYPE_CONTINUATION})
_ON_STREAM = frozenset({0x0, 0x1, 0x2, 0x3, 0x5, 0x9})  # frames that need a stream id
_ON_CONNECTION = frozenset({0x4, 0x6, 0x7})  # SETTINGS, PING, GOAWAY: stream 0 only
_FLAG_END_STREAM = 0x1
_FLAG_END_HEADERS = 0x4
_FLAGS_PADDED_PRIORITY = 0x8 | 0x20  # HEADERS: bytes to take off before the block fragment
_PLAIN_BLOCK_TYPES = frozenset({_TYPE_HEADERS, _TYPE_CONTINUATION})
_FRAME_HEADER = struct.Struct(">HBBBL")


def _frame_header(view: memoryview) -> tuple[int, int, int, int]:
    """(length, type, flags, stream id) of the 9 bytes at view[:9]."""
    hi, lo, ftype, flags, sid = _FRAME_HEADER.unpack(view[:FRAME_HEADER_LEN])
    return (hi << 8) | lo, ftype, flags, sid & 0x7FFFFFFF


def plausible_frames(data: memoryview) -> bool:
    """Whether data starts with a chain of believable frame headers: each one's type, stream id
    and length fit, and the chain runs to the end of data or past it. Used to take up framing
    again at a send boundary after it was lost."""
    pos = 0
    count = 0
    while pos + FRAME_HEADER_LEN <= len(data):
        length, ftype, _flags, sid = _frame_header(data[pos:])
        raw_sid = int.from_bytes(data[pos + 5 : pos + 9], "big")
        if ftype > 0x9 or length > MAX_PLAUSIBLE_FRAME or raw_sid != sid:
            return False
        if (ftype in _ON_STREAM and sid == 0) or (ftype in _ON_CONNECTION and sid != 0):
            return False
        count += 1
        pos += FRAME_HEADER_LEN + length
    # One header alone is weak evidence unless its frame ends exactly with the send.
    return count >= 2 or (count == 1 and pos == len(data))


def _plain_block_sid(raw: memoryview) -> int:
    """For a HEADERS or CONTINUATION frame (raw: header and payload) that hyperframe parses
    with its whole payload as the block fragment (no padding, no priority, a stream id): the
    stream id; else 0 (hyperframe then parses it, or reports it malformed)."""
    if raw[4] & _FLAGS_PADDED_PRIORITY and raw[3] == _TYPE_HEADERS:
        return 0
    return _frame_header(raw)[3]


# A header list as text: (headers, method, path, status, content length).
_HeaderText = tuple[list[tuple[str, str]], str, str, int, int]


def _header_text(headers: list[tuple[bytes, bytes]]) -> _HeaderText:
    fields = [
        (k.decode("utf-8", "replace").lower(), v.decode("utf-8", "replace")) for k, v in headers
    ]
    method = path = ""
    status = 0
    length = -1
    for name, value in fields:  # the last of each wins, as it always did
        if name == ":method":
            method = value
        elif name == ":path":
            path = value
        elif name == ":status":
            status = int(value) if value.isdigit() else 0
        elif name == "content-length" and value.isdigit():
            length = int(value)
    return fields, method, path, status, length


@dataclass(slots=True)
class _Body:
    parts: list[bytes] = field(default_factory=list)
    kept: int = 0
    cut: bool = False  # bytes were lost: nothing after the hole is appended
    # (body offset, kernel time) of each DATA payload kept: when each gRPC message was sent.
    marks: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Stream:
    sid: int
    request: HttpMessage | None = None
    response: HttpMessage | None = None
    request_body: _Body = field(default_factory=_Body)
    response_body: _Body = field(default_factory=_Body)
    request_done: bool = False
    response_done: bool = False
    reset: bool = False
    # STREAMING_PATHS only: the messages of each side as they complete, and how many request
    # messages were handed out already (in partial exchanges).
    request_split: GrpcMessageSplitter | None = None
    response_split: GrpcMessageSplitter | None = None
    handed_out: int = 0


class _Mode(enum.Enum):
    PREFACE = "preface"
    FRAMES = "frames"  # at a frame boundary
    DATA = "data"  # inside a DATA frame's payload
    SKIP = "skip"  # dropping the rest of a frame a gap cut
    LOST = "lost"  # framing lost: waiting for a send that starts with frames


# Remembered header blocks, per direction of a connection: a peer's steady blocks are a few and
# small (gRPC's are tens of bytes once indexed), so only those are kept, within a memory bound
# near the HPACK table's own.
MAX_REMEMBERED_BLOCKS = 16
MAX_REMEMBERED_BYTES = 4096  # a block's bytes plus its decoded names and values


class _CountedTable(HeaderTable):
    """hpack's header table, counting its changes: every insertion and resize gives it a new
    generation, so equal generations mean an equal table (Http2StreamDecoder._decode_block)."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.generation += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


class Http2StreamDecoder:
    """One direction of an HTTP/2 connection (a StreamConsumer)."""

    def __init__(self, conn: Http2Connection, direction: Direction) -> None:
        self._conn = conn
        self.direction = direction
        self._stats = conn.stats
        is_client = direction is Direction.REQUEST
        self._mode = _Mode.PREFACE if is_client else _Mode.FRAMES
        self._preface_seen = 0
        self._hpack: hpack.Decoder = hpack.Decoder()
        self._table = _CountedTable()
        self._hpack.header_table = self._table
        # No SETTINGS tracking: allow any table size up to our own memory cap.
        self._hpack.max_allowed_table_size = MAX_TABLE_SIZE
        self.hpack_ok = True
        # Decoded header blocks that left the table as it was, by (table generation, bytes).
        self._decoded: dict[tuple[int, bytes], list[tuple[bytes, bytes]]] = {}
        # Header block being gathered (HEADERS or PUSH_PROMISE, then CONTINUATION frames).
        self._block: bytearray | None = None
        self._block_sid = 0
        self._block_end_stream = False
        self._block_is_push = False
        self._block_ts = 0
        # DATA frame being read.
        self._data_sid = 0
        self._payload_left = 0
        self._pad_left = 0
        self._pad_pending = False
        self._data_end_stream = False
        # SKIP: bytes to drop, then maybe end a stream.
        self._skip = 0
        self._skip_end_sid = 0

    # -- StreamConsumer --------------------------------------------------------------------

    def on_data(self, chunk: Chunk) -> int:
        data = chunk.data
        n = len(data)
        pos = 0
        while pos < n:
            mode = self._mode
            if mode is _Mode.FRAMES:
                if n - pos < FRAME_HEADER_LEN:
                    return pos
                length, ftype, flags, sid = _frame_header(data[pos:])
                if ftype == _TYPE_DATA:
                    self._start_data(length, flags, sid)
                    pos += FRAME_HEADER_LEN
                    continue
                total = FRAME_HEADER_LEN + length
                if n - pos < total:
                    return pos  # wait for the whole frame
                self._control_frame(data[pos : pos + total], length, chunk.ts_at(pos))
                pos += total
            elif mode is _Mode.DATA:
                pos = self._read_data(data, pos, chunk.ts_at(pos))
            elif mode is _Mode.SKIP:
                take = min(self._skip, n - pos)
                pos += take
                self._skip -= take
                if self._skip == 0:
                    self._end_skip(chunk.ts_at(pos - 1))
            elif mode is _Mode.PREFACE:
                pos = self._read_preface(data, pos)
            else:  # LOST: try at the start of each send, drop the rest
                if pos == 0 and plausible_frames(data):
                    self._stats["h2_resyncs"] += 1
                    self._mode = _Mode.FRAMES
                    continue
                return n
        return n

    def on_gap(self, stranded: memoryview, length: int, cause: GapCause, ts_ns: int) -> None:
        if length == 0 and not stranded:
            return
        mode = self._mode
        if mode is _Mode.FRAMES:
            self._gap_at_frame(stranded, length, ts_ns)
        elif mode is _Mode.DATA:
            self._conn.body_lost(self.direction, self._data_sid, ts_ns)
            self._skip = self._payload_left
            self._skip_end_sid = self._data_sid if self._data_end_stream else 0
            self._mode = _Mode.SKIP
            self._skip_gap(length, ts_ns)
        elif mode is _Mode.SKIP:
            self._skip_gap(length, ts_ns)
        elif mode is _Mode.PREFACE:
            left = len(PREFACE) - self._preface_seen
            if length <= left:
                self._skip = left - length
                self._skip_end_sid = 0
                self._mode = _Mode.SKIP if self._skip else _Mode.FRAMES
            else:
                self._lose_framing()

    def finish(self) -> None:
        self._mode = _Mode.LOST
        self._block = None

    # -- frames ----------------------------------------------------------------------------

    def _read_preface(self, data: memoryview, pos: int) -> int:
        want = PREFACE[self._preface_seen :]
        got = bytes(data[pos : pos + len(want)])
        if not want.startswith(got):
            self._stats["parse_errors"] += 1
            self._conn.lost("parse_error")
            self._lose_framing()
            return pos
        self._preface_seen += len(got)
        if self._preface_seen == len(PREFACE):
            self._mode = _Mode.FRAMES
        return pos + len(got)

    def _start_data(self, length: int, flags: int, sid: int) -> None:
        self._data_sid = sid
        self._payload_left = length
        self._pad_left = 0
        self._pad_pending = bool(flags & 0x8)
        self._data_end_stream = bool(flags & _FLAG_END_STREAM)
        self._mode = _Mode.DATA
        if length == 0:
            self._end_data(0)

    def _read_data(self, data: memoryview, pos: int, ts: int) -> int:
        n = len(data)
        if self._pad_pending:
            self._pad_pending = False
            self._payload_left -= 1
            self._pad_left = min(data[pos], self._payload_left)
            pos += 1
        real_left = self._payload_left - self._pad_left
        take = min(real_left, n - pos)
        if take:
            self._conn.body(self.direction, self._data_sid, data[pos : pos + take], ts)
            pos += take
            self._payload_left -= take
        if self._payload_left == self._pad_left:
            drop = min(self._pad_left, n - pos)
            pos += drop
            self._pad_left -= drop
            self._payload_left -= drop
        if self._payload_left == 0:
            self._end_data(ts)
        return pos

    def _end_data(self, ts: int) -> None:
        self._mode = _Mode.FRAMES
        if self._data_end_stream:
            self._conn.end_stream(self.direction, self._data_sid, ts)

    def _control_frame(self, raw: memoryview, length: int, ts: int) -> None:
        ftype = raw[3]
        if ftype in _PLAIN_TYPES and _plain_frame_ok(raw, length):
            return  # a well-formed PING or WINDOW_UPDATE: gRPC sends several per call
        if ftype in _PLAIN_BLOCK_TYPES:
            sid = _plain_block_sid(raw)
            if sid:
                self._block_fragment(ftype, raw[4], sid, raw[FRAME_HEADER_LEN:], ts)
                return
        frame: Frame
        try:
            frame, _ = Frame.parse_frame_header(raw[:FRAME_HEADER_LEN])
            frame.parse_body(raw[FRAME_HEADER_LEN:])
        except Exception as err:  # hyperframe raises several types for malformed frames
            self._stats["parse_errors"] += 1
            self._conn.lost("parse_error")
            log.debug("h2 %s: bad frame (%s)", self.direction, type(err).__name__)
            if raw[3] in _HEADER_BEARING:
                self._break_hpack()
            return
        if isinstance(frame, HeadersFrame | PushPromiseFrame):
            self._start_block(
                frame.data,
                frame.stream_id,
                "END_STREAM" in frame.flags,
                isinstance(frame, PushPromiseFrame),
                "END_HEADERS" in frame.flags,
                ts,
            )
        elif isinstance(frame, ContinuationFrame):
            self._continue_block(frame.data, frame.stream_id, "END_HEADERS" in frame.flags, ts)
        elif isinstance(frame, RstStreamFrame):
            self._conn.reset(self.direction, frame.stream_id, ts)
        # SETTINGS, PING, GOAWAY, WINDOW_UPDATE, PRIORITY and extensions change nothing here.

    def _block_fragment(
        self, ftype: int, flags: int, sid: int, payload: memoryview, ts: int
    ) -> None:
        """A HEADERS or CONTINUATION frame without padding or priority (what clients send),
        read straight from its bytes: what hyperframe would parse from it, without its frame
        and flag objects."""
        end_headers = bool(flags & _FLAG_END_HEADERS)
        if ftype == _TYPE_HEADERS:
            end_stream = bool(flags & _FLAG_END_STREAM)
            self._start_block(payload, sid, end_stream, False, end_headers, ts)
        else:
            self._continue_block(payload, sid, end_headers, ts)

    def _start_block(
        self,
        fragment: bytes | memoryview,
        sid: int,
        end_stream: bool,
        push: bool,
        end_headers: bool,
        ts: int,
    ) -> None:
        if self._block is not None:
            self._break_hpack()  # a new block before the last one ended
        self._block = bytearray(fragment)
        self._block_sid = sid
        self._block_end_stream = end_stream
        self._block_is_push = push
        self._block_ts = ts
        if end_headers:
            self._end_block()

    def _continue_block(
        self, fragment: bytes | memoryview, sid: int, end_headers: bool, ts: int
    ) -> None:
        if self._block is None or sid != self._block_sid:
            if self.hpack_ok:
                self._stats["parse_errors"] += 1
                self._conn.lost("parse_error")
                self._break_hpack()
            return
        self._block += fragment
        if len(self._block) > MAX_HEADER_BLOCK:
            self._stats["h2_header_blocks_over_limit"] += 1
            self._conn.lost("over_limit")
            self._block = None
            self._break_hpack()
            self._conn.headers(self.direction, self._block_sid, None, False, ts)
            return
        if end_headers:
            self._end_block()

    def _end_block(self) -> None:
        block = self._block
        self._block = None
        if block is None:
            return
        headers: list[tuple[bytes, bytes]] | None = None
        if not self.hpack_ok:
            self._conn.lost("hpack_lost")  # this block's call is lost with the state
        else:
            try:
                headers = self._decode_block(bytes(block))
            except Exception as err:  # hpack raises HPACKError subclasses and a few others
                self._stats["parse_errors"] += 1
                self._conn.lost("parse_error")
                log.debug("h2 %s: HPACK error (%s)", self.direction, type(err).__name__)
                self._break_hpack()
        if self._block_is_push:
            self._stats["h2_push_promises"] += 1
            return
        self._conn.headers(
            self.direction, self._block_sid, headers, self._block_end_stream, self._block_ts
        )

    def _decode_block(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """hpack's decode of a header block, remembered when the block did not change the
        dynamic table. A peer's steady traffic repeats such blocks (every field indexed once
        the first call put it in the table): decoding is then a function of the table's state,
        which its generation names, and the block's bytes, so a repeat is looked up."""
        key = (self._table.generation, block)
        known = self._decoded.get(key)
        if known is not None:
            return list(known)  # a copy: callers keep and extend header lists
        headers = [(bytes(k), bytes(v)) for k, v in self._hpack.decode(block, raw=True)]
        size = len(block) + sum(len(k) + len(v) for k, v in headers)
        if self._table.generation == key[0] and size <= MAX_REMEMBERED_BYTES:
            if len(self._decoded) >= MAX_REMEMBERED_BLOCKS:
                self._decoded.clear()
            self._decoded[key] = list(headers)
        return headers

    # -- gaps ------------------------------------------------------------------------------

    def _gap_at_frame(self, stranded: memoryview, length: int, ts: int) -> None:
        if len(stranded) < 4:
            # Not even the frame length is known (or whole frames may be in the gap).
            self._lose_framing()
            return
        flen = int.from_bytes(stranded[0:3], "big")
        ftype = stranded[3]
        flags = stranded[4] if len(stranded) > 4 else 0
        sid = _frame_header(stranded)[3] if len(stranded) >= FRAME_HEADER_LEN else -1
        end_stream = bool(flags & _FLAG_END_STREAM) and ftype in (_TYPE_DATA, _TYPE_HEADERS)
        if ftype in _HEADER_BEARING:
            self._conn.lost("header_gap")
            self._break_hpack()
            if ftype == _TYPE_HEADERS and sid > 0:
                self._conn.headers(self.direction, sid, None, False, ts)
            elif ftype == _TYPE_CONTINUATION and self._block is not None:
                self._block = None
                if not self._block_is_push:
                    self._conn.headers(self.direction, self._block_sid, None, False, ts)
        elif ftype == _TYPE_DATA:
            if sid > 0:
                self._conn.body_lost(self.direction, sid, ts)
            else:
                self._conn.all_bodies_lost(self.direction)
        self._skip = FRAME_HEADER_LEN + flen - len(stranded)
        self._skip_end_sid = sid if end_stream and sid > 0 else 0
        self._mode = _Mode.SKIP
        self._skip_gap(length, ts)

    def _skip_gap(self, length: int, ts: int) -> None:
        remaining = self._skip - length
        if remaining >= 0:
            self._skip = remaining
            if remaining == 0:
                self._end_skip(ts)
            return
        self._skip = 0
        self._end_skip(ts)
        self._lose_framing()

    def _end_skip(self, ts: int) -> None:
        self._mode = _Mode.FRAMES
        if self._skip_end_sid:
            sid, self._skip_end_sid = self._skip_end_sid, 0
            self._conn.end_stream(self.direction, sid, ts)

    def _lose_framing(self) -> None:
        self._stats["h2_framing_lost"] += 1
        self._conn.lost("framing_lost")
        self._mode = _Mode.LOST
        self._block = None
        self._break_hpack()
        self._conn.all_bodies_lost(self.direction)

    def _break_hpack(self) -> None:
        if self.hpack_ok:
            self._stats["h2_hpack_lost"] += 1
            self.hpack_ok = False
            self._hpack = hpack.Decoder()  # drop the old table: it is never used again
            self._decoded.clear()


class Http2Connection(ConnectionDecoder):
    """One TCP connection's HTTP/2 traffic: a decoder per intercepted flow and the streams.

    Exchanges collect in `ready` when a stream closes: both sides ended, or reset, or the request
    ended and no response can be seen (`expect_responses` False).
    """

    protocol = "h2"

    def _init_state(self) -> None:
        self._decoders: dict[Direction, Http2StreamDecoder] = {}
        self._streams: dict[int, _Stream] = {}
        self._highest_request_sid = 0  # the highest stream id the client side opened
        # Decoded header lists as text, by their bytes: steady traffic repeats them.
        self._header_text: dict[tuple[tuple[bytes, bytes], ...], _HeaderText] = {}

    def consumer(self, direction: Direction, *, resync: bool = False) -> Http2StreamDecoder:
        """`resync` is never asked for: wire.py ignores a mid-stream HTTP/2 flow (HPACK)."""
        decoder = self._decoders.get(direction)
        if decoder is None:
            decoder = self._decoders[direction] = Http2StreamDecoder(self, direction)
        return decoder

    def lost(self, reason: str) -> None:
        """Decoding lost something (agent/protocols/losses.py REASONS)."""
        self.losses.lost(HTTP2, reason, self.connection)

    def hpack_ok(self, direction: Direction) -> bool:
        decoder = self._decoders.get(direction)
        return decoder is None or decoder.hpack_ok

    def finish(self, direction: Direction, ts_ns: int, *, complete: bool = False) -> None:
        """That direction's flow ended: its open messages end as they are. (`complete` is for
        the common signature: stream ids pair HTTP/2 without help.)"""
        decoder = self._decoders.get(direction)
        if decoder is not None:
            decoder.finish()
        if direction is Direction.RESPONSE:
            self.expect_responses = False
        for stream in list(self._streams.values()):
            if direction is Direction.REQUEST and not stream.request_done:
                if stream.request is not None:
                    stream.request_body.cut = True
                self._finish(stream, Direction.REQUEST, ts_ns)
            elif direction is Direction.RESPONSE and not stream.response_done:
                if stream.response is not None:
                    stream.response_body.cut = True
                self._finish(stream, Direction.RESPONSE, ts_ns)
            self._maybe_close(stream)

    def flush(self) -> list[HttpExchange]:
        out = self.take_ready()
        for stream in list(self._streams.values()):
            self._give_up(stream, out)
        self._streams.clear()
        return out

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # -- what the stream decoders report ---------------------------------------------------

    def headers(
        self,
        direction: Direction,
        sid: int,
        headers: list[tuple[bytes, bytes]] | None,
        end_stream: bool,
        ts: int,
    ) -> None:
        stream = self._stream(sid, direction)
        if stream is None:
            return
        if direction is Direction.REQUEST:
            if stream.request is None:
                stream.request = req = self._new_message(direction, sid, headers, ts)
                self.stats["requests"] += 1
                self._per_service[self.connection.server] += 1
                if req.is_grpc and req.path.split("?", 1)[0] in STREAMING_PATHS:
                    encoding = req.header("grpc-encoding") or ""
                    stream.request_split = GrpcMessageSplitter(encoding, self._max_body)
            else:
                self._add_trailers(stream.request, headers, ts)
        else:
            if stream.response is None:
                status = _status(headers)
                if headers is not None and 100 <= status < 200:
                    self.stats["h2_interim_responses"] += 1
                    return
                stream.response = self._new_message(direction, sid, headers, ts)
                self.stats["responses"] += 1
            else:
                self._add_trailers(stream.response, headers, ts)
        if end_stream:
            self.end_stream(direction, sid, ts)

    def body(self, direction: Direction, sid: int, data: memoryview, ts: int) -> None:
        stream = self._stream(sid, direction)
        if stream is None:
            return
        msg = self._message_for(stream, direction, ts)
        msg.end_ts_ns = max(msg.end_ts_ns, ts)
        body = stream.request_body if direction is Direction.REQUEST else stream.response_body
        if body.cut or not self._capture:
            return
        split = self._splitter(stream, direction, msg)
        if split is not None:
            self._stream_body(stream, body, split, data, ts)
            return
        room = self._max_body - body.kept
        if len(data) > room:
            data = data[:room]
            body.cut = True
            self.stats["h2_bodies_over_limit"] += 1
            self.lost("over_limit")
        if data:
            body.marks.append((body.kept, ts))
            body.parts.append(bytes(data))
            body.kept += len(data)

    def _splitter(
        self, stream: _Stream, direction: Direction, msg: HttpMessage
    ) -> GrpcMessageSplitter | None:
        if stream.request_split is None:
            return None
        if direction is Direction.REQUEST:
            return stream.request_split
        if stream.response_split is None:
            encoding = msg.header("grpc-encoding") or ""
            stream.response_split = GrpcMessageSplitter(encoding, self._max_body)
        return stream.response_split

    def _stream_body(
        self,
        stream: _Stream,
        body: _Body,
        split: GrpcMessageSplitter,
        data: memoryview,
        ts: int,
    ) -> None:
        """A streaming call's DATA: split into messages, hand out every pair complete so far."""
        split.feed(data, ts)
        if split.broken or split.pending_bytes > self._max_body:
            # A message over the cap, one we cannot decompress, or answers that never come:
            # what is held is handed out when the stream ends; nothing later is trusted.
            body.cut = True
            split.broken = True
            self.stats["h2_bodies_over_limit"] += 1
            self.lost("over_limit")
            return
        requests = stream.request_split
        assert requests is not None and stream.request is not None
        responses = stream.response_split
        if self.expect_responses:
            n = min(len(requests.messages), len(responses.messages) if responses else 0)
        else:
            n = len(requests.messages)  # no answer will be seen: each request alone
        if n == 0:
            return
        msgs, times = requests.take(n)
        req = dataclasses.replace(
            stream.request, grpc_messages=msgs, grpc_message_ts=times, body=b"", trailers=[]
        )
        resp: HttpMessage | None = None
        if self.expect_responses and responses is not None and stream.response is not None:
            rmsgs, rtimes = responses.take(n)
            resp = dataclasses.replace(
                stream.response, grpc_messages=rmsgs, grpc_message_ts=rtimes, body=b"", trailers=[]
            )
        self.ready.append(HttpExchange(req, resp, stream_offset=stream.handed_out, partial=True))
        stream.handed_out += n

    def body_lost(self, direction: Direction, sid: int, ts: int) -> None:
        stream = self._stream(sid, direction)
        if stream is None:
            return
        self._message_for(stream, direction, ts)
        body = stream.request_body if direction is Direction.REQUEST else stream.response_body
        if not body.cut:
            self.lost("body_gap")
        body.cut = True

    def all_bodies_lost(self, direction: Direction) -> None:
        for stream in self._streams.values():
            done = stream.request_done if direction is Direction.REQUEST else stream.response_done
            if not done:
                body = (
                    stream.request_body if direction is Direction.REQUEST else stream.response_body
                )
                body.cut = True

    def end_stream(self, direction: Direction, sid: int, ts: int) -> None:
        stream = self._stream(sid, direction)
        if stream is None:
            return
        self._message_for(stream, direction, ts)
        self._finish(stream, direction, ts)
        self._maybe_close(stream)

    def reset(self, direction: Direction, sid: int, ts: int) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            return
        self.stats["h2_resets"] += 1
        stream.reset = True
        # A reset ends both sides; what was not complete by then was cut short.
        for side in (Direction.REQUEST, Direction.RESPONSE):
            msg = stream.request if side is Direction.REQUEST else stream.response
            done = stream.request_done if side is Direction.REQUEST else stream.response_done
            if msg is not None and not done:
                (
                    stream.request_body if side is Direction.REQUEST else stream.response_body
                ).cut = True
            self._finish(stream, side, ts)
        self._maybe_close(stream)

    # -- streams ---------------------------------------------------------------------------

    def _stream(self, sid: int, direction: Direction) -> _Stream | None:
        """The stream, opened on first sight unless it was closed already."""
        stream = self._streams.get(sid)
        if stream is not None or sid <= 0:
            return stream
        if sid <= self._highest_request_sid:
            # The client opens streams in increasing id order, so an unknown id below the
            # highest it opened is a stream that was closed (or given up): a late frame.
            self.stats["h2_frames_on_closed_streams"] += 1
            return None
        if direction is Direction.REQUEST:
            self._highest_request_sid = sid
        if len(self._streams) >= MAX_STREAMS:
            self.stats["h2_streams_over_limit"] += 1
            self.lost("over_limit")
            oldest = next(iter(self._streams.values()))
            del self._streams[oldest.sid]
            self._give_up(oldest, self.ready)
        stream = self._streams[sid] = _Stream(sid)
        return stream

    def _message_for(self, stream: _Stream, direction: Direction, ts: int) -> HttpMessage:
        """The stream's message in that direction; one whose header block we never saw (lost
        in a gap) is made with headers_unknown."""
        if direction is Direction.REQUEST:
            if stream.request is None:
                stream.request = self._new_message(direction, stream.sid, None, ts)
                self.stats["requests"] += 1
                self._per_service[self.connection.server] += 1
            return stream.request
        if stream.response is None:
            stream.response = self._new_message(direction, stream.sid, None, ts)
            self.stats["responses"] += 1
        return stream.response

    def _new_message(
        self,
        direction: Direction,
        sid: int,
        headers: list[tuple[bytes, bytes]] | None,
        ts: int,
    ) -> HttpMessage:
        msg = HttpMessage(
            connection=self.connection,
            direction=direction,
            protocol="h2",
            ts_ns=ts,
            end_ts_ns=ts,
            stream_id=sid,
        )
        if headers is None:
            msg.headers_unknown = True
            return msg
        key = tuple(headers)
        text = self._header_text.get(key)
        if text is None:
            text = _header_text(headers)
            if sum(len(k) + len(v) for k, v in headers) <= MAX_REMEMBERED_BYTES:
                if len(self._header_text) >= MAX_REMEMBERED_BLOCKS:
                    self._header_text.clear()
                self._header_text[key] = text
        fields, msg.method, msg.path, msg.status, msg.content_length = text
        msg.headers = list(fields)  # a copy: callers keep and extend header lists
        return msg

    def _add_trailers(
        self, msg: HttpMessage, headers: list[tuple[bytes, bytes]] | None, ts: int
    ) -> None:
        msg.end_ts_ns = max(msg.end_ts_ns, ts)
        if headers is None:
            msg.trailers_unknown = True
        else:
            msg.trailers.extend((_text(k).lower(), _text(v)) for k, v in headers)

    def _finish(self, stream: _Stream, direction: Direction, ts: int) -> None:
        if direction is Direction.REQUEST:
            if stream.request_done:
                return
            stream.request_done = True
            msg, body = stream.request, stream.request_body
        else:
            if stream.response_done:
                return
            stream.response_done = True
            msg, body = stream.response, stream.response_body
        if msg is None:
            return
        msg.end_ts_ns = max(msg.end_ts_ns, ts)
        # A response whose headers were lost is still gRPC when its request was: the stream's
        # framing is the protocol's, not something read from the lost block.
        peer = stream.request if direction is Direction.RESPONSE else stream.response
        split = stream.request_split if direction is Direction.REQUEST else stream.response_split
        if stream.request_split is not None:  # a streaming call: its messages are in `split`
            if body.cut or (split is not None and split.partial):
                msg.body_truncated = True
            return
        grpc = msg.is_grpc or (msg.headers_unknown and peer is not None and peer.is_grpc)
        self._decode_body(msg, body, grpc)

    def _decode_body(self, msg: HttpMessage, body: _Body, grpc_framed: bool) -> None:
        raw = b"".join(body.parts)
        body.parts = []
        if body.cut:
            msg.body_truncated = True
        if grpc_framed:
            msg.body = raw
            grpc = split_grpc_messages(
                raw,
                msg.header("grpc-encoding") or "",
                self._max_body,
                not msg.body_truncated,
                MAX_GRPC_MESSAGES,
            )
            msg.grpc_messages = grpc.messages
            msg.grpc_message_ts = _message_times(raw, body.marks, len(grpc.messages), msg.ts_ns)
            if not grpc.ok:
                self.stats["body_decode_errors"] += 1
            return
        if raw:
            decoded = decode_content(
                raw, msg.header("content-encoding") or "", self._max_body, not msg.body_truncated
            )
            if not decoded.ok:
                self.stats["body_decode_errors"] += 1
            msg.body = decoded.data
            if not decoded.complete:
                msg.body_truncated = True

    def _maybe_close(self, stream: _Stream) -> None:
        request_over = stream.request_done or Direction.REQUEST not in self._decoders
        response_over = stream.response_done or not self.expect_responses
        if request_over and response_over and self._streams.get(stream.sid) is stream:
            del self._streams[stream.sid]
            self._emit(stream, self.ready)

    def _give_up(self, stream: _Stream, out: list[HttpExchange]) -> None:
        ts = 0
        for side in (Direction.REQUEST, Direction.RESPONSE):
            msg = stream.request if side is Direction.REQUEST else stream.response
            if msg is not None:
                ts = max(ts, msg.end_ts_ns)
                done = stream.request_done if side is Direction.REQUEST else stream.response_done
                if not done:
                    msg.body_truncated = True
                    self._finish(stream, side, ts)
        self._emit(stream, out)

    def _emit(self, stream: _Stream, out: list[HttpExchange]) -> None:
        if stream.request is None:
            if stream.response is not None:
                self.stats["responses_unmatched"] += 1
            return
        if stream.response is None:
            self.stats["requests_unanswered"] += 1
        if stream.request_split is None:
            out.append(HttpExchange(stream.request, stream.response))
            return
        # A streaming call's last piece: what was not handed out yet, with the trailers.
        for msg, split in (
            (stream.request, stream.request_split),
            (stream.response, stream.response_split),
        ):
            if msg is not None:
                msg.grpc_messages, msg.grpc_message_ts = split.take() if split else ([], [])
        out.append(HttpExchange(stream.request, stream.response, stream_offset=stream.handed_out))


def _message_times(raw: bytes, marks: list[tuple[int, int]], count: int, default: int) -> list[int]:
    """Kernel time of the send that carried the first byte of each of the first `count` gRPC
    messages of a body (their length prefixes chain from offset 0)."""
    out: list[int] = []
    offsets = [offset for offset, _ts in marks]
    pos = 0
    while len(out) < count and pos + GRPC_PREFIX_LEN <= len(raw):
        i = bisect.bisect_right(offsets, pos) - 1
        out.append(marks[i][1] if i >= 0 else default)
        pos += GRPC_PREFIX_LEN + int.from_bytes(raw[pos + 1 : pos + GRPC_PREFIX_LEN], "big")
    return out


def _status(headers: list[tuple[bytes, bytes]] | None) -> int:
    if headers is None:
        return 0
    for name, value in headers:
        if name == b":status":
            return int(value) if value.isdigit() else 0
    return 0


def _plain_frame_ok(raw: memoryview, length: int) -> bool:
    """Whether hyperframe would parse this PING or WINDOW_UPDATE frame without an error (its
    own checks, made here without building the frame). Neither changes the decoding state; a
    frame that fails here goes through hyperframe, which counts the error as always."""
    if raw[3] == _TYPE_PING:  # 8 bytes of opaque data, on stream 0
        return length == 8 and not int.from_bytes(raw[5:9], "big") & 0x7FFFFFFF
    # WINDOW_UPDATE: 4 bytes, the whole 32-bit word an increment in [1, 2^31 - 1]
    return length == 4 and 1 <= int.from_bytes(raw[9:13], "big") <= 0x7FFFFFFF


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")
