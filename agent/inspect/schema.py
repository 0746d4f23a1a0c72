"""Schema and sanity checks of one InferenceEvent against the training baseline.

Per event: oversized payloads; inputs that cannot be mapped to the baseline's features (wrong
shape, values that are not numbers, features missing); dtypes unlike the baseline's (integer
vs float vs string); NaN and inf values; numeric values outside the training range widened by a
tolerance; categories never seen in training. One finding per (check, feature) per event, with
`value` holding how many values tripped it. Messages carry numbers and feature names only,
never categorical values (they may be personal data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from infertap.agent.inspect.baseline import Baseline, NumericFeature
from infertap.agent.inspect.features import extract_features
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
        out: list[Finding] = []
        size = event.payload_bytes or sum(np.asarray(a).nbytes for a in event.inputs.values())
        if size > self.config.max_payload_bytes:
            msg = f"payload of {size} bytes exceeds {self.config.max_payload_bytes}"
            out.append(self._finding("payload_size", "$", msg, float(size)))
        cols = extract_features(event, self.baseline)
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
