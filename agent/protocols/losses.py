"""Decode losses: every place the wire decoders stop or give up on traffic, counted and logged.

A loss is anything after which some of a connection's calls are no longer decoded (or decoded
without part of what was sent): a header block lost to a gap, HPACK state gone, framing lost, a
resync that may have skipped whole messages, a bound hit. Each is counted by (protocol, reason)
for `infertap_decode_lost_total{protocol,reason}` and `infertap status`, and logged once per
connection (addresses and the reason only: never payload bytes or header values).

Reasons are a small fixed set, so the metric's series stay bounded whatever the traffic does.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from typing import Final

from infertap.agent.flows.records import ConnectionId

log = logging.getLogger(__name__)

HTTP1: Final = "http1"
HTTP2: Final = "http2"
UNKNOWN: Final = "unknown"  # a flow whose protocol was not yet known when it was lost
PROTOCOLS: Final = (HTTP1, HTTP2, UNKNOWN)

REASONS: Final[dict[str, str]] = {
    "parse_error": "bytes that do not parse as the protocol (malformed, or not what was expected)",
    "header_gap": "a header block was cut by lost bytes: that message is not decoded",
    "body_gap": "a body was cut by lost bytes: the call is flagged truncated, not decoded wrong",
    "hpack_lost": "a HTTP/2 header block not decoded: HPACK state on that side was lost earlier",
    "framing_lost": "HTTP/2 frame boundaries lost after a gap: frames dropped until a resync",
    "resync": "HTTP/1 stream lost its place after a gap or error: whole messages may be skipped",
    "mid_stream": "the flow was first seen mid-stream (HTTP/2 cannot be decoded from there)",
    "over_limit": "a memory bound was hit (header block, pending requests, open streams, body)",
    "ambiguous_framing": "HTTP/1 message with both Content-Length and Transfer-Encoding",
    "stream_unpaired": "a streaming call's message could not be paired with its answer",
    "internal_error": "a decoder bug (logged with its type): the flow is no longer decoded",
}

# Connections whose first loss was logged; bounded so a flood of connections cannot grow it.
MAX_LOGGED_CONNECTIONS: Final = 4096


class DecodeLosses:
    """Loss counts by (protocol, reason), safe to read from another thread (metrics, API)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._logged: OrderedDict[ConnectionId, None] = OrderedDict()

    def lost(self, protocol: str, reason: str, connection: ConnectionId, n: int = 1) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown decode loss reason {reason!r}")  # a bug, not input
        with self._lock:
            self._counts[(protocol, reason)] += n
            first = connection not in self._logged
            if first:
                self._logged[connection] = None
                if len(self._logged) > MAX_LOGGED_CONNECTIONS:
                    self._logged.popitem(last=False)
        if first:
            log.warning(
                "decode lost on %s connection %s -> %s: %s (later losses on it are only counted)",
                protocol,
                connection.client,
                connection.server,
                reason,
            )

    def connection_closed(self, connection: ConnectionId) -> None:
        """Forget a connection: a later one with the same addresses logs its own first loss."""
        with self._lock:
            self._logged.pop(connection, None)

    def counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)

    def by_key(self) -> dict[str, int]:
        """Counts keyed "protocol/reason" (status output)."""
        return {f"{p}/{r}": n for (p, r), n in sorted(self.counts().items())}
