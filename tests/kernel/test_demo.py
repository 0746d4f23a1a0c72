"""The embedded demo end to end, as `infertap demo --no-tui` runs it: real pods, a real V2
server, tritonclient traffic, the agent in the kernel; the summary must show what happened."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import needs_root

pytestmark = [needs_root, pytest.mark.kernel]


def test_demo_sees_calls_pii_and_drift_then_cleans_up() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "infertap.cli.main", "demo", "--no-tui", "--duration", "20"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = r.stdout
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "phase drift" in out and "done" in out
    assert "kserve-v2-grpc" in out and "kserve-v2-rest" in out
    for pii_type in ("credit_card", "email", "ssn"):
        assert pii_type in out
    # Raw values never reach the output; redacted forms do.
    assert "jane.doe@example.com" not in out and "4111 1111 1111 1111" not in out
    assert "123-45-6789" not in out and "***-**-6789" in out
    # PII in requests tripped the model's circuit breaker, which blocked it in the kernel: the
    # feature store saw failed calls, and the breaker went half-open after its cooldown.
    assert "closed -> open" in out and "open -> half-open" in out
    assert "verdict: block service" in out and "verdict: unblocked service" in out
    done = next(ln for ln in out.splitlines() if "feature-store: done" in ln)
    assert int(done.split("failed")[1]) > 0
    # The client shifted amount and merchant_risk: drift alerts name those and nothing else. (How
    # many of the two reach a full window depends on how long the breaker held traffic back.)
    alerts = {ln.split("│")[1].strip() for ln in out.splitlines() if "ALERT" in ln}
    assert alerts and alerts <= {"amount", "merchant_risk"}
    # Nothing left behind: no demo pod namespaces, cgroups or attached programs.
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    tree = subprocess.run(["bpftool", "cgroup", "tree"], capture_output=True, text=True).stdout
    for name in ("feature-store", "fraud-model"):
        assert name not in netns and name not in tree
