"""Do a shadow's outputs agree with the primary's? Counts and one number, never values.

Per output (the policy's `outputs`, else every output the primary returned):
- BYTES (object), bool and integer tensors agree only when exactly equal;
- float tensors by the shadow's `agreement` mode:
  - "values": numpy.allclose with the policy's atol/rtol (NaN agrees with NaN);
  - "argmax": the same argmax over the last axis per row (a classifier's decision);
  - "threshold": the same `x >= threshold` per element (a score's decision, e.g. fraud).
A missing output or a different shape disagrees. `max_abs_diff` is the largest absolute
difference over every numeric, non-bool output both sides returned with the same shape (NaN
against a number counts as infinite; bools are decisions, judged by agreement alone), or None
when there was nothing to measure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from infertap.agent.mirror.spec import Agreement


@dataclass(frozen=True, slots=True)
class Comparison:
    agree: bool
    max_abs_diff: float | None
    rows: int  # rows judged (first axis of the compared outputs; 1 for scalars)
    rows_disagree: int  # rows where some compared output disagreed
    missing: tuple[str, ...] = ()  # compared outputs the shadow did not return (names only)


def _rows(a: npt.NDArray[Any]) -> int:
    return int(a.shape[0]) if a.ndim >= 1 else 1


def _row_flags(equal: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Per row (first axis): True when every element of the row agrees."""
    if equal.ndim == 0:
        return equal.reshape(1)
    flags = np.asarray(equal.reshape(equal.shape[0], -1).all(axis=1), dtype=np.bool_)
    return flags


def _abs_diff(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    if a.size == 0:
        return 0.0
    x = a.astype(np.float64, copy=False)
    y = b.astype(np.float64, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(x - y)
    both_nan = np.isnan(x) & np.isnan(y)
    same_inf = np.isinf(x) & (x == y)
    d = np.where(both_nan | same_inf, 0.0, d)
    d = np.where(np.isnan(d), np.inf, d)  # NaN against a number
    return float(d.max())


def _element_equal(
    a: npt.NDArray[Any],
    b: npt.NDArray[Any],
    mode: Agreement,
    threshold: float,
    atol: float,
    rtol: float,
) -> npt.NDArray[np.bool_] | None:
    """Element-wise (or per-row for argmax) agreement, or None for incomparable kinds."""
    ka, kb = a.dtype.kind, b.dtype.kind
    if ka == "O" or kb == "O":
        if ka != kb:
            return None
        eq: npt.NDArray[np.bool_] = np.asarray(a == b, dtype=np.bool_).reshape(a.shape)
        return eq
    floats = ka == "f" or kb == "f" or a.dtype.name == "bfloat16" or b.dtype.name == "bfloat16"
    if not floats:
        same: npt.NDArray[np.bool_] = np.asarray(a == b, dtype=np.bool_)
        return same
    x = a.astype(np.float64)
    y = b.astype(np.float64)
    if mode == "threshold":
        decided: npt.NDArray[np.bool_] = (x >= threshold) == (y >= threshold)
        return decided
    if mode == "argmax":
        if x.ndim == 0 or x.shape[-1] == 0:
            return np.ones(x.shape, dtype=np.bool_)
        picked: npt.NDArray[np.bool_] = np.argmax(x, axis=-1) == np.argmax(y, axis=-1)
        return picked
    close: npt.NDArray[np.bool_] = np.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
    return close


def compare_outputs(
    primary: Mapping[str, npt.NDArray[Any]],
    shadow: Mapping[str, npt.NDArray[Any]],
    names: Iterable[str] = (),
    mode: Agreement = "values",
    threshold: float = 0.5,
    atol: float = 1e-6,
    rtol: float = 1e-5,
) -> Comparison:
    wanted = tuple(names) or tuple(sorted(primary))
    agree = bool(wanted)  # nothing to compare is not agreement
    diff: float | None = None
    rows = 0
    bad_rows: npt.NDArray[np.bool_] | None = None
    missing: list[str] = []
    for name in wanted:
        a, b = primary.get(name), shadow.get(name)
        if a is None or b is None:
            agree = False
            if b is None:
                missing.append(name)
            if a is not None:
                rows = max(rows, _rows(np.asarray(a)))
            continue
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            agree = False
            rows = max(rows, _rows(a))
            continue
        if a.dtype.kind not in ("O", "b") and b.dtype.kind not in ("O", "b"):
            d = _abs_diff(a, b)
            diff = d if diff is None else max(diff, d)
        eq = _element_equal(a, b, mode, threshold, atol, rtol)
        if eq is None:
            agree = False
            continue
        flags = _row_flags(eq)
        rows = max(rows, flags.shape[0])
        if bad_rows is None or bad_rows.shape != flags.shape:
            # Outputs with different row counts: judge rows by the first one seen.
            bad_rows = ~flags if bad_rows is None else bad_rows
        else:
            bad_rows = bad_rows | ~flags
        if not flags.all():
            agree = False
    n_bad = int(bad_rows.sum()) if bad_rows is not None else 0
    if not agree and n_bad == 0 and rows:
        n_bad = rows  # disagreed as a whole (missing output, shape, kinds): every row
    return Comparison(agree, diff, rows, n_bad, tuple(missing))
