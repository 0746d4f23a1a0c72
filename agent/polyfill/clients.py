"""A polyfill rule's client as the rewriter needs it: the pod's cgroup, and a name for its network
namespace that `ip netns exec` knows.

The name is given from a process in the pod (as a pod's pause process would be), once per cgroup,
and removed again by `release()`; the namespace itself stays with the pod.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

from infertap.agent.kernel import cgroups
from infertap.agent.polyfill.unit import ClientPod

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")


class NetnsNames:
    """Names this agent gave to pods' network namespaces (`ip netns attach`)."""

    def __init__(self) -> None:
        self._names: set[str] = set()

    def name_for(self, cgroup: Path) -> str | None:
        """A name for the netns of a process in `cgroup`, or None (no process, or ip failed)."""
        pid = next(cgroups.pids(cgroup), None)
        if pid is None:
            return None
        name = f"infertap-pf-{cgroups.cgroup_id(cgroup)}"
        if not (NETNS_DIR / name).exists():
            done = subprocess.run(
                ["ip", "netns", "attach", name, str(pid)], capture_output=True, text=True
            )
            if done.returncode != 0:
                log.warning(
                    "polyfill: cannot name the netns of %s: %s", cgroup, done.stderr.strip()
                )
                return None
            self._names.add(name)
        return name

    def release(self) -> None:
        """Remove the names we gave (the namespaces stay with the pods)."""
        for name in sorted(self._names):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        self._names.clear()


class ClientPods:
    """Resolves a rule's client, "namespace/name" (a discovered pod) or a cgroup path."""

    def __init__(
        self,
        mount: Path,
        cgroup_of: Callable[[str, str], Path | None],
        netns: NetnsNames | None = None,
    ) -> None:
        self._mount = mount
        self._cgroup_of = cgroup_of
        self.netns = netns or NetnsNames()

    def resolve(self, client: str) -> ClientPod | None:
        """None when the client has no cgroup or no process yet."""
        if client.startswith("/"):
            try:
                cgroup: Path | None = cgroups.resolve(client, self._mount)
            except cgroups.CgroupError:
                return None
        else:
            namespace, name = client.split("/", 1)
            cgroup = self._cgroup_of(namespace, name)
        if cgroup is None:
            return None
        netns = self.netns.name_for(cgroup)
        return ClientPod(cgroup, netns) if netns is not None else None

    def release(self) -> None:
        self.netns.release()
