"""Runs the inspectors over each InferenceEvent: PII, then (for models with a baseline) schema
checks and feature drift. One object so the pipeline has one call, and a policy reload can swap
the configuration in one place."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from infertap.agent.inspect.baseline import Baseline
from infertap.agent.inspect.drift import DriftConfig, DriftMonitor, FeatureBins
from infertap.agent.inspect.features import (
    all_numeric,
    extract_features,
    numeric_matrix,
    stack_matrices,
)
from infertap.agent.inspect.findings import Finding
from infertap.agent.inspect.pii import PiiScanner
from infertap.agent.inspect.schema import SchemaChecker, SchemaConfig
from infertap.agent.models.inference_event import InferenceEvent

log = logging.getLogger(__name__)


@dataclass
class ModelInspection:
    """How one model is checked: against its training baseline, with its own thresholds."""

    baseline: Baseline
    drift: DriftConfig = field(default_factory=DriftConfig)
    schema: SchemaConfig = field(default_factory=SchemaConfig)
    features: tuple[str, ...] = ()  # features watched for drift; empty = all of the baseline's


@dataclass
class InspectionConfig:
    pii_enabled: bool = True
    pii_types: tuple[str, ...] | None = None  # None: every built-in type
    pii_custom: Mapping[str, str] = field(default_factory=dict)
    models: Mapping[str, ModelInspection] = field(default_factory=dict)  # model name -> checks


class InspectionEngine:
    def __init__(self, config: InspectionConfig | None = None, secret: bytes | None = None) -> None:
        self._lock = threading.Lock()
        self._secret = secret
        self._watched: dict[str, frozenset[str]] = {}
        self.configure(config or InspectionConfig())

    def configure(self, config: InspectionConfig) -> None:
        """Swap in a new configuration (policy reload). Drift windows restart."""
        pii = (
            PiiScanner(secret=self._secret, custom=dict(config.pii_custom), types=config.pii_types)
            if config.pii_enabled
            else None
        )
        drift = {m: DriftMonitor(mi.baseline, mi.drift) for m, mi in config.models.items()}
        watched = {m: frozenset(mi.features) for m, mi in config.models.items() if mi.features}
        schema = {m: SchemaChecker(mi.baseline, mi.schema) for m, mi in config.models.items()}
        with self._lock:
            self._pii = pii
            self._drift = drift
            self._schema = schema
            self._watched = watched
            self.config = config

    @property
    def pii(self) -> PiiScanner | None:
        return self._pii

    def inspect(self, event: InferenceEvent) -> list[Finding]:
        with self._lock:
            pii, drift, schema = (
                self._pii,
                self._drift.get(event.model),
                self._schema.get(event.model),
            )
            watched = self._watched.get(event.model)
        findings: list[Finding] = []
        if pii is not None:
            findings += pii.scan_event(event)
        if event.request_truncated or not event.inputs:
            return findings  # missing tensors must not read as drift or schema problems
        if schema is not None:
            findings += schema.check(event)
        if drift is not None:
            drifted = drift.observe(event)
            if watched is not None:  # the policy names the features to watch: drop the others
                drifted = [f for f in drifted if f.location in watched]
            findings += drifted
        return findings

    def inspect_batch(self, events: Sequence[InferenceEvent]) -> list[list[Finding]]:
        """inspect() of each event, in order, done a batch at a time: the same findings, the
        same drift windows and counters as calling inspect() on each event in turn.

        Features are extracted once per event. A model's consecutive events that send their
        features as a numeric matrix (the usual V2 layout) are checked and fed to drift as one
        float64 matrix; any other event of that model is done alone, in its place in the order,
        so drift windows see the values in the order the calls came."""
        with self._lock:
            pii, drift, schema, watched = self._pii, self._drift, self._schema, self._watched
        out: list[list[Finding]] = [[] for _ in events]
        if pii is not None:
            for i, event in enumerate(events):
                out[i] = pii.scan_event(event)
        by_model: dict[str, list[int]] = {}
        for i, event in enumerate(events):
            if event.request_truncated or not event.inputs:
                continue  # missing tensors must not read as drift or schema problems
            if event.model in schema or event.model in drift:
                by_model.setdefault(event.model, []).append(i)
        for model, indices in by_model.items():
            _ModelBatch(schema.get(model), drift.get(model), watched.get(model), events, out).run(
                indices
            )
        return out

    def drift_values(self) -> dict[tuple[str, str, str], float]:
        """(model, feature, stat) -> current value, for the feature drift gauge."""
        with self._lock:
            monitors = dict(self._drift)
            watched = dict(self._watched)
        out: dict[tuple[str, str, str], float] = {}
        for model, mon in monitors.items():
            for (feature, stat), value in mon.metrics().items():
                if model not in watched or feature in watched[model]:
                    out[(model, feature, stat)] = value
        return out

    def bin_values(self) -> dict[tuple[str, str], FeatureBins]:
        """(model, feature) -> baseline shares and live counts per bin, for the bin counters;
        the same models and features as drift_values()."""
        with self._lock:
            monitors = dict(self._drift)
            watched = dict(self._watched)
        out: dict[tuple[str, str], FeatureBins] = {}
        for model, mon in monitors.items():
            for feature, bins in mon.bins().items():
                if model not in watched or feature in watched[model]:
                    out[(model, feature)] = bins
        return out


class _ModelBatch:
    """One model's share of a batch: runs of matrix events at once, other events alone."""

    def __init__(
        self,
        schema: SchemaChecker | None,
        drift: DriftMonitor | None,
        watched: frozenset[str] | None,
        events: Sequence[InferenceEvent],
        out: list[list[Finding]],
    ) -> None:
        self.schema, self.drift, self.watched = schema, drift, watched
        self.events, self.out = events, out
        holder = schema if schema is not None else drift
        assert holder is not None
        self.baseline = holder.baseline
        self.matrix_path = all_numeric(self.baseline)

    def run(self, indices: list[int]) -> None:
        run: list[int] = []
        matrices: list[npt.NDArray[Any]] = []
        for i in indices:
            matrix = numeric_matrix(self.events[i], self.baseline) if self.matrix_path else None
            if matrix is not None:
                run.append(i)
                matrices.append(matrix)
                continue
            if run:
                self._matrices(run, matrices)
                run, matrices = [], []
            self._alone(i)
        if run:
            self._matrices(run, matrices)

    def _keep(self, drifted: list[Finding]) -> list[Finding]:
        if self.watched is None:
            return drifted
        return [f for f in drifted if f.location in self.watched]

    def _alone(self, i: int) -> None:
        cols = extract_features(self.events[i], self.baseline)
        if self.schema is not None:
            self.out[i] += self.schema.check_columns(self.events[i], cols)
        if self.drift is not None:
            self.out[i] += self._keep(self.drift.observe_extracted(cols))

    def _matrices(self, run: list[int], matrices: list[npt.NDArray[Any]]) -> None:
        values, rows = stack_matrices(matrices)
        if self.schema is not None:
            checked = self.schema.check_matrices([self.events[i] for i in run], values, rows)
            for i, found in zip(run, checked, strict=True):
                self.out[i] += found
        if self.drift is not None:
            for i, drifted in zip(run, self.drift.observe_matrices(values, rows), strict=True):
                if drifted:
                    self.out[i] += self._keep(drifted)
