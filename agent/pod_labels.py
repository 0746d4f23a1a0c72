"""Who a cgroup is: (namespace, pod) labels for metrics and events.

Without Kubernetes, a "pod" is its cgroup path below the cgroup2 mount and the namespace is empty.
With pod discovery (agent/discovery), the watcher registers real names for the cgroups it attaches.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from infertap.agent.kernel import cgroups

PodLabels = tuple[str, str]
UNKNOWN: PodLabels = ("", "unknown")


class PodDirectory:
    def __init__(self, mount: Path, rescan_interval_s: float = 5.0) -> None:
        self._mount = mount
        self._lock = threading.Lock()
        self._paths: dict[int, str] = {}
        self._names: dict[str, PodLabels] = {}  # cgroup path -> labels, from discovery
        self._last_scan = 0.0
        self._interval = rescan_interval_s

    def register(self, cgroup_path: Path, namespace: str, pod: str) -> None:
        with self._lock:
            self._names[self._rel(cgroup_path)] = (namespace, pod)

    def forget(self, cgroup_path: Path) -> None:
        with self._lock:
            self._names.pop(self._rel(cgroup_path), None)

    def named(self) -> dict[str, PodLabels]:
        """Discovery's names: cgroup path (below the mount) -> labels (for inspection workers)."""
        with self._lock:
            return dict(self._names)

    def _rel(self, path: Path) -> str:
        try:
            return "/" + str(path.relative_to(self._mount)).lstrip(".")
        except ValueError:
            return str(path)

    def cgroup_of(self, namespace: str, pod: str) -> Path | None:
        """The cgroup discovery registered for a pod, or None."""
        with self._lock:
            for rel, labels in self._names.items():
                if labels == (namespace, pod):
                    return self._mount / rel.lstrip("/")
        return None

    def path_of(self, cgroup_id: int) -> str:
        with self._lock:
            path = self._paths.get(cgroup_id)
            if path is None and time.monotonic() - self._last_scan > self._interval:
                # A cgroup we have not seen: rescan, at most every few seconds.
                self._paths = cgroups.id_to_path(self._mount)
                self._last_scan = time.monotonic()
                path = self._paths.get(cgroup_id)
            return path or ""

    def labels(self, cgroup_id: int) -> PodLabels:
        if not cgroup_id:
            return UNKNOWN
        path = self.path_of(cgroup_id)
        if not path:
            return UNKNOWN
        with self._lock:
            named = self._names.get(path)
        # Nested cgroups (containers inside a pod) belong to the pod registered above them.
        if named is None:
            with self._lock:
                for prefix, labels in self._names.items():
                    if path.startswith(prefix.rstrip("/") + "/"):
                        return labels
        return named or ("", path)
