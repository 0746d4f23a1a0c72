"""Same-node acceleration: sends go straight to the intercepted peer socket (sk_msg redirect),
bypassing TCP, and the application sees exactly the same bytes as without it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import needs_root, start_client, start_server

from infertap.agent.flows.records import Role
from infertap.agent.testbed.peer import payload

pytestmark = [needs_root, pytest.mark.kernel]

WORKLOAD = [(1, 1), (100, 2), (5000, 3), (70000, 4), (1 << 20, 5), (3, 6)]


def echo_round_trips(client: Any, server: Any, port: int) -> list[str]:
    start_server(server, port, echo=True)
    peer = start_client(client, server.ip, port)
    results = []
    for n, seed in WORKLOAD:
        results.append(peer.cmd(f"send {n} {seed}"))
        results.append(peer.cmd(f"expect {n} {seed}"))
    peer.close()
    return results


@pytest.mark.parametrize("accelerate", [True, False])
def test_acceleration_on_and_off_give_identical_results(
    lab: Any, tmp_path: Path, accelerate: bool, make_agent: Callable[..., Any]
) -> None:
    name = "ac" if accelerate else "plain"
    client, server = lab.add_pod(f"{name}-c"), lab.add_pod(f"{name}-s")
    agent = make_agent(
        cgroups=(str(client.cgroup), str(server.cgroup)),
        accelerate=accelerate,
    )
    samples, ends = agent.recorder.samples, agent.recorder.ends
    try:
        results = echo_round_trips(client, server, 8501)
        stats = agent.sensor.stats()
        time.sleep(0.5)  # the flow-end records of the closed connection
    finally:
        agent.stop()
    expected = [f"ok {n}" for n, _ in WORKLOAD for _ in (0, 1)]
    assert results == expected
    if accelerate:
        assert stats["redirected"] >= 2 * len(WORKLOAD) and stats["redirect_missed"] == 0
    else:
        assert stats["redirected"] == 0
    # Sampling is the same either way: every sample holds the sent bytes at its offset.
    sent = b"".join(payload(n, seed) for n, seed in WORKLOAD)
    client_samples = [s for s in samples if s.role is Role.CLIENT]
    assert client_samples
    for s in client_samples:
        assert s.data == sent[s.offset : s.offset + len(s.data)]
    assert sum(s.msg_len for s in client_samples) == len(sent)
    mine = [e.flow for e in ends if 8501 in (e.flow.local.port, e.flow.remote.port)]
    assert {f.role for f in mine} == {Role.CLIENT, Role.SERVER}
    assert all(f.accelerated is accelerate for f in mine)
