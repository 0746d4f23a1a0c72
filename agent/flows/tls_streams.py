"""TLS plaintext samples as flows of their own, for the same wire decoder as cleartext.

A TLS socket carries two streams: the ciphertext its sk_msg samples show (which the wire decoder
takes for unknown bytes and ignores) and the plaintext the TLS library's calls show (bpf/tls.c).
The plaintext gets a virtual flow with its own cookie, on the same connection, so pairing,
reassembly, size limits, truncation flags and decoders are the cleartext ones, unchanged:

- what a socket's SSL_write sent: a virtual flow with the socket's role;
- what its SSL_read received: a virtual flow with the peer's role (the peer's sends), used only
  when nothing else supplies that direction. Each (connection, direction) is owned by the first
  source that shows bytes for it: when both ends are hooked, the sender's SSL_write comes first
  (its bytes are written before the peer can read them), and the receiver's copy is dropped and
  counted, never fed twice.

Virtual cookies are above every kernel cookie (2**64 + 2 * cookie + received), so they never
collide with a socket's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from infertap.agent.flows.records import ConnectionId, FlowInfo, Role, Sample

VIRTUAL_BASE = 1 << 64


def virtual_cookie(cookie: int, received: bool) -> int:
    return VIRTUAL_BASE + 2 * cookie + int(received)


def is_virtual(cookie: int) -> bool:
    return cookie >= VIRTUAL_BASE


class TlsStreams:
    """Maps TLS samples to virtual flows. The caller starts and ends them on its decoder."""

    def __init__(self) -> None:
        self._flows: dict[int, FlowInfo] = {}  # virtual cookie -> its flow
        self._of_socket: dict[int, list[int]] = {}  # real cookie -> its virtual cookies
        self._owner: dict[tuple[ConnectionId, Role], int] = {}  # direction -> virtual cookie
        self.counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._flows)

    def is_tls(self, connection: ConnectionId) -> bool:
        return (connection, Role.CLIENT) in self._owner or (connection, Role.SERVER) in self._owner

    def route(self, sample: Sample, socket: FlowInfo | None) -> tuple[Sample, FlowInfo | None]:
        """(sample re-keyed to its virtual flow, the virtual flow if it is new), or the sample
        unchanged and None when it is to be dropped (counted): check `dropped`."""
        if socket is None:
            self.counts["tls_samples_without_flow"] += 1
            return sample, None
        vcookie = virtual_cookie(sample.cookie, sample.received)
        known = self._flows.get(vcookie)
        if known is not None:
            self.counts["tls_samples"] += 1
            return replace(sample, cookie=vcookie), None
        direction = (socket.connection, sample.role)
        if self._owner.get(direction, vcookie) != vcookie:
            self.counts["tls_samples_duplicate"] += 1
            return sample, None
        self._owner[direction] = vcookie
        same_end = sample.role is socket.role
        flow = FlowInfo(
            cookie=vcookie,
            role=sample.role,
            local=socket.local if same_end else socket.remote,
            remote=socket.remote if same_end else socket.local,
            cgroup_id=socket.cgroup_id if same_end else 0,
            start_ns=socket.start_ns,
            sampled=True,
        )
        self._flows[vcookie] = flow
        self._of_socket.setdefault(sample.cookie, []).append(vcookie)
        self.counts["tls_flows"] += 1
        self.counts["tls_samples"] += 1
        return replace(sample, cookie=vcookie), flow

    def dropped(self, routed: Sample) -> bool:
        return not is_virtual(routed.cookie)

    def socket_ended(self, cookie: int) -> list[int]:
        """The real socket closed: its virtual flows end too. Returns their cookies."""
        ended = self._of_socket.pop(cookie, [])
        for vcookie in ended:
            flow = self._flows.pop(vcookie, None)
            if flow is not None:
                direction = (flow.connection, flow.role)
                if self._owner.get(direction) == vcookie:
                    del self._owner[direction]
        return ended
