"""The dispatch point of the wire decoder: one TCP connection's decoder for one protocol.

The wire decoder (wire.py) detects a flow's protocol from its first bytes, makes one
ConnectionDecoder per connection (Http1Connection or Http2Connection) and then only talks to it
through this interface: a byte-stream consumer per direction, the end of a direction, the
exchanges ready, and a flush when the connection is gone. What both keep (the connection, the
shared counters, the size limits, the ready list) is set up here once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from typing import ClassVar

from infertap.agent.flows.reassembly import StreamConsumer
from infertap.agent.flows.records import ConnectionId, Direction, Endpoint
from infertap.agent.protocols.losses import DecodeLosses
from infertap.agent.protocols.messages import HttpExchange

DEFAULT_MAX_BODY = 1024 * 1024


class ConnectionDecoder(ABC):
    protocol: ClassVar[str]  # "http/1.1" or "h2": what detection chose

    def __init__(
        self,
        connection: ConnectionId,
        stats: Counter[str],
        requests_by_service: Counter[Endpoint],
        *,
        expect_responses: bool,
        capture_bodies: bool = True,
        max_body: int = DEFAULT_MAX_BODY,
        losses: DecodeLosses | None = None,
    ) -> None:
        """`stats` and `requests_by_service` are the wire decoder's counters, shared by every
        connection. `expect_responses` False: the server side is not intercepted, so a request
        is ready (response None) once complete. `capture_bodies` False keeps no body bytes;
        `max_body` caps those kept per message."""
        self.connection = connection
        self.expect_responses = expect_responses
        self.stats = stats
        self.losses = losses if losses is not None else DecodeLosses()
        self.ready: list[HttpExchange] = []  # completed exchanges, for the caller to take
        self._per_service = requests_by_service
        self._capture = capture_bodies
        self._max_body = max_body
        self._init_state()

    @abstractmethod
    def _init_state(self) -> None:
        """The protocol's own per-connection state (called once, from __init__)."""

    @abstractmethod
    def consumer(self, direction: Direction, *, resync: bool = False) -> StreamConsumer:
        """The byte-stream consumer of one direction (made once, then the same). `resync`: the
        flow's first bytes were lost; look for the next message start (HTTP/1 only: HTTP/2's
        header compression cannot be picked up mid-stream)."""

    @abstractmethod
    def finish(self, direction: Direction, ts_ns: int, *, complete: bool = False) -> None:
        """A direction's flow ended; `complete`: every byte it sent was seen."""

    @abstractmethod
    def flush(self) -> list[HttpExchange]:
        """The connection is gone: what is left, unanswered requests included."""

    def take_ready(self) -> list[HttpExchange]:
        ready, self.ready = self.ready, []
        return ready
