"""`podman run` arguments derived from the DaemonSet (daemonset/ rendered by test_manifests'
kustomize), so that the container test runs the agent with exactly the privileges, host
namespaces, mounts and environment the manifests declare, and cannot drift from them.

What maps, and how:
- securityContext: privileged -> --privileged; capabilities drop/add -> --cap-drop/--cap-add;
  allowPrivilegeEscalation: false -> no-new-privileges; seccompProfile/appArmorProfile
  Unconfined -> seccomp=unconfined / apparmor=unconfined.
- hostPID -> --pid=host; hostNetwork -> --network=host, else the pod's own network namespace
  (the caller passes one: a test pod's, as the kubelet would give the pod one).
- volumes: hostPath -> a bind mount of the same host path (DirectoryOrCreate creates it, Directory
  must exist); configMap -> a directory the caller filled with the ConfigMap's data; readOnly ->
  ro. Bind mounts are recursive (rbind), like the kubelet's hostPath mounts.
- env: value as given; fieldRef spec.nodeName -> the node name given.
- args: the container's args (the image's entrypoint is `infertap`), plus what the caller adds.
- resources.limits.memory -> --memory.
Nothing else in the pod spec has a podman meaning here (serviceAccount, priorityClass,
tolerations, probes: the test calls the probe endpoints itself).

Two things come from this machine, not from the manifests (`machine_args`): the OCI runtime is
runc (crun refuses hybrid cgroups), and rlimits no higher than podman's own (root here lacks
CAP_SYS_RESOURCE). scripts/build-image.sh does the same.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

PODMAN = ["podman", "--runtime", "runc"]
PODMAN_NPROC = 32768  # podman lowers its own RLIMIT_NPROC to this (/proc/<podman>/limits)

Obj = dict[str, Any]

KNOWN_SECURITY = {
    "privileged",
    "allowPrivilegeEscalation",
    "capabilities",
    "seccompProfile",
    "appArmorProfile",
}


def machine_args() -> list[str]:
    """rlimits a container may have here: at most podman's own hard limits."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    if nproc == resource.RLIM_INFINITY or nproc > PODMAN_NPROC:
        nproc = PODMAN_NPROC
    return [f"--ulimit=nofile={nofile}:{nofile}", f"--ulimit=nproc={nproc}:{nproc}"]


def agent_pod(objs: list[Obj]) -> tuple[Obj, Obj]:
    """(pod spec, agent container) of the rendered DaemonSet."""
    (ds,) = [o for o in objs if o["kind"] == "DaemonSet"]
    spec: Obj = ds["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "agent"]
    return spec, container


def security_args(container: Obj) -> list[str]:
    sc: Obj = container.get("securityContext", {})
    unknown = set(sc) - KNOWN_SECURITY
    assert not unknown, f"no podman mapping for securityContext {unknown}"
    out: list[str] = []
    if sc.get("privileged"):
        out.append("--privileged")
    caps = sc.get("capabilities", {})
    out += [f"--cap-drop={c}" for c in caps.get("drop", [])]
    out += [f"--cap-add={c}" for c in caps.get("add", [])]
    if sc.get("allowPrivilegeEscalation") is False:
        out.append("--security-opt=no-new-privileges")
    for field, opt in (("seccompProfile", "seccomp"), ("appArmorProfile", "apparmor")):
        profile = sc.get(field)
        if profile is not None:
            assert profile["type"] == "Unconfined", f"{field} {profile}: only Unconfined maps"
            out.append(f"--security-opt={opt}=unconfined")
    return out


def mount_args(spec: Obj, container: Obj, config_dirs: dict[str, Path]) -> list[str]:
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    out: list[str] = []
    for m in container.get("volumeMounts", []):
        volume = volumes[m["name"]]
        if "hostPath" in volume:
            host = Path(volume["hostPath"]["path"])
            kind = volume["hostPath"].get("type", "")
            if kind == "DirectoryOrCreate":
                host.mkdir(parents=True, exist_ok=True)
            elif kind == "Directory":
                assert host.is_dir(), f"hostPath {host} must be a directory"
            else:
                raise AssertionError(f"no mapping for hostPath type {kind!r}")
        elif "configMap" in volume:
            host = config_dirs[volume["configMap"]["name"]]
        else:
            raise AssertionError(f"no mapping for volume {volume}")
        options = ["ro" if m.get("readOnly") else "rw", "rbind"]
        out.append(f"--volume={host}:{m['mountPath']}:{','.join(options)}")
    return out


def env_args(container: Obj, node_name: str, override: dict[str, str]) -> list[str]:
    out: list[str] = []
    for e in container.get("env", []):
        if e["name"] in override:
            continue
        if "value" in e:
            value = e["value"]
        else:
            ref = e["valueFrom"]["fieldRef"]["fieldPath"]
            assert ref == "spec.nodeName", f"no mapping for fieldRef {ref}"
            value = node_name
        out.append(f"--env={e['name']}={value}")
    out += [f"--env={k}={v}" for k, v in override.items()]
    return out


def podman_run_args(
    objs: list[Obj],
    *,
    name: str,
    image: str,
    netns: str | None,
    config_dirs: dict[str, Path],
    node_name: str = "podman-node",
    env_override: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> list[str]:
    """`podman run` argv (without the leading "podman") for the DaemonSet's agent container."""
    spec, container = agent_pod(objs)
    argv = ["run", "--detach", f"--name={name}", "--pull=never", *machine_args()]
    argv += security_args(container)
    if spec.get("hostPID"):
        argv.append("--pid=host")
    if spec.get("hostNetwork"):
        argv.append("--network=host")
    else:
        assert netns, "the pod has its own network namespace: give one"
        argv.append(f"--network=ns:{netns}")
    memory = container.get("resources", {}).get("limits", {}).get("memory")
    if memory:
        argv.append(f"--memory={memory.removesuffix('i').lower()}")
    argv += mount_args(spec, container, config_dirs)
    argv += env_args(container, node_name, env_override or {})
    argv.append(image)
    argv += [*container.get("args", []), *(extra_args or [])]
    return argv
