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
from pathlib import Path


class InstanceRegistry:
    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "instances"
        self._own: Path | None = None
        self._fd: int | None = None

    def _files(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob("*.json"))

    def register(self, prog_ids: list[int]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.dir / f"{os.getpid()}.json"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": os.getpid(), "prog_ids": prog_ids}).encode())
        self._own, self._fd = path, fd

    def live_prog_ids(self) -> set[int]:
        """Program ids of other agents that are alive now (their lock is held)."""
        ids: set[int] = set()
        for path in self._files():
            if path == self._own:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    with contextlib.suppress(ValueError, OSError):
                        ids.update(json.loads(Path(path).read_text())["prog_ids"])
                    continue
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        return ids

    def remove_dead(self) -> int:
        """Delete the files of instances that are gone. Returns how many."""
        removed = 0
        for path in self._files():
            if path == self._own:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            path.unlink(missing_ok=True)
            os.close(fd)
            removed += 1
        return removed

    def unregister(self) -> None:
        if self._own is not None:
            self._own.unlink(missing_ok=True)
            self._own = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
