"""Who holds a TCP port: for the one line `run` prints when its metrics port is taken.

The metrics endpoint binds a port any local user may bind first (ports from 1024 up, by default);
an agent that only said "address already in use" would leave the operator to hunt for the
squatter. /proc/net/tcp and tcp6 list listening sockets with their inode; /proc/<pid>/fd/* links
name the socket inodes each process holds (`socket:[INODE]`), and /proc/<pid>/comm its name.
Reading another user's fd links needs root, which `run` has. The proc root is an argument so
tests can use a fake tree.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from infertap.agent.errors import InfertapError

_LISTEN: Final = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


@dataclass(frozen=True, slots=True)
class PortOwner:
    pid: int | None  # None: the socket was found but no process we can read holds it
    name: str  # the process name (comm); "" when pid is None
    uid: int  # the socket's owner, from /proc/net/tcp

    def describe(self) -> str:
        if self.pid is None:
            return f"a process of uid {self.uid} (pid not visible)"
        return f"pid {self.pid} ({self.name}, uid {self.uid})"


class PortInUse(InfertapError, OSError):
    """The metrics address is taken; str() and strerror are the one line `run` prints."""

    def __init__(self, address: str, owner: PortOwner | None) -> None:
        who = owner.describe() if owner is not None else "a process in another network namespace"
        super().__init__(
            errno.EADDRINUSE,
            f"metrics address {address} is already in use by {who}: stop it, or give"
            " --metrics-addr another port",
        )

    def __str__(self) -> str:
        return str(self.strerror)


def listening_inodes(port: int, proc: Path = Path("/proc")) -> list[tuple[int, int]]:
    """(inode, uid) of every TCP socket listening on `port`, IPv4 and IPv6."""
    found: list[tuple[int, int]] = []
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != _LISTEN:
                continue
            local_port = int(cols[1].rsplit(":", 1)[1], 16)
            if local_port == port:
                found.append((int(cols[9]), int(cols[7])))
    return found


def holders(inode: int, proc: Path = Path("/proc")) -> list[int]:
    """Pids with a file descriptor on socket `inode`, lowest first."""
    target = f"socket:[{inode}]"
    pids: list[int] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    pids.append(int(entry.name))
                    break
            except OSError:
                continue
    return sorted(pids)


def port_owner(port: int, proc: Path = Path("/proc")) -> PortOwner | None:
    """Who listens on `port` in our network namespace; None when nobody visible does."""
    for inode, uid in listening_inodes(port, proc):
        pids = holders(inode, proc) if inode else []
        if not pids:
            return PortOwner(None, "", uid)
        pid = pids[0]
        try:
            name = (proc / str(pid) / "comm").read_text().strip()
        except OSError:
            name = "?"
        return PortOwner(pid, name, uid)
    return None
