"""Several ring buffers (one per inspection worker) against the real kernel: every record of a
flow goes to the ring its flow names, both ends of a connection name the same ring (the hash of
bpf/intercept.c ring_for, mirrored in agent/kernel/rings.py), and connections spread over the
rings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from support import needs_root, start_client, start_server

from infertap.agent.flows.records import FlowCgroup, FlowEnd, FlowStart, Role, Sample
from infertap.agent.kernel import rings
from infertap.agent.kernel.decode import decode_record
from infertap.agent.kernel.ringbuf import RingReader
from infertap.agent.kernel.sensor import Sensor, SensorOptions

pytestmark = [needs_root, pytest.mark.kernel]

PORT = 8191


@pytest.fixture(scope="module")
def two_rings(lab: Any) -> Iterator[tuple[Sensor, Any, Any]]:
    client, server = lab.add_pod("rings-c"), lab.add_pod("rings-s")
    sensor = Sensor(SensorOptions(n_rings=2, ring_pages=256))
    sensor.start()
    try:
        sensor.attach(client.cgroup)
        sensor.attach(server.cgroup)
        yield sensor, client, server
    finally:
        sensor.close()


def read_ring(reader: RingReader) -> list[Any]:
    out: list[Any] = []
    reader.drain(lambda view: out.append(decode_record(view)))
    return out


def test_each_flow_goes_to_one_ring_shared_by_both_ends(two_rings: tuple[Sensor, Any, Any]) -> None:
    sensor, client, server = two_rings
    assert len(sensor.ring_fds) == 2
    readers = [RingReader(fd, sensor.ring_size) for fd in sensor.ring_fds]
    srv = start_server(server, PORT, echo=True)
    try:
        peers = []
        # Enough connections that both rings get some (each lands on one of 2: 12 all on the
        # same ring has odds 1 in 2048; the hash is fixed, so the run is repeatable per port).
        for _ in range(12):
            peer = start_client(client, server.ip, PORT)
            assert peer.cmd("send 300 1") == "ok 300"
            peers.append(peer)
        flows = [f for f in sensor.flows() if PORT in (f.local.port, f.remote.port)]
        assert len(flows) == 24  # a client and a server flow per connection
        ring_of = {f.cookie: f.ring for f in flows}
        for f in flows:
            assert f.ring == rings.ring_for(
                (f.local.ip, f.local.port), (f.remote.ip, f.remote.port), 2
            )
        by_conn: dict[tuple[Any, ...], set[int]] = {}
        for f in flows:
            key = tuple(sorted([(f.local.ip, f.local.port), (f.remote.ip, f.remote.port)]))
            by_conn.setdefault(key, set()).add(f.ring)
        assert len(by_conn) == 12 and all(len(r) == 1 for r in by_conn.values())
        assert {f.ring for f in flows} == {0, 1}
        for peer in peers:
            peer.close()
        seen: dict[int, set[type]] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until every flow's end record is in (server ends
            for index, reader in enumerate(readers):  # close after their clients)
                for rec in read_ring(reader):
                    cookie = rec.cookie if isinstance(rec, Sample) else rec.flow.cookie
                    if cookie not in ring_of:
                        continue  # another test's traffic
                    assert ring_of[cookie] == index, f"flow {cookie} record in ring {index}"
                    seen.setdefault(cookie, set()).add(type(rec))
            if len(seen) == len(ring_of) and all(FlowEnd in k for k in seen.values()):
                break
            time.sleep(0.05)
        # Every kind of record followed its flow: start, cgroup, samples (both ways: echo), end.
        assert set(seen) == set(ring_of)
        for cookie, kinds in seen.items():
            assert kinds == {FlowStart, FlowCgroup, Sample, FlowEnd}, (cookie, kinds)
        clients = [f for f in flows if f.role is Role.CLIENT]
        assert len(clients) == 12
    finally:
        srv.kill()
        srv.wait()
        for reader in readers:
            reader.close()
