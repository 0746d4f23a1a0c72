"""Which attached infertap programs belong to a live agent, and which were left by a dead one.

Cgroup programs attached with BPF_PROG_ATTACH outlive the process that attached them (see
shared kernel facts), so each running agent registers the ids of its programs in a file under
the run directory and holds an flock on it for as long as it lives. The kernel drops the lock
when the process dies, even on SIGKILL, so "file exists but lock is free" means "dead instance".
Several agents may run on one node (one per pod); a new one must never touch a live one's
programs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path


class RegistryUnreadable(RuntimeError):
    """A live agent's registration could not be read: sweeping now could remove its programs."""


class InstanceRegistry:
    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "instances"
        self._own: Path | None = None
        self._fd: int | None = None
        self._ids: list[int] = []

    def _files(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob("*.json"))

    def register(self, prog_ids: list[int]) -> None:
        """Record program ids as this process's. Each program unit (interception, steering)
        registers its own; ids accumulate in one file per process."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.dir / f"{os.getpid()}.json"
        if self._fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._own, self._fd, self._ids = path, fd, []
        self._ids = sorted({*self._ids, *prog_ids})
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps({"pid": os.getpid(), "prog_ids": self._ids}).encode(), 0)

    def own_prog_ids(self) -> list[int]:
        return list(self._ids)

    def _others(self) -> list[tuple[Path, bool]]:
        """Other instances' files, each with whether its owner is alive (holds the lock).

        The check takes the lock exclusively when it is free and keeps it only for the dead
        one's file removal in remove_dead; the kernel drops a dead owner's lock, SIGKILL or not.
        """
        out = []
        for path in self._files():
            if path == self._own:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alive = False
            except BlockingIOError:
                alive = True
            finally:
                os.close(fd)  # releases our lock, if we took it
            out.append((path, alive))
        return out

    def live_prog_ids(self) -> set[int]:
        """Program ids of other agents that are alive now (their lock is held)."""
        ids: set[int] = set()
        for path, alive in self._others():
            if alive:
                ids.update(self._read_ids(path))
        return ids

    @staticmethod
    def _read_ids(path: Path) -> list[int]:
        """A live instance's ids. Its file can be empty for an instant while it registers (it
        takes the lock, then writes): retry briefly, and if it stays unreadable, refuse, so a
        sweep never takes an unreadable live instance's programs for stale ones."""
        for _ in range(50):
            with contextlib.suppress(ValueError, OSError, KeyError, TypeError):
                return [int(i) for i in json.loads(path.read_text())["prog_ids"]]
            time.sleep(0.01)
        raise RegistryUnreadable(f"instance file {path} is locked but unreadable")

    def remove_dead(self) -> int:
        """Delete the files of instances that are gone. Returns how many."""
        dead = [path for path, alive in self._others() if not alive]
        for path in dead:
            path.unlink(missing_ok=True)
        return len(dead)

    def unregister(self, prog_ids: list[int] | None = None) -> None:
        """Forget some program ids (a unit closed), or all; the file goes with the last id."""
        if self._fd is None:
            return
        self._ids = [] if prog_ids is None else [i for i in self._ids if i not in prog_ids]
        if self._ids:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps({"pid": os.getpid(), "prog_ids": self._ids}).encode(), 0)
            return
        if self._own is not None:
            self._own.unlink(missing_ok=True)
            self._own = None
        os.close(self._fd)
        self._fd = None


_shared: dict[Path, InstanceRegistry] = {}


def shared_registry(run_dir: Path) -> InstanceRegistry:
    """The one registry of this process for a run directory: program units share it (two flocks
    on the same file from one process would conflict)."""
    reg = _shared.get(run_dir)
    if reg is None:
        reg = _shared[run_dir] = InstanceRegistry(run_dir)
    return reg
