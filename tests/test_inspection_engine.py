"""The engine applies a policy's per-model feature list: drift on other features is not reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from infertap.agent.demo import fraud_baseline
from infertap.agent.flows.records import Endpoint
from infertap.agent.inspect.baseline import Baseline
from infertap.agent.inspect.drift import DriftConfig
from infertap.agent.inspect.engine import InspectionConfig, InspectionEngine, ModelInspection
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.testbed.fraud_model import FEATURES, example_transactions


def drifted_events(n: int) -> list[InferenceEvent]:
    rng = np.random.default_rng(5)
    events = []
    for _ in range(n):
        x = example_transactions(4, rng, fraud_rate=0.05)
        x[:, 0] *= 6.0  # amount
        x[:, 7] = 3.0  # hour
        ev = InferenceEvent(Endpoint("10.0.0.1", 8000), "fraud", "", "kserve-v2-rest", 0)
        ev.inputs = {"features": x}
        events.append(ev)
    return events


def run(tmp_path: Path, features: tuple[str, ...]) -> tuple[set[str], set[str]]:
    baseline = Baseline.load(fraud_baseline(tmp_path))
    engine = InspectionEngine(
        InspectionConfig(
            pii_enabled=False,
            models={"fraud": ModelInspection(baseline, DriftConfig(window=200), features=features)},
        )
    )
    found = set()
    for ev in drifted_events(100):
        found |= {f.location for f in engine.inspect(ev) if f.kind == "drift"}
    gauged = {feature for (_m, feature, _s) in engine.drift_values()}
    return found, gauged


def test_without_a_feature_list_every_shifted_feature_is_reported(tmp_path: Path) -> None:
    found, gauged = run(tmp_path, ())
    assert {"amount", "hour"} <= found
    assert gauged == set(FEATURES)


def test_a_feature_list_limits_findings_and_gauges(tmp_path: Path) -> None:
    found, gauged = run(tmp_path, ("amount",))
    assert found == {"amount"}
    assert gauged == {"amount"}


def test_bin_counters_follow_the_feature_list(tmp_path: Path) -> None:
    baseline = Baseline.load(fraud_baseline(tmp_path))
    models = {"fraud": ModelInspection(baseline, DriftConfig(window=200), features=("amount",))}
    engine = InspectionEngine(InspectionConfig(pii_enabled=False, models=models))
    events = drifted_events(10)
    for ev in events:
        engine.inspect(ev)
    bins = engine.bin_values()
    assert set(bins) == {("fraud", "amount")}  # the same features as the drift gauge
    assert sum(bins[("fraud", "amount")].seen) == 4 * len(events)
