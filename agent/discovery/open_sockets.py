"""TCP connections that were open before infertap attached to a pod: counted, never silent.

sockops sees a socket only when it is established (or listens) after the program is attached, so
a connection the pod opened earlier is never in the sockhash: its traffic is neither sampled nor
decoded, and without this module it would be in no flow list, event or metric either. When a
cgroup is attached, the established TCP sockets of its processes are listed from userspace: each
process's socket descriptors (/proc/PID/fd) matched by inode to its network namespace's TCP
table (/proc/PID/net/tcp, tcp6: the pod's own view, so no netns switching is needed). Each gets
its socket cookie (pidfd_getfd + SO_COOKIE, root only; 0 if that fails), the id `flows` shows.

`UninspectedConnections` keeps those still open: on every read (rate-limited) it drops the ones
whose socket is gone. Costs: one read of every fd link of the cgroup's processes at attach, then
one TCP table read per network namespace per refresh.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from infertap.agent.flows.records import Endpoint, Role
from infertap.agent.kernel import sockets

log = logging.getLogger(__name__)

PRE_EXISTING = "pre_existing"  # the one reason today: opened before the cgroup was attached
_ESTABLISHED = "01"
_LISTEN = "0A"
REFRESH_S = 1.0


@dataclass(frozen=True, slots=True)
class TcpEntry:
    local: Endpoint
    remote: Endpoint
    state: str  # two hex digits, as the kernel prints them
    inode: int


@dataclass(frozen=True, slots=True)
class OpenConnection:
    """A connection the agent found open and cannot inspect."""

    cookie: int  # 0 when the socket could not be duplicated to read it
    role: Role  # SERVER when its local port is one the pod listens on
    local: Endpoint
    remote: Endpoint
    cgroup: Path
    pid: int
    inode: int
    reason: str = PRE_EXISTING


def _address(text: str) -> Endpoint:
    """ "0100007F:C80D" (IPv4) or 32 hex digits:port (IPv6), as /proc/net/tcp* print them: each
    32-bit word in host byte order (little-endian here)."""
    hex_ip, hex_port = text.split(":")
    raw = bytes.fromhex(hex_ip)
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(packed)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket talking IPv4: shown as the kernel flows are
    return Endpoint(str(ip), int(hex_port, 16))


def parse_tcp_table(text: str) -> list[TcpEntry]:
    """Rows of /proc/net/tcp or /proc/net/tcp6 (the header line is skipped)."""
    out: list[TcpEntry] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            out.append(
                TcpEntry(_address(fields[1]), _address(fields[2]), fields[3], int(fields[9]))
            )
        except ValueError:
            continue
    return out


def tcp_table(pid: int, proc: Path = Path("/proc")) -> list[TcpEntry]:
    """The TCP sockets of a process's network namespace (empty if it is gone)."""
    rows: list[TcpEntry] = []
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            rows += parse_tcp_table((proc / str(pid) / "net" / name).read_text())
    return rows


def _netns(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return 0


def _cookie(pid: int, fd: int) -> int:
    try:
        dup = sockets.pidfd_getfd(pid, fd)
    except OSError:
        return 0
    try:
        return sockets.socket_cookie(dup)
    except OSError:
        return 0
    finally:
        os.close(dup)


def _cgroup_pids(cgroup: Path) -> Iterator[tuple[Path, int]]:
    for dirpath, _dirs, _files in os.walk(cgroup):
        with contextlib.suppress(OSError, ValueError):
            for line in (Path(dirpath) / "cgroup.procs").read_text().split():
                yield Path(dirpath), int(line)


def find_open_connections(
    cgroup: Path,
    ports: Iterable[int] = (),
    intercepted: Callable[[Endpoint, Endpoint], bool] = lambda local, remote: False,
) -> list[OpenConnection]:
    """Established TCP connections of the processes in a cgroup (and below), except those the
    kernel already intercepts (`intercepted(local, remote)`: opened after the attach). With
    `ports`, only connections with one end on a watched port, as the kernel filters."""
    watched = set(ports)
    tables: dict[int, tuple[dict[int, TcpEntry], set[int]]] = {}  # netns -> (by inode, listening)
    found: dict[int, OpenConnection] = {}
    me = os.getpid()
    for folder, pid in _cgroup_pids(cgroup):
        if pid == me:
            continue
        ns = _netns(pid)
        if ns not in tables:
            rows = tcp_table(pid)
            tables[ns] = (
                {r.inode: r for r in rows if r.state == _ESTABLISHED and r.inode},
                {r.local.port for r in rows if r.state == _LISTEN},
            )
        established, listening = tables[ns]
        for fd, inode in sockets.socket_inodes(pid):
            entry = established.get(inode)
            if entry is None or inode in found:
                continue
            if watched and entry.local.port not in watched and entry.remote.port not in watched:
                continue
            if intercepted(entry.local, entry.remote):
                continue
            role = Role.SERVER if entry.local.port in listening else Role.CLIENT
            found[inode] = OpenConnection(
                _cookie(pid, fd), role, entry.local, entry.remote, folder, pid, inode
            )
    return list(found.values())


class UninspectedConnections:
    """The connections found open at attach time that are still open. Thread-safe."""

    def __init__(self, refresh_s: float = REFRESH_S) -> None:
        self._lock = threading.Lock()
        self._open: list[OpenConnection] = []
        self._refresh_s = refresh_s
        self._checked = 0.0

    def add(self, found: Iterable[OpenConnection]) -> None:
        with self._lock:
            known = {c.inode for c in self._open}
            self._open += [c for c in found if c.inode not in known]

    def forget_cgroup(self, cgroup: Path) -> None:
        """A detached cgroup: its connections are no longer ours to report."""
        with self._lock:
            self._open = [c for c in self._open if not c.cgroup.is_relative_to(cgroup)]

    def current(self) -> list[OpenConnection]:
        with self._lock:
            now = time.monotonic()
            if self._open and now - self._checked >= self._refresh_s:
                self._checked = now
                self._open = self._still_open(self._open)
            return list(self._open)

    def counts(self) -> dict[str, int]:
        out = {PRE_EXISTING: 0}
        for c in self.current():
            out[c.reason] = out.get(c.reason, 0) + 1
        return out

    @staticmethod
    def _still_open(conns: list[OpenConnection]) -> list[OpenConnection]:
        alive: dict[int, set[int]] = {}  # pid -> established inodes in its netns
        keep = []
        for c in conns:
            if c.pid not in alive:
                alive[c.pid] = {r.inode for r in tcp_table(c.pid) if r.state == _ESTABLISHED}
            if c.inode in alive[c.pid]:
                keep.append(c)
        return keep
