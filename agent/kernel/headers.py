"""Find kernel headers for BCC when the running kernel has none of its own.

BCC compiles against `/lib/modules/$(uname -r)/build`. Many nodes (this project's CI among them)
run a kernel whose headers package does not exist, so we pick the closest installed
`linux-headers-*` and point BCC at it with `BCC_KERNEL_SOURCE`. UAPI structs are append-only, so
older headers compile programs that load on newer kernels.

Debian splits one header tree in two folders: `linux-headers-<v>-<flavour>` (config, generated
files) and `linux-headers-<v>-common` (the rest, `include/linux/kconfig.h` among it). BCC's
`BCC_KERNEL_SOURCE` wants one tree, so we build a merged tree of symlinks under a runtime folder.
Nothing on the host's `/lib/modules` is changed.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from infertap.agent.defaults import DEFAULT_RUN_DIR
from infertap.agent.errors import InfertapError

log = logging.getLogger(__name__)

HEADERS_PACKAGE_HINT = "linux-headers-amd64"
_VERSION_RE = re.compile(r"^linux-headers-(\d+)\.(\d+)\.(\d+)(?:-(\d+))?-(.+)$")


class HeadersNotFound(InfertapError, RuntimeError):
    """No usable kernel headers on this machine."""


@dataclass(frozen=True)
class HeaderTree:
    """Where BCC should compile from, and how it was chosen (for the log line)."""

    path: Path
    origin: str  # "running kernel", or the name of the headers folder picked instead


def _version_tuple(release: str) -> tuple[int, int, int]:
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        return (0, 0, 0)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


def _is_tree(path: Path) -> bool:
    return (path / "include" / "linux" / "kconfig.h").is_file()


Candidate = tuple[tuple[int, int, int], Path, Path | None]


def _candidates(src_root: Path) -> list[Candidate]:
    """Flavoured header folders (e.g. -amd64) with their -common sibling, if any."""
    found: list[Candidate] = []
    if not src_root.is_dir():
        return found
    for entry in sorted(src_root.iterdir()):
        m = _VERSION_RE.match(entry.name)
        if not m or m.group(5) == "common" or not entry.is_dir():
            continue
        version = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        stem = entry.name[: -len(m.group(5))]
        common = src_root / f"{stem}common"
        found.append((version, entry, common if common.is_dir() else None))
    return found


def _closest(release: str, cands: list[Candidate]) -> Candidate:
    """Prefer the newest headers not newer than the running kernel; else the oldest newer one."""
    running = _version_tuple(release)
    older = [c for c in cands if c[0] <= running]
    if older:
        return max(older, key=lambda c: c[0])
    return min(cands, key=lambda c: c[0])


def _merge_links(dst: Path, sources: list[Path]) -> None:
    """Make `dst` a tree of symlinks that shows the union of `sources` (earlier ones win files)."""
    dst.mkdir(parents=True, exist_ok=True)
    names: dict[str, list[Path]] = {}
    for src in sources:
        for child in src.iterdir():
            names.setdefault(child.name, []).append(child)
    for name, paths in names.items():
        target = dst / name
        dirs = [p for p in paths if p.is_dir()]
        if len(dirs) > 1:
            _merge_links(target, dirs)
        elif not target.exists() and not target.is_symlink():
            target.symlink_to(paths[0])


def find_headers(
    release: str | None = None,
    modules_root: Path = Path("/lib/modules"),
    src_root: Path = Path("/usr/src"),
    runtime_dir: Path = DEFAULT_RUN_DIR / "kernel-headers",
) -> HeaderTree:
    """Return a header tree for BCC, building a merged one if the running kernel has none."""
    release = release or os.uname().release
    own = modules_root / release / "build"
    if _is_tree(own) or _is_tree(modules_root / release / "source"):
        return HeaderTree(path=own, origin="running kernel")
    cands = _candidates(src_root)
    if not cands:
        raise HeadersNotFound(
            f"no kernel headers for {release} and none installed under {src_root}: "
            f"install the '{HEADERS_PACKAGE_HINT}' package (apt-get install {HEADERS_PACKAGE_HINT})"
        )
    _version, flavoured, common = _closest(release, cands)
    sources = [flavoured] + ([common] if common else [])
    merged = runtime_dir / flavoured.name
    if not _is_tree(merged):
        _merge_links(merged, sources)
    if not _is_tree(merged):
        raise HeadersNotFound(
            f"headers in {flavoured} are incomplete (no include/linux/kconfig.h): "
            f"reinstall '{HEADERS_PACKAGE_HINT}'"
        )
    return HeaderTree(path=merged, origin=flavoured.name)


def point_bcc_at(tree: HeaderTree) -> None:
    """Tell BCC where to compile from. Only needed when the tree is not the running kernel's."""
    if tree.origin != "running kernel":
        os.environ["BCC_KERNEL_SOURCE"] = str(tree.path)
