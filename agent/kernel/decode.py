"""Small decoders between kernel bytes and the plain records in agent/flows/records.py.

The ring-buffer reader calls `decode_record` for every record, so it uses precompiled
struct.Struct layouts (checked against the ctypes mirrors in tests) rather than ctypes objects.
"""

from __future__ import annotations

import socket
import struct

from infertap.agent.flows.records import (
    Endpoint,
    FlowCgroup,
    FlowEnd,
    FlowInfo,
    FlowStart,
    Role,
    Sample,
    Shed,
)
from infertap.agent.kernel import structs

# struct itap_record
RECORD = struct.Struct("<IIQQQIBBH")
# struct itap_flow: 11 u64s, the key (u16 family, pad, lport, rport, 2 x 16 address bytes),
# u32 seq_last, then role, sampled, announced, seq_ok, accel, capture, sockhash, h2, h2_head_len,
# ring, shed, a pad byte, then h2_next, h2_keep, u32 h2_head and u32 requests_shed.
FLOW = struct.Struct("<11Q4H16s16sIBBBBBBBBBBBxQQII")

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

Record = Sample | FlowStart | FlowCgroup | FlowEnd | Shed


def ip_text(family: int, raw: bytes) -> str:
    """An address as the kernel stores it (network order, IPv4 in the first 4 bytes)."""
    if family == AF_INET:
        return socket.inet_ntop(AF_INET, raw[:4])
    return socket.inet_ntop(AF_INET6, raw)


def ip_raw(ip: str) -> tuple[int, bytes]:
    """(family, 16 bytes) for an address given as text; IPv4-mapped IPv6 folds to IPv4."""
    if ":" in ip:
        raw = socket.inet_pton(AF_INET6, ip)
        if raw[:12] == b"\0" * 10 + b"\xff\xff":
            return AF_INET, raw[12:] + b"\0" * 12
        return AF_INET6, raw
    return AF_INET, socket.inet_pton(AF_INET, ip) + b"\0" * 12


def decode_flow(buf: bytes | memoryview, offset: int = 0) -> FlowInfo:
    (
        cookie,
        cgroup_id,
        start_ns,
        msgs,
        nbytes,
        drops,
        samples,
        samples_lost,
        unseen_bytes,
        next_offset,
        _seq_pos,
        family,
        _pad,
        lport,
        rport,
        lip,
        rip,
        _seq_last,
        role,
        sampled,
        _announced,
        _seq_ok,
        accel,
        capture,
        sockhash,
        h2,
        _h2_head_len,
        ring,
        shed,
        _h2_next,
        _h2_keep,
        _h2_head,
        requests_shed,
    ) = FLOW.unpack_from(buf, offset)
    return FlowInfo(
        cookie=cookie,
        role=Role(role) if role in (1, 2) else Role.CLIENT,
        local=Endpoint(ip_text(family, lip), lport),
        remote=Endpoint(ip_text(family, rip), rport),
        cgroup_id=cgroup_id,
        start_ns=start_ns,
        sampled=bool(sampled),
        messages=msgs,
        bytes=nbytes,
        drops=drops,
        samples=samples,
        samples_lost=samples_lost,
        unseen_bytes=unseen_bytes,
        stream_bytes=next_offset,
        accelerated=accel == structs.ACCEL_YES,
        capture="skb" if capture == structs.CAPTURE_SKB else "sk_msg",
        sockhash_always=sockhash == structs.SOCKHASH_ALWAYS,
        http2_frames=h2 == structs.H2_WALK,
        ring=ring,
        shed=shed,
        requests_shed=requests_shed,
    )


def decode_record(view: memoryview) -> Record | None:
    """One ring-buffer record; None for a kind this version does not know (counted by caller)."""
    kind, cap_len, ts_ns, cookie, offset, msg_len, role, flags, _pad = RECORD.unpack_from(view)
    if kind == structs.REC_SAMPLE:
        start = RECORD.size
        return Sample(
            cookie=cookie,
            ts_ns=ts_ns,
            offset=offset,
            msg_len=msg_len,
            data=bytes(view[start : start + cap_len]),
            role=Role(role) if role in (1, 2) else Role.CLIENT,
            truncated=bool(flags & structs.SAMPLE_TRUNCATED),
            pull_failed=bool(flags & structs.SAMPLE_PULL_FAILED),
            tls=bool(flags & structs.SAMPLE_TLS),
            received=bool(flags & structs.SAMPLE_TLS_RECEIVED),
        )
    if kind == structs.REC_FLOW_START:
        return FlowStart(flow=decode_flow(view, RECORD.size), ts_ns=ts_ns)
    if kind == structs.REC_FLOW_CGROUP:
        return FlowCgroup(flow=decode_flow(view, RECORD.size), ts_ns=ts_ns)
    if kind == structs.REC_FLOW_END:
        return FlowEnd(flow=decode_flow(view, RECORD.size), ts_ns=ts_ns)
    if kind == structs.REC_SHED:
        return Shed(
            cookie=cookie,
            ts_ns=ts_ns,
            offset=offset,
            role=Role(role) if role in (1, 2) else Role.CLIENT,
            connection=bool(flags & structs.SHED_CONNECTION),
        )
    return None


def service_key(service: Endpoint) -> structs.ServiceKey:
    family, raw = ip_raw(service.ip)
    key = structs.ServiceKey()
    key.family = family
    key.port = service.port
    ct_ip = (structs.ServiceKey.ip.size // 4) * [0]
    for i in range(4):
        ct_ip[i] = int.from_bytes(raw[4 * i : 4 * i + 4], "little")
    key.ip[:] = ct_ip
    return key


def service_from_key(key: structs.ServiceKey) -> Endpoint:
    raw = b"".join(int(x).to_bytes(4, "little") for x in key.ip)
    return Endpoint(ip_text(key.family, raw), key.port)


def flow_key(flow: FlowInfo) -> structs.FlowKey:
    """The kernel's key for a flow (the flow table's and the sockhash's)."""
    family, local = ip_raw(flow.local.ip)
    _family, remote = ip_raw(flow.remote.ip)
    key = structs.FlowKey()
    key.family = family
    key.local_port = flow.local.port
    key.remote_port = flow.remote.port
    for i in range(4):
        key.local_ip[i] = int.from_bytes(local[4 * i : 4 * i + 4], "little")
        key.remote_ip[i] = int.from_bytes(remote[4 * i : 4 * i + 4], "little")
    return key
