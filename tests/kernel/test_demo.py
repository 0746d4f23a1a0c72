"""The embedded demo end to end, as `infertap demo --no-tui` runs it: real pods, a real V2
server, tritonclient traffic, the agent in the kernel, and a real Prometheus (Debian's) scraping
the agent; the summary must show what happened, and every dashboard, alert and recording rule
query must evaluate in that Prometheus over the series it scraped."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from support import needs_root
from test_dashboards import all_expressions, recorded_series, uses

from infertap.agent.testbed.prometheus import PrometheusApi, PrometheusError

pytestmark = [needs_root, pytest.mark.kernel]

LINGER_S = 20  # the demo keeps the agent and Prometheus up this long after its summary
RANGE_S = 120  # queries cover the demo's run: 20 s of traffic, then its summary
# Metrics a clean demo run may not produce, and why. A new metric that the demo does not make
# belongs here, with its reason; everything else must have scraped series.
NOT_IN_THE_DEMO = {
    # Its policy mirrors no model to a shadow.
    "infertap_shadow_requests_total": "no shadow",
    "infertap_shadow_max_abs_diff_bucket": "no shadow",
    "infertap_shadow_max_abs_diff_sum": "no shadow",
    "infertap_shadow_max_abs_diff_count": "no shadow",
    # Only counted when a decoder gives up; the demo's traffic decodes whole.
    "infertap_decode_lost_total": "no decode loss",
    # OpenAI-style usage: the demo's model speaks KServe V2.
    "infertap_tokens_total": "no OpenAI traffic",
    # Only counted when the kernel sheds under overload; the demo's load is light.
    "infertap_inspection_skipped_total": "no overload",
}


@dataclass
class DemoRun:
    returncode: int
    out: str
    err: str
    prometheus_url: str = ""
    errors: dict[str, str] = field(default_factory=dict)  # where -> Prometheus' error
    results: dict[str, int] = field(default_factory=dict)  # where -> series returned
    selector_series: dict[str, int] = field(default_factory=dict)  # series name -> series stored
    queried: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def query_everything(prom: PrometheusApi, run: DemoRun) -> None:
    """Every expression of the dashboard, the alerts and the recording rules, evaluated over the
    demo's run as a dashboard panel would (a range query), and the series each selector finds."""
    for where, expr in all_expressions():
        try:
            run.results[where] = len(prom.query_range(expr, RANGE_S))
        except PrometheusError as exc:
            run.errors[where] = str(exc)
        for use in uses(expr):
            if use.series not in run.selector_series:
                stored = f"count by () (last_over_time({use.series}[{RANGE_S}s]))"
                run.selector_series[use.series] = len(prom.query(stored))
    for name, expr in {
        "up": 'up{job="infertap"}',
        "psi": "model_feature:infertap_feature_psi:increase1h",
        "bins": 'infertap_feature_bin_total{feature="amount"}',
        "pii": "sum by (type) (increase(infertap_pii_findings_total[5m]))",
        "calls": "sum by (protocol) (increase(infertap_inference_requests_total[5m]))",
    }.items():
        run.queried[name] = prom.query(expr)


@pytest.fixture(scope="module")
def demo() -> DemoRun:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "infertap.cli.main", "demo", "--no-tui"),
            *("--duration", "20", "--linger", str(LINGER_S)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    url = ""
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("prometheus: lingering"):
            url = line.split(" at ")[1].split()[0]
            break
        assert time.monotonic() < deadline, "demo did not reach its summary"
    run = DemoRun(0, "", "", url)
    if url:
        query_everything(PrometheusApi(url), run)
    rest, err = proc.communicate(timeout=LINGER_S + 60)
    run.returncode, run.out, run.err = proc.returncode, "".join(lines) + rest, err
    return run


def test_demo_sees_calls_pii_and_drift_then_cleans_up(demo: DemoRun) -> None:
    out = demo.out
    assert demo.returncode == 0, demo.err[-3000:]
    assert "Traceback" not in demo.err
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
    # Nothing left behind: no demo pod namespaces, cgroups, attached programs or Prometheus.
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    tree = subprocess.run(["bpftool", "cgroup", "tree"], capture_output=True, text=True).stdout
    for name in ("feature-store", "fraud-model"):
        assert name not in netns and name not in tree
    with pytest.raises(PrometheusError, match="unreachable"):
        PrometheusApi(demo.prometheus_url).api("query", query="up")


def test_every_dashboard_and_rule_query_evaluates_over_scraped_series(demo: DemoRun) -> None:
    assert demo.prometheus_url, f"no Prometheus in the demo:\n{demo.out[-3000:]}"
    assert "in Prometheus" in demo.out  # the demo's own summary of what Prometheus holds
    (up,) = demo.queried["up"]
    assert up["value"][1] == "1"  # the real scrape of the agent works
    assert not demo.errors, demo.errors
    assert set(demo.results) == {where for where, _ in all_expressions()}
    recorded = recorded_series()
    for series, stored in demo.selector_series.items():
        if series not in NOT_IN_THE_DEMO:
            why = " (a recording rule's output)" if series in recorded else ""
            assert stored > 0, (
                f"no {series} series in the demo's Prometheus{why}; if the demo cannot make "
                "it, list it in NOT_IN_THE_DEMO with the reason"
            )
    # Dashboard panels and recording rules that need no threshold show data, unless all they
    # show is metrics the demo cannot produce.
    for where, expr in all_expressions():
        if where.startswith(("panel", "record")) and demo.results[where] == 0:
            assert {u.series for u in uses(expr)} <= set(NOT_IN_THE_DEMO), f"{where}: no data"
    # What the demo sent, as Prometheus saw it: both protocols, the three PII types, a PSI per
    # watched feature of the fraud model from the bin counters.
    assert {s["metric"]["protocol"] for s in demo.queried["calls"]} >= {
        "kserve-v2-rest",
        "kserve-v2-grpc",
    }
    assert {s["metric"]["type"] for s in demo.queried["pii"]} >= {"credit_card", "email", "ssn"}
    psi = {s["metric"]["feature"]: float(s["value"][1]) for s in demo.queried["psi"]}
    assert {"amount", "merchant_risk", "age"} <= set(psi)
    assert len(demo.queried["bins"]) >= 2  # one series per baseline bin
