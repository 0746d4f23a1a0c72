"""The Kubernetes manifests in daemonset/, rendered offline and validated against the schemas.

kustomize is not needed: `render()` below implements the few kustomize features the manifests
use (resources, namespace, configMapGenerator with kustomize's content hash, JSON 6902 patches)
and refuses any other, so a new feature in a kustomization.yaml fails here instead of being
skipped. Where kubectl happens to be installed, its built-in kustomize must produce the very same
objects. Every object is validated with kubernetes-validate in strict mode (unknown fields are
errors) for the oldest and newest Kubernetes versions we support.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DAEMONSET = ROOT / "daemonset"
BASE = DAEMONSET / "base"
OVERLAY = DAEMONSET / "overlays" / "capabilities"
KUBERNETES_VERSIONS = ("1.30", "1.37")  # appArmorProfile needs 1.30
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}
METRICS_PORT = 9464

Obj = dict[str, Any]


# --- A small kustomize ------------------------------------------------------------------------


def kustomize_hash(data: dict[str, str]) -> str:
    """kustomize's ConfigMap name suffix (api/hasher): sha256 of Go's json.Marshal of
    {"data", "kind", "name"}, first 10 hex digits with 0/1/3/a/e spelled g/h/k/m/t. kustomize's
    name lookup (`metadata/name` as one path segment) finds nothing, so the name is ""."""
    encoded = json.dumps(
        {"data": data, "kind": "ConfigMap", "name": ""},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    # Go's encoder escapes these three for HTML safety.
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        encoded = encoded.replace(char, escape)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def json_patch(obj: Obj, ops: list[Obj]) -> None:
    """Apply RFC 6902 add/replace/remove operations in place."""
    for op in ops:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]
        ]
        target: Any = obj
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        key: Any = int(last) if isinstance(target, list) and last != "-" else last
        if op["op"] == "remove":
            del target[key]
        elif op["op"] == "replace":
            if isinstance(target, dict) and key not in target:
                raise KeyError(f"replace of a missing member: {op['path']}")
            target[key] = copy.deepcopy(op["value"])
        elif op["op"] == "add" and isinstance(target, list):
            target.insert(len(target) if key == "-" else key, copy.deepcopy(op["value"]))
        elif op["op"] == "add":
            target[key] = copy.deepcopy(op["value"])
        else:
            raise ValueError(f"unsupported patch op {op['op']!r}")


def matches(obj: Obj, target: Obj) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {
        "group": group,
        "version": version,
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
    }
    return all(wanted[k] == v for k, v in target.items())


def render(directory: Path) -> list[Obj]:
    """The objects `kustomize build directory` produces, for the features used here."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "patches"}
    assert set(spec) <= known, f"render() does not implement {set(spec) - known}"
    objs: list[Obj] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objs += render(path)
        else:
            objs += [o for o in yaml.safe_load_all(path.read_text()) if o]
    renames: dict[str, str] = {}
    for gen in spec.get("configMapGenerator", []):
        assert set(gen) <= {"name", "files"}, gen
        data = {Path(f).name: (directory / f).read_text() for f in gen["files"]}
        name = f"{gen['name']}-{kustomize_hash(data)}"
        renames[gen["name"]] = name
        objs.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
        )
    if "namespace" in spec:
        for obj in objs:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
            for subject in obj.get("subjects", []):
                if subject["kind"] == "ServiceAccount":
                    subject["namespace"] = spec["namespace"]
    for obj in objs:  # kustomize's name references: ConfigMap volumes of workloads
        for volume in obj.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if "configMap" in volume and volume["configMap"]["name"] in renames:
                volume["configMap"]["name"] = renames[volume["configMap"]["name"]]
    for patch in spec.get("patches", []):
        assert set(patch) == {"path", "target"}, patch
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        hits = [o for o in objs if matches(o, patch["target"])]
        assert len(hits) == 1, f"patch target {patch['target']} matches {len(hits)} objects"
        json_patch(hits[0], ops)
    return objs


def by_kind(objs: list[Obj], kind: str) -> Obj:
    (hit,) = [o for o in objs if o["kind"] == kind]
    return hit


def canonical(objs: list[Obj]) -> list[str]:
    return sorted(json.dumps(o, sort_keys=True) for o in objs)


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return render(DAEMONSET)


@pytest.fixture(scope="module")
def overlay() -> list[Obj]:
    return render(OVERLAY)


# --- The renderer is kustomize ----------------------------------------------------------------


def test_kustomize_hash_matches_known_value() -> None:
    # `kubectl kustomize` (kustomize v5.5.0) names a generated ConfigMap with {"f.yaml": "a: 1\n"}
    # x-86552t2557.
    assert kustomize_hash({"f.yaml": "a: 1\n"}) == "86552t2557"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("directory", [DAEMONSET, OVERLAY], ids=["base", "capabilities"])
def test_render_equals_kubectl_kustomize(directory: Path) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], check=True, capture_output=True, text=True
    ).stdout
    assert canonical(render(directory)) == canonical([o for o in yaml.safe_load_all(out) if o])


# --- Schemas ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", ["base", "overlay"])
def test_every_object_validates_strictly(
    variant: str, version: str, base: list[Obj], overlay: list[Obj]
) -> None:
    objs = base if variant == "base" else overlay
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Service",
        ]
    )
    for obj in objs:
        kubernetes_validate.validate(obj, version, strict=True)


def test_demo_workloads_validate_strictly() -> None:
    objs = [o for o in yaml.safe_load_all((DAEMONSET / "demo" / "workloads.yaml").read_text()) if o]
    assert [o["kind"] for o in objs] == [
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "Deployment",
    ]
    for obj in objs:
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)
    for source in objs[1]["data"].values():
        compile(source, "demo", "exec")  # the scripts the demo pods run are Python
    # The policy's namespace selector picks the demo namespace.
    policy = yaml.safe_load((BASE / "policy.yaml").read_text())
    wanted = policy["discovery"]["namespaceSelector"]["matchLabels"]
    assert wanted.items() <= objs[0]["metadata"]["labels"].items()


def test_strict_validation_catches_a_typo(base: list[Obj]) -> None:
    broken = copy.deepcopy(by_kind(base, "DaemonSet"))
    broken["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


# --- What the DaemonSet must do ---------------------------------------------------------------


def agent_container(ds: Obj) -> Obj:
    container: Obj
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "agent"
    return container


def test_everything_in_one_namespace(base: list[Obj]) -> None:
    for obj in base:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == "infertap-system", obj["kind"]
    assert by_kind(base, "Namespace")["metadata"]["name"] == "infertap-system"


def test_rbac_is_read_only_pods_namespaces_nodes(base: list[Obj]) -> None:
    (rule,) = by_kind(base, "ClusterRole")["rules"]
    assert rule == {
        "apiGroups": [""],
        "resources": ["pods", "namespaces", "nodes"],
        "verbs": ["get", "list", "watch"],
    }
    binding = by_kind(base, "ClusterRoleBinding")
    sa = by_kind(base, "ServiceAccount")
    assert binding["roleRef"]["name"] == by_kind(base, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "infertap-system"}
    ]
    pod = by_kind(base, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]


def test_daemonset_privileges_and_host_mounts(base: list[Obj]) -> None:
    ds = by_kind(base, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    container = agent_container(ds)
    assert container["securityContext"] == {"privileged": True}
    assert pod["hostPID"] is True
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert sorted(host_paths.values()) == sorted(
        ["/sys/fs/bpf", "/sys/fs/cgroup", "/lib/modules", "/usr/src", "/run/infertap"]
    )
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    read_only = {host_paths[n] for n, m in mounts.items() if n in host_paths and m.get("readOnly")}
    # Written to: bpffs (pinned maps) and /run/infertap (the API socket). The rest is read.
    assert read_only == {"/sys/fs/cgroup", "/lib/modules", "/usr/src"}
    assert mounts["cgroup"]["mountPath"] == "/host/sys/fs/cgroup"


def test_daemonset_runs_the_agent_with_its_addresses(base: list[Obj]) -> None:
    container = agent_container(by_kind(base, "DaemonSet"))
    args = container["args"]
    assert args[0] == "run"
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert options == {
        "--metrics-addr": f"0.0.0.0:{METRICS_PORT}",
        "--api": "unix:/run/infertap/api.sock",
        "--policy": "/etc/infertap/policy.yaml",
    }
    (node_name,) = [e for e in container["env"] if e["name"] == "NODE_NAME"]
    assert node_name["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert container["ports"] == [
        {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}
    ]


def test_probes(base: list[Obj]) -> None:
    container = agent_container(by_kind(base, "DaemonSet"))
    startup = container["startupProbe"]
    # BCC compiles at start: give it well over a minute before liveness takes over.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert startup["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_scheduling_resources_and_rollout(base: list[Obj]) -> None:
    ds = by_kind(base, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["priorityClassName"] == "system-node-critical"
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    resources = agent_container(ds)["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert "memory" in resources["limits"]


def test_scrape_annotations_and_service(base: list[Obj]) -> None:
    ds = by_kind(base, "DaemonSet")
    service = by_kind(base, "Service")
    want = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }
    for found in (
        ds["spec"]["template"]["metadata"]["annotations"],
        service["metadata"]["annotations"],
    ):
        assert want.items() <= found.items()
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert ds["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_policy_configmap_is_generated_and_checksummed(base: list[Obj]) -> None:
    policy_text = (BASE / "policy.yaml").read_text()
    config = by_kind(base, "ConfigMap")
    assert config["data"] == {"policy.yaml": policy_text}
    name = config["metadata"]["name"]
    assert name == f"infertap-policy-{kustomize_hash({'policy.yaml': policy_text})}"
    ds = by_kind(base, "DaemonSet")
    (volume,) = [v for v in ds["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == name  # a new policy is a new name: a rollout
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    sha = hashlib.sha256(policy_text.encode()).hexdigest()
    assert annotations["infertap.io/policy-sha256"] == sha, (
        "daemonset/base/daemonset.yaml's infertap.io/policy-sha256 is stale: set it to the output "
        "of `sha256sum daemonset/base/policy.yaml`"
    )


def test_policy_content() -> None:
    policy = yaml.safe_load((BASE / "policy.yaml").read_text())
    assert sorted(s["port"] for s in policy["services"]) == [8000, 8001, 8500, 9000]
    assert policy["pii"]["enabled"] is True
    assert policy["drift"]["thresholds"]["psi"] == {"warn": 0.1, "alert": 0.25}
    selector = policy["discovery"]["namespaceSelector"]
    assert selector == {"matchLabels": {"infertap.io/inspect": "true"}}


def test_capabilities_overlay_changes_only_the_security_context(
    base: list[Obj], overlay: list[Obj]
) -> None:
    ds = by_kind(overlay, "DaemonSet")
    sc = agent_container(ds)["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {
        "drop": ["ALL"],
        "add": ["BPF", "PERFMON", "NET_ADMIN", "SYSLOG", "SYS_ADMIN"],
    }
    # Everything else is the base, unchanged.
    stripped = copy.deepcopy(overlay)
    agent_container(by_kind(stripped, "DaemonSet"))["securityContext"] = {"privileged": True}
    assert canonical(stripped) == canonical(base)


# --- The image and the dev VM -----------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DAEMONSET / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    # `ARG BASE=debian:12-slim` then `FROM ${BASE}`: the default base is what docker uses.
    args = dict(arg.split("=", 1) for op, arg in instructions if op == "ARG" and "=" in arg)
    froms = [
        args.get(arg.strip("${}"), arg) if arg.startswith("$") else arg
        for op, arg in instructions
        if op == "FROM"
    ]
    assert froms and all(
        f.startswith("debian:12") or f.startswith("debian:bookworm") for f in froms
    )
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    for package in ("python3-bpfcc", "bpftool", "iproute2"):
        assert f" {package} " in f" {runs} ", package
    assert "/usr/bin/python3 -m venv --system-site-packages /opt/infertap" in runs
    assert "/opt/infertap/bin/pip install --no-cache-dir $PIP_OPTIONS ." in runs
    # Never PyPI's unrelated `bcc`: no pip install names a package called bcc.
    for command in runs.split("&&"):
        words = command.split()
        if "pip" in " ".join(words[:2]) and "install" in words:
            assert "bcc" not in [w.split("=")[0].lower() for w in words], command
    entrypoint = [arg for op, arg in instructions if op == "ENTRYPOINT"]
    assert entrypoint == ['["infertap"]']


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not installed")
def test_vagrantfile_is_valid_ruby() -> None:
    result = subprocess.run(
        ["ruby", "-c", str(ROOT / "Vagrantfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Syntax OK" in result.stdout


# --- podman run, derived from the manifests (tests/podman_manifest.py) -------------------------


def test_podman_args_follow_the_privileged_daemonset(base: list[Obj], tmp_path: Path) -> None:
    from podman_manifest import podman_run_args

    configmap = next(o for o in base if o["kind"] == "ConfigMap")["metadata"]["name"]
    argv = podman_run_args(
        base,
        name="t",
        image="infertap/agent:0.1.0",
        netns="/run/netns/pod",
        config_dirs={configmap: tmp_path},
        node_name="node-1",
        env_override={"INFERTAP_KUBERNETES": "false"},
        extra_args=["--cgroup", "pods/a"],
    )
    assert "--privileged" in argv and "--pid=host" in argv
    assert "--network=ns:/run/netns/pod" in argv  # no hostNetwork: the pod's own namespace
    assert not [a for a in argv if a.startswith("--cap-")]
    volumes = sorted(a.removeprefix("--volume=") for a in argv if a.startswith("--volume="))
    assert volumes == sorted(
        [
            "/sys/fs/bpf:/sys/fs/bpf:rw,rbind",
            "/sys/fs/cgroup:/host/sys/fs/cgroup:ro,rbind",
            "/lib/modules:/lib/modules:ro,rbind",
            "/usr/src:/usr/src:ro,rbind",
            "/run/infertap:/run/infertap:rw,rbind",
            f"{tmp_path}:/etc/infertap:ro,rbind",
        ]
    )
    assert "--env=NODE_NAME=node-1" in argv and "--env=INFERTAP_KUBERNETES=false" in argv
    assert "--env=INFERTAP_KUBERNETES=true" not in argv
    assert "--memory=1536m" in argv
    image = argv.index("infertap/agent:0.1.0")
    assert argv[image + 1 :] == [
        *("run", "--metrics-addr", "0.0.0.0:9464", "--api", "unix:/run/infertap/api.sock"),
        *("--policy", "/etc/infertap/policy.yaml", "--cgroup", "pods/a"),
    ]


def test_podman_args_follow_the_capabilities_overlay(overlay: list[Obj], tmp_path: Path) -> None:
    from podman_manifest import podman_run_args

    configmap = next(o for o in overlay if o["kind"] == "ConfigMap")["metadata"]["name"]
    argv = podman_run_args(
        overlay, name="t", image="i", netns="/n", config_dirs={configmap: tmp_path}
    )
    assert "--privileged" not in argv
    caps = [a for a in argv if a.startswith("--cap-")]
    assert caps == [
        "--cap-drop=ALL",
        *(f"--cap-add={c}" for c in ("BPF", "PERFMON", "NET_ADMIN", "SYSLOG", "SYS_ADMIN")),
    ]
    for opt in ("no-new-privileges", "seccomp=unconfined", "apparmor=unconfined"):
        assert f"--security-opt={opt}" in argv
    assert "--pid=host" in argv


def test_podman_args_refuse_what_they_cannot_map(base: list[Obj], tmp_path: Path) -> None:
    from podman_manifest import podman_run_args

    changed = copy.deepcopy(base)
    ds = next(o for o in changed if o["kind"] == "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = 1000
    with pytest.raises(AssertionError, match="runAsUser"):
        podman_run_args(changed, name="t", image="i", netns="/n", config_dirs={})
