"""Pod discovery on recorded pod objects and real (temporary) cgroup directory trees.

Only the Kubernetes API is faked: pods and namespaces come from JSON fixtures in
tests/fixtures/k8s/, either handed over directly or served over HTTP on 127.0.0.1 to the real
`kubernetes` client. The cgroup trees are real directories laid out the way the kubelet lays them
out, written here by hand (not with the module's own path functions) for both cgroup drivers and
containerd, CRI-O and docker.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlparse

import kubernetes_validate
import pytest
from kubernetes import client

from infertap.agent.discovery.kubelet_cgroups import (
    cgroup2_mounts,
    cgroupfs_pod_cgroup,
    container_cgroup_names,
    find_cgroup_root,
    find_pod_cgroup,
    parse_container_id,
    pod_uid_from_cgroup,
    systemd_pod_cgroup,
)
from infertap.agent.discovery.pod_watch import (
    Attachment,
    KubernetesApi,
    LabelSelector,
    Pod,
    PodAdded,
    PodEvent,
    PodRemoved,
    PodWatcher,
    Requirement,
    attach_detach,
    reconcile,
    wants_inspection,
)

FIXTURES = Path(__file__).parent / "fixtures" / "k8s"
Driver = Literal["systemd", "cgroupfs"]
DRIVERS: tuple[Driver, ...] = ("systemd", "cgroupfs")
SERVING = LabelSelector({"infertap.io/inspect": "true"})
# The fixture pods that are inspected with SERVING as the namespace selector.
INSPECTED = ("triton-7d9c6b5f4-x2k8q", "vllm-0", "tfserving-5c8d7f9b6-pq4zr", "sklearn-server-0")


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def pod_objects() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = load("pods-node-a.json")["items"]
    return items


def namespace_labels() -> dict[str, dict[str, str]]:
    return {
        ns["metadata"]["name"]: ns["metadata"]["labels"] for ns in load("namespaces.json")["items"]
    }


def by_name(name: str) -> dict[str, Any]:
    return next(p for p in pod_objects() if p["metadata"]["name"] == name)


# --- A kubelet's cgroup tree, by hand -----------------------------------------------------------

# Written out literally, independent of infertap.agent.discovery.kubelet_cgroups.
SYSTEMD_POD = {
    "Guaranteed": "kubepods.slice/kubepods-pod{u}.slice",
    "Burstable": "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice",
    "BestEffort": "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice",
}
CGROUPFS_POD = {
    "Guaranteed": "kubepods/pod{uid}",
    "Burstable": "kubepods/burstable/pod{uid}",
    "BestEffort": "kubepods/besteffort/pod{uid}",
}
SYSTEMD_CONTAINER = {
    "containerd": "cri-containerd-{id}.scope",
    "cri-o": "crio-{id}.scope",
    "docker": "docker-{id}.scope",
}
CGROUPFS_CONTAINER = {"containerd": "{id}", "cri-o": "crio-{id}", "docker": "{id}"}
PAUSE_ID = "f" * 64


def pod_dir(driver: Driver, obj: dict[str, Any]) -> str:
    uid = obj["metadata"]["uid"]
    qos = obj["status"]["qosClass"]
    if driver == "systemd":
        return SYSTEMD_POD[qos].format(u=uid.replace("-", "_"))
    return CGROUPFS_POD[qos].format(uid=uid)


def container_dir(driver: Driver, container_id: str) -> str:
    runtime, _, ident = container_id.partition("://")
    table = SYSTEMD_CONTAINER if driver == "systemd" else CGROUPFS_CONTAINER
    return table[runtime].format(id=ident)


def make_tree(root: Path, driver: Driver, objs: list[dict[str, Any]]) -> Path:
    """The kubelet's directories for these pods (pod, sandbox, running containers) plus noise."""
    root.mkdir(parents=True, exist_ok=True)
    for noise in ("system.slice/containerd.service", "user.slice", "init.scope"):
        (root / noise).mkdir(parents=True, exist_ok=True)
    for obj in objs:
        base = root / pod_dir(driver, obj)
        base.mkdir(parents=True, exist_ok=True)
        runtime = obj["status"]["containerStatuses"][0]["containerID"].partition("://")[0]
        (base / container_dir(driver, f"{runtime}://{PAUSE_ID}")).mkdir()
        if runtime == "cri-o" and driver == "systemd":
            (base / f"crio-conmon-{PAUSE_ID}.scope").mkdir()
        for status in obj["status"]["containerStatuses"]:
            if "running" in status["state"]:
                (base / container_dir(driver, status["containerID"])).mkdir()
    return root


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> Driver:
    value: Driver = request.param
    return value


@pytest.fixture
def tree(tmp_path: Path, driver: Driver) -> Path:
    return make_tree(tmp_path / "cgroup", driver, pod_objects())


# --- Fixtures are Pods ------------------------------------------------------------------------


def test_fixtures_are_valid_kubernetes_objects() -> None:
    objs = [*pod_objects(), *load("namespaces.json")["items"]]
    objs += [e["object"] for e in load("pod-watch-events.json") if e["type"] != "BOOKMARK"]
    for obj in objs:
        kubernetes_validate.validate(obj, "1.34", strict=True)


# --- Paths ------------------------------------------------------------------------------------

UID = "8f3b2a1c-6d4e-4f7a-9b2c-1e5d7a9c3b41"


def test_systemd_paths_for_each_qos() -> None:
    u = "8f3b2a1c_6d4e_4f7a_9b2c_1e5d7a9c3b41"
    assert str(systemd_pod_cgroup(UID, "Guaranteed")) == f"kubepods.slice/kubepods-pod{u}.slice"
    assert str(systemd_pod_cgroup(UID, "Burstable")) == (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"
    )
    assert str(systemd_pod_cgroup(UID, "BestEffort")) == (
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"
    )


def test_cgroupfs_paths_for_each_qos() -> None:
    assert str(cgroupfs_pod_cgroup(UID, "Guaranteed")) == f"kubepods/pod{UID}"
    assert str(cgroupfs_pod_cgroup(UID, "Burstable")) == f"kubepods/burstable/pod{UID}"
    assert str(cgroupfs_pod_cgroup(UID, "BestEffort")) == f"kubepods/besteffort/pod{UID}"


def test_container_names_per_runtime() -> None:
    assert container_cgroup_names("containerd://abc") == ("cri-containerd-abc.scope", "abc")
    assert container_cgroup_names("docker://abc") == ("docker-abc.scope", "abc")
    assert container_cgroup_names("cri-o://abc") == ("crio-abc.scope", "abc", "crio-abc")
    assert parse_container_id("containerd://abc") == ("containerd", "abc")
    for bad in ("abc", "containerd://", "://abc"):
        with pytest.raises(ValueError):
            parse_container_id(bad)


@pytest.mark.parametrize(
    "path",
    [
        f"/sys/fs/cgroup/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice",
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}"
        ".slice/cri-containerd-abc.scope",
        f"/host/sys/fs/cgroup/kubepods/besteffort/pod{UID}/crio-abc",
        f"kubepods/pod{UID}/abc",
    ],
)
def test_pod_uid_from_cgroup(path: str) -> None:
    assert pod_uid_from_cgroup(path) == UID


def test_pod_uid_from_non_pod_cgroups() -> None:
    for path in ("/sys/fs/cgroup", "/sys/fs/cgroup/kubepods.slice", "system.slice/x.service"):
        assert pod_uid_from_cgroup(path) is None


def test_find_pod_cgroup_both_layouts_and_unknown_qos(tree: Path, driver: Driver) -> None:
    for obj in pod_objects():
        uid = obj["metadata"]["uid"]
        expected = tree / pod_dir(driver, obj)
        assert find_pod_cgroup(tree, uid, obj["status"]["qosClass"]) == expected
        assert find_pod_cgroup(tree, uid, None) == expected  # qosClass missing: all are tried
    assert find_pod_cgroup(tree, "00000000-0000-4000-8000-000000000000", "Burstable") is None


def test_cgroup_root_from_mountinfo(tmp_path: Path) -> None:
    own = tmp_path / "own"  # the container's cgroup namespace: no kubepods visible
    own.mkdir()
    host = tmp_path / "host sys" / "fs" / "cgroup"  # a space, escaped as \040 in mountinfo
    (host / "kubepods.slice").mkdir(parents=True)
    escaped = str(host).replace(" ", "\\040")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        f"30 22 0:26 / {own} rw,nosuid,nodev shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
        f"41 22 0:26 /../../.. {escaped} rw master:9 - cgroup2 cgroup2 rw,nsdelegate\n"
        "42 22 0:40 / /sys/fs/bpf rw - bpf bpf rw\n"
    )
    assert cgroup2_mounts(mountinfo.read_text()) == [own, host]
    assert find_cgroup_root(mountinfo) == host
    (host / "kubepods.slice").rmdir()
    assert find_cgroup_root(mountinfo) == own  # none shows pods: the first mount
    mountinfo.write_text("22 1 0:21 / /proc rw,nosuid - proc proc rw\n")
    with pytest.raises(FileNotFoundError):
        find_cgroup_root(mountinfo)


# --- Selection --------------------------------------------------------------------------------


def test_pod_from_json() -> None:
    pod = Pod.from_json(by_name("triton-7d9c6b5f4-x2k8q"))
    assert (pod.namespace, pod.name, pod.qos_class, pod.phase) == (
        "serving",
        "triton-7d9c6b5f4-x2k8q",
        "Burstable",
        "Running",
    )
    assert pod.uid == "8f3b2a1c-6d4e-4f7a-9b2c-1e5d7a9c3b41"
    assert pod.labels["app"] == "triton"
    assert len(pod.container_ids) == 2
    assert all(c.startswith("containerd://") for c in pod.container_ids)
    assert Pod.from_json(by_name("warmup-28431100-zt9vn")).container_ids == ()  # terminated


def test_label_selector() -> None:
    sel = LabelSelector.from_dict(
        {
            "matchLabels": {"team": "inference"},
            "matchExpressions": [
                {"key": "env", "operator": "In", "values": ["prod", "staging"]},
                {"key": "legacy", "operator": "DoesNotExist"},
            ],
        }
    )
    assert sel.matches({"team": "inference", "env": "prod"})
    assert not sel.matches({"team": "inference", "env": "dev"})
    assert not sel.matches({"team": "inference", "env": "prod", "legacy": "yes"})
    assert not sel.matches({"env": "prod"})
    assert LabelSelector().matches({})  # empty selects everything, as in Kubernetes
    assert Requirement("x", "NotIn", ("a",)).matches({})
    assert Requirement("x", "Exists").matches({"x": ""})
    bad: dict[str, Any]
    for bad in (
        {"matchLabel": {}},
        {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["b"]}]},
        {"matchExpressions": [{"key": "a", "operator": "In"}]},
        {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]},
    ):
        with pytest.raises(ValueError):
            LabelSelector.from_dict(bad)


def test_opt_in_rules() -> None:
    ns = namespace_labels()
    chosen = {
        o["metadata"]["name"]
        for o in pod_objects()
        if wants_inspection(Pod.from_json(o), ns, SERVING)
    }
    # triton by namespace; vllm by label; tfserving by annotation; sklearn by label. Not: web
    # (nothing), warmup (finished), debug-shell (opted out inside a selected namespace).
    assert chosen == {
        "triton-7d9c6b5f4-x2k8q",
        "vllm-0",
        "tfserving-5c8d7f9b6-pq4zr",
        "sklearn-server-0",
    }
    without_selector = {
        o["metadata"]["name"] for o in pod_objects() if wants_inspection(Pod.from_json(o), ns, None)
    }
    assert without_selector == chosen - {"triton-7d9c6b5f4-x2k8q"}


# --- Reconcile --------------------------------------------------------------------------------


def desired_names(attachments: frozenset[Attachment]) -> set[tuple[str, str, str]]:
    return {(a.pod.namespace, a.pod.name, str(a.cgroup_path)) for a in attachments}


def test_reconcile_pod_level(tree: Path, driver: Driver) -> None:
    pods = [Pod.from_json(o) for o in pod_objects()]
    got = reconcile(pods, tree, namespace_labels=namespace_labels(), namespace_selector=SERVING)
    expected = {
        (o["metadata"]["namespace"], o["metadata"]["name"], str(tree / pod_dir(driver, o)))
        for o in map(by_name, INSPECTED)
    }
    assert desired_names(got) == expected


def test_reconcile_container_level(tree: Path, driver: Driver) -> None:
    pods = [Pod.from_json(o) for o in pod_objects()]
    got = reconcile(
        pods,
        tree,
        namespace_labels=namespace_labels(),
        namespace_selector=SERVING,
        level="container",
    )
    expected = set()
    for name in [
        "triton-7d9c6b5f4-x2k8q",
        "vllm-0",
        "tfserving-5c8d7f9b6-pq4zr",
        "sklearn-server-0",
    ]:
        obj = by_name(name)
        for status in obj["status"]["containerStatuses"]:
            path = tree / pod_dir(driver, obj) / container_dir(driver, status["containerID"])
            expected.add((obj["metadata"]["namespace"], name, str(path)))
    assert desired_names(got) == expected
    assert len(got) == 5  # triton has two containers; the sandbox (pause) is never picked
    runtimes = {str(a.cgroup_path.name) for a in got}
    if driver == "systemd":
        prefixes = {n.split("-")[0] for n in runtimes}
        assert prefixes == {"cri", "crio", "docker"}


def test_reconcile_waits_for_the_cgroup(tmp_path: Path, driver: Driver) -> None:
    obj = by_name("vllm-0")
    root = tmp_path / "cgroup"
    root.mkdir()
    pods = [Pod.from_json(obj)]
    assert reconcile(pods, root) == frozenset()  # kubelet has not made it yet
    (root / pod_dir(driver, obj)).mkdir(parents=True)
    assert desired_names(reconcile(pods, root)) == {
        ("ml", "vllm-0", str(root / pod_dir(driver, obj)))
    }


# --- PodWatcher, fed directly -----------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[PodEvent] = []
        self.lock = threading.Lock()

    def __call__(self, event: PodEvent) -> None:
        with self.lock:
            self.events.append(event)

    def take(self) -> list[tuple[str, str]]:
        with self.lock:
            out = [(type(e).__name__, f"{e.namespace}/{e.name}") for e in self.events]
            self.events.clear()
        return out


def watcher_for(tree: Path, on_event: Callable[[PodEvent], None]) -> PodWatcher:
    return PodWatcher("node-a", tree, on_event, namespace_selector=SERVING)


def test_watcher_add_remove_relabel(tree: Path, driver: Driver) -> None:
    rec = Recorder()
    watcher = watcher_for(tree, rec)
    watcher.replace(map(Pod.from_json, pod_objects()), load("namespaces.json")["items"])
    assert sorted(rec.take()) == [
        ("PodAdded", "ml/sklearn-server-0"),
        ("PodAdded", "ml/tfserving-5c8d7f9b6-pq4zr"),
        ("PodAdded", "ml/vllm-0"),
        ("PodAdded", "serving/triton-7d9c6b5f4-x2k8q"),
    ]
    events = load("pod-watch-events.json")
    new_pod = events[0]["object"]
    make_tree(tree, driver, [new_pod])  # the kubelet makes its cgroup as it starts it
    expected = [
        [("PodAdded", "serving/triton-7d9c6b5f4-m7h2w")],  # ADDED in a selected namespace
        [("PodRemoved", "ml/vllm-0")],  # relabelled infertap.io/inspect=false
        [("PodRemoved", "ml/tfserving-5c8d7f9b6-pq4zr")],  # DELETED
        [],  # BOOKMARK
    ]
    for event, want in zip(events, expected, strict=True):
        watcher.apply(event["type"], event["object"])
        assert rec.take() == want

    # A label change that does not touch the opt-in detaches nothing.
    triton = copy.deepcopy(by_name("triton-7d9c6b5f4-x2k8q"))
    triton["metadata"]["labels"]["version"] = "v2"
    watcher.apply("MODIFIED", triton)
    assert rec.take() == []
    # Opting in by relabel attaches; the web pod's cgroup exists already.
    web = copy.deepcopy(by_name("web-6f7b8c9d5-abcde"))
    web["metadata"]["labels"]["infertap.io/inspect"] = "true"
    watcher.apply("MODIFIED", web)
    assert rec.take() == [("PodAdded", "default/web-6f7b8c9d5-abcde")]
    # Finishing detaches.
    web["status"]["phase"] = "Succeeded"
    watcher.apply("MODIFIED", web)
    assert rec.take() == [("PodRemoved", "default/web-6f7b8c9d5-abcde")]


def test_events_carry_path_and_labels(tree: Path, driver: Driver) -> None:
    attached: list[Path] = []
    detached: list[Path] = []
    seen: list[PodEvent] = []

    def on_event(event: PodEvent) -> None:
        seen.append(event)
        attach_detach(attached.append, detached.append)(event)

    watcher = watcher_for(tree, on_event)
    vllm = by_name("vllm-0")
    watcher.replace([Pod.from_json(vllm)])
    path = tree / pod_dir(driver, vllm)
    assert attached == [path]
    added = seen[0]
    assert isinstance(added, PodAdded)
    assert (added.namespace, added.name, added.uid) == ("ml", "vllm-0", vllm["metadata"]["uid"])
    assert added.labels == {"app": "vllm", "infertap.io/inspect": "true"}
    watcher.apply("DELETED", vllm)
    assert detached == [path]
    assert seen[1] == PodRemoved("ml", "vllm-0", vllm["metadata"]["uid"], path)


def test_failed_attach_is_retried(tree: Path) -> None:
    calls: list[PodEvent] = []

    def flaky(event: PodEvent) -> None:
        calls.append(event)
        if len(calls) == 1:
            raise OSError("BPF_PROG_ATTACH: EBUSY")

    watcher = watcher_for(tree, flaky)
    watcher.replace([Pod.from_json(by_name("vllm-0"))])
    assert watcher.attached == frozenset()
    watcher.sync()
    assert len(watcher.attached) == 1
    assert [type(e) for e in calls] == [PodAdded, PodAdded]


def test_pod_for_cgroup_lookups(tree: Path, driver: Driver) -> None:
    watcher = watcher_for(tree, Recorder())
    watcher.replace(map(Pod.from_json, pod_objects()), load("namespaces.json")["items"])
    triton = by_name("triton-7d9c6b5f4-x2k8q")
    base = tree / pod_dir(driver, triton)
    container = base / container_dir(
        driver, triton["status"]["containerStatuses"][0]["containerID"]
    )
    assert watcher.pod_for_cgroup(base) == ("serving", "triton-7d9c6b5f4-x2k8q")
    assert watcher.pod_for_cgroup(container) == ("serving", "triton-7d9c6b5f4-x2k8q")
    assert watcher.pod_for_cgroup(container.relative_to(tree)) == (
        "serving",
        "triton-7d9c6b5f4-x2k8q",
    )
    web = by_name("web-6f7b8c9d5-abcde")  # on the node but not inspected
    assert watcher.pod_for_cgroup(tree / pod_dir(driver, web)) is None
    assert watcher.pod_for_cgroup(tree / "system.slice") is None
    # By cgroup ID (the directory's inode), including a container started after the attach.
    assert watcher.pod_for_cgroup_id(os.stat(container).st_ino) == (
        "serving",
        "triton-7d9c6b5f4-x2k8q",
    )
    restarted = base / container_dir(driver, "containerd://" + "e" * 64)
    restarted.mkdir()
    assert watcher.pod_for_cgroup_id(os.stat(restarted).st_ino) == (
        "serving",
        "triton-7d9c6b5f4-x2k8q",
    )
    assert watcher.pod_for_cgroup_id(os.stat(tree / pod_dir(driver, web)).st_ino) is None


# --- PodWatcher.run against a fake API server and the real client ------------------------------


class FakeApiServer:
    """Serves the fixtures as the API server would: a pod list honouring spec.nodeName, the
    namespace list, and one watch stream of the recorded events (later watches end empty)."""

    def __init__(self) -> None:
        self.pods = {p["metadata"]["uid"]: p for p in pod_objects()}
        self.events: list[dict[str, Any]] = load("pod-watch-events.json")
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.fail_next_list = 1  # the first pod list answers 500: the watcher must retry
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                server.requests.append((url.path, query))
                if url.path == "/api/v1/namespaces":
                    self.reply(200, load("namespaces.json"))
                elif url.path == "/api/v1/pods" and query.get("watch") == ["true"]:
                    self.watch()
                elif url.path == "/api/v1/pods":
                    if server.fail_next_list:
                        server.fail_next_list -= 1
                        self.reply(500, {"kind": "Status", "code": 500, "message": "etcd"})
                        return
                    node = query["fieldSelector"][0].removeprefix("spec.nodeName=")
                    items = [p for p in server.pods.values() if p["spec"]["nodeName"] == node]
                    self.reply(200, {"kind": "PodList", "metadata": {"resourceVersion": "1000"},
                                     "items": items})  # fmt: skip
                else:
                    self.reply(404, {"kind": "Status", "code": 404})

            def reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def watch(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
                events, server.events = server.events, []
                if not events:
                    time.sleep(0.1)  # a quiet watch that times out
                for event in events:
                    obj = event["object"]
                    if event["type"] == "DELETED":
                        server.pods.pop(obj["metadata"]["uid"], None)
                    elif event["type"] != "BOOKMARK":
                        server.pods[obj["metadata"]["uid"]] = obj
                    self.wfile.write(json.dumps(event).encode() + b"\n")
                    self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def api(self) -> KubernetesApi:
        port = self.httpd.server_address[1]
        return KubernetesApi(
            client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}"))
        )


@pytest.fixture
def fake_api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


def test_run_lists_watches_and_detaches_on_stop(
    tree: Path, driver: Driver, fake_api: FakeApiServer
) -> None:
    make_tree(tree, driver, [load("pod-watch-events.json")[0]["object"]])
    rec = Recorder()
    watcher = PodWatcher(
        "node-a",
        tree,
        rec,
        api=fake_api.api(),
        namespace_selector=SERVING,
        resync_seconds=1,
        retry_seconds=0.05,
    )
    stop = threading.Event()
    runner = threading.Thread(target=watcher.run, args=(stop,))
    runner.start()
    try:
        deadline = time.monotonic() + 20
        want = {
            "serving/triton-7d9c6b5f4-x2k8q",
            "serving/triton-7d9c6b5f4-m7h2w",
            "ml/sklearn-server-0",
        }
        while time.monotonic() < deadline:
            if {f"{a.pod.namespace}/{a.pod.name}" for a in watcher.attached} == want and any(
                path == "/api/v1/pods" and q.get("watch") == ["true"] and not fake_api.events
                for path, q in fake_api.requests
            ):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"watcher never settled: {watcher.attached}")
    finally:
        stop.set()
        runner.join(timeout=10)
    assert not runner.is_alive()
    events = rec.take()
    added = {n for kind, n in events if kind == "PodAdded"}
    removed = [n for kind, n in events if kind == "PodRemoved"]
    assert added == want | {"ml/vllm-0", "ml/tfserving-5c8d7f9b6-pq4zr"}
    assert sorted(removed) == sorted(added)  # the two the watch took away, then all on stop
    assert watcher.attached == frozenset()
    # The 500 was retried, and every pod request asked for this node only.
    pod_requests = [q for path, q in fake_api.requests if path == "/api/v1/pods"]
    assert len(pod_requests) >= 3
    assert all(q["fieldSelector"] == ["spec.nodeName=node-a"] for q in pod_requests)
