"""Cluster-wide drift: the recording rules' PSI and JS, evaluated by promtool, on bin counters
made by two agents that each see a different share of one shifted stream.

Two DriftMonitors (what two nodes' agents run) are fed minute by minute with a fraud-heavy stream
split 60/40 between them; the bin counters they export (`bins()`, as metrics.py serves them) and
their own drift gauges become promtool input series. promtool must find, per feature:
- PSI and JS equal (to 1e-6) to what numpy and scipy compute on the merged raw values;
- InfertapClusterFeatureDrift firing for exactly the features whose merged PSI stayed over 0.25
  (with at least 500 values an hour) for 15 minutes, while neither agent has enough values to
  judge the stream alone, so the per-agent alert stays silent;
- and, with only one agent's series, no cluster alert (too few values), though PSI is computed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import yaml
from scipy.spatial.distance import jensenshannon  # type: ignore[import-untyped]
from support import run_promtool, write_rules

from infertap.agent.inspect.baseline import Baseline, NumericFeature, build_baseline
from infertap.agent.inspect.drift import DriftConfig, DriftMonitor
from infertap.agent.testbed.fraud_model import FEATURES, example_transactions

MODEL = "fraud"
MINUTES = 78  # long enough for the alert at ALERT_AT, short enough that no agent fills a window
PER_MINUTE = 9  # values per minute over the whole model: 540 an hour, split 60/40
SHARE_A = 0.6
EPS = 1e-4  # DriftConfig.epsilon
PSI_ALERT = 0.25
MIN_VALUES = 500
CHECK_AT = 60  # minutes: the window [0, 60m] holds every value sent so far
ALERT_AT = 75  # minutes: 15 minutes after the first eval where the merged window qualifies


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    work = tmp_path_factory.mktemp("baseline")
    training = example_transactions(20000, np.random.default_rng(0), fraud_rate=0.05)
    np.save(work / "training.npy", training)
    return build_baseline(work / "training.npy", MODEL, work / "b.json", features=list(FEATURES))


class Agents:
    """Two agents' drift monitors fed a shared stream minute by minute, with what they export."""

    def __init__(self, baseline: Baseline) -> None:
        rng = np.random.default_rng(1)
        # Shifted traffic: half of it fraud-like (training had 5%).
        self.stream = example_transactions(MINUTES * PER_MINUTE, rng, fraud_rate=0.5)
        # ... and no new accounts: the lowest tenure bins stay empty, so PSI's epsilon floor
        # takes part in the comparison.
        self.stream[:, FEATURES.index("tenure_months")] += 36
        self.minute = np.repeat(np.arange(1, MINUTES + 1), PER_MINUTE)  # when each value came
        self.node = np.where(rng.random(len(self.stream)) < SHARE_A, "a", "b")
        assert all(isinstance(f, NumericFeature) for f in baseline.features)
        self.edges = {f.name: np.asarray(f.edges) for f in baseline.features}  # type: ignore[union-attr]
        self.baseline_share = {
            f.name: np.asarray(f.counts) / sum(f.counts) for f in baseline.features
        }
        # counters[node][feature]: (MINUTES + 1, bins) cumulative counts, row = minute
        self.counters: dict[str, dict[str, npt.NDArray[np.int64]]] = {}
        self.gauges: dict[str, dict[str, list[float | None]]] = {}  # node -> feature -> psi/min
        for node in ("a", "b"):
            mon = DriftMonitor(baseline, DriftConfig(window=MIN_VALUES))
            rows: dict[str, list[tuple[int, ...]]] = {f: [b.seen] for f, b in mon.bins().items()}
            psi: dict[str, list[float | None]] = {f: [None] for f in FEATURES}
            for m in range(1, MINUTES + 1):
                batch = self.stream[(self.minute == m) & (self.node == node)]
                if len(batch):
                    mon.observe_columns({f: batch[:, i] for i, f in enumerate(FEATURES)})
                for f, b in mon.bins().items():
                    rows[f].append(b.seen)
                judged = mon.metrics()
                for f in FEATURES:
                    psi[f].append(judged.get((f, "psi")))
            self.counters[node] = {f: np.asarray(r, dtype=np.int64) for f, r in rows.items()}
            self.gauges[node] = psi

    def merged_values(self, feature: str, start: int, end: int, nodes: str = "ab") -> Any:
        """Raw values of one feature that arrived in minutes (start, end] on the given nodes."""
        pick = (self.minute > start) & (self.minute <= end) & np.isin(self.node, list(nodes))
        return self.stream[pick, FEATURES.index(feature)].astype(np.float64)

    def window_counts(self, feature: str, end: int, nodes: str = "ab") -> Any:
        """Per-bin counts of the raw values in the hour before `end`, binned here with numpy."""
        v = self.merged_values(feature, max(0, end - 60), end, nodes)
        edges = self.edges[feature]
        return np.bincount(np.searchsorted(edges, v, side="left"), minlength=len(edges) + 1)


def numpy_psi(counts: Any, share: Any) -> float:
    p = np.maximum(counts / counts.sum(), EPS)
    q = np.maximum(share, EPS)
    return float(np.sum((p - q) * np.log(p / q)))


def scipy_js(counts: Any, share: Any) -> float:
    return float(jensenshannon(counts / counts.sum(), share, base=2))


@pytest.fixture(scope="module")
def agents(baseline: Baseline) -> Agents:
    return Agents(baseline)


def series_line(name: str, labels: dict[str, str], values: list[float | None]) -> dict[str, str]:
    text = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    points = " ".join("_" if v is None else repr(float(v)) for v in values)
    return {"series": f"{name}{{{text}}}", "values": points}


def input_series(agents: Agents, nodes: str) -> list[dict[str, str]]:
    out = []
    for node in nodes:
        instance = {"instance": f"node-{node}:9464", "job": "infertap"}
        for feature, counts in agents.counters[node].items():
            share = agents.baseline_share[feature]
            for i in range(counts.shape[1]):
                labels = {"model": MODEL, "feature": feature, "bin": str(i), **instance}
                out.append(series_line("infertap_feature_bin_total", labels, counts[:, i].tolist()))
                out.append(
                    series_line(
                        "infertap_feature_baseline_share", labels, [share[i]] * (MINUTES + 1)
                    )
                )
            gauge = agents.gauges[node][feature]
            if any(v is not None for v in gauge):  # an agent exports a gauge once it judged
                labels = {"model": MODEL, "feature": feature, "stat": "psi", **instance}
                out.append(series_line("infertap_feature_drift", labels, gauge))
    return out


def close_to(record: str, feature: str, value: float) -> dict[str, Any]:
    return {
        "expr": f'abs({record}{{feature="{feature}"}} - {value!r}) < bool 1e-6',
        "eval_time": f"{CHECK_AT}m",
        "exp_samples": [{"labels": f'{{model="{MODEL}", feature="{feature}"}}', "value": 1}],
    }


def alerting_features(agents: Agents, nodes: str) -> list[str]:
    """Features whose merged window qualified at every evaluation from ALERT_AT - 15m on."""
    out = []
    for feature in agents.edges:
        share = agents.baseline_share[feature]
        ok = True
        for t in range(ALERT_AT - 15, ALERT_AT + 1):
            counts = agents.window_counts(feature, t, nodes)
            ok &= counts.sum() >= MIN_VALUES and numpy_psi(counts, share) > PSI_ALERT
        if ok:
            out.append(feature)
    return out


def promtool_case(agents: Agents, nodes: str) -> dict[str, Any]:
    checks = []
    for feature in agents.edges:
        counts = agents.window_counts(feature, CHECK_AT, nodes)
        share = agents.baseline_share[feature]
        checks.append(
            close_to(
                "model_feature:infertap_feature_psi:increase1h", feature, numpy_psi(counts, share)
            )
        )
        checks.append(
            close_to(
                "model_feature:infertap_feature_js:increase1h", feature, scipy_js(counts, share)
            )
        )
    alerts = []
    for feature in alerting_features(agents, nodes):
        window = agents.window_counts(feature, ALERT_AT, nodes)
        value = numpy_psi(window, agents.baseline_share[feature])
        alerts.append(
            {
                "exp_labels": {"severity": "critical", "model": MODEL, "feature": feature},
                "exp_annotations": {
                    "summary": f"Model {MODEL}: feature {feature} has drifted (all nodes)",
                    "description": (
                        f"PSI of {feature} for {MODEL} over the last hour of its traffic on every "
                        f"node is {value:.2f} (alert threshold 0.25) for 15 minutes."
                    ),
                },
            }
        )
    return {
        "interval": "1m",
        "input_series": input_series(agents, nodes),
        "promql_expr_test": checks,
        "alert_rule_test": [
            {
                "eval_time": f"{ALERT_AT}m",
                "alertname": "InfertapClusterFeatureDrift",
                "exp_alerts": alerts,
            },
            # Each agent alone never fills its 500-value window: no per-agent judgement, no alert.
            {
                "eval_time": f"{ALERT_AT}m",
                "alertname": "InfertapFeatureDriftAlert",
                "exp_alerts": [],
            },
        ],
    }


def run_case(
    tmp_path: Path, case: dict[str, Any], change: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    doc = {
        "rule_files": ["recording-rules.rules.yaml", "alerts.rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [case],
    }
    name = "cluster_drift_test.yaml"
    (tmp_path / name).write_text(yaml.safe_dump(doc, sort_keys=False))
    write_rules(tmp_path, change)
    return run_promtool(tmp_path, name)


def passes(result: subprocess.CompletedProcess[str]) -> bool:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return "SUCCESS" in result.stdout + result.stderr


def test_the_agents_split_the_stream_and_neither_can_judge_it(agents: Agents) -> None:
    per_node = {n: int((agents.node == n).sum()) for n in "ab"}
    assert 0.5 < per_node["a"] / len(agents.stream) < 0.7
    assert max(per_node.values()) < MIN_VALUES <= len(agents.stream)  # only the cluster fills it
    for node in "ab":
        for feature, counts in agents.counters[node].items():
            # The exported counters are the agent's own binning of everything it saw.
            assert counts[-1].sum() == per_node[node], (node, feature)
            assert np.all(np.diff(counts, axis=0) >= 0)
        assert all(v is None for g in agents.gauges[node].values() for v in g)


def test_cluster_psi_and_js_equal_numpy_and_scipy_and_alert_on_merged_traffic(
    tmp_path: Path, agents: Agents
) -> None:
    drifted = alerting_features(agents, "ab")
    # The stream is shifted in the fraud features and not in the others.
    assert {"amount", "merchant_risk"} <= set(drifted)
    assert "tenure_months" in drifted and "age" not in drifted
    assert 0 in agents.window_counts("tenure_months", CHECK_AT)  # an empty bin: epsilon counts
    assert passes(run_case(tmp_path, promtool_case(agents, "ab")))


def test_a_different_epsilon_in_the_rules_fails(tmp_path: Path, agents: Agents) -> None:
    result = run_case(tmp_path, promtool_case(agents, "ab"), change={"0.0001": "0.001"})
    assert result.returncode != 0
    # The empty tenure bins make the difference: that PSI no longer matches numpy's.
    assert (
        'infertap_feature_psi:increase1h{feature=\\"tenure_months\\"}'
        in result.stdout + result.stderr
    )


def test_one_agent_alone_has_too_few_values_to_alert(tmp_path: Path, agents: Agents) -> None:
    assert alerting_features(agents, "a") == []
    # ... though its PSI of the shifted features is as high: the value guard is what holds it.
    a = agents.window_counts("amount", CHECK_AT, "a")
    assert a.sum() < MIN_VALUES
    assert numpy_psi(a, agents.baseline_share["amount"]) > PSI_ALERT
    assert passes(run_case(tmp_path, promtool_case(agents, "a")))
