"""The agent as a process: ready line, clean exit, kill -9, restart. Checked against the kernel
(bpftool), not the agent's own view."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support import INFERTAP, needs_root, start_agent, start_client, start_server

pytestmark = [needs_root, pytest.mark.kernel]

# What the default (skb) capture attaches to each cgroup: sockops and cgroup_skb egress.
PER_CGROUP = 2


def attached(cgroup: Path) -> list[dict[str, Any]]:
    """Programs attached to a cgroup, as the kernel reports them through bpftool."""
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True, check=True
    ).stdout
    return [p for p in json.loads(out.strip() or "[]") if p.get("name", "").startswith("itap_")]


@pytest.fixture(scope="module")
def pods(lab: Any) -> tuple[Any, Any]:
    return lab.add_pod("lc-client"), lab.add_pod("lc-server")


def test_kill_9_leaves_traffic_flowing_and_a_restart_cleans_up(
    pods: tuple[Any, Any], agent: Any, lab: Any, tmp_path: Path
) -> None:
    client, server = pods
    cgs = [client.cgroup, server.cgroup]
    first = start_agent(cgs, tmp_path / "a1.sock")
    start_server(server, 8201, echo=True)
    peer = start_client(client, server.ip, 8201)
    assert peer.cmd("send 4096 1") == "ok 4096" and peer.cmd("recv 4096") == "ok 4096"
    assert all(len(attached(cg)) == PER_CGROUP for cg in cgs)

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    # Mid-stream: the open connection keeps working, and so do new ones.
    assert peer.cmd(f"send {1 << 20} 2") == f"ok {1 << 20}"
    assert peer.cmd(f"recv {1 << 20}") == f"ok {1 << 20}"
    fresh = start_client(client, server.ip, 8201)
    assert fresh.cmd("send 100 3") == "ok 100" and fresh.cmd("recv 100") == "ok 100"
    # What a killed agent leaves: its cgroup programs stay attached (BPF_PROG_ATTACH).
    assert all(len(attached(cg)) == PER_CGROUP for cg in cgs)

    second = start_agent(cgs, tmp_path / "a2.sock")
    # The new agent removed the dead one's programs: exactly one (its own) per cgroup.
    progs = [attached(cg) for cg in cgs]
    assert all(len(p) == PER_CGROUP for p in progs)
    # ... and left the other live agent (this test session's) alone.
    assert all(
        len(attached(p.cgroup)) == PER_CGROUP for p in (lab.pods["client"], lab.pods["server"])
    )
    assert peer.cmd("send 100 4") == "ok 100" and peer.cmd("recv 100") == "ok 100"

    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=20) == 0
    assert second.stdout is not None and "programs detached" in second.stdout.read()
    assert all(attached(cg) == [] for cg in cgs)
    assert not (tmp_path / "a2.sock").exists()
    peer.close()
    fresh.close()


def test_clean_exit_on_sigint_leaves_nothing_attached(
    pods: tuple[Any, Any], tmp_path: Path
) -> None:
    client, server = pods
    proc = start_agent([client.cgroup, server.cgroup], tmp_path / "a.sock")
    assert len(attached(client.cgroup)) == PER_CGROUP
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0
    assert attached(client.cgroup) == [] and attached(server.cgroup) == []
    # Nothing pinned either: bpffs, if mounted, holds no infertap object.
    bpffs = Path("/sys/fs/bpf")
    if bpffs.is_dir():
        assert not [p for p in bpffs.rglob("*itap*")]


def test_api_socket_is_root_only(pods: tuple[Any, Any], tmp_path: Path) -> None:
    client, _server = pods
    proc = start_agent([client.cgroup], tmp_path / "api.sock")
    try:
        mode = os.stat(tmp_path / "api.sock").st_mode & 0o777
        assert mode == 0o600
        out = subprocess.run(
            [*INFERTAP, "status", "--json", "--api", f"unix:{tmp_path}/api.sock"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        status = json.loads(out)
        assert status["ready"] is True and status["mode"] == "pods"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def compiler_resident_kb(pid: int) -> int:
    """Resident kB of the compiler's libraries (libLLVM, libclang-cpp) in a process."""
    total, in_compiler = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's first line
            name = fields[5].rsplit("/", 1)[-1] if len(fields) > 5 else ""
            in_compiler = name.startswith(("libLLVM", "libclang-cpp"))
        elif in_compiler and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_a_started_agent_gives_back_the_compilers_memory(
    pods: tuple[Any, Any], tmp_path: Path
) -> None:
    """BCC compiles in the agent's process; once loaded, the compiler's pages (83 MB of libLLVM
    and libclang-cpp measured resident before they were paged out) are given back."""
    client, _server = pods
    proc = start_agent([client.cgroup], tmp_path / "api.sock")
    try:
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libLLVM" in maps  # the compiler is loaded: what is measured is there
        assert compiler_resident_kb(proc.pid) < 16 * 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_cli_flows_block_unblock_through_the_api(agent: Any, lab: Any) -> None:
    client, server = lab.pods["client"], lab.pods["server"]
    api = agent.options.api_addr
    start_server(server, 8202, echo=True)
    peer = start_client(client, server.ip, 8202)
    assert peer.cmd("send 10 1") == "ok 10"
    deadline = time.monotonic() + 5
    flows: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(flows) < 2:
        out = subprocess.run(
            [*INFERTAP, "flows", "--json", "--api", api], capture_output=True, text=True, check=True
        ).stdout
        flows = [
            f for f in json.loads(out)["flows"] if 8202 in (f["local"]["port"], f["remote"]["port"])
        ]
    assert {f["role"] for f in flows} == {"client", "server"}
    mine = next(f for f in flows if f["role"] == "client")
    assert int(mine["messages"]) == 1 and int(mine["bytes"]) == 10

    r = subprocess.run(
        [*INFERTAP, "block", "--flow", str(mine["id"]), "--api", api],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "block flow" in r.stdout
    assert peer.cmd("send 10 2") == "err EACCES"
    r = subprocess.run(
        [*INFERTAP, "unblock", "--flow", str(mine["id"]), "--api", api],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "unblocked" in r.stdout
    assert peer.cmd("send 10 3") == "ok 10" and peer.cmd("recv 20") == "ok 20"
    peer.close()


def test_node_mode_watches_every_pod_on_the_watched_ports_only(lab: Any, tmp_path: Path) -> None:
    from infertap.agent.kernel.cgroups import cgroup2_mount

    client, server = lab.add_pod("nm-client"), lab.add_pod("nm-server")
    root = cgroup2_mount()
    api = tmp_path / "node.sock"
    argv = [
        *INFERTAP,
        "run",
        "--port",
        "8301",
        "--metrics-addr",
        "127.0.0.1:0",
        "--api",
        f"unix:{api}",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "node mode" in line and "[8301]" in line, line
        assert len(attached(root)) == PER_CGROUP
        start_server(server, 8301)
        start_server(server, 8302)
        watched = start_client(client, server.ip, 8301)
        other = start_client(client, server.ip, 8302)
        assert watched.cmd("send 10 1") == "ok 10" and other.cmd("send 10 1") == "ok 10"
        deadline = time.monotonic() + 5
        ports: set[int] = set()
        while time.monotonic() < deadline and 8301 not in ports:
            out = subprocess.run(
                [*INFERTAP, "flows", "--json", "--api", f"unix:{api}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            ports = {
                int(f["remote"]["port"])
                for f in json.loads(out)["flows"]
                if f["role"] == "client" and f["remote"]["ip"] == server.ip
            }
        assert ports == {8301}  # the port filter: 8302 is not intercepted
        watched.close()
        other.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert attached(root) == []
