"""cgroup v2: where it is mounted, and turning user-given paths into checked cgroup folders.

The mount point is read from mountinfo, never assumed: hybrid hosts (like this project's CI) have
it at /sys/fs/cgroup/unified, pure cgroup v2 nodes at /sys/fs/cgroup.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from infertap.agent.errors import InfertapError


class CgroupError(InfertapError, ValueError):
    """A cgroup path a user gave is unusable; the message is one line for them."""


def cgroup2_mount(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path:
    for line in mountinfo.read_text().splitlines():
        # fields: id parent major:minor root mountpoint options [optional...] - fstype source ...
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split(" ")[4])
    raise CgroupError("no cgroup2 filesystem is mounted (infertap needs cgroup v2)")


def resolve(path: str | Path, mount: Path) -> Path:
    """A cgroup given as an absolute path under the mount, or relative to it ("/" = root)."""
    p = Path(path)
    full = p if p.is_absolute() and p.is_relative_to(mount) else mount / str(p).lstrip("/")
    full = Path(os.path.normpath(full))
    if not full.is_relative_to(mount):
        raise CgroupError(f"cgroup path {path} is outside the cgroup2 mount {mount}")
    if not (full / "cgroup.procs").is_file():
        raise CgroupError(f"cgroup {path} does not exist under {mount}")
    return full


def cgroup_id(path: Path) -> int:
    """The cgroup v2 id, as bpf_get_current_cgroup_id() reports it: the folder's inode number."""
    return os.stat(path).st_ino


def walk(mount: Path) -> Iterator[Path]:
    """Every cgroup folder below and including the mount."""
    for dirpath, _dirnames, _files in os.walk(mount):
        yield Path(dirpath)


def pids(cgroup: Path) -> Iterator[int]:
    """Processes in a cgroup and its children (a folder that goes away while read is skipped)."""
    for folder in walk(cgroup):
        try:
            text = (folder / "cgroup.procs").read_text()
        except OSError:
            continue
        yield from (int(p) for p in text.split())


def id_to_path(mount: Path) -> dict[int, str]:
    """Map cgroup ids to paths relative to the mount ("/" for the root)."""
    out: dict[int, str] = {}
    for p in walk(mount):
        try:
            out[cgroup_id(p)] = "/" + str(p.relative_to(mount)).lstrip(".")
        except OSError:
            continue
    return out
