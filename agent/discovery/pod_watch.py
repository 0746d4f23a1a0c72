"""Which pods on this node infertap inspects, and their cgroups: a stream of PodAdded/PodRemoved.

A pod is inspected when it opts in with the label or annotation `infertap.io/inspect: "true"`,
or when its namespace matches the policy's namespace selector; `"false"` on the pod opts it out
even in a selected namespace. Pods that have finished (Succeeded/Failed) are not inspected.

The pure core is `reconcile(pods, cgroup_root) -> desired attachments`; `PodWatcher` keeps the
pods of this node (list, then watch with `spec.nodeName=$NODE_NAME`), reconciles on every change
and hands the differences to the agent as events. `attach_detach(attach, detach)` turns the two
callbacks the agent has into the watcher's `on_event`.

Attach point: by default the pod's own cgroup, not each container's. BPF cgroup programs apply
to every descendant, so one attachment covers all the pod's containers, a restarted container
is covered before its first connect (its new scope is born under an attached parent), and the
pod cgroup exists from sandbox creation on. `level="container"` attaches per container scope
instead (one event per running container) for setups that want that.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, cast, get_args

from infertap.agent.discovery.kubelet_cgroups import (
    QosClass,
    find_container_cgroup,
    find_pod_cgroup,
    pod_uid_from_cgroup,
)

log = logging.getLogger(__name__)

INSPECT_KEY = "infertap.io/inspect"
_FINISHED_PHASES = frozenset({"Succeeded", "Failed"})

AttachLevel = Literal["pod", "container"]


# --- The pod as discovery sees it -------------------------------------------------------------


@dataclass(frozen=True)
class PodRef:
    """A pod's identity: what an attachment is keyed by (labels can change, this cannot)."""

    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class Pod:
    """The fields of a Pod object that discovery uses, read from its JSON form."""

    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    qos_class: QosClass | None = None
    phase: str = "Pending"
    node_name: str = ""
    # Running containers' IDs as the kubelet reports them: "<runtime>://<id>".
    container_ids: tuple[str, ...] = ()

    @property
    def ref(self) -> PodRef:
        return PodRef(self.namespace, self.name, self.uid)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Pod:
        """Read a Pod as the API serves it (`kubectl get pod -o json`, a watch event's object)."""
        meta: Mapping[str, Any] = obj.get("metadata") or {}
        spec: Mapping[str, Any] = obj.get("spec") or {}
        status: Mapping[str, Any] = obj.get("status") or {}
        qos = status.get("qosClass")
        statuses: list[Mapping[str, Any]] = [
            *(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or []),
        ]
        return cls(
            namespace=str(meta.get("namespace", "default")),
            name=str(meta["name"]),
            uid=str(meta["uid"]),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            qos_class=cast(QosClass, qos) if qos in get_args(QosClass) else None,
            phase=str(status.get("phase", "Pending")),
            node_name=str(spec.get("nodeName", "")),
            # Only running containers have a cgroup worth attaching to.
            container_ids=tuple(
                str(s["containerID"])
                for s in statuses
                if s.get("containerID") and "running" in (s.get("state") or {})
            ),
        )


# --- Namespace selector (the policy's) --------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """One matchExpressions entry of a Kubernetes LabelSelector."""

    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values  # NotIn: also true when the key is absent


@dataclass(frozen=True)
class LabelSelector:
    """A Kubernetes LabelSelector ({matchLabels, matchExpressions}); empty matches everything."""

    match_labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            r.matches(labels) for r in self.match_expressions
        )

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> LabelSelector:
        """Read the policy's `namespaceSelector` (the same shape as in any Kubernetes object)."""
        unknown = set(obj) - {"matchLabels", "matchExpressions"}
        if unknown:
            raise ValueError(f"unknown label selector fields: {sorted(unknown)}")
        requirements = []
        for expr in obj.get("matchExpressions") or []:
            op = expr["operator"]
            if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
                raise ValueError(f"unknown label selector operator: {op!r}")
            values = tuple(str(v) for v in expr.get("values") or ())
            if (op in ("In", "NotIn")) != bool(values):
                raise ValueError(f"{op} needs values exactly when it is In or NotIn")
            requirements.append(Requirement(str(expr["key"]), op, values))
        labels = {str(k): str(v) for k, v in (obj.get("matchLabels") or {}).items()}
        return cls(labels, tuple(requirements))


def wants_inspection(
    pod: Pod,
    namespace_labels: Mapping[str, Mapping[str, str]],
    namespace_selector: LabelSelector | None,
) -> bool:
    """Whether the pod is opted in: by itself, or by its namespace unless it opts out."""
    if pod.phase in _FINISHED_PHASES:
        return False
    marks = {pod.labels.get(INSPECT_KEY), pod.annotations.get(INSPECT_KEY)}
    if "false" in marks:
        return False
    if "true" in marks:
        return True
    if namespace_selector is None:
        return False
    return namespace_selector.matches(namespace_labels.get(pod.namespace, {}))


# --- Reconcile: pods -> desired attachments (pure but for reading the cgroup tree) ------------


class Attachment(NamedTuple):
    """One cgroup infertap should have its programs on, and the pod it belongs to."""

    pod: PodRef
    cgroup_path: Path


def reconcile(
    pods: Iterable[Pod],
    cgroup_root: Path,
    *,
    namespace_labels: Mapping[str, Mapping[str, str]] | None = None,
    namespace_selector: LabelSelector | None = None,
    level: AttachLevel = "pod",
) -> frozenset[Attachment]:
    """The attachments the given pods call for, with cgroup paths under cgroup_root.

    A selected pod whose cgroup is not (yet, or any more) on disk is left out; the next
    reconcile after its next update picks it up.
    """
    desired: set[Attachment] = set()
    for pod in pods:
        if not wants_inspection(pod, namespace_labels or {}, namespace_selector):
            continue
        pod_cgroup = find_pod_cgroup(cgroup_root, pod.uid, pod.qos_class)
        if pod_cgroup is None:
            continue
        if level == "pod":
            desired.add(Attachment(pod.ref, pod_cgroup))
            continue
        for container_id in pod.container_ids:
            try:
                scope = find_container_cgroup(pod_cgroup, container_id)
            except ValueError:
                log.warning("pod %s/%s: odd containerID %r", pod.namespace, pod.name, container_id)
                continue
            if scope is not None:
                desired.add(Attachment(pod.ref, scope))
    return frozenset(desired)


# --- Events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodAdded:
    """Attach to cgroup_path: it belongs to this inspected pod."""

    namespace: str
    name: str
    uid: str
    cgroup_path: Path
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class PodRemoved:
    """Detach from cgroup_path: the pod is gone, finished or no longer selected."""

    namespace: str
    name: str
    uid: str
    cgroup_path: Path


PodEvent = PodAdded | PodRemoved


def attach_detach(
    attach: Callable[[Path], None], detach: Callable[[Path], None]
) -> Callable[[PodEvent], None]:
    """An on_event for PodWatcher that calls the agent's attach/detach with the cgroup path."""

    def on_event(event: PodEvent) -> None:
        if isinstance(event, PodAdded):
            attach(event.cgroup_path)
        else:
            detach(event.cgroup_path)

    return on_event


# --- The Kubernetes API, narrowed to what discovery asks of it ---------------------------------


class KubeApi(Protocol):
    """The three calls discovery makes. Objects are plain JSON dicts, as the API serves them."""

    def list_pods(self, node_name: str) -> tuple[list[dict[str, Any]], str]:
        """This node's pods and the list's resourceVersion."""
        ...

    def list_namespaces(self) -> list[dict[str, Any]]: ...

    def watch_pods(
        self, node_name: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(type, object) pairs from resource_version on; ends after timeout_seconds."""
        ...

    def stop_watch(self) -> None:
        """Make a watch_pods iterator in another thread end soon."""
        ...


class KubernetesApi:
    """KubeApi over the official client. In the cluster it uses the pod's service account."""

    def __init__(self, api_client: Any = None) -> None:
        from kubernetes import client, config, watch

        # The config loaders and Watch carry no annotations; typed as Any here, once.
        load_incluster: Any = config.load_incluster_config
        load_kubeconfig: Any = config.load_kube_config
        if api_client is None:
            try:
                load_incluster()
            except config.ConfigException:
                load_kubeconfig()  # running outside the cluster, e.g. on a dev VM
            api_client = client.ApiClient()
        self._core = client.CoreV1Api(api_client)
        self._watch_cls: Any = watch.Watch
        self._watch: Any = None

    def list_pods(self, node_name: str) -> tuple[list[dict[str, Any]], str]:
        # Raw JSON, not the client's models: discovery reads a handful of fields and the
        # recorded fixtures in tests/ have the same shape.
        # With _preload_content=False the client returns the HTTP response, not its annotation.
        resp: Any = self._core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={node_name}", _preload_content=False
        )
        body = json.loads(resp.data)
        return list(body.get("items") or []), str(body["metadata"]["resourceVersion"])

    def list_namespaces(self) -> list[dict[str, Any]]:
        resp: Any = self._core.list_namespace(_preload_content=False)
        return list(json.loads(resp.data).get("items") or [])

    def watch_pods(
        self, node_name: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        self._watch = self._watch_cls()
        stream = self._watch.stream(
            self._core.list_pod_for_all_namespaces,
            field_selector=f"spec.nodeName={node_name}",
            resource_version=resource_version,
            timeout_seconds=timeout_seconds,
            allow_watch_bookmarks=True,
            deserialize=False,
        )
        for event in stream:
            yield str(event["type"]), event["object"]

    def stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.stop()


# --- The watcher ------------------------------------------------------------------------------


class PodWatcher:
    """Follows this node's pods and emits PodAdded/PodRemoved as the desired attachments change.

    `on_event` is called from the thread running `run`; if it raises on a PodAdded, that
    attachment is not recorded and is tried again at the next change or resync. When `run`
    returns, a PodRemoved has been emitted for every attachment still held.
    """

    def __init__(
        self,
        node_name: str,
        cgroup_root: Path,
        on_event: Callable[[PodEvent], None],
        *,
        api: KubeApi | None = None,
        namespace_selector: LabelSelector | None = None,
        level: AttachLevel = "pod",
        resync_seconds: int = 60,
        retry_seconds: float = 5.0,
    ) -> None:
        self.node_name = node_name
        self.cgroup_root = cgroup_root
        self._on_event = on_event
        self._api = api
        self._namespace_selector = namespace_selector
        self._level: AttachLevel = level
        # Each watch ends after this long and is followed by a fresh list: namespace label
        # changes are picked up then, and anything a watch missed is corrected.
        self._resync_seconds = resync_seconds
        self._retry_seconds = retry_seconds
        # _lock guards the state below; _sync_lock makes whole syncs (and their callbacks) one at
        # a time, while lookups from inside a callback still get _lock.
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._pods: dict[str, Pod] = {}
        self._namespace_labels: dict[str, dict[str, str]] = {}
        self._attached: dict[Path, Attachment] = {}
        self._by_cgroup_id: dict[int, PodRef] = {}

    # The state, for the agent's labels and the API.

    @property
    def attached(self) -> frozenset[Attachment]:
        with self._lock:
            return frozenset(self._attached.values())

    def pod_for_cgroup(self, path: str | os.PathLike[str]) -> tuple[str, str] | None:
        """(namespace, pod) of the attached pod that owns path (its cgroup or one below), or
        None. The pod UID is read from the path, so absolute and relative paths both work."""
        uid = pod_uid_from_cgroup(path)
        if uid is None:
            return None
        with self._lock:
            for attachment in self._attached.values():
                if attachment.pod.uid == uid:
                    return attachment.pod.namespace, attachment.pod.name
        return None

    def pod_for_cgroup_id(self, cgroup_id: int) -> tuple[str, str] | None:
        """(namespace, pod) for a cgroup v2 ID (its directory's inode, what BPF's
        bpf_get_current_cgroup_id returns), looking below attached cgroups, or None."""
        with self._lock:
            ref = self._by_cgroup_id.get(cgroup_id)
            if ref is None:
                # New containers appear below attached pod cgroups without an event: rescan.
                self._index_cgroup_ids()
                ref = self._by_cgroup_id.get(cgroup_id)
        return None if ref is None else (ref.namespace, ref.name)

    # Feeding it: run() against the API, or replace()/apply() directly.

    def replace(self, pods: Iterable[Pod], namespaces: Iterable[Mapping[str, Any]] = ()) -> None:
        """Take a full list of this node's pods (and namespaces) and reconcile."""
        with self._lock:
            self._pods = {p.uid: p for p in pods}
            self._namespace_labels = {
                str(ns["metadata"]["name"]): dict(ns["metadata"].get("labels") or {})
                for ns in namespaces
            }
        self.sync()

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> None:
        """Take one watch event (ADDED, MODIFIED, DELETED; BOOKMARK is ignored) and reconcile."""
        if event_type == "BOOKMARK":
            return
        pod = Pod.from_json(obj)
        with self._lock:
            if event_type == "DELETED":
                self._pods.pop(pod.uid, None)
            else:
                self._pods[pod.uid] = pod
        self.sync()

    def sync(self) -> None:
        """Reconcile the pods held now and emit the difference from what is attached."""
        with self._sync_lock:
            self._sync()

    def _sync(self) -> None:
        with self._lock:
            pods = dict(self._pods)
            desired = reconcile(
                pods.values(),
                self.cgroup_root,
                namespace_labels=self._namespace_labels,
                namespace_selector=self._namespace_selector,
                level=self._level,
            )
            current = frozenset(self._attached.values())
        # Removals first: a container restart under level="container" frees the old scope.
        for gone in sorted(current - desired, key=lambda a: str(a.cgroup_path)):
            self._emit_removed(gone)
        for new in sorted(desired - current, key=lambda a: str(a.cgroup_path)):
            self._emit_added(new, pods[new.pod.uid].labels)

    def run(self, stop_event: threading.Event) -> None:
        """List and watch this node's pods until stop_event is set; then detach everything."""
        api = self._api if self._api is not None else KubernetesApi()

        def stop_watch_on_stop() -> None:
            stop_event.wait()
            api.stop_watch()

        threading.Thread(target=stop_watch_on_stop, name="pod-watch-stop", daemon=True).start()
        try:
            while not stop_event.is_set():
                try:
                    self._list_and_watch(api, stop_event)
                except Exception:
                    # API unreachable, 410 Gone, a bad object: keep what is attached, list anew.
                    log.exception("pod discovery: list/watch failed; retrying")
                    stop_event.wait(self._retry_seconds)
        finally:
            with self._sync_lock:
                for attachment in sorted(self.attached, key=lambda a: str(a.cgroup_path)):
                    self._emit_removed(attachment)

    # Internals.

    def _list_and_watch(self, api: KubeApi, stop_event: threading.Event) -> None:
        # Namespaces only matter to a selector; without one, no cluster-wide list is needed.
        namespaces = api.list_namespaces() if self._namespace_selector is not None else []
        items, resource_version = api.list_pods(self.node_name)
        self.replace((Pod.from_json(item) for item in items), namespaces)
        for event_type, obj in api.watch_pods(
            self.node_name, resource_version, self._resync_seconds
        ):
            if stop_event.is_set():
                return
            self.apply(event_type, obj)

    def _emit_added(self, attachment: Attachment, labels: Mapping[str, str]) -> None:
        pod = attachment.pod
        event = PodAdded(pod.namespace, pod.name, pod.uid, attachment.cgroup_path, dict(labels))
        try:
            self._on_event(event)
        except Exception:
            log.exception("attach %s failed; will retry", attachment.cgroup_path)
            return
        with self._lock:
            self._attached[attachment.cgroup_path] = attachment
            self._index_cgroup_ids()

    def _emit_removed(self, attachment: Attachment) -> None:
        pod = attachment.pod
        with self._lock:
            self._attached.pop(attachment.cgroup_path, None)
            self._index_cgroup_ids()
        try:
            self._on_event(PodRemoved(pod.namespace, pod.name, pod.uid, attachment.cgroup_path))
        except Exception:
            # Usually the cgroup is already gone, taking the attachment with it.
            log.exception("detach %s failed", attachment.cgroup_path)

    def _index_cgroup_ids(self) -> None:
        # Called with the lock held. Walks attached cgroups and all their descendants.
        index: dict[int, PodRef] = {}
        for attachment in self._attached.values():
            for dirpath, _dirs, _files in os.walk(attachment.cgroup_path):
                try:
                    index[os.stat(dirpath).st_ino] = attachment.pod
                except FileNotFoundError:
                    continue
        self._by_cgroup_id = index
