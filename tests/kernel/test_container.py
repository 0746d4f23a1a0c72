"""The DaemonSet's agent container, started for real with podman from the image `make image`
builds, with exactly the privileges, host namespaces, mounts and environment the manifests declare
(tests/podman_manifest.py derives the `podman run` arguments from daemonset/), privileged and with
the capability-only overlay.

One thing differs from a cluster, and only in the arguments: there is no API server here, so
instead of `--kubernetes` (INFERTAP_KUBERNETES=false) the agent is given the test pods' cgroups
with `--cgroup` after the DaemonSet's own args. The container gets its own network namespace, a
test pod's, as a pod without hostNetwork gets one from the kubelet; the test reaches its probes and
metrics at that pod's address on the metrics port, as the kubelet and Prometheus do.

The test first runs scripts/build-image.sh (`make image`), which rebuilds the image only when it
is missing or was built from other files than this checkout's, so the image under test is always
this code.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from podman_manifest import PODMAN, agent_pod, podman_run_args
from support import needs_root, repo_root
from test_manifests import DAEMONSET, OVERLAY, render

from infertap.agent.kernel import cgroups
from infertap.agent.testbed.v2server import start_in_pod

pytestmark = [needs_root, pytest.mark.kernel]

IMAGE = "localhost/infertap/agent:0.1.0"
METRICS_PORT = 9464
STARTUP_S = 180  # the DaemonSet's startup probe: 36 x 5 s


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=check
    )


@pytest.fixture(scope="module")
def image() -> str:
    assert shutil.which("podman"), "podman missing: scripts/system-deps.sh installs it"
    # Builds only if the image is missing or older than this checkout's files (seconds if not).
    build = subprocess.run(
        [str(repo_root() / "scripts" / "build-image.sh")],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    return IMAGE


@dataclass
class Pods:
    """The container test's pods, added to the session's lab (a second Lab in one process would
    share its bridge and interface names, which are the process id)."""

    client: Any
    server: Any
    agent: Any  # the agent pod's own network namespace


@pytest.fixture(scope="module")
def pods(lab: Any) -> Pods:
    made = Pods(*(lab.add_pod(f"ctr-{role}") for role in ("client", "server", "agent")))
    start_in_pod(made.server, 8000, 8001)
    return made


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


def attached_cgroups() -> str:
    return subprocess.run(["bpftool", "cgroup", "tree"], capture_output=True, text=True).stdout


def run_client(pods: Pods, seed: int) -> None:
    script = str(repo_root() / "tests" / "v2_client_script.py")
    server = pods.server
    r = pods.client.run(
        [sys.executable, script, server.ip, "8000", "8001", str(seed)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]


def metric_value(body: str, name: str, *needles: str) -> float:
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") and all(n in line for n in needles):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_container(
    objs: list[dict[str, Any]], pods: Pods, image: str, name: str, tmp: Path
) -> tuple[str, dict[str, Any]]:
    """Start the DaemonSet's container on the test pods; returns (metrics URL, facts seen)."""
    configmap = next(o for o in objs if o["kind"] == "ConfigMap")
    config_dir = tmp / "policy"
    config_dir.mkdir()
    for file, text in configmap["data"].items():
        (config_dir / file).write_text(text)
    mount = cgroups.cgroup2_mount()
    pod_cgroups = [str(p.cgroup.relative_to(mount)) for p in (pods.client, pods.server)]
    extra = [arg for cg in pod_cgroups for arg in ("--cgroup", cg)]
    argv = podman_run_args(
        objs,
        name=name,
        image=image,
        netns=f"/var/run/netns/{pods.agent.netns}",
        config_dirs={configmap["metadata"]["name"]: config_dir},
        node_name="podman-node",
        env_override={"INFERTAP_KUBERNETES": "false"},
        extra_args=extra,
    )
    podman("rm", "--force", "--ignore", name)
    podman(*argv)
    return f"http://{pods.agent.ip}:{METRICS_PORT}", {"argv": argv}


def stop_like_the_kubelet(name: str, objs: list[dict[str, Any]]) -> bool:
    """SIGTERM, then SIGKILL if still running after terminationGracePeriodSeconds. (`podman
    stop` is not used: with --pid=host under runc its SIGTERM never reached the agent here,
    while `podman kill --signal TERM` did.) True if it exited within the grace period."""
    grace = float(agent_pod(objs)[0]["terminationGracePeriodSeconds"])
    podman("kill", "--signal", "TERM", name, check=False)
    try:
        podman("wait", name, timeout=grace, check=False)
        return True
    except subprocess.TimeoutExpired:
        podman("kill", "--signal", "KILL", name, check=False)
        podman("wait", name, timeout=30, check=False)
        return False


def manifests(variant: str) -> list[dict[str, Any]]:
    """privileged: daemonset/; capabilities: the overlay; capabilities-without-X: the overlay
    with capability X taken out (to measure what the agent really needs)."""
    if variant == "privileged":
        return render(DAEMONSET)
    objs = render(OVERLAY)
    if variant.startswith("capabilities-without-"):
        missing = variant.removeprefix("capabilities-without-").split("+")
        caps = agent_pod(objs)[1]["securityContext"]["capabilities"]
        assert set(missing) <= set(caps["add"])
        caps["add"] = [c for c in caps["add"] if c not in missing]
    return objs


# SYS_ADMIN is in the overlay for what enters pod network namespaces (steering, polyfill), not
# for interception and inspection: the agent does all of this test without it.
@pytest.mark.parametrize(
    "variant", ["privileged", "capabilities", "capabilities-without-SYS_ADMIN"]
)
def test_the_daemonset_container_attaches_inspects_serves_and_detaches(
    variant: str, image: str, pods: Pods, tmp_path: Path
) -> None:
    objs = manifests(variant)
    name = f"infertap-test-{variant.lower()}"
    url, facts = run_container(objs, pods, image, name, tmp_path)
    try:
        deadline = time.monotonic() + STARTUP_S
        while get(f"{url}/ready")[0] != 200:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", podman("logs", name, check=False).stderr[-3000:]
            assert time.monotonic() < deadline, "not ready within the startup probe's budget"
            time.sleep(1)
        assert get(f"{url}/healthz")[0] == 200
        tree = attached_cgroups()
        for pod in (pods.client, pods.server):
            assert str(pod.cgroup) + "\n" in tree, f"{pod.name} not attached:\n{tree}"
        # Real traffic between the test pods: tritonclient over REST and gRPC.
        run_client(pods, seed=21)
        time.sleep(1.0)  # the reader polls the ring every 20 ms; metrics are read at scrape
        status, body = get(f"{url}/metrics")
        assert status == 200
        calls = metric_value(body, "infertap_inference_requests_total", 'model="echo"')
        assert calls >= 2, body[-3000:]
        assert metric_value(body, "infertap_messages_total") > 0
        assert 'protocol="kserve-v2-grpc"' in body and 'protocol="kserve-v2-rest"' in body
    finally:
        stopped_in_time = stop_like_the_kubelet(name, objs)
        logs = podman("logs", name, check=False)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", name, check=False)
        podman("rm", "--force", "--ignore", name, check=False)
    # A clean stop (SIGTERM, exit within the grace period) leaves nothing attached.
    assert stopped_in_time, logs.stderr[-2000:]
    assert code.stdout.strip() == "0", logs.stdout[-2000:] + logs.stderr[-2000:]
    assert "Traceback" not in logs.stderr + logs.stdout
    tree = attached_cgroups()
    for pod in (pods.client, pods.server):
        assert str(pod.cgroup) + "\n" not in tree, f"{pod.name} still attached:\n{tree}"
    assert facts["argv"]


# Without SYS_ADMIN (which stands in for BPF and PERFMON in the kernel's checks), each of the
# four others is needed: the agent cannot load its programs, says so in one line and exits 1.
@pytest.mark.parametrize("missing", ["BPF", "PERFMON", "NET_ADMIN", "SYSLOG"])
def test_without_a_needed_capability_the_agent_says_so_and_leaves_nothing(
    missing: str, image: str, pods: Pods, tmp_path: Path
) -> None:
    objs = manifests(f"capabilities-without-SYS_ADMIN+{missing}")
    name = f"infertap-test-no-{missing.lower()}"
    run_container(objs, pods, image, name, tmp_path)
    try:
        podman("wait", name, timeout=60, check=False)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        logs = podman("logs", name, check=False)
    finally:
        podman("rm", "--force", "--ignore", name, check=False)
    assert code == "1", logs.stdout[-1000:]  # a clear error, not a crash
    assert "infertap: error: could not compile or load the BPF programs" in logs.stderr
    assert "Traceback" not in logs.stderr
    tree = attached_cgroups()
    for pod in (pods.client, pods.server):
        assert str(pod.cgroup) + "\n" not in tree
