"""The cgroups one program unit (interception, steering) is attached to.

Each attach puts all of the unit's programs on a cgroup, with BPF_F_ALLOW_MULTI so they sit next
to anyone else's, or none of them: a failure part-way undoes what it did. Detaching a cgroup that
is already gone is a no-op: its programs went with it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infertap.agent.kernel import bpfsys, cgroups

log = logging.getLogger(__name__)

Programs = Sequence[tuple[Any, bpfsys.AttachType]]  # (BCC function, attach type)


class CgroupAttachments:
    def __init__(self, mount: Path, unit: str) -> None:
        self.mount = mount
        self.unit = unit  # for log lines: "sockops", "steering"
        self._paths: list[Path] = []

    @property
    def paths(self) -> list[Path]:
        return list(self._paths)

    def attach(self, cgroup: str | Path, programs: Programs) -> Path:
        from bcc import BPF

        path = cgroups.resolve(cgroup, self.mount)
        if path in self._paths:
            return path
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        done: list[tuple[Any, bpfsys.AttachType]] = []
        try:
            for fn, attach_type in programs:
                BPF.attach_func(fn, fd, int(attach_type), bpfsys.BPF_F_ALLOW_MULTI)
                done.append((fn, attach_type))
        except Exception:
            for fn, attach_type in done:
                try:
                    BPF.detach_func(fn, fd, int(attach_type))
                except Exception as exc:
                    log.warning("could not undo a partial %s attach: %s", self.unit, exc)
            raise
        finally:
            os.close(fd)
        self._paths.append(path)
        log.info("%s attached to cgroup %s", self.unit, path)
        return path

    def detach(self, cgroup: str | Path, programs: Programs) -> None:
        from bcc import BPF

        path = cgroups.resolve(cgroup, self.mount) if Path(cgroup).exists() else Path(cgroup)
        if path not in self._paths:
            return
        self._paths.remove(path)
        if not path.exists():
            return  # the pod's cgroup is gone, and its programs with it
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for fn, attach_type in programs:
                BPF.detach_func(fn, fd, int(attach_type))
        finally:
            os.close(fd)
        log.info("%s detached from cgroup %s", self.unit, path)

    def detach_all(self, programs: Programs) -> None:
        """Detach from every cgroup, carrying on past failures (used when a unit closes)."""
        for path in list(self._paths):
            try:
                self.detach(path, programs)
            except Exception as exc:
                log.warning("could not detach %s from %s: %s", self.unit, path, exc)
