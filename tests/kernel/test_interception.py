"""Interception against the real kernel: real programs, real pods (cgroup + netns + veth), real
TCP. These share one agent (see tests/conftest.py); each test uses its own server port."""

from __future__ import annotations

from typing import Any

import pytest
from support import needs_root, start_client, start_server

from infertap.agent.flows.records import FlowInfo, Role, Sample
from infertap.agent.kernel import structs
from infertap.agent.testbed.peer import payload

pytestmark = [needs_root, pytest.mark.kernel]


def client_flow(agent: Any, server_ip: str, port: int) -> FlowInfo:
    def find() -> FlowInfo | None:
        return next(
            (
                f
                for f in agent.flows()
                if f.role is Role.CLIENT and f.remote.ip == server_ip and f.remote.port == port
            ),
            None,
        )

    return agent.recorder.wait_for(find)  # type: ignore[no-any-return]


def stream_from_samples(samples: list[Sample]) -> dict[int, bytes]:
    return {s.offset: s.data for s in samples}


def test_sampled_bytes_equal_the_bytes_sent(agent: Any, lab: Any) -> None:
    client, server = lab.pods["client"], lab.pods["server"]
    start_server(server, 8101)
    peer = start_client(client, server.ip, 8101)
    sizes = [(100, 1), (5000, 2), (1 << 20, 3), (17, 4)]
    sent = b""
    for n, seed in sizes:
        assert peer.cmd(f"send {n} {seed}") == f"ok {n}"
        sent += payload(n, seed)
    flow = client_flow(agent, server.ip, 8101)
    rec = agent.recorder
    rec.wait_for(lambda: sum(s.msg_len for s in rec.samples_of(flow.cookie)) >= len(sent))
    samples = rec.samples_of(flow.cookie)

    # Every sample holds exactly the stream bytes at its offset, flagged truncated when cut.
    for s in samples:
        assert s.data == sent[s.offset : s.offset + len(s.data)]
        assert s.truncated == (len(s.data) < s.msg_len)
        assert len(s.data) == min(s.msg_len, 4096)
        assert s.role is Role.CLIENT
    # The messages tile the stream with no gap: the true lengths add up to what was sent.
    offsets = sorted((s.offset, s.msg_len) for s in samples)
    pos = 0
    for off, length in offsets:
        assert off == pos
        pos += length
    assert pos == len(sent)
    # The 1 MiB send: the first sample starting at its offset carries its first 4 KiB, truncated.
    big = next(s for s in samples if s.offset == 5100)
    assert big.truncated and big.data == payload(1 << 20, 3)[:4096]
    peer.close()


def test_kernel_counters_match_what_was_sent(agent: Any, lab: Any) -> None:
    client, server = lab.pods["client"], lab.pods["server"]
    start_server(server, 8102)
    peer = start_client(client, server.ip, 8102)
    for i in range(10):
        assert peer.cmd(f"send 1000 {i}") == "ok 1000"
    flow = client_flow(agent, server.ip, 8102)
    agent.recorder.wait_for(lambda: len(agent.recorder.samples_of(flow.cookie)) >= 10)
    now = next(f for f in agent.flows() if f.cookie == flow.cookie)
    assert (now.messages, now.bytes, now.drops, now.stream_bytes) == (10, 10000, 0, 10000)
    assert now.cgroup_id == client.cgroup_id  # the pod's cgroup, not the softirq's
    peer.close()
    end = agent.recorder.wait_for(lambda: agent.recorder.end_of(flow.cookie))
    assert (end.flow.messages, end.flow.bytes, end.flow.stream_bytes) == (10, 10000, 10000)
    assert not any(f.cookie == flow.cookie for f in agent.flows())  # removed on close


def test_nonblocking_sender_bytes_the_kernel_skips_are_an_exact_gap(agent: Any, lab: Any) -> None:
    """A non-blocking send that cannot push a whole message makes the kernel keep its verdict
    and send the retried bytes without running sk_msg; offsets must stay true anyway."""
    client, server = lab.pods["client"], lab.pods["server"]
    start_server(server, 8103)
    peer = start_client(client, server.ip, 8103, nonblocking=True)
    sent = b""
    for seed in range(3):
        assert peer.cmd(f"send {1 << 20} {seed}") == f"ok {1 << 20}"
        sent += payload(1 << 20, seed)
    flow = client_flow(agent, server.ip, 8103)
    peer.close()
    end = agent.recorder.wait_for(lambda: agent.recorder.end_of(flow.cookie))
    samples = agent.recorder.samples_of(flow.cookie)
    assert end.flow.stream_bytes == len(sent)
    # Whatever went unseen is counted, and what was seen sits at its true offset.
    assert end.flow.bytes + end.flow.unseen_bytes >= len(sent)
    for s in samples:
        assert s.data == sent[s.offset : s.offset + len(s.data)]


def test_block_gives_eacces_and_unblock_reopens_the_same_connection(agent: Any, lab: Any) -> None:
    from infertap.agent.flows.records import Endpoint

    client, server = lab.pods["client"], lab.pods["server"]
    start_server(server, 8104, echo=True)
    peer = start_client(client, server.ip, 8104)
    assert peer.cmd("send 500 1") == "ok 500"
    assert peer.cmd("recv 500") == "ok 500"
    svc = Endpoint(server.ip, 8104)
    assert agent.verdicts.block_service(svc, "test") is not None
    assert peer.cmd("send 500 2") == "err EACCES"
    assert peer.cmd("send 500 3") == "err EACCES"
    assert agent.verdicts.unblock_service(svc) is not None
    assert peer.cmd("send 500 4") == "ok 500"  # same connection
    assert peer.cmd("recv 500") == "ok 500"
    flow = client_flow(agent, server.ip, 8104)
    assert flow.drops >= 1
    # Only the passed messages count as stream bytes, and sampling carries on after the unblock.
    agent.recorder.wait_for(
        lambda: any(s.offset == 500 for s in agent.recorder.samples_of(flow.cookie))
    )
    after = next(s for s in agent.recorder.samples_of(flow.cookie) if s.offset == 500)
    assert after.data == payload(500, 4)
    peer.close()


def test_block_one_flow_leaves_other_flows_to_the_same_service_alone(agent: Any, lab: Any) -> None:
    client, server = lab.pods["client"], lab.pods["server"]
    start_server(server, 8105)
    a = start_client(client, server.ip, 8105)
    b = start_client(client, server.ip, 8105)
    assert a.cmd("send 10 1") == "ok 10" and b.cmd("send 10 1") == "ok 10"
    flows = agent.recorder.wait_for(
        lambda: (
            [
                f
                for f in agent.flows()
                if f.role is Role.CLIENT and f.remote.port == 8105 and f.messages >= 1
            ]
            if len([f for f in agent.flows() if f.role is Role.CLIENT and f.remote.port == 8105])
            == 2
            else None
        )
    )
    target = flows[0]
    assert agent.verdicts.block_flow(target.cookie, "test") is not None
    results = {a.cmd("send 10 2"), b.cmd("send 10 2")}
    assert results == {"ok 10", "err EACCES"}
    assert agent.verdicts.unblock_flow(target.cookie) is not None
    assert a.cmd("send 10 3") == "ok 10" and b.cmd("send 10 3") == "ok 10"
    a.close()
    b.close()


def test_ipv4_ports_and_addresses_decode_as_the_sockets_see_them(agent: Any, lab: Any) -> None:
    client, server = lab.pods["client"], lab.pods["server"]
    start_server(server, 8106)
    peer = start_client(client, server.ip, 8106)
    assert peer.cmd("send 1 1") == "ok 1"
    flow = client_flow(agent, server.ip, 8106)
    assert flow.local.ip == client.ip and flow.remote == flow.service
    server_flow = agent.recorder.wait_for(
        lambda: next(
            (f for f in agent.flows() if f.role is Role.SERVER and f.remote == flow.local), None
        )
    )
    assert server_flow.local.port == 8106 and server_flow.connection == flow.connection
    assert server_flow.cgroup_id == 0 or server_flow.cgroup_id == server.cgroup_id
    peer.close()


def test_sample_size_classes_cover_the_configured_limit(agent: Any, lab: Any) -> None:
    client, server = lab.pods["client"], lab.pods["server"]
    agent.sensor.set_sampling(structs.SAMPLE_MAX, 1)
    try:
        start_server(server, 8107)
        peer = start_client(client, server.ip, 8107)
        sent = b""
        for n, seed in ((300, 1), (3000, 2), (12000, 3), (40000, 4)):
            assert peer.cmd(f"send {n} {seed}") == f"ok {n}"
            sent += payload(n, seed)
        flow = client_flow(agent, server.ip, 8107)
        agent.recorder.wait_for(
            lambda: sum(s.msg_len for s in agent.recorder.samples_of(flow.cookie)) >= len(sent)
        )
        samples = agent.recorder.samples_of(flow.cookie)
        for s in samples:
            assert len(s.data) == min(s.msg_len, structs.SAMPLE_MAX)
            assert s.data == sent[s.offset : s.offset + len(s.data)]
        assert any(len(s.data) == structs.SAMPLE_MAX for s in samples)
        peer.close()
    finally:
        agent.sensor.set_sampling(4096, 1)
