"""What the wire decoders produce: HTTP messages and request/response exchanges.

Plain data. The decoders (http1, http2) build these from reassembled byte streams; the model
adapters (agent/models) read them. Header names are lower-case; HTTP/2 pseudo-headers (":path")
are kept in `headers` too. Bodies are decoded (de-chunked, decompressed) when complete; a body
the sampling cut short is flagged `body_truncated` and never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infertap.agent.flows.records import ConnectionId, Direction, FlowInfo


@dataclass(slots=True)
class HttpMessage:
    connection: ConnectionId
    direction: Direction
    protocol: str  # "http/1.1", "http/1.0" or "h2"
    ts_ns: int  # kernel time of the send that carried the first byte
    end_ts_ns: int  # kernel time of the send that carried the last byte seen
    method: str = ""  # requests
    path: str = ""  # requests
    status: int = 0  # responses (HTTP status; gRPC status is in trailers)
    headers: list[tuple[str, str]] = field(default_factory=list)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    body_truncated: bool = False  # bytes of the body were not seen (sample limit or lost samples)
    headers_unknown: bool = False  # HTTP/2: HPACK state was lost to a gap; fail closed
    content_length: int = -1  # -1 when not given
    stream_id: int = 0  # HTTP/2 stream id; 0 for HTTP/1
    grpc_messages: list[bytes] = field(default_factory=list)  # de-framed, decompressed
    # Kernel time of the send that carried each gRPC message's first byte (streaming calls).
    grpc_message_ts: list[int] = field(default_factory=list)
    trailers_unknown: bool = False  # HTTP/2: the trailer block came after HPACK state was lost
    # HTTP/1: Content-Length and Transfer-Encoding both given (or Content-Length twice): where
    # the body ends depends on who reads it (request smuggling). The rest of the header block
    # and the body are not decoded (body_truncated); the message is still reported and paired.
    framing_ambiguous: bool = False

    def header(self, name: str) -> str | None:
        """The first value of a header (name lower-case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def grpc_status(self) -> int | None:
        """gRPC status from the trailers (or the headers of a trailers-only response)."""
        for k, v in (*self.trailers, *self.headers):
            if k == "grpc-status":
                return int(v) if v.isdigit() else None
        return None

    @property
    def is_grpc(self) -> bool:
        ctype = self.header("content-type") or ""
        return self.protocol == "h2" and ctype.startswith("application/grpc")


@dataclass(slots=True)
class HttpExchange:
    """A request and, once seen, its response, on one connection."""

    request: HttpMessage
    response: HttpMessage | None = None
    # A streaming call handed out in pieces as its messages pair (HTTP/2, STREAMING_PATHS): this
    # piece's first request message is message number `stream_offset` of the stream; `partial`
    # for every piece but the last, which comes when the stream closes (with its trailers).
    stream_offset: int = 0
    partial: bool = False
    # The connection's intercepted flows when the exchange came out of the wire decoder (its
    # flow table): which pods it belongs to. Not part of what was said, so not compared.
    client_flow: FlowInfo | None = field(default=None, compare=False, repr=False)
    server_flow: FlowInfo | None = field(default=None, compare=False, repr=False)

    @property
    def latency_ns(self) -> int | None:
        """Request sent (first byte) to the first response byte sent, from kernel timestamps."""
        if self.response is None:
            return None
        return max(0, self.response.ts_ns - self.request.ts_ns)
