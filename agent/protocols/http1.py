"""HTTP/1.x from reassembled byte streams: one decoder per flow (direction), pairing per connection.

Parsing is llhttp's (through httptools): keep-alive, pipelining, Content-Length and chunked
bodies, trailers, upgrades. This module adds what sampling needs on top:

- Gaps. Inside a body of known length the decoder skips exactly the missing bytes, flags the body
  truncated and picks up the next message where it must start. Anywhere else (header block,
  chunked body, between messages) it drops what it cannot trust and resyncs on the next line that
  looks like a request line (or status line). Whole messages may be inside such a gap, which the
  pairing is told about.
- Shed gaps (overload: the kernel stopped sampling at a message boundary, bpf/infertap.h
  ITAP_SHED_*) lose nothing: between messages the decoder just starts afresh where sampling
  resumes, a start line; no resync and no loss is counted. The kernel sheds a response exactly
  when it shed its request, so pairing in order holds; a shed response whose request was decoded
  anyway (a race the kernel cannot rule out) leaves that request unanswered, never mispaired.
- Pairing. Responses answer requests in order. A response never answers a request sent after it
  began (kernel timestamps on one host), which keeps a lost request from shifting every later
  pair; after responses were lost, a response answers the latest request sent before it (the
  usual one-request-at-a-time client) and the older ones are reported unanswered.
- Responses to HEAD have no body whatever Content-Length says; llhttp can only be told so from
  the request, which the pairing knows.
"""

from __future__ import annotations

import enum
import logging
import re
from collections import Counter, deque
from dataclasses import dataclass
from typing import Protocol

import httptools

from infertap.agent.flows.reassembly import Chunk, GapCause
from infertap.agent.flows.records import ConnectionId, Direction
from infertap.agent.protocols.connection import ConnectionDecoder
from infertap.agent.protocols.content import decode_content
from infertap.agent.protocols.losses import HTTP1
from infertap.agent.protocols.messages import HttpExchange, HttpMessage

log = logging.getLogger(__name__)

# Where a message can start after a gap: a request line or a status line, at a line start.
_METHODS = rb"GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH|CONNECT|TRACE"
REQUEST_LINE = re.compile(rb"(?m)^(?:" + _METHODS + rb") [!-~]+ HTTP/1\.[01]\r\n")
STATUS_LINE = re.compile(rb"(?m)^HTTP/1\.[01] [1-5][0-9][0-9](?: [^\r\n]*)?\r\n")
# What the first bytes of a stream must look like to be worth an HTTP/1 decoder (a prefix test:
# the line may not be complete yet). Used by classify.
REQUEST_START = re.compile(rb"(?:" + _METHODS + rb") ")
STATUS_START = re.compile(rb"HTTP/1\.[01] ")

# llhttp's own error texts for a header block whose body length is ambiguous.
_AMBIGUOUS_FRAMING = (
    "Content-Length can't be present with Transfer-Encoding",
    "Transfer-Encoding can't be present with Content-Length",
    "Duplicate Content-Length",
)

MAX_START_LINE = 8 * 1024  # a start line longer than this is not looked for across sends
MAX_HEADER_BYTES = 64 * 1024  # a header block past this is dropped (llhttp itself has no limit)
MAX_HEADERS = 256
MAX_PENDING = 1024  # unanswered requests kept per connection
_HEADER_END = b"\r\n\r\n"


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _is_ambiguous(err: Exception) -> bool:
    text = str(err)
    return any(reason in text for reason in _AMBIGUOUS_FRAMING)


class Http1Sink(Protocol):
    """What a stream decoder reports to (the connection's pairing)."""

    def http1_headers(self, msg: HttpMessage) -> bool:
        """A message's header block is complete; for a response, True means it has no body."""
        ...

    def http1_done(self, msg: HttpMessage) -> None:
        """A message is complete (or as complete as it will get: see body_truncated)."""
        ...

    def http1_desync(self, direction: Direction, ts_ns: int) -> None:
        """Whole messages in this direction may have been lost, up to kernel time ts_ns."""
        ...

    def http1_head_outstanding(self) -> bool:
        """Whether a response to a HEAD request may come next (cheap, asked per send)."""
        ...

    def http1_request_bytes(self) -> None:
        """The request side received bytes with no gap before them."""
        ...

    def http1_lost(self, reason: str) -> None:
        """Decoding lost something (agent/protocols/losses.py REASONS)."""
        ...

    def http1_shed(self, direction: Direction, ts_ns: int) -> None:
        """Whole messages of `direction` from `ts_ns` on were shed on purpose (overload)."""
        ...


class _Mode(enum.Enum):
    PARSE = "parse"  # llhttp is fed every byte
    SKIP = "skip"  # dropping the rest of a Content-Length body whose middle was lost
    RESYNC = "resync"  # looking for the next start line
    DEAD = "dead"  # upgraded or tunnelled: no longer HTTP/1


class Http1StreamDecoder:
    """HTTP/1 messages from one flow's byte stream (a StreamConsumer)."""

    def __init__(
        self,
        connection: ConnectionId,
        direction: Direction,
        sink: Http1Sink,
        stats: Counter[str],
        *,
        capture_bodies: bool = True,
        max_body: int = 1024 * 1024,
        resync: bool = False,
    ) -> None:
        self.connection = connection
        self.direction = direction
        self._sink = sink
        self._stats = stats
        self._capture = capture_bodies
        self._max_body = max_body
        self._is_request = direction is Direction.REQUEST
        self._start_line = REQUEST_LINE if self._is_request else STATUS_LINE
        self._parser: httptools.HttpRequestParser | httptools.HttpResponseParser
        self._new_parser()
        self._mode = _Mode.RESYNC if resync else _Mode.PARSE
        self._line_start = True  # RESYNC: the next byte offered begins a line (or follows a gap)
        self._skip = 0  # SKIP: body bytes still to drop
        self._ts = 0  # kernel time of the send being fed
        # The message being parsed.
        self._msg: HttpMessage | None = None
        self._url: list[bytes] = []
        self._body: list[bytes] = []
        self._body_kept = 0
        self._body_seen = 0  # raw (de-chunked) body bytes llhttp passed, kept or not
        self._headers_done = False
        self._header_bytes = 0
        self._chunked = False
        self._bodyless = False  # a response to HEAD: complete at the end of its header block
        self._headers_capped = False  # headers past MAX_HEADERS were dropped

    # -- StreamConsumer --------------------------------------------------------------------

    def on_data(self, chunk: Chunk) -> int:
        if self._is_request:
            self._sink.http1_request_bytes()
        data = chunk.data
        n = len(data)
        pos = 0
        while pos < n:
            mode = self._mode
            if mode is _Mode.PARSE:
                # Feed retained and new bytes separately so each message gets its own send's time.
                end = chunk.carried if pos < chunk.carried else n
                self._parse(data[pos:end], chunk.ts_at(pos))
                pos = end
            elif mode is _Mode.SKIP:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                if self._skip == 0:
                    self._ts = chunk.ts_at(pos - 1) if take else self._ts
                    self._finish_message(truncated=True)
                    self._new_parser()
                    self._mode = _Mode.PARSE
            elif mode is _Mode.RESYNC:
                found = self._find_start(data, pos)
                if found < 0:
                    return self._retain_partial_line(data, pos)
                pos = found
                self._new_parser()
                self._mode = _Mode.PARSE
            else:
                return n
        return n

    def on_gap(self, stranded: memoryview, length: int, cause: GapCause, ts_ns: int) -> None:
        if length == 0 and not stranded:
            return
        # What the gap hid was sent before the send that revealed it.
        self._ts = max(self._ts, ts_ns)
        mode = self._mode
        if mode is _Mode.DEAD:
            return
        if cause is GapCause.SHED and self._shed_gap(ts_ns):
            return
        if mode is _Mode.RESYNC:
            self._line_start = True  # what follows a gap may well start a message
            return
        if mode is _Mode.SKIP:
            self._skip_gap(length)
            return
        # PARSE: llhttp took every byte before the gap, so its state says where the gap is.
        msg = self._msg
        if msg is None or not self._headers_done:
            if msg is not None:
                self._stats["http1_dropped_header_blocks"] += 1
            self._reset_message()
            self._desync("header_gap" if msg is not None else "resync")
            return
        msg.body_truncated = True
        self._sink.http1_lost("body_gap")
        length_known = msg.content_length >= 0 and not self._chunked and not self._bodyless
        if not length_known:
            self._finish_message(truncated=True)
            self._desync("resync")
            return
        self._skip = msg.content_length - self._body_seen
        self._mode = _Mode.SKIP
        self._skip_gap(length)

    def _shed_gap(self, ts_ns: int) -> bool:
        """A shed gap: True when it fell between messages, as the kernel makes it, and the
        stream simply goes on at the next message (sampling resumes at a start line)."""
        if self._mode is _Mode.PARSE and self._msg is not None:
            return False  # inside a message: a real cut, handled as any gap
        if self._mode is _Mode.SKIP:
            return False
        self._stats["http1_shed_gaps"] += 1
        self._new_parser()
        # RESYNC from a line start finds the start line at the gap's end at once, and skips to
        # the next one if the kernel took body bytes for a message start.
        self._mode = _Mode.RESYNC
        self._line_start = True
        self._sink.http1_shed(self.direction, ts_ns)
        return True

    def finish(self, ts_ns: int) -> None:
        """The flow ended: a body that runs to the end of the connection is complete now."""
        msg = self._msg
        if msg is not None and self._headers_done and self._mode is _Mode.PARSE:
            until_close = not self._is_request and msg.content_length < 0 and not self._chunked
            self._finish_message(truncated=not until_close)
        elif msg is not None and self._headers_done:
            self._finish_message(truncated=True)
        self._reset_message()
        self._mode = _Mode.DEAD

    @property
    def buffered_body_bytes(self) -> int:
        return self._body_kept

    # -- parsing ---------------------------------------------------------------------------

    def _new_parser(self) -> None:
        if self._is_request:
            self._parser = httptools.HttpRequestParser(self)
        else:
            self._parser = httptools.HttpResponseParser(self)

    def _parse(self, data: memoryview, ts: int) -> None:
        self._ts = ts
        if not self._is_request and self._sink.http1_head_outstanding():
            self._parse_head_aware(data)
            return
        self._feed(data)

    def _parse_head_aware(self, data: memoryview) -> None:
        # Feed up to each possible end of a header block, so that when a response to HEAD has
        # just ended its headers the parser can be replaced before it takes the next response
        # for a body.
        raw = bytes(data)
        start = 0
        while start < len(raw) and self._mode is _Mode.PARSE:
            cut = raw.find(_HEADER_END, start)
            end = len(raw) if cut < 0 else cut + len(_HEADER_END)
            self._feed(data[start:end])
            start = end
            if self._bodyless and self._msg is not None and self._headers_done:
                self._finish_message(truncated=False)
                self._new_parser()

    def _feed(self, data: memoryview) -> None:
        if not self._headers_done:
            self._header_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Websocket, CONNECT tunnel or h2c: what follows is not HTTP/1.
            self._stats["http1_upgrades"] += 1
            if self._msg is not None and self._headers_done:
                self._finish_message(truncated=False)
            self._reset_message()
            self._mode = _Mode.DEAD
            return
        except httptools.HttpParserError as err:
            if self._msg is not None and not self._headers_done and _is_ambiguous(err):
                self._ambiguous_framing()
                return
            self._stats["parse_errors"] += 1
            log.debug(
                "http1 %s parse error on %s: %s",
                self.direction,
                self.connection.server,
                type(err).__name__,
            )
            if self._msg is not None and self._headers_done:
                self._finish_message(truncated=True)
            self._reset_message()
            self._mode = _Mode.RESYNC
            self._line_start = False  # the rest of this send is dropped; resync after it
            self._desync("parse_error")
            return
        if (
            self._msg is not None
            and not self._headers_done
            and (self._header_bytes > MAX_HEADER_BYTES)
        ):
            self._stats["http1_oversized_header_blocks"] += 1
            self._reset_message()
            self._mode = _Mode.RESYNC
            self._line_start = False
            self._desync("over_limit")

    def _ambiguous_framing(self) -> None:
        """Report the message with what its header block gave up to the conflict, flagged, and
        look for the next message: where this one's body ends is exactly what is in doubt."""
        msg = self._msg
        assert msg is not None
        self._stats["http1_ambiguous_framing"] += 1
        msg.framing_ambiguous = True
        msg.body_truncated = True
        self._headers_done = True
        if isinstance(self._parser, httptools.HttpRequestParser):
            msg.method = _text(self._parser.get_method())
            msg.path = _text(b"".join(self._url))
        else:
            msg.status = self._parser.get_status_code()
        self._sink.http1_headers(msg)
        self._finish_message(truncated=True)
        self._mode = _Mode.RESYNC
        # The rest of this send is dropped. The next send may start a message (a client's next
        # write): a full request or status line there is evidence enough.
        self._line_start = True
        self._desync("ambiguous_framing")

    def _skip_gap(self, length: int) -> None:
        remaining = self._skip - length
        if remaining > 0:
            self._skip = remaining
            return
        self._skip = 0
        self._finish_message(truncated=True)
        self._new_parser()
        if remaining == 0:
            self._mode = _Mode.PARSE  # the gap ended exactly where the body did
        else:
            self._mode = _Mode.RESYNC
            self._line_start = True
            self._desync("resync")

    def _find_start(self, data: memoryview, pos: int) -> int:
        match = self._start_line.search(data, pos)
        if match is not None and match.start() == pos and not self._line_start:
            match = self._start_line.search(data, pos + 1)
        return -1 if match is None else match.start()

    def _retain_partial_line(self, data: memoryview, pos: int) -> int:
        # Keep the last partial line (it may be the start of a start line cut by the send
        # boundary); drop everything before it.
        n = len(data)
        window_start = max(pos, n - MAX_START_LINE)
        newline = bytes(data[window_start:]).rfind(b"\n")
        if newline >= 0:
            self._line_start = True
            return window_start + newline + 1
        if n - pos >= MAX_START_LINE:
            self._line_start = False
            return n
        return pos  # keep it all; whether it starts a line is unchanged

    def _desync(self, reason: str) -> None:
        self._stats["http1_resyncs"] += 1
        self._sink.http1_lost(reason)
        self._mode = _Mode.RESYNC if self._mode is not _Mode.DEAD else _Mode.DEAD
        self._sink.http1_desync(self.direction, self._ts)

    def _reset_message(self) -> None:
        self._msg = None
        self._url = []
        self._body = []
        self._body_kept = 0
        self._body_seen = 0
        self._headers_done = False
        self._header_bytes = 0
        self._chunked = False
        self._bodyless = False
        self._headers_capped = False

    def _finish_message(self, truncated: bool) -> None:
        msg = self._msg
        if msg is None:
            return
        msg.end_ts_ns = max(msg.end_ts_ns, self._ts)
        if truncated:
            msg.body_truncated = True
        if self._body:
            raw = b"".join(self._body)
            complete = not msg.body_truncated
            decoded = decode_content(
                raw, msg.header("content-encoding") or "", self._max_body, complete
            )
            if not decoded.ok:
                self._stats["body_decode_errors"] += 1
            msg.body = decoded.data
            if not decoded.complete:
                msg.body_truncated = True
        self._reset_message()
        self._sink.http1_done(msg)

    # -- httptools callbacks (names fixed by httptools) ------------------------------------

    def on_message_begin(self) -> None:
        self._reset_message()
        self._header_bytes = 0
        self._msg = HttpMessage(
            connection=self.connection,
            direction=self.direction,
            protocol="http/1.1",
            ts_ns=self._ts,
            end_ts_ns=self._ts,
        )

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        msg = self._msg
        if msg is None:
            return
        target = msg.trailers if self._headers_done else msg.headers
        if len(target) < MAX_HEADERS:  # _text, inlined: this runs for every header
            target.append(
                (name.decode("utf-8", "replace").lower(), value.decode("utf-8", "replace"))
            )
        else:
            if not self._headers_capped:  # a loss once per message, not per header
                self._headers_capped = True
                self._sink.http1_lost("over_limit")
            self._stats["http1_headers_over_limit"] += 1

    def on_headers_complete(self) -> None:
        msg = self._msg
        if msg is None:
            return
        self._headers_done = True
        self._header_bytes = 0
        msg.protocol = "http/" + self._parser.get_http_version()
        if isinstance(self._parser, httptools.HttpRequestParser):
            msg.method = _text(self._parser.get_method())
            msg.path = _text(b"".join(self._url))
        else:
            msg.status = self._parser.get_status_code()
        length: str | None = None
        coding: str | None = None
        for name, value in msg.headers:  # the first of each, as msg.header() gives it
            if name == "content-length":
                if length is None:
                    length = value
            elif name == "transfer-encoding" and coding is None:
                coding = value
        if length is not None and length.strip().isdigit():
            msg.content_length = int(length)
        self._chunked = "chunked" in (coding or "").lower()
        self._bodyless = self._sink.http1_headers(msg) and not self._is_request

    def on_body(self, body: bytes) -> None:
        self._body_seen += len(body)
        if self._msg is not None:
            self._msg.end_ts_ns = self._ts
        if not self._capture:
            return
        room = self._max_body - self._body_kept
        if room <= 0:
            if self._msg is not None:
                if not self._msg.body_truncated:
                    self._sink.http1_lost("over_limit")
                self._msg.body_truncated = True
            return
        if len(body) > room:
            body = body[:room]
            self._sink.http1_lost("over_limit")  # once: room is 0 from here on
            if self._msg is not None:
                self._msg.body_truncated = True
        self._body.append(body)
        self._body_kept += len(body)

    def on_message_complete(self) -> None:
        if self._msg is not None:
            self._finish_message(truncated=False)


@dataclass(slots=True)
class _Pending:
    """A request, and its response once one began."""

    request: HttpMessage
    request_done: bool = False
    response: HttpMessage | None = None
    response_done: bool = False
    response_lost: bool = False  # no response will be paired with it
    # Paired by timing after responses were lost: held until the request side shows that no
    # request was lost in between (its next bytes come without a gap).
    tentative: bool = False


class Http1Connection(ConnectionDecoder):
    """One TCP connection's HTTP/1 traffic: a decoder per intercepted flow, requests paired
    with responses in order. Completed exchanges collect in `ready` for the caller to take.

    With `expect_responses` False (the server side is not intercepted), a request is ready,
    with response None, as soon as it is complete.
    """

    protocol = "http/1.1"

    def _init_state(self) -> None:
        self._decoders: dict[Direction, Http1StreamDecoder] = {}
        self._pending: deque[_Pending] = deque()  # not yet ready, in request order
        self._awaiting: deque[_Pending] = deque()  # no response yet, in request order
        self._request_entry: _Pending | None = None  # request being parsed
        self._response_entry: _Pending | None = None  # response being parsed
        self._responses_lost = False
        self._head_outstanding = 0
        # For telling a lost request from a present one: when the request side last lost
        # messages, when the last request a response was matched to was sent, and whether the
        # client ever had two requests out at once (pipelining defeats the timing argument).
        self._request_loss_ts = -1
        self._last_matched_ts = -1
        self._pipelined = False
        self._tentatives = 0

    def consumer(self, direction: Direction, *, resync: bool = False) -> Http1StreamDecoder:
        decoder = self._decoders.get(direction)
        if decoder is None:
            if resync and direction is Direction.RESPONSE:
                self._responses_lost = True  # a server flow seen from mid-stream
            decoder = Http1StreamDecoder(
                self.connection,
                direction,
                self,
                self.stats,
                capture_bodies=self._capture,
                max_body=self._max_body,
                resync=resync,
            )
            self._decoders[direction] = decoder
        return decoder

    def finish(self, direction: Direction, ts_ns: int, *, complete: bool = False) -> None:
        """That direction's flow ended; `complete`: every byte it sent was accounted for (seen
        or reported as a gap), so no message can have been lost after the last one seen."""
        decoder = self._decoders.get(direction)
        if decoder is not None:
            decoder.finish(ts_ns)
        if direction is Direction.REQUEST and self._tentatives:
            if complete:
                self._confirm_tentative()
            else:
                self.http1_desync(Direction.REQUEST, ts_ns)  # a lost last request: fail closed
        if direction is Direction.RESPONSE:
            # No response can come any more.
            self.expect_responses = False
            self._mark_all_unanswered()

    def flush(self) -> list[HttpExchange]:
        """Everything still held, as it is (unfinished messages flagged truncated)."""
        out = self.take_ready()
        for entry in self._pending:
            if not entry.request_done:
                entry.request.body_truncated = True
            if entry.response is not None and not entry.response_done:
                entry.response.body_truncated = True
            out.append(HttpExchange(entry.request, entry.response))
        self._pending.clear()
        self._awaiting.clear()
        self._request_entry = self._response_entry = None
        self._head_outstanding = 0
        return out

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    # -- Http1Sink -------------------------------------------------------------------------

    def http1_headers(self, msg: HttpMessage) -> bool:
        if msg.direction is Direction.REQUEST:
            self.stats["requests"] += 1
            self._per_service[self.connection.server] += 1
            entry = _Pending(msg)
            self._request_entry = entry
            if self._awaiting:
                self._pipelined = True
            if len(self._pending) >= MAX_PENDING:
                self.stats["http1_pending_over_limit"] += 1
                self.http1_lost("over_limit")
                self._drop_oldest()
            self._pending.append(entry)
            self._awaiting.append(entry)
            if msg.method == "HEAD":
                self._head_outstanding += 1
            return False
        self.stats["responses"] += 1
        if msg.status < 200 and msg.status != 101:
            self.stats["http1_interim_responses"] += 1  # 100 Continue and such: not the answer
            self._response_entry = None
            return False
        matched = self._match(msg)
        self._response_entry = matched
        if matched is None:
            self.stats["responses_unmatched"] += 1
            return False
        matched.response = msg
        if matched.request.method == "HEAD":
            self._head_outstanding -= 1
            return True
        return False

    def http1_done(self, msg: HttpMessage) -> None:
        if msg.direction is Direction.REQUEST:
            entry = self._request_entry
            self._request_entry = None
            if entry is None or entry.request is not msg:
                return
            entry.request_done = True
            if not self.expect_responses and entry.response is None:
                entry.response_lost = True
        else:
            entry = self._response_entry
            self._response_entry = None
            if entry is None or entry.response is not msg:
                return
            entry.response_done = True
        self._collect()

    def http1_desync(self, direction: Direction, ts_ns: int) -> None:
        if direction is Direction.RESPONSE:
            self._responses_lost = True
            self._response_entry = None
        else:
            self._request_entry = None
            self._request_loss_ts = max(self._request_loss_ts, ts_ns)
            # A request lost now may be what a tentatively paired response answered.
            self._tentatives = 0
            for entry in self._pending:
                if entry.tentative:
                    entry.tentative = False
                    entry.response = None
                    entry.response_done = False
                    entry.response_lost = True
                    self.stats["responses_unmatched"] += 1
            self._collect()

    def http1_lost(self, reason: str) -> None:
        self.losses.lost(HTTP1, reason, self.connection)

    def http1_shed(self, direction: Direction, ts_ns: int) -> None:
        if direction is Direction.REQUEST:
            return  # its response is shed too: nothing to pair
        self._response_entry = None
        awaiting = self._awaiting
        before = [e for e in awaiting if e.request.ts_ns <= ts_ns][:2]
        if len(before) == 1:
            # One request was out when the shed response began: it is what that response
            # answered, decoded though its response was shed (the kernel's request and response
            # decisions raced). Leave it unanswered rather than pair the next response with it.
            # With several out (pipelining) which one is not known: left to the timing rules.
            self.stats["http1_shed_unanswered"] += 1
            self._unanswered(awaiting.popleft())
            self._collect()

    def http1_request_bytes(self) -> None:
        if self._tentatives:
            self._confirm_tentative()

    def _confirm_tentative(self) -> None:
        self._tentatives = 0
        for entry in self._pending:
            entry.tentative = False
        self._collect()

    def http1_head_outstanding(self) -> bool:
        return self._head_outstanding > 0

    # -- pairing ---------------------------------------------------------------------------

    def _match(self, response: HttpMessage) -> _Pending | None:
        awaiting = self._awaiting
        if self._responses_lost:
            # Responses were lost: answer the latest request sent before this response began
            # (a client waits for each answer before it asks again). Unless requests were lost
            # since that one was sent: the answer may be to one of those, so none is chosen.
            self._responses_lost = False
            latest = -1
            for i, entry in enumerate(awaiting):
                if entry.request.ts_ns > response.ts_ns:
                    break
                latest = i
            for _ in range(latest):
                self._unanswered(awaiting.popleft())
            if latest < 0:
                return None
            if self._request_loss_ts >= awaiting[0].request.ts_ns:
                self._unanswered(awaiting.popleft())
                return None
            entry = self._matched(awaiting.popleft())
            entry.tentative = True
            self._tentatives += 1
            return entry
        if not awaiting or awaiting[0].request.ts_ns > response.ts_ns:
            return None  # it answers a request we never saw
        head = awaiting[0]
        if self._pipelined and self._last_matched_ts < self._request_loss_ts <= head.request.ts_ns:
            # Pipelined requests were lost before this one: in-order pairing would shift.
            while awaiting:
                self._unanswered(awaiting.popleft())
            return None
        return self._matched(awaiting.popleft())

    def _matched(self, entry: _Pending) -> _Pending:
        self._last_matched_ts = entry.request.ts_ns
        return entry

    def _unanswered(self, entry: _Pending) -> None:
        entry.response_lost = True
        if entry.request.method == "HEAD":
            self._head_outstanding -= 1

    def _mark_all_unanswered(self) -> None:
        while self._awaiting:
            self._unanswered(self._awaiting.popleft())
        if self._response_entry is not None and not self._response_entry.response_done:
            entry = self._response_entry
            self._response_entry = None
            if entry.response is not None:
                entry.response.body_truncated = True
            entry.response_done = True
        self._collect()

    def _drop_oldest(self) -> None:
        entry = self._pending.popleft()
        if entry in self._awaiting:
            self._awaiting.remove(entry)
            self._unanswered(entry)
        if not entry.request_done:
            entry.request.body_truncated = True
        self.ready.append(HttpExchange(entry.request, entry.response))

    def _collect(self) -> None:
        pending = self._pending
        while pending:
            head = pending[0]
            if head.tentative or not head.request_done:
                break
            if not (head.response_done or head.response_lost):
                break
            pending.popleft()
            if head.response is None:
                self.stats["requests_unanswered"] += 1
            self.ready.append(HttpExchange(head.request, head.response))
