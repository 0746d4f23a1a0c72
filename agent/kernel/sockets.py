"""Find an intercepted socket by its cookie and get our own descriptor for it.

Why: after sk_msg returns SK_DROP once, the kernel caches that verdict on the socket's psock
(tcp_bpf_send_verdict returns -EACCES before resetting psock->eval), so every later send fails
without our program running again, even after the verdict map entry is gone. To lift a block we
re-insert the socket into the sockhash, which gives it a fresh psock. Re-insertion from userspace
needs a descriptor of the socket, which lives in another process: we find it through the pods'
cgroups and /proc, and duplicate it with pidfd_getfd (root).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import ctypes.util
import os
import socket
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

from infertap.agent.kernel.cgroups import pids as cgroup_pids

SO_COOKIE = 57
_SYS_PIDFD_GETFD = 438  # x86_64 and arm64 share the generic syscall number


@cache
def _libc() -> ct.CDLL:
    return ct.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def pidfd_getfd(pid: int, target_fd: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        fd = int(_libc().syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0))
        if fd < 0:
            err = ct.get_errno()
            raise OSError(err, os.strerror(err))
        return fd
    finally:
        os.close(pidfd)


def socket_cookie(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def _all_pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def socket_inodes(pid: int) -> Iterator[tuple[int, int]]:
    """(fd, socket inode) of a process's socket descriptors."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            link = os.readlink(f"{fd_dir}/{name}")
            if link.startswith("socket:["):
                yield int(name), int(link[len("socket:[") : -1])


def find_socket(cookie: int, cgroups: Iterable[Path]) -> int | None:
    """A descriptor (ours, to close) of the socket with this cookie, or None if none is found.

    Looks in the processes of the given cgroups first, then everywhere.
    """
    seen: set[int] = set()
    pid_sources: list[Iterable[int]] = [cgroup_pids(cg) for cg in cgroups]
    pid_sources.append(_all_pids())
    for source in pid_sources:
        for pid in source:
            if pid in seen or pid == os.getpid():
                continue
            seen.add(pid)
            for target, _ in socket_inodes(pid):
                try:
                    fd = pidfd_getfd(pid, target)
                except OSError:
                    continue
                try:
                    if socket_cookie(fd) == cookie:
                        return fd
                except OSError:
                    pass
                os.close(fd)
    return None
