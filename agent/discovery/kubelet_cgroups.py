"""Where the kubelet puts a pod's cgroup (v2), for both cgroup drivers and the common runtimes.

Layouts under the cgroup2 mount (`uid_` is the pod UID with `-` replaced by `_`; Guaranteed
pods have no QoS level):

  systemd driver:  kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/
                       <runtime>-<containerid>.scope
                   kubepods.slice/kubepods-pod<uid_>.slice/<runtime>-<containerid>.scope
  cgroupfs driver: kubepods/<qos>/pod<uid>/<containerid>
                   kubepods/pod<uid>/<containerid>

`<runtime>` is `cri-containerd` (containerd), `crio` (CRI-O) or `docker` (cri-dockerd). Under
the cgroupfs driver containerd and docker name the container's cgroup by its bare ID while CRI-O
still prefixes `crio-`.

The driver is not configured: the pod's directory is looked for in both layouts, so one agent
works on any node. Nothing here touches the Kubernetes API; the tests run it on a fake tree.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Literal

QosClass = Literal["Guaranteed", "Burstable", "BestEffort"]
QOS_CLASSES: tuple[QosClass, ...] = ("Guaranteed", "Burstable", "BestEffort")

# containerStatuses[].containerID scheme -> prefix of the container's systemd scope.
RUNTIME_SCOPE_PREFIXES: dict[str, str] = {
    "containerd": "cri-containerd",
    "cri-o": "crio",
    "docker": "docker",
}

# The kubelet's names for the QoS levels; Guaranteed pods sit directly under kubepods.
_QOS_LEVEL: dict[QosClass, str | None] = {
    "Guaranteed": None,
    "Burstable": "burstable",
    "BestEffort": "besteffort",
}

# A pod's own directory in either layout; the UID is group 1 (systemd, underscores) or 2.
_POD_DIR = re.compile(
    r"^kubepods(?:-(?:burstable|besteffort))?-pod([0-9a-fA-F_]+)\.slice$|^pod([0-9a-fA-F-]+)$"
)


def systemd_pod_cgroup(uid: str, qos: QosClass) -> PurePosixPath:
    """The pod's cgroup under the systemd driver, relative to the cgroup2 mount."""
    escaped = uid.replace("-", "_")
    level = _QOS_LEVEL[qos]
    if level is None:
        return PurePosixPath("kubepods.slice", f"kubepods-pod{escaped}.slice")
    return PurePosixPath(
        "kubepods.slice", f"kubepods-{level}.slice", f"kubepods-{level}-pod{escaped}.slice"
    )


def cgroupfs_pod_cgroup(uid: str, qos: QosClass) -> PurePosixPath:
    """The pod's cgroup under the cgroupfs driver, relative to the cgroup2 mount."""
    level = _QOS_LEVEL[qos]
    if level is None:
        return PurePosixPath("kubepods", f"pod{uid}")
    return PurePosixPath("kubepods", level, f"pod{uid}")


def parse_container_id(container_id: str) -> tuple[str, str]:
    """Split a status containerID (`containerd://<id>`) into (runtime, id)."""
    runtime, sep, ident = container_id.partition("://")
    if not sep or not runtime or not ident:
        raise ValueError(f"not a <runtime>://<id> container ID: {container_id!r}")
    return runtime, ident


def container_cgroup_names(container_id: str) -> tuple[str, ...]:
    """Names the container's cgroup may have inside its pod's directory, systemd's first.

    Unknown runtimes get the bare ID and `<runtime>-<id>.scope`, which is what most CRI
    implementations do.
    """
    runtime, ident = parse_container_id(container_id)
    prefix = RUNTIME_SCOPE_PREFIXES.get(runtime, runtime)
    names = [f"{prefix}-{ident}.scope", ident]
    if runtime == "cri-o":
        names.append(f"crio-{ident}")  # CRI-O keeps its prefix under cgroupfs too
    return tuple(names)


def find_pod_cgroup(cgroup_root: Path, uid: str, qos: QosClass | None) -> Path | None:
    """The pod's existing cgroup directory under cgroup_root, in either layout, or None.

    None also when the kubelet has not made it yet (a pending pod) or has removed it; the caller
    looks again on the pod's next update. An unknown QoS class tries all three.
    """
    classes = (qos,) if qos is not None else QOS_CLASSES
    for cls in classes:
        for rel in (systemd_pod_cgroup(uid, cls), cgroupfs_pod_cgroup(uid, cls)):
            candidate = cgroup_root / rel
            if candidate.is_dir():
                return candidate
    return None


def find_container_cgroup(pod_cgroup: Path, container_id: str) -> Path | None:
    """The container's existing cgroup directory inside its pod's, or None."""
    for name in container_cgroup_names(container_id):
        candidate = pod_cgroup / name
        if candidate.is_dir():
            return candidate
    return None


def pod_uid_from_cgroup(path: str | os.PathLike[str]) -> str | None:
    """The pod UID a cgroup path belongs to (the pod's own or any directory below it), or None.

    Works on absolute and relative paths of either layout; the UID comes back with dashes.
    """
    for part in reversed(PurePosixPath(path).parts):
        match = _POD_DIR.match(part)
        if match is not None:
            systemd_uid, cgroupfs_uid = match.groups()
            return cgroupfs_uid if systemd_uid is None else systemd_uid.replace("_", "-")
    return None


def cgroup2_mounts(mountinfo: str) -> list[Path]:
    """Mount points of every cgroup2 file system in /proc/<pid>/mountinfo text, in order."""
    mounts: list[Path] = []
    for line in mountinfo.splitlines():
        # "<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> ..."
        fields, sep, tail = line.partition(" - ")
        if not sep or not tail.startswith("cgroup2 "):
            continue
        parts = fields.split()
        if len(parts) >= 5:
            mounts.append(Path(_unescape_mountinfo(parts[4])))
    return mounts


def find_cgroup_root(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path:
    """The cgroup2 mount that shows the kubelet's pods.

    A container sees its own cgroup namespace at /sys/fs/cgroup, with no kubepods in it; the
    DaemonSet mounts the host's hierarchy a second time (at /host/sys/fs/cgroup), so the mount
    that has kubepods.slice or kubepods wins, and the first cgroup2 mount is the fallback.
    """
    mounts = cgroup2_mounts(mountinfo.read_text())
    if not mounts:
        raise FileNotFoundError(f"no cgroup2 file system in {mountinfo}: cgroup v1 is unsupported")
    for mount in mounts:
        if (mount / "kubepods.slice").is_dir() or (mount / "kubepods").is_dir():
            return mount
    return mounts[0]


def _unescape_mountinfo(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \040, \011, \012 and \134.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
