"""Map an InferenceEvent's input tensors to a baseline's features.

Two layouts are understood, and may be mixed:
- one named input per feature (`age`, `income`, ...), each [batch] or [batch, 1] (or a scalar);
- one matrix input [batch, n_features] (or one row [n_features]) whose columns are the baseline's
  features in the baseline's order. Any input not named after a feature whose last dimension
  equals the number of features is taken as such a matrix.

What cannot be mapped is reported as a Problem (shape, dtype, missing) rather than raised, so the
drift monitor can count a skip and the schema checks can report it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from infertap.agent.inspect.baseline import Baseline, Feature, NumericFeature
from infertap.agent.models.inference_event import InferenceEvent

ProblemType = Literal["shape", "dtype", "missing"]


@dataclass(frozen=True, slots=True)
class Problem:
    type: ProblemType
    location: str  # feature or input name
    message: str


@dataclass(slots=True)
class FeatureColumns:
    """1-D values per feature: float64 for numeric features, object arrays of str otherwise."""

    columns: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    dtypes: dict[str, np.dtype[Any]] = field(default_factory=dict)  # of the source tensor
    problems: list[Problem] = field(default_factory=list)


def _to_numeric(a: npt.NDArray[Any]) -> npt.NDArray[np.float64] | None:
    """float64 values of a tensor, or None when its elements are not numbers."""
    if a.dtype.kind in "biuf":
        return a.astype(np.float64)
    if a.dtype.kind in "OSU":
        try:
            # BYTES tensors holding numbers as text still count: b"3.5" -> 3.5.
            return np.array([_as_float(v) for v in a.ravel()], dtype=np.float64).reshape(a.shape)
        except (TypeError, ValueError, UnicodeDecodeError):
            return None
    return None


def _as_float(v: Any) -> float:
    if isinstance(v, bytes | np.bytes_):
        v = bytes(v).decode("ascii")
    return float(v)


def _element_dtype(a: npt.NDArray[Any]) -> np.dtype[Any]:
    """The dtype of an object array's elements (an object matrix may mix int, float and str
    columns), or the array's own dtype."""
    if a.dtype.kind != "O" or a.size == 0:
        return a.dtype
    try:
        return np.array(a.tolist()).dtype
    except (ValueError, TypeError):
        return a.dtype


def _to_text(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    flat = [
        bytes(v).decode("utf-8", errors="replace") if isinstance(v, bytes | np.bytes_) else str(v)
        for v in a.ravel()
    ]
    return np.array(flat, dtype=object).reshape(a.shape)


def _column(f: Feature, values: npt.NDArray[Any], where: str) -> npt.NDArray[Any] | Problem:
    if isinstance(f, NumericFeature):
        num = _to_numeric(values)
        if num is None:
            return Problem("dtype", where, f"{values.dtype} values are not numbers")
        return num
    return _to_text(values)


def extract_features(event: InferenceEvent, baseline: Baseline) -> FeatureColumns:
    out = FeatureColumns()
    names = baseline.feature_names
    n = len(names)
    unmapped: list[Feature] = []
    for f in baseline.features:
        raw = event.inputs.get(f.name)
        if raw is None:
            unmapped.append(f)
            continue
        a = np.asarray(raw)
        if a.ndim == 2 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim > 1:
            out.problems.append(
                Problem("shape", f.name, f"shape {list(a.shape)}; expected [batch] or [batch, 1]")
            )
            continue
        col = _column(f, a.reshape(-1), f.name)
        if isinstance(col, Problem):
            out.problems.append(col)
        else:
            out.columns[f.name], out.dtypes[f.name] = col, _element_dtype(a)
    if not unmapped:
        return out

    matrix: tuple[str, npt.NDArray[Any]] | None = None
    wrong_width: list[Problem] = []
    for name, raw in event.inputs.items():
        if name in names:
            continue
        a = np.asarray(raw)
        if a.ndim in (1, 2) and a.shape[-1] == n:
            matrix = (name, a.reshape(-1, n))
            break
        if a.ndim == 2:
            msg = f"shape {list(a.shape)}: {a.shape[1]} columns; the baseline has {n} features"
            wrong_width.append(Problem("shape", name, msg))
    if matrix is None:
        # A matrix of the wrong width explains the missing features better than "missing".
        out.problems.extend(wrong_width)
        for f in unmapped:
            out.problems.append(Problem("missing", f.name, "no input carries this feature"))
        return out
    name, a = matrix
    for f in unmapped:
        j = names.index(f.name)
        col = _column(f, a[:, j], f"{name}[:, {j}]")
        if isinstance(col, Problem):
            out.problems.append(Problem(col.type, f.name, f"{name}[:, {j}]: {col.message}"))
        else:
            out.columns[f.name], out.dtypes[f.name] = col, _element_dtype(a[:, j])
    return out


def all_numeric(baseline: Baseline) -> bool:
    """Whether every feature of the baseline is numeric (the batch matrix path needs it)."""
    return bool(baseline.features) and all(isinstance(f, NumericFeature) for f in baseline.features)


def numeric_matrix(event: InferenceEvent, baseline: Baseline) -> npt.NDArray[Any] | None:
    """The event's feature rows as one [rows, n_features] numeric tensor, when its layout is
    exactly the matrix one extract_features would map with no problem: no input named after a
    feature, the first input of width n a numeric (bool, int, float) tensor with rows. Else None
    (the caller then takes extract_features' general path). Only for all-numeric baselines.

    The result is the tensor as sent (its own dtype), reshaped, so its dtype is the one
    extract_features reports for each column."""
    names = baseline.feature_names
    n = len(names)
    inputs = event.inputs
    for name in names:
        if name in inputs:
            return None
    for raw in inputs.values():
        a = raw if isinstance(raw, np.ndarray) else np.asarray(raw)
        if a.ndim in (1, 2) and a.shape[-1] == n:
            if a.dtype.kind not in "biuf" or a.size == 0:
                return None
            return a.reshape(-1, n)
    return None


@dataclass(slots=True)
class RowSpans:
    """Where each event's rows sit in a stack of numeric matrices (stack_matrices)."""

    starts: npt.NDArray[np.intp]
    ends: npt.NDArray[np.intp]
    dtypes: list[np.dtype[Any]]  # the dtype each event sent
    one_row_each: bool  # every event sent one row: per-event reductions are the rows themselves

    def __len__(self) -> int:
        return len(self.dtypes)

    def any_per_event(self, cells: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """[events, columns]: whether any of an event's rows is set, per column."""
        if self.one_row_each:
            return cells
        return np.logical_or.reduceat(cells, self.starts, axis=0)

    def count_per_event(self, cells: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
        """[events]: how many of an event's cells (a 1-D column) are set."""
        if self.one_row_each:
            return cells.astype(np.int64)
        return np.add.reduceat(cells.astype(np.int64), self.starts)


def stack_matrices(
    matrices: list[npt.NDArray[Any]],
) -> tuple[npt.NDArray[np.float64], RowSpans]:
    """numeric_matrix results of a run of events as one float64 matrix, each converted on its
    own (as extract_features converts each event's columns), with the events' row spans."""
    counts = np.fromiter((len(m) for m in matrices), dtype=np.intp, count=len(matrices))
    ends = np.cumsum(counts)
    spans = RowSpans(ends - counts, ends, [m.dtype for m in matrices], bool((counts == 1).all()))
    return np.concatenate(matrices, axis=0, dtype=np.float64, casting="unsafe"), spans
