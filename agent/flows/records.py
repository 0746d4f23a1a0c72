"""Plain data types that cross module boundaries on the sample path.

The kernel speaks in C structs (bpf/infertap.h, mirrored in agent/kernel/structs.py); everything
after the ring-buffer reader speaks in these. A stage knows the stage before it only by these types.

Vocabulary:
- A *flow* is one intercepted socket (one end of a TCP connection). Its id is the kernel's
  socket cookie. sk_msg sees only what a socket *sends*, so a flow carries one direction of bytes:
  a client socket's sends are requests, a server socket's sends are responses.
- A *connection* pairs the client and server flows of one TCP connection when both ends are
  intercepted (both pods watched, or node mode). Its id is (client endpoint, server endpoint).
- A *service* is the server endpoint ip:port.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.IntEnum):
    """Which end of the connection a flow is. Values match ITAP_ROLE_* in bpf/infertap.h."""

    CLIENT = 1
    SERVER = 2

    @property
    def direction(self) -> Direction:
        return Direction.REQUEST if self is Role.CLIENT else Direction.RESPONSE


class Direction(enum.StrEnum):
    REQUEST = "request"  # bytes sent by the client
    RESPONSE = "response"  # bytes sent by the server


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class ConnectionId:
    """Both ends of a TCP connection, the same whichever end's flow it was computed from."""

    client: Endpoint
    server: Endpoint


@dataclass(slots=True)
class FlowInfo:
    """One intercepted socket, as the kernel flow table describes it."""

    cookie: int
    role: Role
    local: Endpoint
    remote: Endpoint
    cgroup_id: int
    start_ns: int
    sampled: bool
    messages: int = 0
    bytes: int = 0
    drops: int = 0
    samples: int = 0
    samples_lost: int = 0
    unseen_bytes: int = 0  # sent while the kernel skipped sk_msg (see bpf/infertap.h)
    stream_bytes: int = 0  # stream length so far: where the next message starts
    accelerated: bool = False  # sends go straight to the peer socket (same-node acceleration)
    capture: str = "sk_msg"  # which kernel program samples it: "skb" or "sk_msg"
    # In the sockhash for its whole life (sk_msg capture or acceleration); otherwise it joins
    # only while a verdict applies to it.
    sockhash_always: bool = True
    http2_frames: bool = False  # the kernel walks its HTTP/2 frames (header blocks kept whole)
    ring: int = 0  # the ring buffer (inspection worker) its records go to
    shed: int = 0  # overload shedding state (ITAP_SHED_* in bpf/infertap.h)
    requests_shed: int = 0  # requests (responses, or the connection) not sampled: overload

    @property
    def service(self) -> Endpoint:
        """The server end: a service verdict on this endpoint applies to the flow."""
        return self.local if self.role is Role.SERVER else self.remote

    @property
    def connection(self) -> ConnectionId:
        if self.role is Role.CLIENT:
            return ConnectionId(client=self.local, server=self.remote)
        return ConnectionId(client=self.remote, server=self.local)

    @property
    def direction(self) -> Direction:
        return self.role.direction


@dataclass(frozen=True, slots=True)
class Sample:
    """The first bytes of one sendmsg (sk_msg capture) or one skb (skb capture) on a sampled flow.

    `data` holds stream bytes [offset, offset + len(data)); the message itself covered
    [offset, offset + msg_len). When `truncated`, the rest of the message was not captured.
    Offsets are true TCP stream offsets (from the socket's write_seq; dropped messages take no
    room), so a jump between one sample's `end` and the next sample's `offset` is an exact count
    of bytes not captured (lost samples, or bytes the kernel sent without running sk_msg). A
    sample may also start *before* the previous one's end: a non-blocking send that pushed only
    part of a message is retried by the application, and the retried tail is seen again. The
    overlapping bytes are the same bytes; consumers skip them. With skb capture, TCP
    retransmits that carry some new bytes overlap the same way.
    """

    cookie: int
    ts_ns: int
    offset: int
    msg_len: int
    data: bytes
    role: Role
    truncated: bool
    pull_failed: bool = False
    # Plaintext from a TLS library call (bpf/tls.c), not the socket's bytes: a stream of its own.
    tls: bool = False
    # TLS only: bytes the flow received (`role` is then its peer's, whose sends they are).
    received: bool = False

    @property
    def end(self) -> int:
        """Stream offset just past this message."""
        return self.offset + self.msg_len


@dataclass(frozen=True, slots=True)
class Shed:
    """Overload: the kernel stopped sampling the flow at a message boundary, at stream offset
    `offset`, on purpose (bpf/infertap.h ITAP_REC_SHED). The bytes from there to the flow's next
    sample (or its end) are a gap that loses nothing decoded: the next sample starts a message.
    One record per request (or response) shed; `connection`: the whole connection is shed from
    its first byte (HTTP/2 and other protocols are never cut inside a connection)."""

    cookie: int
    ts_ns: int
    offset: int
    role: Role
    connection: bool = False


@dataclass(frozen=True, slots=True)
class FlowEnd:
    """The kernel saw the socket close; `flow` carries its final counters."""

    flow: FlowInfo
    ts_ns: int


@dataclass(frozen=True, slots=True)
class FlowStart:
    """The connection was established; the flow's cgroup is not known yet (cgroup_id 0)."""

    flow: FlowInfo
    ts_ns: int


@dataclass(frozen=True, slots=True)
class FlowCgroup:
    """The flow's first send: the kernel now knows its cgroup (see bpf/intercept.c)."""

    flow: FlowInfo
    ts_ns: int
