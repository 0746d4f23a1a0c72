"""Small decoders between kernel bytes and plain records, each checked on hand-built structs."""

from __future__ import annotations

import ctypes as ct
import socket
import struct

from infertap.agent.flows.records import Endpoint, FlowCgroup, FlowEnd, FlowStart, Role, Sample
from infertap.agent.kernel import decode, structs


def make_flow(family: int, local: str, remote: str, lport: int, rport: int) -> structs.Flow:
    f = structs.Flow()
    f.cookie, f.cgroup_id, f.start_ns = 77, 5, 1000
    f.msgs, f.bytes, f.drops, f.samples, f.samples_lost = 3, 300, 1, 2, 1
    f.unseen_bytes, f.next_offset = 10, 310
    f.key.family, f.key.local_port, f.key.remote_port = family, lport, rport
    raw_l = socket.inet_pton(family, local).ljust(16, b"\0")
    raw_r = socket.inet_pton(family, remote).ljust(16, b"\0")
    for i in range(4):
        f.key.local_ip[i] = int.from_bytes(raw_l[4 * i : 4 * i + 4], "little")
        f.key.remote_ip[i] = int.from_bytes(raw_r[4 * i : 4 * i + 4], "little")
    f.role, f.sampled = structs.ROLE_SERVER, 1
    return f


def test_struct_layouts_used_by_the_fast_decoders_match_the_mirrors() -> None:
    assert decode.RECORD.size == ct.sizeof(structs.Record)
    assert decode.FLOW.size == ct.sizeof(structs.Flow)


def test_flow_decodes_ipv4_and_ipv6() -> None:
    f4 = decode.decode_flow(bytes(make_flow(socket.AF_INET, "10.1.2.3", "10.9.8.7", 8000, 41000)))
    assert f4.local == Endpoint("10.1.2.3", 8000) and f4.remote == Endpoint("10.9.8.7", 41000)
    assert f4.role is Role.SERVER and f4.service == f4.local
    assert (f4.cookie, f4.messages, f4.bytes, f4.drops, f4.unseen_bytes, f4.stream_bytes) == (
        77,
        3,
        300,
        1,
        10,
        310,
    )
    f6 = decode.decode_flow(bytes(make_flow(socket.AF_INET6, "fd00::1", "fd00::2", 443, 5000)))
    assert f6.local == Endpoint("fd00::1", 443) and str(f6.local) == "[fd00::1]:443"


def test_records_decode_by_kind() -> None:
    rec = structs.Record(
        kind=structs.REC_SAMPLE,
        cap_len=5,
        ts_ns=9,
        cookie=4,
        offset=100,
        msg_len=50,
        role=structs.ROLE_CLIENT,
        flags=structs.SAMPLE_TRUNCATED,
    )
    s = decode.decode_record(memoryview(bytes(rec) + b"hello" + b"junk"))
    assert s == Sample(
        cookie=4,
        ts_ns=9,
        offset=100,
        msg_len=50,
        data=b"hello",
        role=Role.CLIENT,
        truncated=True,
        pull_failed=False,
    )
    flow = make_flow(socket.AF_INET, "1.1.1.1", "2.2.2.2", 1, 2)
    start = decode.decode_record(
        memoryview(bytes(structs.Record(kind=structs.REC_FLOW_START, ts_ns=3)) + bytes(flow))
    )
    end = decode.decode_record(
        memoryview(bytes(structs.Record(kind=structs.REC_FLOW_END, ts_ns=4)) + bytes(flow))
    )
    assert isinstance(start, FlowStart) and start.flow.cookie == 77 and start.ts_ns == 3
    assert isinstance(end, FlowEnd) and end.flow.local.port == 1
    cg = decode.decode_record(
        memoryview(bytes(structs.Record(kind=structs.REC_FLOW_CGROUP, ts_ns=5)) + bytes(flow))
    )
    assert isinstance(cg, FlowCgroup) and cg.flow.cgroup_id == 5
    assert decode.decode_record(memoryview(bytes(structs.Record(kind=99)))) is None


def test_service_key_round_trips_and_folds_v4_mapped_addresses() -> None:
    for svc in (Endpoint("10.0.0.7", 8000), Endpoint("fd00::7", 9000)):
        assert decode.service_from_key(decode.service_key(svc)) == svc
    mapped = decode.service_key(Endpoint("::ffff:10.0.0.7", 8000))
    assert mapped.family == socket.AF_INET
    assert decode.service_from_key(mapped) == Endpoint("10.0.0.7", 8000)


def test_flow_key_matches_the_kernel_layout() -> None:
    flow = decode.decode_flow(bytes(make_flow(socket.AF_INET, "10.1.2.3", "10.9.8.7", 8000, 41000)))
    key = decode.flow_key(flow)
    assert bytes(key) == bytes(make_flow(socket.AF_INET, "10.1.2.3", "10.9.8.7", 8000, 41000).key)
    assert struct.unpack_from("<HHHH", bytes(key)) == (socket.AF_INET, 0, 8000, 41000)
