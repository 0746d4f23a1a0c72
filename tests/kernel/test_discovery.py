"""Pod discovery driving real attachment: a pod's cgroup where kubelet's systemd driver puts it,
a recorded-shape pod object from a stand-in API server (there is no cluster here: the only mock),
and the real agent attaching, labelling and detaching as the pod comes and goes."""

from __future__ import annotations

import json
import queue
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import needs_root, start_client, start_server

pytestmark = [needs_root, pytest.mark.kernel]

UID = "5f1c2b8a-1111-4222-8333-444455556666"


def pod_object(ip: str, resource_version: str = "10") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "fraud-0",
            "namespace": "models",
            "uid": UID,
            "resourceVersion": resource_version,
            "labels": {"app": "fraud", "infertap.io/inspect": "true"},
        },
        "spec": {"nodeName": "node-a", "containers": [{"name": "model", "image": "v2"}]},
        "status": {"phase": "Running", "qosClass": "BestEffort", "podIP": ip},
    }


class StandInKubeApi:
    """The three calls discovery makes, answered from memory; the test pushes watch events."""

    def __init__(self, pods: list[dict[str, Any]]) -> None:
        self.pods = pods
        self.events: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()

    def list_pods(self, node_name: str) -> tuple[list[dict[str, Any]], str]:
        return [p for p in self.pods if p["spec"]["nodeName"] == node_name], "10"

    def list_namespaces(self) -> list[dict[str, Any]]:
        return []

    def watch_pods(
        self, node_name: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        while True:
            item = self.events.get()
            if item is None:
                return
            yield item

    def stop_watch(self) -> None:
        self.events.put(None)


def attached(cgroup: Path) -> int:
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True
    ).stdout
    return sum(1 for p in json.loads(out.strip() or "[]") if p.get("name") == "itap_sockops")


def wait(pred: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_discovered_pods_are_attached_labelled_and_detached(
    lab: Any, tmp_path: Path, make_agent: Callable[..., Any]
) -> None:
    from infertap.agent.kernel.cgroups import cgroup2_mount

    mount = cgroup2_mount()
    slice_ = f"kubepods-besteffort-pod{UID.replace('-', '_')}.slice"
    cg = mount / "kubepods.slice" / "kubepods-besteffort.slice" / slice_
    server = lab.add_pod("k8s-server", cgroup=cg)
    client = lab.add_pod("k8s-client")  # not a Kubernetes pod: never attached
    api = StandInKubeApi([pod_object(server.ip)])
    agent = make_agent(
        kubernetes=True,
        node_name="node-a",
        kube_api=api,
        metrics_addr="127.0.0.1:0",
        api_addr=f"unix:{tmp_path}/a.sock",
    )
    try:
        wait(lambda: attached(cg) == 1)
        assert attached(client.cgroup) == 0
        start_server(server, 8401, echo=True)
        peer = start_client(client, server.ip, 8401)
        assert peer.cmd("send 100 1") == "ok 100" and peer.cmd("recv 100") == "ok 100"
        flow = wait(
            lambda: next((f for f in agent.flows() if f.local.port == 8401 and f.cgroup_id), None)
        )
        assert agent.pods.labels(flow.cgroup_id) == ("models", "fraud-0")
        assert agent.metrics is not None
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics.port}/metrics").read().decode()
        )
        assert 'infertap_bytes_total{namespace="models",pod="fraud-0"} 100.0' in body
        # The pod goes away: the agent detaches from its cgroup.
        api.events.put(("DELETED", pod_object(server.ip, "11")))
        wait(lambda: attached(cg) == 0)
        peer.close()
    finally:
        agent.stop()
    assert attached(cg) == 0
