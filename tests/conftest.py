"""Shared fixtures. Kernel tests share one lab (two pods) and one loaded agent per session:
a BCC compile costs about a second and the suite should stay well under ten minutes."""

from __future__ import annotations

import os

# grpc's fork handlers print warnings when tests start pod processes while the API serves.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import IS_ROOT, start_recorded_agent


def pytest_configure(config: pytest.Config) -> None:
    if IS_ROOT and shutil.which("ip"):
        from infertap.agent.testbed.lab import cleanup_stale_labs

        cleanup_stale_labs()  # pods a killed earlier run left behind


@pytest.fixture(scope="session")
def lab() -> Iterator[Any]:
    if not IS_ROOT:
        pytest.skip("kernel tests need root (CI runs as root)")
    from infertap.agent.testbed.lab import Lab

    with Lab() as lab:
        lab.add_pod("client")
        lab.add_pod("server")
        yield lab


@pytest.fixture(scope="session")
def agent(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from infertap.agent.runtime import AgentOptions

    # The instance registry stays the node-wide default (/run/infertap): every agent on a node
    # must see every other, or one's start-up sweep would remove another's programs.
    api_dir = tmp_path_factory.mktemp("agent-api")
    a = start_recorded_agent(
        AgentOptions(
            cgroups=(str(lab.pods["client"].cgroup), str(lab.pods["server"].cgroup)),
            metrics_addr="127.0.0.1:0",
            api_addr=f"unix:{api_dir}/api.sock",
        )
    )
    yield a
    a.stop()


@pytest.fixture(scope="session")
def sk_msg_agent_pods(lab: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(agent, client pod, server pod): one agent with sk_msg capture on a pair of pods of its
    own, shared by the kernel tests that run both capture modes (the skb side is `agent`)."""
    from infertap.agent.runtime import AgentOptions

    client, server = lab.add_pod("skmsg-c"), lab.add_pod("skmsg-s")
    a = start_recorded_agent(
        AgentOptions(
            cgroups=(str(client.cgroup), str(server.cgroup)),
            metrics_addr=None,
            api_addr=None,
            capture="sk_msg",
        )
    )
    yield a, client, server
    a.stop()


@pytest.fixture
def make_agent(lab: Any) -> Iterator[Callable[..., Any]]:
    """For tests that need an agent of their own (options the shared one does not have):
    make_agent(**AgentOptions fields) starts an Agent with a Recorder as `agent.recorder`,
    metrics and API off unless given. Every agent made is stopped after the test (stop() is
    safe to call again, so a test may stop it earlier to read what it left)."""
    from infertap.agent.runtime import AgentOptions

    made: list[Any] = []

    def make(**options: Any) -> Any:
        options.setdefault("metrics_addr", None)
        options.setdefault("api_addr", None)
        a = start_recorded_agent(AgentOptions(**options))
        made.append(a)
        return a

    yield make
    for a in reversed(made):
        a.stop()
