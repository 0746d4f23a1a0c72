"""Overload shedding over real interception: the kernel skips whole requests (HTTP/1 keep-alive)
or whole connections (gRPC), every call decoded is whole and paired with its own response, what
was skipped is counted, nothing counts as a loss, and sampling resumes when the level drops.

Real clients (httpx, tritonclient.grpc) in the client pod, the V2 test server in the server pod,
both intercepted by the shared agent. The level is set by hand (the controller held, so the read
loop's fill readings do not undo it) and through the controller's own logic.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support import needs_root, repo_root

from infertap.agent.flows.records import Role
from infertap.agent.pipeline import SKIP_OVERLOAD, SKIP_OVERLOAD_CONNECTION
from infertap.agent.testbed.v2server import start_in_pod

pytestmark = [needs_root, pytest.mark.kernel]

HTTP_PORT = 8600
GRPC_PORT = 8601


@dataclass
class Tap:
    """An agent and two pods it intercepts, the V2 test server running in `server`."""

    agent: Any
    client: Any
    server: Any


@pytest.fixture(scope="module")
def skb_tap(lab: Any) -> Tap:
    start_in_pod(lab.pods["server"], HTTP_PORT, GRPC_PORT)
    return Tap(None, lab.pods["client"], lab.pods["server"])  # the shared agent: per test


@pytest.fixture(scope="module")
def sk_msg_tap(sk_msg_agent_pods: tuple[Any, Any, Any]) -> Tap:
    agent, client, server = sk_msg_agent_pods
    start_in_pod(server, HTTP_PORT, GRPC_PORT)
    return Tap(agent, client, server)


@pytest.fixture(params=["skb", "sk_msg"])
def tap(request: pytest.FixtureRequest) -> Iterator[Tap]:
    """Both capture modes; the agent's shed controller held (levels only change by hand)."""
    if request.param == "skb":
        base = request.getfixturevalue("skb_tap")
        t = Tap(request.getfixturevalue("agent"), base.client, base.server)
    else:
        t = request.getfixturevalue("sk_msg_tap")
    ctl = t.agent.shedding
    ctl.hold = True
    yield t
    ctl.set_level(0)
    ctl.hold = False


class Client:
    """One of the batch client scripts, running in the client pod."""

    def __init__(self, pod: Any, script: str, host: str, port: int) -> None:
        path = str(repo_root() / "tests" / script)
        self.proc: subprocess.Popen[str] = pod.popen(
            [sys.executable, path, host, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def batch(self, line: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        assert reply.startswith("ok"), f"client failed: {reply!r}"

    def quit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        assert self.proc.wait(timeout=30) == 0


def x_of(event: Any) -> int | None:
    x = event.inputs.get("x")
    return int(x.ravel()[0]) if x is not None and x.size == 1 else None


def echo_calls(agent: Any, protocol: str, lo: int, hi: int) -> list[Any]:
    events = list(agent.recorder.inferences)  # a copy: the reader appends (wait_for holds lock)
    return [
        e
        for e in events
        if e.model == "echo" and e.protocol == protocol and lo <= (x_of(e) or -1) < hi
    ]


def skipped(agent: Any, reason: str) -> int:
    return sum(n for (_m, r), n in agent.pipeline.snapshot().skipped.items() if r == reason)


def skipped_above(agent: Any, reason: str, count: int, timeout: float = 10.0) -> int:
    """The skipped count once it is above `count`: the kernel's SHED records reach the reader
    within its poll interval after the client's last call, not at once. Polled without the
    recorder's lock (snapshot() takes the pipeline's, which the reader holds while it records)."""
    deadline = time.monotonic() + timeout
    while (n := skipped(agent, reason)) <= count and time.monotonic() < deadline:
        time.sleep(0.02)
    return n


def assert_whole_and_paired(calls: list[Any]) -> None:
    """Each decoded call complete, answered, and answered with its own input (echo)."""
    for e in calls:
        assert e.status == "ok", (e.status, e.error)
        assert not e.request_truncated and not e.response_truncated
        out = e.outputs.get("x")
        assert out is not None and int(out.ravel()[0]) == x_of(e), "paired with another response"


def test_http1_keepalive_sheds_whole_requests_and_resumes(tap: Tap) -> None:
    agent, held = tap.agent, tap.agent.shedding
    losses = agent.pipeline.decoder.losses.counts()
    lost_before = agent.sensor.stats()["samples_lost"]
    skipped_before = skipped(agent, SKIP_OVERLOAD)
    unmatched = agent.pipeline.decoder.stats.get("responses_unmatched", 0)  # earlier tests'

    client = Client(tap.client, "shed_http1_client.py", tap.server.ip, HTTP_PORT)

    held.set_level(50)
    assert agent.sensor.shed_levels() == [50]
    client.batch(f"80 {700_000}")  # 80 calls, x = 700000..700079, one keep-alive connection
    held.set_level(0)
    client.batch(f"20 {700_100}")  # the level dropped: every new request is sampled again
    client.quit()

    rec = agent.recorder
    resumed = rec.wait_for(
        lambda: r if len(r := echo_calls(agent, "kserve-v2-rest", 700_100, 700_120)) == 20 else None
    )
    shed_phase = echo_calls(agent, "kserve-v2-rest", 700_000, 700_080)
    n_skipped = skipped(agent, SKIP_OVERLOAD) - skipped_before
    assert 0 < len(shed_phase) < 80, "a level of 50 should shed some requests, not all"
    assert len(shed_phase) + n_skipped == 80, (len(shed_phase), n_skipped)
    assert len({x_of(e) for e in shed_phase}) == len(shed_phase)  # each call decoded once
    assert_whole_and_paired(shed_phase + resumed)

    # Both ends shed the same requests (the response follows its request), counted per flow.
    def ends() -> list[Any]:
        return [
            e.flow
            for e in rec.ends
            if HTTP_PORT in (e.flow.local.port, e.flow.remote.port) and e.flow.requests_shed
        ]

    flows = rec.wait_for(lambda: f if len(f := ends()) == 2 else None)
    by_role = {f.role: f for f in flows}
    assert by_role[Role.CLIENT].requests_shed == n_skipped
    assert by_role[Role.SERVER].requests_shed == n_skipped
    # On purpose, so not a loss: no decode loss, no sample lost in the kernel.
    assert agent.pipeline.decoder.losses.counts() == losses
    assert agent.sensor.stats()["samples_lost"] == lost_before
    assert agent.pipeline.decoder.stats.get("responses_unmatched", 0) == unmatched


def test_grpc_connections_are_shed_whole_or_decoded_whole(tap: Tap) -> None:
    agent, held = tap.agent, tap.agent.shedding
    losses = agent.pipeline.decoder.losses.counts()
    skipped_before = skipped(agent, SKIP_OVERLOAD_CONNECTION)
    uninspected_before = agent.uninspected_counts()
    client = Client(tap.client, "shed_grpc_client.py", tap.server.ip, GRPC_PORT)

    held.set_level(50)
    client.batch(f"12 5 {800_000}")  # 12 connections, 5 calls each: x = 800000..800059
    held.set_level(0)
    client.batch(f"2 5 {800_100}")  # new connections after the level dropped: all decoded
    client.quit()

    rec = agent.recorder
    resumed = rec.wait_for(
        lambda: r if len(r := echo_calls(agent, "kserve-v2-grpc", 800_100, 800_110)) == 10 else None
    )
    # Every flow of the 14 connections has ended (each client closes its channel).
    rec.wait_for(
        lambda: sum(1 for e in rec.ends if e.flow.remote.port == GRPC_PORT) >= 14, timeout=20
    )
    shed_phase = echo_calls(agent, "kserve-v2-grpc", 800_000, 800_060)
    per_conn: dict[int, int] = {}
    for e in shed_phase:
        x = x_of(e)
        assert x is not None
        per_conn[(x - 800_000) // 5] = per_conn.get((x - 800_000) // 5, 0) + 1
    # A connection is decoded whole or not at all: never torn.
    assert all(n == 5 for n in per_conn.values()), per_conn
    n_shed = skipped(agent, SKIP_OVERLOAD_CONNECTION) - skipped_before
    assert 0 < len(per_conn) < 12 and len(per_conn) + n_shed == 12, (per_conn, n_shed)
    assert_whole_and_paired(shed_phase + resumed)
    # Both ends of a shed connection agree: the kernel skipped the server's end too.
    shed_flows = [e.flow for e in rec.ends if GRPC_PORT in (e.flow.local.port, e.flow.remote.port)]
    shed_by_role = {
        role: sum(1 for f in shed_flows if f.role is role and f.requests_shed)
        for role in (Role.CLIENT, Role.SERVER)
    }
    assert shed_by_role == {Role.CLIENT: n_shed, Role.SERVER: n_shed}
    # No HPACK state lost, nothing "mid_stream", nothing counted as not inspected.
    assert agent.pipeline.decoder.losses.counts() == losses
    assert agent.uninspected_counts() == uninspected_before


def test_the_controller_raises_the_level_on_a_full_ring_and_lowers_it_after(
    agent: Any, skb_tap: Tap
) -> None:
    """The controller's own logic drives the kernel's map: a near-full ring sheds, a drained one
    brings the level back down step by step, and traffic follows it."""
    held = agent.shedding
    held.hold = True
    try:
        controlled(agent, held, skb_tap)
    finally:
        held.set_level(0)
        held.hold = False


def controlled(agent: Any, held: Any, tap: Tap) -> None:
    skipped_before = skipped(agent, SKIP_OVERLOAD)
    assert held.observe(0.9) == held.thresholds.panic_level  # about to overflow: jump
    assert agent.sensor.shed_levels() == [held.thresholds.panic_level]
    client = Client(tap.client, "shed_http1_client.py", tap.server.ip, HTTP_PORT)
    client.batch(f"40 {710_000}")
    assert skipped_above(agent, SKIP_OVERLOAD, skipped_before) > skipped_before
    assert held.observe(0.3) == held.thresholds.panic_level  # between the thresholds: holds
    while held.observe(0.0):
        pass
    assert agent.sensor.shed_levels() == [0]
    client.batch(f"20 {710_100}")
    client.quit()
    resumed = agent.recorder.wait_for(
        lambda: r if len(r := echo_calls(agent, "kserve-v2-rest", 710_100, 710_120)) == 20 else None
    )
    assert_whole_and_paired(resumed + echo_calls(agent, "kserve-v2-rest", 710_000, 710_040))
