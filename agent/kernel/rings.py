"""Which ring buffer (inspection worker) a connection's records go to: the Python mirror of
bpf/intercept.c's ring_for, for tests and for explaining a flow's placement.

Each endpoint (ip, port) is hashed on its own and the two are summed, so both ends of a
connection (the client and server flows of a same-node connection, and its TLS plaintext) get the
same ring: the wire decoder pairs requests and responses across the two flows, in one worker.
"""

from __future__ import annotations

import socket

from infertap.agent.kernel import structs

_M32 = 0xFFFFFFFF


def _endpoint_hash(ip_words: tuple[int, int, int, int], port: int) -> int:
    h = ip_words[0] ^ ip_words[1] ^ ip_words[2] ^ ip_words[3]
    h ^= (port * 0x9E3779B1) & _M32
    h ^= h >> 15
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    return h


def ip_words(ip: str) -> tuple[int, int, int, int]:
    """An address as the flow key's four u32 words (network-order bytes read little-endian, as
    the kernel's loads see them on x86; IPv4 in the first word)."""
    if ":" in ip:
        raw = socket.inet_pton(socket.AF_INET6, ip)
    else:
        raw = socket.inet_pton(socket.AF_INET, ip) + bytes(12)
    return (
        int.from_bytes(raw[0:4], "little"),
        int.from_bytes(raw[4:8], "little"),
        int.from_bytes(raw[8:12], "little"),
        int.from_bytes(raw[12:16], "little"),
    )


def ring_for(local: tuple[str, int], remote: tuple[str, int], n_rings: int) -> int:
    """The ring of a flow with these endpoints (either order gives the same ring)."""
    if n_rings <= 1:
        return 0
    n_rings = min(n_rings, structs.MAX_RINGS)
    h = (
        _endpoint_hash(ip_words(local[0]), local[1])
        + _endpoint_hash(ip_words(remote[0]), remote[1])
    ) & _M32
    h ^= h >> 16
    h = (h * 0x7FEB352D) & _M32
    h ^= h >> 15
    return h % n_rings
