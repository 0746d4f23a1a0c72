"""Schema and sanity checks of one InferenceEvent against the training baseline.

Per event: oversized payloads; inputs that cannot be mapped to the baseline's features (wrong
shape, values that are not numbers, features missing); dtypes unlike the baseline's (integer
vs float vs string); NaN and inf values; numeric values outside the training range widened by a
tolerance; categories never seen in training. One finding per (check, feature) per event, with
`value` holding how many values tripped it. Messages carry numbers and feature names only,
never categorical values (they may be personal data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from infertap.agent.inspect.baseline import Baseline, NumericFeature
from infertap.agent.inspect.features import FeatureColumns, RowSpans, extract_features
from infertap.agent.inspect.findings import Finding, Severity
from infertap.agent.models.inference_event import InferenceEvent

DEFAULT_MAX_PAYLOAD_BYTES: Final = 8 << 20


@dataclass(frozen=True, slots=True)
class SchemaConfig:
    range_tolerance: float = 0.1  # share of the training range (max - min) allowed beyond it
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES

    def __post_init__(self) -> None:
        if self.range_tolerance < 0 or self.max_payload_bytes < 1:
            raise ValueError(
                "bad schema config: needs range_tolerance >= 0, max_payload_bytes >= 1"
            )


def _dtype_class(kind: str) -> str:
    """Coarse class of a numpy dtype kind: what a model's input layer actually cares about."""
    if kind in "biu":
        return "integer"
    if kind == "f":
        return "float"
    return "string"


def _trained_class(dtype: str) -> str | None:
    if dtype == "string":
        return "string"
    try:
        return _dtype_class(np.dtype(dtype).kind)
    except TypeError:
        return None  # a dtype name this numpy does not know: nothing to compare with


_SEVERITY: Final[dict[str, Severity]] = {
    "payload_size": "warn",
    "shape": "alert",
    "dtype": "warn",
    "missing": "warn",
    "nan": "warn",
    "inf": "warn",
    "range": "warn",
    "category": "info",
}


class SchemaChecker:
    def __init__(self, baseline: Baseline, config: SchemaConfig | None = None) -> None:
        self.baseline = baseline
        self.config = config or SchemaConfig()
        self._categories = {
            f.name: (np.array(sorted(f.categories), dtype=str), f.other_count == 0)
            for f in baseline.features
            if not isinstance(f, NumericFeature)
        }
        # For check_matrices (all-numeric baselines): per feature, in baseline order, the bounds
        # _numeric() uses, so a cell is flagged exactly when _numeric() would report it.
        self._numeric_features = [f for f in baseline.features if isinstance(f, NumericFeature)]
        lo, hi, nan_forbidden = [], [], []
        for f in self._numeric_features:
            if f.min is None or f.max is None:
                lo.append(-np.inf)
                hi.append(np.inf)
            else:
                slack = self.config.range_tolerance * (f.max - f.min)
                lo.append(f.min - slack)
                hi.append(f.max + slack)
            nan_forbidden.append(f.nan_share == 0.0)
        self._lo = np.array(lo, dtype=np.float64)
        self._hi = np.array(hi, dtype=np.float64)
        self._nan_forbidden = np.array(nan_forbidden, dtype=bool)
        self._mismatch_cache: dict[np.dtype[Any], frozenset[int]] = {}

    def _finding(self, type_: str, location: str, message: str, value: float | None) -> Finding:
        return Finding(
            kind="schema",
            model=self.baseline.model,
            type=type_,
            location=location,
            severity=_SEVERITY[type_],
            value=value,
            message=message,
        )

    def check(self, event: InferenceEvent) -> list[Finding]:
        return self.check_columns(event, extract_features(event, self.baseline))

    def _payload(self, event: InferenceEvent) -> list[Finding]:
        size = event.payload_bytes or sum(np.asarray(a).nbytes for a in event.inputs.values())
        if size > self.config.max_payload_bytes:
            msg = f"payload of {size} bytes exceeds {self.config.max_payload_bytes}"
            return [self._finding("payload_size", "$", msg, float(size))]
        return []

    def check_columns(self, event: InferenceEvent, cols: FeatureColumns) -> list[Finding]:
        """check() with the event's features already extracted (extract_features)."""
        out = self._payload(event)
        for p in cols.problems:
            out.append(self._finding(p.type, p.location, p.message, None))
        for name, values in cols.columns.items():
            f = self.baseline.feature(name)
            live = _dtype_class(cols.dtypes[name].kind)
            trained = _trained_class(f.dtype)
            if trained is not None and live != trained:
                msg = f"{cols.dtypes[name]} values; trained on {f.dtype}"
                out.append(self._finding("dtype", name, msg, None))
            if isinstance(f, NumericFeature):
                out.extend(self._numeric(f, values))
            else:
                out.extend(self._categorical(name, values))
        return out

    def _numeric(
        self, f: NumericFeature, v: np.ndarray[Any, np.dtype[np.float64]]
    ) -> list[Finding]:
        out: list[Finding] = []
        nan = int(np.isnan(v).sum())
        if nan and f.nan_share == 0.0:  # missing values the model never saw in training
            out.append(self._finding("nan", f.name, f"{nan} of {len(v)} values are NaN", nan))
        inf = int(np.isinf(v).sum())
        if inf:
            out.append(self._finding("inf", f.name, f"{inf} of {len(v)} values are infinite", inf))
        if f.min is None or f.max is None:
            return out
        slack = self.config.range_tolerance * (f.max - f.min)
        lo, hi = f.min - slack, f.max + slack
        finite = v[np.isfinite(v)]
        outside = finite[(finite < lo) | (finite > hi)]
        if len(outside):
            worst = outside[np.argmax(np.maximum(lo - outside, outside - hi))]
            msg = (
                f"{len(outside)} of {len(v)} values outside the training range "
                f"[{f.min:g}, {f.max:g}] (tolerance {self.config.range_tolerance:g}); "
                f"furthest {worst:g}"
            )
            out.append(self._finding("range", f.name, msg, float(len(outside))))
        return out

    def _categorical(self, name: str, v: np.ndarray[Any, np.dtype[Any]]) -> list[Finding]:
        known, complete = self._categories[name]
        if not complete or len(v) == 0:
            return []  # the baseline kept only the top categories: an unknown one proves nothing
        vals = v.astype(str)
        i = np.minimum(np.searchsorted(known, vals), max(len(known) - 1, 0))
        unseen = int(len(vals) if len(known) == 0 else (known[i] != vals).sum())
        if not unseen:
            return []
        msg = f"{unseen} of {len(v)} values are categories not seen in training"
        return [self._finding("category", name, msg, float(unseen))]

    def check_matrices(
        self, events: Sequence[InferenceEvent], values: npt.NDArray[np.float64], rows: RowSpans
    ) -> list[list[Finding]]:
        """check() of a run of events whose features are numeric matrices (numeric_matrix),
        stacked as float64 in `values` [total rows, n features], event i's rows at
        rows.starts[i]:rows.ends[i]; `rows.dtypes[i]` the dtype event i sent. All features of
        the baseline are numeric. The same findings as check() per event, in the same order:
        NaN, inf and range are screened for the whole run with one pass of numpy, and only the
        (event, feature) cells that trip something are worked out one by one."""
        out = [self._payload(e) for e in events]
        bad = np.isinf(values)
        bad |= np.isnan(values) & self._nan_forbidden
        with np.errstate(invalid="ignore"):  # NaN compares false: never outside
            bad |= (values < self._lo) | (values > self._hi)
        tripped = rows.any_per_event(bad)
        dtype_cells = [self._dtype_mismatches(dt) for dt in rows.dtypes]
        for i in np.flatnonzero(tripped.any(axis=1) | np.array([bool(c) for c in dtype_cells])):
            findings = out[i]
            mismatched = dtype_cells[i]
            for j in range(len(self._numeric_features)):
                f = self._numeric_features[j]
                if j in mismatched:
                    msg = f"{rows.dtypes[i]} values; trained on {f.dtype}"
                    findings.append(self._finding("dtype", f.name, msg, None))
                if tripped[i, j]:
                    findings.extend(self._numeric(f, values[rows.starts[i] : rows.ends[i], j]))
        return out

    def _dtype_mismatches(self, dtype: np.dtype[Any]) -> frozenset[int]:
        """Feature indices whose trained dtype class differs from a tensor of `dtype`."""
        known = self._mismatch_cache.get(dtype)
        if known is None:
            live = _dtype_class(dtype.kind)
            known = frozenset(
                j
                for j, f in enumerate(self._numeric_features)
                if (t := _trained_class(f.dtype)) is not None and t != live
            )
            self._mismatch_cache[dtype] = known
        return known
