"""Interception against the real kernel: real programs, real pods (cgroup + netns + veth), real
TCP. Each test runs on both capture paths: skb (the default; the shared agent of
tests/conftest.py) and sk_msg (a second agent on its own pair of pods). Each test uses its own
server port."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from support import needs_root, start_client, start_server

from infertap.agent.flows.records import Endpoint, FlowInfo, Role, Sample
from infertap.agent.kernel import structs
from infertap.agent.testbed.peer import payload

pytestmark = [needs_root, pytest.mark.kernel]


@dataclass
class Tap:
    agent: Any
    client: Any
    server: Any
    capture: str


@pytest.fixture(scope="module")
def sk_msg_agent(sk_msg_agent_pods: tuple[Any, Any, Any]) -> Tap:
    return Tap(*sk_msg_agent_pods, "sk_msg")


@pytest.fixture(params=["skb", "sk_msg"])
def tap(request: pytest.FixtureRequest, lab: Any) -> Tap:
    if request.param == "skb":
        return Tap(request.getfixturevalue("agent"), lab.pods["client"], lab.pods["server"], "skb")
    return request.getfixturevalue("sk_msg_agent")  # type: ignore[no-any-return]


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


def test_sampled_bytes_equal_the_bytes_sent(tap: Tap) -> None:
    agent, client, server = tap.agent, tap.client, tap.server
    start_server(server, 8101)
    peer = start_client(client, server.ip, 8101)
    sizes = [(100, 1), (5000, 2), (1 << 20, 3), (17, 4)]
    sent = b""
    for n, seed in sizes:
        assert peer.cmd(f"send {n} {seed}") == f"ok {n}"
        sent += payload(n, seed)
    flow = client_flow(agent, server.ip, 8101)
    assert flow.capture == tap.capture
    rec = agent.recorder
    rec.wait_for(lambda: sum(s.msg_len for s in rec.samples_of(flow.cookie)) >= len(sent))
    samples = rec.samples_of(flow.cookie)

    # Every sample holds exactly the stream bytes at its offset, flagged truncated when cut.
    for s in samples:
        assert s.data == sent[s.offset : s.offset + len(s.data)]
        assert s.truncated == (len(s.data) < s.msg_len)
        assert len(s.data) == min(s.msg_len, 4096)
        assert s.role is Role.CLIENT
    # The messages (skbs) tile the stream with no gap: the true lengths add up to what was
    # sent. skbs may overlap where TCP retransmitted a few new bytes with old ones.
    offsets = sorted((s.offset, s.msg_len) for s in samples)
    pos = 0
    for off, length in offsets:
        assert off == pos if tap.capture == "sk_msg" else off <= pos
        pos = max(pos, off + length)
    assert pos == len(sent)
    big_send = payload(1 << 20, 3)
    if tap.capture == "sk_msg":
        # The 1 MiB send: the sample starting at its offset carries its first 4 KiB, truncated.
        big = next(s for s in samples if s.offset == 5100)
        assert big.truncated and big.data == big_send[:4096]
    else:
        # The 1 MiB send went out as many skbs (at most 64 KiB each), each sampled at its
        # true offset and cut to 4 KiB.
        inside = [s for s in samples if 5100 <= s.offset < 5100 + len(big_send)]
        assert len(inside) >= 16 and all(s.truncated for s in inside if s.msg_len > 4096)
    peer.close()


def test_kernel_counters_match_what_was_sent(tap: Tap) -> None:
    agent, client, server = tap.agent, tap.client, tap.server
    start_server(server, 8102)
    peer = start_client(client, server.ip, 8102)
    for i in range(10):
        assert peer.cmd(f"send 1000 {i}") == "ok 1000"
    flow = client_flow(agent, server.ip, 8102)
    agent.recorder.wait_for(
        lambda: sum(s.msg_len for s in agent.recorder.samples_of(flow.cookie)) >= 10000
    )
    now = next(f for f in agent.flows() if f.cookie == flow.cookie)
    # sk_msg counts sends; skb capture counts skbs (TCP may pack two sends into one).
    messages = (10, 10) if tap.capture == "sk_msg" else (1, 10)
    assert messages[0] <= now.messages <= messages[1]
    assert (now.bytes, now.drops, now.stream_bytes) == (10000, 0, 10000)
    assert now.cgroup_id == client.cgroup_id  # the pod's cgroup, not the softirq's
    peer.close()
    end = agent.recorder.wait_for(lambda: agent.recorder.end_of(flow.cookie))
    assert (end.flow.messages, end.flow.bytes, end.flow.stream_bytes) == (
        now.messages,
        10000,
        10000,
    )
    assert not any(f.cookie == flow.cookie for f in agent.flows())  # removed on close


def test_nonblocking_sender_bytes_the_kernel_skips_are_an_exact_gap(tap: Tap) -> None:
    """A non-blocking send that cannot push a whole message makes the kernel keep its verdict
    and send the retried bytes without running sk_msg; offsets must stay true anyway. skb
    capture sees every byte that leaves, so there it has no gap at all."""
    agent, client, server = tap.agent, tap.client, tap.server
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
    if tap.capture == "skb":
        assert (end.flow.bytes, end.flow.unseen_bytes) == (len(sent), 0)


def test_block_gives_eacces_and_unblock_reopens_the_same_connection(tap: Tap) -> None:
    agent, client, server = tap.agent, tap.client, tap.server
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


def test_block_one_flow_leaves_other_flows_to_the_same_service_alone(tap: Tap) -> None:
    agent, client, server = tap.agent, tap.client, tap.server
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


def test_ipv4_ports_and_addresses_decode_as_the_sockets_see_them(tap: Tap) -> None:
    agent, client, server = tap.agent, tap.client, tap.server
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


def test_sample_size_classes_cover_the_configured_limit(tap: Tap) -> None:
    agent, client, server = tap.agent, tap.client, tap.server
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


def test_a_service_verdict_reaches_open_connections_before_the_block_call_returns(
    tap: Tap,
) -> None:
    """skb capture keeps sockets out of the sockhash (native speed) until a verdict needs
    sk_msg on them: then they join it, so the very next send fails with EACCES; a connection
    opened under the verdict joins at establishment; unblocking takes them all out again, on
    the same connections. sk_msg capture keeps every socket in the sockhash throughout."""
    agent, client, server = tap.agent, tap.client, tap.server
    skb = tap.capture == "skb"
    port = 8108
    start_server(server, port, echo=True)
    peers = [start_client(client, server.ip, port) for _ in range(3)]
    for p in peers:
        assert p.cmd("send 100 1") == "ok 100" and p.cmd("recv 100") == "ok 100"

    def flows_of_service(n: int) -> list[FlowInfo]:
        return agent.recorder.wait_for(  # type: ignore[no-any-return]
            lambda: (
                fs if len(fs := [f for f in agent.flows() if f.service.port == port]) == n else None
            )
        )

    flows = flows_of_service(6)  # three connections, both ends
    assert all(f.capture == tap.capture and f.sockhash_always != skb for f in flows)
    assert all(agent.sensor.in_sockhash(f) != skb for f in flows)

    svc = Endpoint(server.ip, port)
    assert agent.verdicts.block_service(svc, "test") is not None
    # No waiting: block_service returned after the open sockets joined the sockhash.
    for p in peers:
        assert p.cmd("send 100 2") == "err EACCES"
    assert all(agent.sensor.in_sockhash(f) for f in flows)
    late = start_client(client, server.ip, port)
    assert late.cmd("send 100 3") == "err EACCES"  # refused on its first send

    assert agent.verdicts.unblock_service(svc) is not None
    for p in [*peers, late]:
        assert p.cmd("send 100 4") == "ok 100" and p.cmd("recv 100") == "ok 100"
    flows = flows_of_service(8)
    assert all(agent.sensor.in_sockhash(f) != skb for f in flows)
    # Sampling carried on across the block: the bytes sent after it, at their true offset
    # (100 after the first send on the old connections, 0 on the late one).
    rec = agent.recorder
    for f in flows:
        if f.role is not Role.CLIENT:
            continue
        at = 0 if f.stream_bytes == 100 else 100
        got = rec.wait_for(
            lambda f=f, at=at: next(
                (s for s in rec.samples_of(f.cookie) if s.offset == at and s.msg_len == 100), None
            )
        )
        assert got.data == payload(100, 4)
    for p in [*peers, late]:
        p.close()


def test_skb_capture_keeps_offsets_exact_through_retransmits(agent: Any, lab: Any) -> None:
    """A token bucket on the client pod's interface drops what overflows it, after the egress
    hook saw it: TCP retransmits those bytes, the kernel skips skbs it has seen whole, and
    every sample still holds the bytes at its offset, with no byte counted twice or missed."""
    client, server = lab.pods["client"], lab.pods["server"]
    port = 8109
    start_server(server, port)
    peer = start_client(client, server.ip, port)
    shaper = ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "100mbit"]
    done = client.run([*shaper, "burst", "16kb", "limit", "24kb"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    try:
        before = agent.sensor.stats()["retransmits"]
        sent = b""
        for seed in range(4):
            assert peer.cmd(f"send {1 << 20} {seed}") == f"ok {1 << 20}"
            sent += payload(1 << 20, seed)
        flow = client_flow(agent, server.ip, port)
        peer.close()
        end = agent.recorder.wait_for(lambda: agent.recorder.end_of(flow.cookie), timeout=30)
    finally:
        client.run(["tc", "qdisc", "del", "dev", "eth0", "root"], capture_output=True)
    assert agent.sensor.stats()["retransmits"] > before  # TCP did retransmit
    assert (end.flow.stream_bytes, end.flow.bytes, end.flow.unseen_bytes) == (
        len(sent),
        len(sent),
        0,
    )
    samples = agent.recorder.samples_of(flow.cookie)
    pos = 0
    for s in sorted(samples, key=lambda s: s.offset):
        assert s.data == sent[s.offset : s.offset + len(s.data)]
        assert s.offset <= pos
        pos = max(pos, s.end)
    assert pos == len(sent)
