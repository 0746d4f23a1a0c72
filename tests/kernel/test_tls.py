"""TLS plaintext over real interception: uprobes on OpenSSL (libssl.so.3) in real HTTPS clients
(requests, httpx) and a TLS V2 REST server, decoded by the cleartext pipeline; grpcio's stripped
BoringSSL is counted, not seen; no uprobe survives a detach (checked with bpftool)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from support import needs_root

from infertap.agent.api.tls import make_dev_ca
from infertap.agent.testbed.v2server import start_in_pod

pytestmark = [needs_root, pytest.mark.kernel]

HTTPS_PORT, GRPCS_PORT = 9500, 9501
EMAIL = "tls.secret.person@example.net"

# The same request from two real HTTPS clients; each prints the outputs it got back.
CLIENT = """
import json, sys
kind, url, ca, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
body = {
    "id": f"req-{seed}",
    "inputs": [
        {"name": "tls_fp32", "shape": [2, 3], "datatype": "FP32",
         "data": [seed + 0.5, -1.25, 3.0, 4.75, -5.5, 6.0]},
        {"name": "tls_int64", "shape": [3], "datatype": "INT64", "data": [seed, -(10**12), 7]},
        {"name": "who", "shape": [1], "datatype": "BYTES", "data": ["EMAIL"]},
    ],
}
if kind == "requests":
    import requests
    with requests.Session() as s:
        for _ in range(2):
            r = s.post(url, json=body, verify=ca, timeout=30)
            r.raise_for_status()
else:
    import httpx
    with httpx.Client(verify=ca, timeout=30) as c:
        for _ in range(2):
            r = c.post(url, json=body)
            r.raise_for_status()
print("done", json.dumps(r.json()["outputs"][0]["data"]), flush=True)
""".replace("EMAIL", EMAIL)

GRPC_CLIENT = """
import sys, numpy as np, tritonclient.grpc as grpcclient
c = grpcclient.InferenceServerClient(url=sys.argv[1], ssl=True, root_certificates=sys.argv[2])
x = grpcclient.InferInput("tls_fp32", [2], "FP32")
x.set_data_from_numpy(np.array([1.5, 2.5], dtype=np.float32))
r = c.infer("echo", [x])
assert r.as_numpy("tls_fp32").tolist() == [1.5, 2.5]
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def tls_pods(agent: Any, lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    client, server = lab.add_pod("tls-client"), lab.add_pod("tls-server")
    certs = tmp_path_factory.mktemp("tls-certs")
    make_dev_ca(certs, [server.ip])
    for pod in (client, server):
        agent.sensor.attach(pod.cgroup)
    agent.start_tls()  # before any TLS process starts: every one starts after the attach
    try:
        start_in_pod(server, HTTPS_PORT, GRPCS_PORT, tls_dir=certs)
        yield client, server, certs
    finally:
        for pod in (client, server):
            pod.stop_all()
            agent.sensor.detach(pod.cgroup)
        agent.stop_tls()


def run_client(pod: Any, kind: str, url: str, ca: Path, seed: int) -> str:
    r = pod.run(
        [sys.executable, "-c", CLIENT, kind, url, str(ca), str(seed)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]
    return str(r.stdout)


@pytest.mark.parametrize("kind", ["requests", "httpx"])
def test_https_v2_calls_are_decoded_exactly_from_plaintext(
    agent: Any, tls_pods: Any, kind: str
) -> None:
    client, server, certs = tls_pods
    seed = 3 if kind == "requests" else 4
    sub = agent.events.subscribe()
    try:
        run_client(
            client,
            kind,
            f"https://{server.ip}:{HTTPS_PORT}/v2/models/echo/infer",
            certs / "ca.pem",
            seed,
        )
        rec = agent.recorder

        def mine() -> list[Any]:
            return [
                e
                for e in rec.inferences
                if e.service.port == HTTPS_PORT and e.request_id == f"req-{seed}"
            ]

        events = rec.wait_for(lambda: mine() if len(mine()) >= 2 else None)
        time.sleep(0.3)  # let the findings and events of these calls be published
        seen = []
        while (ev := sub.get(timeout=0.2)) is not None:
            seen.append(ev)
    finally:
        sub.close()
    assert len(events) == 2  # keep-alive: both calls on one TLS connection, each decoded once
    for e in events:
        assert e.protocol == "kserve-v2-rest" and e.model == "echo" and e.status == "ok"
        assert not e.request_truncated and not e.response_truncated
        assert e.service.ip == server.ip
        assert e.client_cgroup == client.cgroup_id and e.server_cgroup == server.cgroup_id
        assert e.latency_ns is not None and e.latency_ns > 0
        x = e.inputs["tls_fp32"]
        assert x.dtype == np.float32 and x.shape == (2, 3)
        assert x.ravel().tolist() == [seed + 0.5, -1.25, 3.0, 4.75, -5.5, 6.0]
        assert e.inputs["tls_int64"].tolist() == [seed, -(10**12), 7]
        assert [bytes(b) for b in e.inputs["who"].ravel()] == [EMAIL.encode()]
        assert e.outputs["tls_fp32"].ravel().tolist() == x.ravel().tolist()  # the response too
    # PII inside TLS traffic is found, and only its redacted form leaves the inspector.
    findings = [ev.data for ev in seen if ev.kind == "finding" and ev.data.get("type") == "email"]
    assert findings and all(EMAIL not in json.dumps(f) for f in findings)
    assert all(EMAIL not in json.dumps(ev.data) for ev in seen)
    stats = agent.tls.stats()
    assert stats["libraries_openssl"] >= 1 and stats["samples"] > 0


def test_grpc_over_tls_uses_stripped_boringssl_and_is_counted(agent: Any, tls_pods: Any) -> None:
    """tritonclient.grpc with ssl=True: grpcio's BoringSSL has no symbols to probe. The call
    works (nothing in the path), its library is counted stripped, and nothing is decoded."""
    client, server, certs = tls_pods
    before = [e for e in agent.recorder.inferences if e.service.port == GRPCS_PORT]
    proc = client.popen(
        [
            sys.executable,
            "-c",
            GRPC_CLIENT,
            f"{server.ip}:{GRPCS_PORT}",
            str(certs / "ca.pem"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "done" in out, err[-2000:]
    deadline = time.monotonic() + 5
    while agent.tls.counters["libraries_stripped"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent.tls.counters["libraries_stripped"] >= 1
    stripped = [lib for lib in agent.tls.libraries.values() if not lib.hooked]
    assert any(lib.kind == "boringssl-grpc" for lib in stripped)
    after = [e for e in agent.recorder.inferences if e.service.port == GRPCS_PORT]
    assert after == before


def bpftool_perf(pid: int) -> list[dict[str, Any]]:
    """Perf-event attachments this process holds, as the kernel reports them."""
    out = subprocess.run(["bpftool", "-j", "perf", "list"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [p for p in json.loads(out.stdout or "[]") if p.get("pid") == pid]


def test_detach_leaves_no_uprobe_in_the_kernel(agent: Any, tls_pods: Any) -> None:
    import os

    deadline = time.monotonic() + 5  # the unit hooks the server's libssl on its scan
    while agent.tls.uprobe_count < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.tls.uprobe_count == 8  # 4 functions x (entry + return) on one libssl file
    held = bpftool_perf(os.getpid())
    probes = [p for p in held if p.get("fd_type") in ("uprobe", "uretprobe")]
    assert len(probes) == 8 and all("libssl.so.3" in p.get("filename", "") for p in probes)
    tps = {p.get("tracepoint") for p in held if p.get("fd_type") == "raw_tracepoint"}
    assert {"sock_send_length", "sock_recv_length"} <= tps
    agent.stop_tls()
    left = bpftool_perf(os.getpid())
    assert [p for p in left if p.get("fd_type") in ("uprobe", "uretprobe")] == []
    assert not {"sock_send_length", "sock_recv_length"} & {p.get("tracepoint") for p in left}
    # And it comes back: the programs stay verified in the sensor's object.
    unit = agent.start_tls()
    assert unit.uprobe_count == 8
    agent.stop_tls()


def test_run_with_tls_plaintext_hooks_at_start_and_unhooks_at_stop(lab: Any) -> None:
    """The agent's own path (run --tls-plaintext): a separate agent, loaded and stopped."""
    import os

    from infertap.agent.runtime import Agent, AgentOptions

    pod = lab.add_pod("tls-run")
    # A process that maps OpenSSL is in the pod before the agent starts.
    proc = pod.popen([sys.executable, "-c", "import ssl, time; time.sleep(60)"])
    before = len(bpftool_perf(os.getpid()))
    a = Agent(
        AgentOptions(
            cgroups=(str(pod.cgroup),), metrics_addr=None, api_addr=None, tls_plaintext=True
        )
    )
    try:
        a.start()
        assert a.tls is not None
        deadline = time.monotonic() + 5
        while a.tls.uprobe_count < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.tls.uprobe_count == 8
        assert len(bpftool_perf(os.getpid())) == before + 8 + 2  # uprobes + 2 raw tracepoints
    finally:
        a.stop()
        pod.kill(proc)
    assert cast(Any, a).tls is None  # (mypy narrowed a.tls above)
    assert len(bpftool_perf(os.getpid())) == before
