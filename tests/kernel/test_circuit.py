"""A drift alert trips the model's circuit breaker: the kernel drops its traffic (calls fail), and
when the inputs recover the circuit closes and calls succeed again. Real pods, real V2 server,
real tritonclient, the real agent under a policy."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import needs_root

from infertap.agent.testbed.v2server import start_in_pod

pytestmark = [needs_root, pytest.mark.kernel]

CLIENT = r"""
import sys, time
import numpy as np
import tritonclient.http as httpclient
from infertap.agent.testbed.fraud_model import example_transactions
host, drift_s, normal_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
rng = np.random.default_rng(3)
client = httpclient.InferenceServerClient(url=f"{host}:9100", connection_timeout=2.0,
                                          network_timeout=2.0)
start = time.monotonic()
while (now := time.monotonic() - start) < drift_s + normal_s:
    x = example_transactions(4, rng, fraud_rate=0.05)
    phase = "drift" if now < drift_s else "normal"
    if phase == "drift":
        x[:, 0] *= 6.0
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    try:
        client.infer("fraud", [inp])
        print(f"{now:.2f} {phase} ok", flush=True)
    except Exception:
        print(f"{now:.2f} {phase} fail", flush=True)
        client.close()
        client = httpclient.InferenceServerClient(url=f"{host}:9100", connection_timeout=2.0,
                                                  network_timeout=2.0)
    time.sleep(0.01)
"""

POLICY = """\
version: 1
services:
  - {{name: fraud, port: 9100}}
models:
  - name: fraud
    baseline: {baseline}
    features: [amount]
    drift: {{window: 200}}
pii: {{enabled: false}}
actions:
  drift: {{info: log, warn: log, alert: circuit_break}}
circuit: {{cooldown: 1s, max_cooldown: 4s, probe: 2s}}
"""


def test_drift_alert_blocks_in_the_kernel_and_recovery_restores(
    lab: Any, tmp_path: Path, make_agent: Callable[..., Any]
) -> None:
    from infertap.agent.demo import fraud_baseline

    client, server = lab.add_pod("cb-client"), lab.add_pod("cb-server")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(baseline=fraud_baseline(tmp_path)))
    agent = make_agent(
        cgroups=(str(client.cgroup), str(server.cgroup)),
        policy=policy,
    )
    sub = agent.events.subscribe(frozenset({"circuit"}))
    try:
        start_in_pod(server, 9100, 9101)
        run = client.run(
            [sys.executable, "-c", CLIENT, server.ip, "4", "12"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        transitions = []
        while (ev := sub.get(0.5)) is not None:
            transitions.append((ev.data["from_state"], ev.data["to_state"], ev.data["reason"]))
    finally:
        agent.stop()

    calls = [line.split() for line in run.stdout.splitlines()]
    # The drift alert opened the circuit, and the kernel dropped the model's traffic.
    opened = [t for t in transitions if t[1] == "open"]
    assert opened and "drift" in opened[0][2], transitions
    assert any(result == "fail" for _, _, result in calls)
    # Inputs recovered: the circuit went half-open, then closed, and calls succeed again.
    assert ("half-open", "closed") in [(a, b) for a, b, _ in transitions], transitions
    tail = calls[-20:]
    assert all(phase == "normal" and result == "ok" for _, phase, result in tail), tail
    assert agent.verdicts.list() == []
