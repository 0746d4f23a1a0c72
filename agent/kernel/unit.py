"""The lifecycle every BPF unit built from one C file shares, written once (as cilium/tetragon's
generic sensor load and unload): the interception sensor (bpf/intercept.c) and steering
(bpf/steer.c) are both a KernelUnit.

    start: privileges -> the unit's own checks -> kernel headers -> compile -> load programs
           -> register their ids (before anything is attached, so no other agent's start-up
              sweep takes them) -> the unit's own set-up (maps, sk_msg)
    attach / detach: the unit's cgroup programs on a cgroup, all or none (attach.py)
    close: the unit's own tear-down -> detach from every cgroup -> release the maps
           -> unregister. Safe to call twice, and after a failed start.

A unit says what differs through class attributes (its C file, its error class, its name in
messages) and a few hooks; everything else lives here.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, ClassVar

from infertap.agent.errors import InfertapError
from infertap.agent.kernel import bpfsys, cgroups, structs
from infertap.agent.kernel.attach import CgroupAttachments
from infertap.agent.kernel.compiler_memory import release_compiler_memory
from infertap.agent.kernel.headers import HeaderTree, find_headers, point_bcc_at
from infertap.agent.kernel.instances import shared_registry

log = logging.getLogger(__name__)

Program = tuple[Any, bpfsys.AttachType]  # a loaded BCC function and how it attaches to a cgroup


class KernelUnit:
    SOURCES: ClassVar[tuple[str, ...]]  # the C files in bpf/, joined into one object
    ERROR: ClassVar[type[InfertapError]]  # what start() raises: one line for the user
    WHAT: ClassVar[str]  # in messages: "could not compile or load the {WHAT}"
    ATTACH_LABEL: ClassVar[str]  # the attachments' name in their messages
    PRIVILEGES: ClassVar[str]  # the message when not root

    def __init__(self, run_dir: Path, cgroup_mount: Path | None = None) -> None:
        self.run_dir = run_dir
        self.mount = cgroup_mount or cgroups.cgroup2_mount()
        self.headers: HeaderTree | None = None
        self._bpf: Any = None
        self._loaded: list[Any] = []  # every program loaded, attached anywhere or not
        self._cgroups = CgroupAttachments(self.mount, self.ATTACH_LABEL)
        self._registry = shared_registry(run_dir)
        self._prog_ids: list[int] = []
        self.compile_seconds = 0.0

    # ---- what a unit says about itself ---------------------------------------------------

    def _check(self) -> None:
        """Options that make no sense: raise ERROR before anything is loaded."""

    def _cflags(self) -> list[str]:
        """Compiler flags besides the include path."""
        return []

    def _load(self, bpf: Any) -> list[Any]:
        """Load the unit's programs from the compiled object; returns them all."""
        raise NotImplementedError

    def _programs(self) -> list[Program]:
        """The programs attached to each cgroup, and how."""
        raise NotImplementedError

    def _set_up(self) -> None:
        """After the programs are registered: maps, other attachments. May raise."""

    def _tear_down(self) -> None:
        """First step of close(), for what _set_up made. Must not raise."""

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if os.geteuid() != 0:
            raise self.ERROR(self.PRIVILEGES)
        self._check()
        try:
            self.headers = find_headers(runtime_dir=self.run_dir / "kernel-headers")
        except Exception as exc:  # HeadersNotFound or an unreadable /usr/src
            raise self.ERROR(str(exc)) from exc
        point_bcc_at(self.headers)
        what = " + ".join(self.SOURCES)
        log.info("compiling %s against kernel headers: %s", what, self.headers.origin)
        from bcc import BPF  # Debian's python3-bpfcc; imported late so tests can run without it

        cflags = [f"-I{structs.BPF_DIR}", *self._cflags(), "-Wno-macro-redefined"]
        t0 = time.monotonic()
        try:
            # BCC takes programs only from the main source, so several files are joined.
            source = "\n".join((structs.BPF_DIR / name).read_text() for name in self.SOURCES)
            self._bpf = BPF(text=source.encode(), cflags=cflags)
            self._loaded = self._load(self._bpf)
        except Exception as exc:
            self.close()
            raise self.ERROR(f"could not compile or load the {self.WHAT}: {exc}") from exc
        self.compile_seconds = time.monotonic() - t0
        release_compiler_memory()  # dead weight until the next compile
        try:
            # Registered before anything is attached, so no other agent's sweep takes them.
            self._prog_ids = [bpfsys.prog_info(fn.fd).id for fn in self._loaded]
            self._registry.register(self._prog_ids)
            self._set_up()
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        """Detach everything this unit attached and release the maps. Safe to call twice."""
        self._tear_down()
        if self._loaded:
            self._cgroups.detach_all(self._programs())
        self._loaded = []
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        if self._prog_ids:
            self._registry.unregister(self._prog_ids)
            self._prog_ids = []

    def __enter__(self) -> KernelUnit:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def started(self) -> bool:
        """Programs compiled and loaded: the maps exist."""
        return self._bpf is not None

    @property
    def prog_ids(self) -> list[int]:
        return list(self._prog_ids)

    # ---- cgroups ---------------------------------------------------------------------------

    def attach(self, cgroup: str | Path) -> Path:
        """Attach the unit's cgroup programs to a cgroup (all, or none)."""
        if not self._loaded:
            raise self.ERROR(f"{self.ATTACH_LABEL} is not started")
        return self._cgroups.attach(cgroup, self._programs())

    def detach(self, cgroup: str | Path) -> None:
        if self._loaded:
            self._cgroups.detach(cgroup, self._programs())

    @property
    def attached(self) -> list[Path]:
        return self._cgroups.paths
