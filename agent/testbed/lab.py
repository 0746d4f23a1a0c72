"""Local pods for tests, the demo and benchmarks: a cgroup v2 child plus a network namespace.

A Kubernetes pod, as the kernel sees it, is a cgroup and a network namespace with a veth pair to
the node. A Lab makes the same on one machine: a bridge in the root namespace, and per pod a
namespace whose veth end sits on the bridge, an address from a private /24, and a cgroup under
the cgroup2 mount. Processes run in a pod by entering its namespace (`ip netns exec`) after
joining its cgroup, so every socket they open belongs to the pod exactly as in a cluster.

Everything a Lab makes is removed by `close()` (also on errors while building), and each Lab
picks names and a subnet from its process id so concurrent labs do not collide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetNS, netns

from infertap.agent.kernel import cgroups

log = logging.getLogger(__name__)


@dataclass
class Pod:
    name: str
    netns: str
    cgroup: Path  # absolute path under the cgroup2 mount
    ip: str
    host_veth: str
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def cgroup_id(self) -> int:
        return cgroups.cgroup_id(self.cgroup)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside the pod: in its cgroup, then in its network namespace."""
        procs = str(self.cgroup / "cgroup.procs")

        def join_cgroup() -> None:  # runs in the child between fork and exec
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *argv],
            preexec_fn=join_cgroup,  # the cgroup must be joined before exec
            start_new_session=True,
            **kwargs,
        )
        self.processes.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        if kwargs.pop("capture_output", False):
            kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc = self.popen(argv, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    @staticmethod
    def kill(proc: subprocess.Popen[Any]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.processes:
            self.kill(proc)
        self.processes.clear()


class Lab:
    """A bridge and a set of pods. Use as a context manager; `close()` removes everything."""

    def __init__(self, tag: str | None = None, cgroup_mount: Path | None = None) -> None:
        pid = os.getpid()
        self.tag = tag or str(pid)  # the owner's pid: cleanup_stale_labs() knows whose it is
        self.mount = cgroup_mount or cgroups.cgroup2_mount()
        self.cgroup_root = self.mount / f"infertap-lab-{self.tag}"
        self.bridge = f"itbr{self.tag}"[:15]
        self.pods: dict[str, Pod] = {}
        self._made: list[Path] = []  # parent cgroup folders add_pod made, removed on close
        self._ipr = IPRoute()
        self.subnet = self._free_subnet(pid)
        try:
            self._ipr.link("add", ifname=self.bridge, kind="bridge")
            idx = self._ipr.link_lookup(ifname=self.bridge)[0]
            # The node's own address on the pod network (pods start at .2), as a CNI gives the
            # node: traffic from the host to pods (the agent's shadow mirroring, for one) then
            # stays on this bridge instead of following the default route off the machine.
            self._ipr.addr("add", index=idx, address=f"{self.subnet}.1", prefixlen=24)
            self._ipr.link("set", index=idx, state="up")
            self.cgroup_root.mkdir(exist_ok=True)
        except Exception:
            self.close()
            raise

    def _free_subnet(self, seed: int) -> str:
        """A private /24 (as "10.a.b") no route on this host uses yet: labs of concurrent test
        runs must not share one, now that the host has an address on each lab's bridge."""
        used = {r.get_attr("RTA_DST") for r in self._ipr.get_routes(family=socket.AF_INET)}
        for i in range(250):
            n = (seed + i) % 250
            subnet = f"10.{200 + n % 50}.{n}"
            if f"{subnet}.0" not in used:
                return subnet
        raise RuntimeError("no free 10.x.y.0/24 for a lab")

    def add_pod(self, name: str, cgroup: Path | None = None) -> Pod:
        """A new pod. `cgroup` places its cgroup elsewhere under the mount (e.g. where kubelet
        would); its parent folders are made here and removed with the pod."""
        n = len(self.pods) + 1
        ns = f"itap-{self.tag}-{name}"
        host_veth = f"itv{self.tag}-{n}"  # "-": tag 1234 must not own itv12345...
        pod_veth = "eth0"
        ip = f"{self.subnet}.{n + 1}"
        if cgroup is None:
            cgroup = self.cgroup_root / name
        else:
            for parent in reversed(cgroup.relative_to(self.mount).parents):
                folder = self.mount / parent
                if not folder.exists():
                    folder.mkdir()
                    self._made.append(folder)
        pod = Pod(name=name, netns=ns, cgroup=cgroup, ip=ip, host_veth=host_veth)
        self.pods[name] = pod
        netns.create(ns)
        cgroup.mkdir(exist_ok=True)
        peer_tmp = f"itp{self.tag}{n}"[:15]
        self._ipr.link("add", ifname=host_veth, kind="veth", peer=peer_tmp)
        host_idx = self._ipr.link_lookup(ifname=host_veth)[0]
        br_idx = self._ipr.link_lookup(ifname=self.bridge)[0]
        self._ipr.link("set", index=host_idx, master=br_idx, state="up")
        peer_idx = self._ipr.link_lookup(ifname=peer_tmp)[0]
        self._ipr.link("set", index=peer_idx, net_ns_fd=ns)
        with NetNS(ns) as nsr:
            idx = nsr.link_lookup(ifname=peer_tmp)[0]
            nsr.link("set", index=idx, ifname=pod_veth)
            nsr.addr("add", index=idx, address=ip, prefixlen=24)
            nsr.link("set", index=idx, state="up")
            lo = nsr.link_lookup(ifname="lo")[0]
            nsr.link("set", index=lo, state="up")
        return pod

    def close(self) -> None:
        for pod in self.pods.values():
            pod.stop_all()
        for pod in self.pods.values():
            with contextlib.suppress(Exception):
                idx = self._ipr.link_lookup(ifname=pod.host_veth)
                if idx:
                    self._ipr.link("del", index=idx[0])
            with contextlib.suppress(Exception):
                netns.remove(pod.netns)
            _rmdir_cgroup(pod.cgroup)
        self.pods.clear()
        for folder in reversed(self._made):
            _rmdir_cgroup(folder)
        self._made.clear()
        with contextlib.suppress(Exception):
            idx = self._ipr.link_lookup(ifname=self.bridge)
            if idx:
                self._ipr.link("del", index=idx[0])
        _rmdir_cgroup(self.cgroup_root)
        with contextlib.suppress(Exception):
            self._ipr.close()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cleanup_stale_labs(cgroup_mount: Path | None = None) -> int:
    """Remove labs whose creating process is dead (a test run that was killed). Returns count."""
    mount = cgroup_mount or cgroups.cgroup2_mount()
    tags: set[str] = set()
    for path in mount.glob("infertap-lab-*"):
        tags.add(path.name.removeprefix("infertap-lab-"))
    with contextlib.suppress(Exception):
        for name in os.listdir("/run/netns"):
            if name.startswith("itap-"):
                tags.add(name.split("-")[1])
    removed = 0
    for tag in tags:
        if tag.isdigit() and Path(f"/proc/{tag}").exists():
            continue  # its owner is alive
        with IPRoute() as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME") or ""
                if name == f"itbr{tag}"[:15] or name.startswith(f"itv{tag}-"):
                    with contextlib.suppress(Exception):
                        ipr.link("del", index=link["index"])
        with contextlib.suppress(Exception):
            for name in os.listdir("/run/netns"):
                if name.startswith(f"itap-{tag}-"):
                    with contextlib.suppress(Exception):
                        netns.remove(name)
        root = mount / f"infertap-lab-{tag}"
        if root.exists():
            for child in root.iterdir():
                if child.is_dir():
                    _rmdir_cgroup(child)
            _rmdir_cgroup(root)
        removed += 1
    return removed


def _rmdir_cgroup(path: Path) -> None:
    """Remove a cgroup folder, killing anything left in it first (rmdir fails while busy)."""
    if not path.exists():
        return
    for _ in range(50):
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            pids = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
    log.warning("could not remove cgroup %s", path)
