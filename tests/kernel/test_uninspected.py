"""Traffic infertap cannot see is counted: a connection a pod opened before the agent started is
never intercepted (sockops sees sockets at establishment), and is reported as not inspected in
`infertap flows`, `infertap status`, the `infertap_connections_uninspected` gauge and an event.
A separate agent is started for this (the shared one attached long before the connection)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support import INFERTAP, needs_root, start_client, start_server

pytestmark = [needs_root, pytest.mark.kernel]

PORT = 8501


def cli_json(api: str, *command: str) -> dict[str, Any]:
    out = subprocess.run(
        [*INFERTAP, *command, "--json", "--api", api], capture_output=True, text=True, check=True
    ).stdout
    return dict(json.loads(out))


def gauge(agent: Any, reason: str = "pre_existing") -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics.port}/metrics").read().decode()
    for line in body.splitlines():
        if line.startswith(f'infertap_connections_uninspected{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no infertap_connections_uninspected series")


def test_connection_opened_before_the_agent_is_reported_not_inspected(
    lab: Any, tmp_path: Path
) -> None:
    from infertap.agent.runtime import Agent, AgentOptions

    client, server = lab.add_pod("pe-client"), lab.add_pod("pe-server")
    start_server(server, PORT, echo=True)
    old = start_client(client, server.ip, PORT)  # before any agent watches these pods
    assert old.cmd("send 100 1") == "ok 100" and old.cmd("recv 100") == "ok 100"

    api = f"unix:{tmp_path}/api.sock"
    agent = Agent(
        AgentOptions(
            cgroups=(str(client.cgroup), str(server.cgroup)),
            metrics_addr="127.0.0.1:0",
            api_addr=api,
        )
    )
    events = agent.events.subscribe(frozenset({"uninspected"}))  # before start: see them all
    agent.start()
    try:
        # Traffic on the old connection after the start: still not intercepted.
        assert old.cmd("send 200 2") == "ok 200" and old.cmd("recv 200") == "ok 200"
        fresh = start_client(client, server.ip, PORT)
        assert fresh.cmd("send 10 3") == "ok 10" and fresh.cmd("recv 10") == "ok 10"

        flows = [
            f
            for f in cli_json(api, "flows")["flows"]
            if PORT in (f["local"]["port"], f["remote"]["port"])
        ]
        marked = [f for f in flows if f["uninspected"] == "pre_existing"]
        # The new connection is intercepted (kernel counters), but its bytes are the peer's
        # random payload, not HTTP: marked too, for that reason.
        intercepted = [f for f in flows if f["uninspected"] == "not_http"]
        # Both ends of the old connection, marked; both ends of the new one, intercepted.
        assert {f["role"] for f in marked} == {"client", "server"}, flows
        assert {f["role"] for f in intercepted} == {"client", "server"}, flows
        assert all(int(f["messages"]) >= 1 for f in intercepted)
        old_ports = {f["local"]["port"] for f in marked if f["role"] == "client"}
        new_ports = {f["local"]["port"] for f in intercepted if f["role"] == "client"}
        assert old_ports.isdisjoint(new_ports)
        assert all(int(f["id"]) > 0 and f["cgroup"] for f in marked)  # socket cookie, pod cgroup
        assert all(int(f["messages"]) == 0 for f in marked)  # the kernel never counted them

        status = cli_json(api, "status")
        assert status["connections_uninspected"] == {"pre_existing": "2", "not_http": "1"}
        assert gauge(agent) == 2 and gauge(agent, "not_http") == 1
        seen = [events.get(timeout=1.0) for _ in range(2)]
        assert all(e is not None and e.data["reason"] == "pre_existing" for e in seen), seen
        assert {e.data["role"] for e in seen if e is not None} == {"client", "server"}

        # Closed: no longer reported.
        old.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and gauge(agent) != 0:
            time.sleep(0.2)
        assert gauge(agent) == 0
        left = [f["uninspected"] for f in cli_json(api, "flows")["flows"] if f["uninspected"]]
        assert "pre_existing" not in left
        fresh.close()
    finally:
        events.close()
        agent.stop()
