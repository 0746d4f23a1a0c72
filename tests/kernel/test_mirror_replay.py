"""Shadow mirroring over real kernel interception: tritonclient calls the fraud model in one pod,
the agent decodes them from its samples and replays a share to a shadow V2 server in a third pod,
comparing outputs; no iptables rule anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import needs_root

from infertap.agent.testbed.v2server import start_in_pod

pytestmark = [needs_root, pytest.mark.kernel]

CLIENT = r"""
import sys
import numpy as np
import tritonclient.http as httpclient
from infertap.agent.testbed.fraud_model import example_transactions
rng = np.random.default_rng(9)
c = httpclient.InferenceServerClient(url=f"{sys.argv[1]}:9300")
for _ in range(int(sys.argv[2])):
    x = example_transactions(2, rng)
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    c.infer("fraud", [inp], parameters={"customer_email": "jane.doe@example.com"})
print("done", flush=True)
"""

POLICY = """\
version: 1
services:
  - {{name: fraud, port: 9300}}
mirror:
  models:
    - model: fraud
      endpoint: {shadow}:9300
      protocol: rest
      share: 1.0
  sink:
    directory: {sink}
"""


def start_v2(pod: Any) -> None:
    start_in_pod(pod, 9300, 9301)


def test_shadow_receives_the_primarys_requests_and_agrees(
    lab: Any, tmp_path: Path, make_agent: Callable[..., Any]
) -> None:
    client, primary, shadow = (lab.add_pod(n) for n in ("mr-client", "mr-primary", "mr-shadow"))
    # The agent replays from the host: its route to pods must be the lab bridge, never the
    # default route off the machine.
    route = subprocess.run(["ip", "route", "get", shadow.ip], capture_output=True, text=True)
    assert f"dev {lab.bridge}" in route.stdout, route.stdout
    start_v2(primary)
    start_v2(shadow)
    policy = tmp_path / "policy.yaml"
    sink = tmp_path / "sink"
    policy.write_text(POLICY.format(shadow=shadow.ip, sink=sink))
    agent = make_agent(
        cgroups=(str(client.cgroup), str(primary.cgroup)),
        policy=policy,
        sample_bytes=16384,
    )
    sub = agent.events.subscribe(frozenset({"shadow"}))
    results: list[dict[str, Any]] = []
    try:
        n = 20
        done = client.run(
            [sys.executable, "-c", CLIENT, primary.ip, str(n)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        deadline = time.monotonic() + 15
        while len(results) < n and time.monotonic() < deadline:
            ev = sub.get(0.5)
            if ev is not None:
                results.append(ev.data)
    finally:
        agent.stop()
    # Every call reached the shadow (share 1.0) and the same model agreed, row by row.
    assert len(results) == n, results[:3]
    assert all(r["result"] == "agree" and r["max_abs_diff"] == 0 for r in results), [
        (r["result"], r["max_abs_diff"], r.get("error")) for r in results[:5]
    ]
    assert {r["shadow"] for r in results} == {f"{shadow.ip}:9300"}
    # The sink kept every call for offline evaluation, redacted: shapes and types, no parameters.
    lines = [json.loads(line) for f in sorted(sink.glob("*.jsonl")) for line in f.open()]
    mine = [rec for rec in lines if rec["model"] == "fraud"]
    assert len(mine) == n
    assert all(
        rec["inputs"] == [{"name": "features", "shape": [2, 8], "datatype": "FP32"}] for rec in mine
    )
    assert not any("jane.doe" in f.read_text() for f in sink.glob("*.jsonl"))
