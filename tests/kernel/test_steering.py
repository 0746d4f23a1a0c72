"""Steering against the real kernel: weighted routing at connect() between real pods, live route
changes, SO_ORIGINAL_DST, no iptables, a clean detach. These tests make their own pods and their
own Steering unit; the shared session agent is not touched."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import iptables_tables, needs_root

from infertap.agent.flows.records import Endpoint
from infertap.agent.kernel.steering import Backend, Route, Steering, SteeringError

pytestmark = [needs_root, pytest.mark.kernel]

VIP_PORT = 80

# Each backend answers every connection with its one-byte id, then closes.
SERVER = r"""
import socket, sys
port, ident = int(sys.argv[1]), sys.argv[2].encode()
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen(1024)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    try:
        conn.sendall(ident)
    except OSError:
        pass
    conn.close()
"""

# Connects N times to HOST:PORT and counts the backend ids it reads. With --v6, the sockets are
# AF_INET6 and HOST is written IPv4-mapped (a dual-stack client reaching an IPv4 service).
CLIENT = r"""
import json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
v6 = "--v6" in sys.argv[4:]
counts, errors = {}, {}
for _ in range(n):
    try:
        if v6:
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(("::ffff:" + host, port))
        else:
            s = socket.create_connection((host, port), timeout=5)
        with s:
            ident = s.recv(1).decode() or "eof"
    except OSError as exc:
        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        continue
    counts[ident] = counts.get(ident, 0) + 1
print(json.dumps({"counts": counts, "errors": errors}))
"""

# One connection; prints the peer address and what getsockopt(SO_ORIGINAL_DST) answers.
ORIG_DST = r"""
import json, socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
v6 = "--v6" in sys.argv[3:]
if v6:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.connect(("::ffff:" + host, port))
else:
    s = socket.create_connection((host, port), timeout=5)
out = {"peer": list(s.getpeername()[:2]), "ident": s.recv(1).decode()}
for name, level, size in (("ip", socket.SOL_IP, 16), ("ip6", socket.IPPROTO_IPV6, 28)):
    try:
        raw = s.getsockopt(level, 80, size)
    except OSError as exc:
        out[name] = {"errno": exc.errno}
        continue
    family = struct.unpack_from("=H", raw)[0]
    dport = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        addr = socket.inet_ntop(socket.AF_INET, raw[4:8])
    else:
        addr = socket.inet_ntop(socket.AF_INET6, raw[8:24])
    out[name] = {"family": family, "addr": addr, "port": dport, "len": len(raw)}
s.close()
print(json.dumps(out))
"""


def attached(cgroup: Path) -> list[dict[str, Any]]:
    """infertap programs attached to a cgroup, as the kernel reports them through bpftool."""
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True, check=True
    ).stdout
    return [p for p in json.loads(out.strip() or "[]") if p.get("name", "").startswith("itap_")]


def run_client(pod: Any, host: str, port: int, n: int, v6: bool = False) -> dict[str, Any]:
    argv = [sys.executable, "-c", CLIENT, host, str(port), str(n), *(["--v6"] if v6 else [])]
    done = pod.run(argv, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def orig_dst(pod: Any, host: str, port: int, v6: bool = False) -> dict[str, Any]:
    argv = [sys.executable, "-c", ORIG_DST, host, str(port), *(["--v6"] if v6 else [])]
    done = pod.run(argv, timeout=30, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def start_backend(pod: Any, port: int, ident: str) -> None:
    proc: subprocess.Popen[str] = pod.popen(
        [sys.executable, "-c", SERVER, str(port), ident], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"


def within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """`count` successes out of `n` agree with probability `p` (binomial, normal bound)."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


class Setup:
    def __init__(self, lab: Any) -> None:
        self.client = lab.add_pod("st-client")
        self.v1 = lab.add_pod("st-v1")
        self.v2 = lab.add_pod("st-v2")
        self.vip = f"{lab.subnet}.200"  # an address no pod has
        assert all(p.ip != self.vip for p in lab.pods.values())
        self.b1 = Endpoint(self.v1.ip, 8000)
        self.b2 = Endpoint(self.v2.ip, 8001)  # another port: the port is rewritten too
        self.service = Endpoint(self.vip, VIP_PORT)
        self.pods = (self.client, self.v1, self.v2)
        self.iptables_before = {p.name: iptables_tables(p.netns) for p in self.pods}
        self.iptables_before["host"] = iptables_tables(None)
        start_backend(self.v1, self.b1.port, "1")
        start_backend(self.v2, self.b2.port, "2")

    def route(self, w1: int, w2: int) -> Route:
        return Route(self.service, (Backend(self.b1, w1), Backend(self.b2, w2)))


@pytest.fixture(scope="module")
def setup(lab: Any) -> Setup:
    return Setup(lab)


@pytest.fixture(scope="module")
def steering(setup: Setup) -> Iterator[Steering]:
    with Steering() as s:
        s.attach(setup.client.cgroup)
        yield s


def test_split_follows_the_weights(setup: Setup, steering: Steering) -> None:
    steering.set_routes([setup.route(90, 10)])
    n = 2000
    got = run_client(setup.client, setup.vip, VIP_PORT, n)
    assert got["errors"] == {}
    counts = got["counts"]
    assert set(counts) <= {"1", "2"} and sum(counts.values()) == n
    print(f"\n90/10 split over {n} connections: v1 {counts.get('1', 0)}, v2 {counts.get('2', 0)}")
    assert within(counts.get("2", 0), n, 0.10), counts
    # The kernel's counters saw exactly the connections the client made.
    stats = steering.stats()[setup.service]
    assert stats == {setup.b1: counts.get("1", 0), setup.b2: counts.get("2", 0)}
    c = steering.counters()
    assert c["rewritten"] >= n and c["no_storage"] == 0 and c["bad_route"] == 0


def test_routes_change_live(setup: Setup, steering: Steering) -> None:
    steering.set_routes([setup.route(90, 10)])
    before = steering.stats()[setup.service]
    # Same backends, new weights: new connections follow at once, counters carry on.
    steering.set_routes([setup.route(10, 90)])
    n = 1000
    counts = run_client(setup.client, setup.vip, VIP_PORT, n)["counts"]
    print(f"\n10/90 split over {n} connections: v1 {counts.get('1', 0)}, v2 {counts.get('2', 0)}")
    assert within(counts.get("1", 0), n, 0.10), counts
    after = steering.stats()[setup.service]
    assert after[setup.b1] - before[setup.b1] == counts.get("1", 0)
    assert after[setup.b2] - before[setup.b2] == counts.get("2", 0)

    # A route with other backends: everything to v2, counted from zero.
    steering.set_routes([Route(setup.service, (Backend(setup.b2, 1),))])
    assert steering.stats()[setup.service] == {setup.b2: 0}
    counts = run_client(setup.client, setup.vip, VIP_PORT, 200)["counts"]
    assert counts == {"2": 200}
    assert steering.stats()[setup.service] == {setup.b2: 200}

    # No route: the connect is left alone and goes to the VIP, which nobody answers.
    steering.set_routes([])
    assert steering.stats() == {} and steering.routes() == []
    got = run_client(setup.client, setup.vip, VIP_PORT, 1)
    assert got["counts"] == {} and sum(got["errors"].values()) == 1
    # ... while the backends themselves are reachable as usual.
    assert run_client(setup.client, setup.v1.ip, setup.b1.port, 5)["counts"] == {"1": 5}


def test_dual_stack_socket_to_an_ipv4_mapped_vip_is_steered(
    setup: Setup, steering: Steering
) -> None:
    steering.set_routes([setup.route(50, 50)])
    got = run_client(setup.client, setup.vip, VIP_PORT, 400, v6=True)
    assert got["errors"] == {}
    assert within(got["counts"].get("1", 0), 400, 0.5), got


def test_so_original_dst_answers_the_vip(setup: Setup, steering: Steering) -> None:
    steering.set_routes([Route(setup.service, (Backend(setup.b2, 1),))])
    got = orig_dst(setup.client, setup.vip, VIP_PORT)
    # The socket is connected to the backend ...
    assert got["ident"] == "2" and got["peer"] == [setup.b2.ip, setup.b2.port]
    # ... and SO_ORIGINAL_DST gives the address the application asked for.
    assert got["ip"] == {"family": 2, "addr": setup.vip, "port": VIP_PORT, "len": 16}
    # An IPv4 socket has no IPv6 original destination: the kernel's answer stands.
    assert "errno" in got["ip6"]

    # A dual-stack socket: SOL_IP gives the IPv4 address, SOL_IPV6 the IPv4-mapped one.
    got = orig_dst(setup.client, setup.vip, VIP_PORT, v6=True)
    assert got["ident"] == "2"
    assert got["ip"] == {"family": 2, "addr": setup.vip, "port": VIP_PORT, "len": 16}
    assert got["ip6"] == {"family": 10, "addr": f"::ffff:{setup.vip}", "port": VIP_PORT, "len": 28}

    # A connection that was not rewritten: the kernel's own answer (an error here), unchanged.
    got = orig_dst(setup.client, setup.v1.ip, setup.b1.port)
    assert got["ident"] == "1" and "errno" in got["ip"]
    assert steering.counters()["orig_dst"] >= 3


def test_bad_routes_are_refused_and_change_nothing(setup: Setup, steering: Steering) -> None:
    good = setup.route(3, 1)
    steering.set_routes([good])
    bad = [
        Route(setup.service, ()),
        Route(setup.service, (Backend(setup.b1, 0),)),
        Route(setup.service, (Backend(setup.b1, 1), Backend(setup.b1, 2))),
        Route(setup.service, (Backend(Endpoint("2001:db8::1", 80), 1),)),
        Route(Endpoint(setup.vip, 0), (Backend(setup.b1, 1),)),
    ]
    for route in bad:
        with pytest.raises(SteeringError):
            steering.set_routes([route])
    with pytest.raises(SteeringError, match="routed twice"):
        steering.set_routes([good, good])
    assert steering.routes() == [good]


def test_iptables_nat_and_filter_are_unchanged(setup: Setup, steering: Steering) -> None:
    # Runs after the traffic tests above: steering did its work without a single rule.
    assert steering.counters()["rewritten"] > 0
    after = {p.name: iptables_tables(p.netns) for p in setup.pods}
    after["host"] = iptables_tables(None)
    assert after == setup.iptables_before


def test_close_leaves_nothing_attached(setup: Setup, steering: Steering) -> None:
    unit = Steering()
    unit.start()
    try:
        for pod in (setup.client, setup.v1):
            unit.attach(pod.cgroup)
        progs = attached(setup.v1.cgroup)  # nothing else is attached to this pod
        assert sorted(p["name"] for p in progs) == [
            "itap_connect4",
            "itap_connect6",
            "itap_getsockopt",
        ]
        assert {p["id"] for p in progs} == set(unit.prog_ids)
        assert set(unit.prog_ids) < {p["id"] for p in attached(setup.client.cgroup)}
    finally:
        unit.close()
    unit.close()  # safe twice
    assert attached(setup.v1.cgroup) == []
    # The module's unit, attached to the same client pod, is untouched.
    assert {p["id"] for p in attached(setup.client.cgroup)} == set(steering.prog_ids)


def policy_text(setup: Setup, w1: int, w2: int) -> str:
    return (
        "version: 1\n"
        "routes:\n"
        f"  - service: {setup.service}\n"
        "    backends:\n"
        f"      - {{endpoint: {setup.b1}, weight: {w1}}}\n"
        f"      - {{endpoint: {setup.b2}, weight: {w2}}}\n"
    )


def test_agent_routes_from_its_policy_and_follows_reloads(
    setup: Setup, steering: Steering, tmp_path: Path
) -> None:
    from infertap.agent.runtime import Agent, AgentOptions

    steering.detach(setup.client.cgroup)  # this test's agent is the only steering in the pod
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(setup, 100, 1))
    agent = Agent(
        AgentOptions(
            cgroups=(str(setup.client.cgroup),), metrics_addr=None, api_addr=None, policy=policy
        )
    )
    try:
        agent.start()
        assert agent.steering is not None
        names = sorted(p["name"] for p in attached(setup.client.cgroup))
        assert names == [
            "itap_connect4",
            "itap_connect6",
            "itap_getsockopt",
            "itap_skb_egress",  # the default (skb) capture
            "itap_sockops",
        ]
        first = run_client(setup.client, setup.vip, VIP_PORT, 500)["counts"]
        assert within(first.get("2", 0), 500, 1 / 101), first

        # The policy file changes: the watcher applies it, and new connections follow.
        policy.write_text(policy_text(setup, 1, 100))
        deadline = time.monotonic() + 10
        while agent.steering.routes()[0].backends[0].weight != 1:
            assert time.monotonic() < deadline, "the new policy was not applied"
            time.sleep(0.1)
        second = run_client(setup.client, setup.vip, VIP_PORT, 500)["counts"]
        assert within(second.get("1", 0), 500, 1 / 101), second
        # Same backends, new weights: the counters carried on over the reload.
        assert agent.steering.stats()[setup.service] == {
            setup.b1: first.get("1", 0) + second.get("1", 0),
            setup.b2: first.get("2", 0) + second.get("2", 0),
        }
    finally:
        agent.stop()
        steering.attach(setup.client.cgroup)
    assert agent.steering is not None and not agent.steering.started
    # Only the module's unit is left, re-attached above: the agent took all of its programs.
    assert {p["id"] for p in attached(setup.client.cgroup)} == set(steering.prog_ids)


def test_agent_without_routes_loads_no_steering(setup: Setup, tmp_path: Path) -> None:
    from infertap.agent.runtime import Agent, AgentOptions

    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\n")
    agent = Agent(AgentOptions(cgroups=(), metrics_addr=None, api_addr=None, policy=policy))
    assert agent.steering is None
    agent.stop()  # never started: nothing to detach
