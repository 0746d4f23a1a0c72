"""Online feature drift: live values over a sliding window against the training baseline.

Per feature, the last `window` values (count-based) are compared with the baseline:
- PSI over the baseline's histogram bins (empty bins floored at `epsilon`, the usual practice,
  so one empty bin does not make PSI infinite);
- the two-sample Kolmogorov-Smirnov statistic against the baseline's quantile sketch, which
  stands in for the training sample (error about 1/len(sketch));
- the Jensen-Shannon distance (base 2, so in [0, 1]) over the same bins.
Categorical features get PSI and JS over the baseline's categories plus an "other" bucket.

Thresholds are confidence-aware: a statistic is compared with the larger of the configured
level and the level it reaches by chance alone, without drift, for this baseline's sample size
and this window's (`chance_thresholds`: the 99% no-drift quantile for warn, 99.9% for alert). On
a large baseline and window that changes nothing; on a small one (89 training rows: PSI's
no-drift mean is about (bins - 1) x (1/rows + 1/window), 0.2 for 89 and 89) it keeps sampling
noise from reading as drift.

A feature is judged once its window holds `min_samples` values, then again after every
`evaluate_every` new values. A Finding is produced whenever a (feature, statistic) pair changes
level: up to warn or alert, or back under its thresholds (severity "info"). `current()` and
`metrics()` expose the latest values for export (metric infertap_feature_drift{model,feature,
stat}). `bins()` gives, per feature, the baseline's share of each bin and every live value counted
into the same bins since the start (metric infertap_feature_bin_total), which Prometheus sums over
the agents of a model's nodes for cluster-wide PSI and JS (daemonset/prometheus/
recording-rules.yaml). Everything per value is numpy; Python loops run over features, never values.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from infertap.agent.inspect.baseline import (
    Baseline,
    CategoricalFeature,
    NumericFeature,
)
from infertap.agent.inspect.features import FeatureColumns, RowSpans, extract_features
from infertap.agent.inspect.findings import Finding, Severity
from infertap.agent.models.inference_event import InferenceEvent

STATS: Final = ("psi", "ks", "js")


@dataclass(frozen=True, slots=True)
class Thresholds:
    warn: float
    alert: float


DEFAULT_THRESHOLDS: Final[Mapping[str, Thresholds]] = {
    "psi": Thresholds(0.1, 0.25),
    # KS and JS: under no drift, with windows of a few hundred values, both stay well below 0.2.
    "ks": Thresholds(0.2, 0.3),
    "js": Thresholds(0.2, 0.3),
}


@dataclass(frozen=True, slots=True)
class DriftConfig:
    window: int = 500
    min_samples: int | None = None  # values a window needs before it is judged; default window
    evaluate_every: int | None = None  # new values between judgements; default window // 10
    thresholds: Mapping[str, Thresholds] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    epsilon: float = 1e-4  # PSI floor for empty bins

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.window < 2:
            problems.append(f"window must be >= 2, not {self.window}")
        if self.min_samples is not None and not 1 <= self.min_samples <= self.window:
            problems.append(f"min_samples must be in [1, window], not {self.min_samples}")
        if self.evaluate_every is not None and self.evaluate_every < 1:
            problems.append(f"evaluate_every must be >= 1, not {self.evaluate_every}")
        for stat, t in self.thresholds.items():
            if stat not in STATS:
                problems.append(f"unknown statistic {stat!r} (known: {', '.join(STATS)})")
            elif not 0 <= t.warn <= t.alert:
                problems.append(f"{stat}: needs 0 <= warn <= alert, not {t.warn}, {t.alert}")
        if not 0 < self.epsilon < 1:
            problems.append(f"epsilon must be in (0, 1), not {self.epsilon}")
        if problems:
            raise ValueError("bad drift config: " + "; ".join(problems))

    @property
    def min_n(self) -> int:
        return self.window if self.min_samples is None else self.min_samples

    @property
    def every(self) -> int:
        return max(1, self.window // 10) if self.evaluate_every is None else self.evaluate_every


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    feature: str
    n: int  # values in the window when judged
    psi: float | None
    ks: float | None  # None for categorical features
    js: float | None
    severity: Severity | None  # highest level crossed by any statistic; None within thresholds

    def stats(self) -> dict[str, float]:
        out = {"psi": self.psi, "ks": self.ks, "js": self.js}
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True, slots=True)
class FeatureBins:
    """One feature over the baseline's bins (numeric bins in edge order; categorical: the
    baseline's categories, then "other"). Agents on many nodes export these so Prometheus can
    merge their counts and compute the drift of a model's whole traffic (the bin counters)."""

    baseline_share: tuple[float, ...]  # the baseline's share of each bin (sums to 1)
    seen: tuple[int, ...]  # live values that fell in each bin since the monitor started


# --- statistics ----------------------------------------------------------------------------------


def psi(expected: npt.ArrayLike, actual: npt.ArrayLike, epsilon: float = 1e-4) -> float:
    """Population stability index between two count (or proportion) vectors over the same bins."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    e = np.maximum(e / e.sum(), epsilon)
    a = np.maximum(a / a.sum(), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_statistic(reference: npt.ArrayLike, sample: npt.ArrayLike) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two ECDFs."""
    return ks_sorted(np.sort(np.asarray(reference, dtype=np.float64)), sample)


def ks_sorted(r: npt.NDArray[np.float64], sample: npt.ArrayLike) -> float:
    """ks_statistic with the reference already sorted (a baseline's sketch, sorted once)."""
    s = np.sort(np.asarray(sample, dtype=np.float64))
    points = np.concatenate([r, s])
    cdf_r = np.searchsorted(r, points, side="right") / len(r)
    cdf_s = np.searchsorted(s, points, side="right") / len(s)
    return float(np.max(np.abs(cdf_r - cdf_s)))


def js_distance(p: npt.ArrayLike, q: npt.ArrayLike) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two count vectors over the same bins."""
    pp = np.asarray(p, dtype=np.float64)
    qq = np.asarray(q, dtype=np.float64)
    pp, qq = pp / pp.sum(), qq / qq.sum()
    m = (pp + qq) / 2

    def kl(x: npt.NDArray[np.float64]) -> float:
        nz = x > 0  # 0 * log(0 / m) is 0; and m > 0 wherever x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return float(np.sqrt(max((kl(pp) + kl(qq)) / 2, 0.0)))


# --- confidence-aware thresholds ----------------------------------------------------------------

_Z_WARN: Final = 2.3263  # standard normal quantile at 0.99
_Z_ALERT: Final = 3.0902  # at 0.999
_KS_C_WARN: Final = 1.6276  # Kolmogorov's c(alpha) = sqrt(-ln(alpha / 2) / 2), alpha 0.01
_KS_C_ALERT: Final = 1.9495  # alpha 0.001


def _chi2_quantile(dof: int, z: float) -> float:
    """Wilson-Hilferty: the chi-square quantile with `dof` degrees of freedom at normal z."""
    k = float(max(dof, 1))
    return k * (1.0 - 2.0 / (9.0 * k) + z * math.sqrt(2.0 / (9.0 * k))) ** 3


def chance_thresholds(
    stat: str, configured: Thresholds, baseline_n: float, window_n: int, bins: int
) -> Thresholds:
    """`configured`, raised to what `stat` reaches by chance (no drift) at 99% (warn) and
    99.9% (alert) for a baseline of `baseline_n` values and a window of `window_n`, over `bins`
    non-empty bins. Two samples of one distribution give PSI ~ chi2(bins - 1) x (1/N + 1/M),
    JS divergence (bits) ~ that / (8 ln 2), and KS ~ c(alpha) sqrt(1/N + 1/M)."""
    if baseline_n <= 0 or window_n <= 0:
        return configured
    scale = 1.0 / baseline_n + 1.0 / window_n
    if stat == "ks":
        warn, alert = _KS_C_WARN * np.sqrt(scale), _KS_C_ALERT * np.sqrt(scale)
    else:
        w2, a2 = _chi2_quantile(bins - 1, _Z_WARN), _chi2_quantile(bins - 1, _Z_ALERT)
        if stat == "psi":
            warn, alert = w2 * scale, a2 * scale
        else:  # js: a distance, the square root of the divergence
            warn = np.sqrt(w2 * scale / (8 * np.log(2)))
            alert = np.sqrt(a2 * scale / (8 * np.log(2)))
    return Thresholds(max(configured.warn, float(warn)), max(configured.alert, float(alert)))


# --- windows -------------------------------------------------------------------------------------


class _Window:
    """The last `size` entries of one feature (values, or rows of codes), in a ring buffer."""

    def __init__(self, size: int, dtype: type[np.generic], width: int = 0) -> None:
        self.buf = np.zeros((size, width) if width else size, dtype=dtype)
        self.size = size
        self.pos = 0
        self.n = 0
        self.fresh = 0  # values added since the last judgement

    def extend(self, values: npt.NDArray[Any]) -> None:
        k = len(values)
        self.fresh += k
        if k >= self.size:
            self.buf[:] = values[-self.size :]
            self.pos, self.n = 0, self.size
            return
        first = min(k, self.size - self.pos)
        self.buf[self.pos : self.pos + first] = values[:first]
        self.buf[: k - first] = values[first:]
        self.pos = (self.pos + k) % self.size
        self.n = min(self.size, self.n + k)

    def values(self) -> npt.NDArray[Any]:
        return self.buf[: self.n] if self.n < self.size else self.buf


_Grid = tuple[float, float, npt.NDArray[np.int64], list[npt.NDArray[np.float64]]]


class _CutIndex:
    """#(cuts < v) + #(cuts <= v) for finite values v against sorted distinct cuts: twice the
    searchsorted position, plus one on a cut. A binary search per value is about 40 ns here,
    and a batch's every feature value goes through one, so a grid over the cuts' range does
    most of it: a value's grid cell (a monotone function of it, so every cut in a lower cell is
    below it and every cut in a higher cell above) gives the count below, and the few cuts that
    share its cell are compared with it. Equal to searchsorted for every value (tested); cuts
    that crowd into one cell past MAX_SHARED at the finest grid keep searchsorted."""

    MAX_SHARED = 3
    MAX_CELLS = 16384  # a few hundred KiB per feature at most
    MIN_VALUES = 64  # fewer values: the binary search costs less than the grid's steps

    def __init__(self, cuts: npt.NDArray[np.float64]) -> None:
        self.cuts = cuts
        self.grid: _Grid | None = None
        m = len(cuts)
        if m < 2:
            return
        lo, span = float(cuts[0]), float(cuts[-1]) - float(cuts[0])
        if not (math.isfinite(span) and span > 0):
            return
        for cells in (8 * m, 32 * m, 128 * m):  # finer until few cuts share a cell
            if cells > self.MAX_CELLS:
                return
            scale = cells / span
            if not math.isfinite(scale):  # a span too small to divide by: (v - lo) * inf
                return
            of = self._cells(cuts, lo, scale, cells)
            per = np.bincount(of, minlength=cells)
            if int(per.max()) <= self.MAX_SHARED:
                break
        else:
            return
        below = 2 * (np.cumsum(per) - per)  # 2 x #(cuts in lower cells)
        shared = np.full((self.MAX_SHARED, cells), np.inf)  # +inf adds nothing below
        rank = np.arange(m) - (np.cumsum(per) - per)[of]  # a cut's place within its cell
        shared[rank, of] = cuts
        rows = [shared[r] for r in range(int(per.max()))]
        self.grid = (lo, scale, below.astype(np.int64), rows)

    def _cells(
        self, v: npt.NDArray[np.float64], lo: float, scale: float, cells: int
    ) -> npt.NDArray[np.intp]:
        # Values outside the cuts are held to their ends first (the same cell, and no overflow).
        t = np.clip((np.clip(v, lo, self.cuts[-1]) - lo) * scale, 0.0, cells - 1.0)
        return t.astype(np.intp)

    def codes(self, v: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        if self.grid is None or len(v) < self.MIN_VALUES:
            left = np.searchsorted(self.cuts, v, side="left")
            code = 2 * left
            if len(self.cuts):
                code += self.cuts.take(left, mode="clip") == v  # on the cut: one cell on
            return code
        lo, scale, below, rows = self.grid
        at = self._cells(v, lo, scale, len(below))
        code = below[at]
        for row in rows:
            u = row[at]
            code += u < v
            code += u <= v
        return code


class _NumericTracker:
    """A numeric feature's window, kept as one cell code per value instead of the value. The
    cuts are the sketch's distinct values and the bin edges, u_0 < ... < u_m-1; a value on u_i
    has code 2i+1, one between u_i-1 and u_i code 2i (#cuts < v + #cuts <= v). The codes are
    offset to this feature's row of its monitor's cell counts, so judging every feature is one
    bincount of their windows, and no sort (_NumericStats).

    Why the cell counts are all a judgement needs: a histogram bin is a run of cells (every
    edge is a cut), and the sketch's ECDF is constant between two cuts, so over each such
    stretch the largest gap to the window's ECDF is at its ends, #(window <= u_i) and
    #(window < u_i+1): the cumulative counts of the cells. ks_sorted() takes that maximum over
    the sketch's and the window's values; every value it sees is one of these (tested)."""

    def __init__(self, f: NumericFeature, window: int, offset: int) -> None:
        self.edges = np.asarray(f.edges, dtype=np.float64)
        self.expected = np.asarray(f.counts, dtype=np.float64)
        self.sketch = np.sort(np.asarray(f.quantiles, dtype=np.float64))
        self.cuts = np.unique(np.concatenate([self.sketch, self.edges]))
        self.index = _CutIndex(self.cuts)
        self.bins = len(self.expected)
        self.cells = 2 * len(self.cuts) + 1
        self.offset = offset
        self.window = _Window(window, np.int64)
        self.seen = np.zeros(self.bins, dtype=np.int64)  # every value ever, per bin
        # Each cell's histogram bin (#edges < v, as bin_counts bins), and where each bin's
        # cells end: the bins' counts are differences of the cells' cumulative counts.
        bin_of = np.zeros(self.cells, dtype=np.int64)
        bin_of[1::2] = np.searchsorted(self.edges, self.cuts, side="left")
        bin_of[2::2] = np.searchsorted(self.edges, self.cuts, side="right")
        self.bin_of = bin_of
        self.bin_ends = np.searchsorted(bin_of, np.arange(self.bins), side="right") - 1
        # What every judgement divides by, worked out once as psi() and js_distance() do.
        self.base_n = float(self.expected.sum())
        self.nonzero_bins = int(np.count_nonzero(self.expected))
        self.share = self.expected / self.expected.sum()
        self._floored: tuple[float, npt.NDArray[np.float64]] | None = None

    def floored(self, epsilon: float) -> npt.NDArray[np.float64]:
        """psi()'s expected shares at `epsilon` (the same while the window is full)."""
        if self._floored is None or self._floored[0] != epsilon:
            self._floored = (epsilon, np.maximum(self.share, epsilon))
        return self._floored[1]

    def sketch_cdf(self, width: int) -> npt.NDArray[np.float64]:
        """The sketch's ECDF per cell as ks_sorted() divides it, padded with 1.0 to `width`
        (a padded cell holds the window's total, so its gap is 0)."""
        out = np.ones(width, dtype=np.float64)
        if len(self.sketch):
            below = np.searchsorted(self.sketch, self.cuts, side="right")  # #(sketch <= u_i)
            at = np.zeros(self.cells, dtype=np.int64)
            at[1::2] = below
            at[2::2] = below
            out[: self.cells] = at / len(self.sketch)
        return out

    def codes(self, finite: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """Cell codes of finite values, in order, counting them into `seen`."""
        code = self.index.codes(finite)
        self.seen += np.bincount(self.bin_of[code], minlength=self.bins)
        code += self.offset
        return code

    def add(self, values: npt.NDArray[Any]) -> int:
        """Add finite values; returns how many were dropped as NaN/inf."""
        v = np.asarray(values, dtype=np.float64)
        finite = v[np.isfinite(v)]
        self.window.extend(self.codes(finite))
        return len(v) - len(finite)


class _CategoricalTracker:
    def __init__(self, f: CategoricalFeature, window: int) -> None:
        order = np.argsort(np.array(f.categories, dtype=str))
        self.sorted = np.array(f.categories, dtype=str)[order]
        self.codes = order  # sorted position -> index in the baseline's categories
        self.other = len(f.categories)  # code of the "other" bucket
        self.expected = np.asarray([*f.counts, f.other_count], dtype=np.float64)
        self.window = _Window(window, np.int64)
        self.seen = np.zeros(len(self.expected), dtype=np.int64)  # every value ever, per bin
        self.base_n = float(self.expected.sum())
        self.nonzero_bins = int(np.count_nonzero(self.expected))

    def add(self, values: npt.NDArray[Any]) -> int:
        v = np.asarray(values).astype(str)
        codes = np.full(len(v), self.other, dtype=np.int64)
        if len(self.sorted):
            i = np.minimum(np.searchsorted(self.sorted, v), len(self.sorted) - 1)
            hit = self.sorted[i] == v
            codes[hit] = self.codes[i[hit]]
        self.window.extend(codes)
        self.seen += np.bincount(codes, minlength=len(self.expected))
        return 0

    def judge(self, epsilon: float) -> tuple[float | None, float | None, float | None]:
        actual = np.bincount(self.window.values(), minlength=self.other + 1)
        return psi(self.expected, actual, epsilon), None, js_distance(self.expected, actual)


_Stats = tuple[float | None, float | None, float | None]  # psi, ks, js


_Groups = list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]]  # (rows, [rows, cells] at)


def _grouped_sums(terms: npt.NDArray[np.float64], groups: _Groups, n: int) -> list[float]:
    """Per row, the sum of its cells' terms: rows with as many cells are summed together as a
    matrix, since a row sum of a matrix adds in the order a sum of that row alone does (tested)
    and a sum with zeros padded in does not."""
    out = np.empty(n, dtype=np.float64)
    for rows, at in groups:
        out[rows] = np.add.reduce(terms[at], axis=1)  # np.sum, without its wrapper
    sums: list[float] = out.tolist()
    return sums


_Shapes = list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]]  # (rows, range of a length)


def _shapes(lengths: tuple[int, ...]) -> _Shapes:
    """Rows by length, each with the offsets 0..length - 1."""
    by: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        by.setdefault(length, []).append(row)
    return [(np.array(rows, dtype=np.intp), np.arange(n)) for n, rows in by.items()]


def _groups(starts: npt.NDArray[np.intp], shapes: _Shapes) -> _Groups:
    """Rows (cells starts[i]..starts[i] + lengths[i] - 1 of a flat array) by length."""
    return [(rows, starts[rows, None] + offsets) for rows, offsets in shapes]


@dataclass(slots=True)
class _Plan:
    """What judging one set of trackers shares from one judgement to the next. Their bins
    ("cells" here) lie one tracker after the other in flat arrays, so each step of psi() and
    js_distance() is one numpy operation over all of them; only the sums go by tracker."""

    hi: npt.NDArray[np.intp]  # per bin: its last cell in [0, *cumulative counts]
    lo: npt.NDArray[np.intp]  # ... the cell before its first (0: none)
    row: npt.NDArray[np.intp]  # per bin: its tracker's place among the judged
    bounds: npt.NDArray[np.intp]  # per judged tracker: its first bin; then all bins
    shapes: dict[tuple[int, ...], _Groups]  # kl(qq)'s row lengths seen, and their groups
    by_bins: _Groups  # psi's sums over each tracker's bins
    share: npt.NDArray[np.float64]  # the baseline's share of each bin (js_distance's pp)
    share_at: npt.NDArray[np.intp]  # its nonzero bins
    share_kept: npt.NDArray[np.float64]
    share_sums: _Groups  # kl(pp)'s sums over each tracker's nonzero bins
    floors: tuple[tuple[float, ...], npt.NDArray[np.float64], npt.NDArray[np.float64]] | None


class _NumericStats:
    """PSI, KS and JS of many numeric features' windows at once, equal to psi(), ks_sorted()
    and js_distance() of each window's values to the last bit (tests check it): every cell's
    arithmetic is the one those do, and sums over bins are row sums of same-length rows."""

    def __init__(self, trackers: list[_NumericTracker], width: int) -> None:
        self.trackers = trackers
        self.width = width  # cells per tracker row (the most any tracker has)
        self.total = width * len(trackers)
        self.sketch_cdf = np.stack([t.sketch_cdf(width) for t in trackers]) if trackers else None
        self._plans: dict[tuple[int, ...], _Plan] = {}

    def _plan(self, which: tuple[int, ...]) -> _Plan:
        plan = self._plans.get(which)
        if plan is None:
            group = [self.trackers[k] for k in which]
            hi = np.concatenate([1 + p * self.width + t.bin_ends for p, t in enumerate(group)])
            lo = np.concatenate(
                [
                    np.concatenate(([0], 1 + p * self.width + t.bin_ends[:-1]))
                    for p, t in enumerate(group)
                ]
            )
            bins = np.array([t.bins for t in group], dtype=np.intp)
            first = np.cumsum(bins) - bins
            share = np.concatenate([t.share for t in group])
            share_at = np.flatnonzero(share > 0)
            kept_bins = np.array([np.count_nonzero(t.share) for t in group], dtype=np.intp)
            plan = _Plan(
                hi=hi,
                lo=lo,
                row=np.repeat(np.arange(len(group)), bins),
                bounds=np.append(first, len(hi)),
                shapes={},
                by_bins=_groups(first, _shapes(tuple(bins.tolist()))),
                share=share,
                share_at=share_at,
                share_kept=share[share_at],
                share_sums=_groups(
                    np.cumsum(kept_bins) - kept_bins, _shapes(tuple(kept_bins.tolist()))
                ),
                floors=None,
            )
            self._plans[which] = plan
        return plan

    def judge(self, which: tuple[int, ...], epsilons: list[float]) -> list[_Stats]:
        trackers = [self.trackers[k] for k in which]
        windows = [t.window.values() for t in trackers]
        codes = windows[0] if len(windows) == 1 else np.concatenate(windows)
        counts = np.bincount(codes, minlength=self.total).reshape(len(self.trackers), self.width)
        n = np.array([t.window.n for t in trackers], dtype=np.int64)
        judged = list(which)
        cum = np.cumsum(counts[judged], axis=1)
        assert self.sketch_cdf is not None
        gap = np.abs(self.sketch_cdf[judged] - cum / n[:, None])
        ks = np.max(gap, axis=1).tolist()
        plan = self._plan(which)
        padded = np.concatenate((np.zeros(1, dtype=np.int64), cum.ravel()))
        actual = (padded[plan.hi] - padded[plan.lo]).astype(np.float64)
        live = actual / n.astype(np.float64)[plan.row]  # the window's share of each bin
        eps = tuple(epsilons)
        if plan.floors is None or plan.floors[0] != eps:
            floor = np.array(eps, dtype=np.float64)[plan.row]
            floored = np.concatenate([t.floored(e) for t, e in zip(trackers, eps, strict=True)])
            plan.floors = (eps, floor, floored)
        _eps, floor, expected = plan.floors
        a = np.maximum(live, floor)
        psis = _grouped_sums((a - expected) * np.log(a / expected), plan.by_bins, len(which))
        m = (plan.share + live) / 2
        kept = plan.share_kept
        kl_p = _grouped_sums(kept * np.log2(kept / m[plan.share_at]), plan.share_sums, len(which))
        live_at = np.flatnonzero(live > 0)
        kept = live[live_at]
        bounds = np.searchsorted(live_at, plan.bounds)  # each tracker's first nonzero bin
        starts = bounds[:-1]
        lengths = tuple((bounds[1:] - starts).tolist())  # the starts follow from these
        groups = plan.shapes.get(lengths)
        if groups is None:
            if len(plan.shapes) >= 256:  # the patterns of empty bins a window shows: few
                plan.shapes.clear()
            groups = plan.shapes[lengths] = _groups(starts, _shapes(lengths))
        kl_q = _grouped_sums(kept * np.log2(kept / m[live_at]), groups, len(which))
        return [
            (
                psis[i],
                ks[i] if len(t.sketch) else None,
                math.sqrt(max((kl_p[i] + kl_q[i]) / 2, 0.0)),
            )
            for i, t in enumerate(trackers)
        ]


# --- monitor -------------------------------------------------------------------------------------


class DriftMonitor:
    """Feeds InferenceEvents (or ready columns) through per-feature windows; see module doc."""

    def __init__(self, baseline: Baseline, config: DriftConfig | None = None) -> None:
        self.baseline = baseline
        self.config = config or DriftConfig()
        self._trackers: dict[str, _NumericTracker | _CategoricalTracker] = {}
        numeric: list[_NumericTracker] = []
        # A feature with no finite training value cannot drift.
        wanted = [
            f for f in baseline.features if isinstance(f, NumericFeature) and (f.edges or f.finite)
        ]
        width = max(
            (2 * len(np.unique(np.concatenate([f.quantiles, f.edges]))) + 1 for f in wanted),
            default=1,
        )
        self._index: dict[str, int] = {}  # numeric feature -> its row in self._stats
        for f in baseline.features:
            if isinstance(f, NumericFeature):
                if f.edges or f.finite:
                    tracker = _NumericTracker(f, self.config.window, width * len(numeric))
                    self._index[f.name] = len(numeric)
                    numeric.append(tracker)
                    self._trackers[f.name] = tracker
            else:
                self._trackers[f.name] = _CategoricalTracker(f, self.config.window)
        self._stats = _NumericStats(numeric, width)
        self._current: dict[str, FeatureDrift] = {}
        self._levels: dict[tuple[str, str], Severity | None] = {}
        self._chance: dict[
            tuple[str, int], list[tuple[int, str, Thresholds, Thresholds, tuple[str, str]]]
        ] = {}
        self.skipped: Counter[str] = Counter()  # reason -> count (events or values)

    @property
    def model(self) -> str:
        return self.baseline.model

    def observe(self, event: InferenceEvent) -> list[Finding]:
        """Add an event's feature values; returns findings for levels that changed."""
        return self.observe_extracted(extract_features(event, self.baseline))

    def observe_extracted(self, cols: FeatureColumns) -> list[Finding]:
        """observe() with the event's features already extracted (extract_features)."""
        for p in cols.problems:
            self.skipped[p.type] += 1
        if not cols.columns:
            self.skipped["event_without_features"] += 1
            return []
        return self.observe_columns(cols.columns)

    def observe_columns(self, columns: Mapping[str, npt.ArrayLike]) -> list[Finding]:
        """Add 1-D values per feature name (unknown names are counted and ignored)."""
        due: list[str] = []  # judged after all are added: a judgement reads its own window only
        for name, values in columns.items():
            tracker = self._trackers.get(name)
            if tracker is None:
                self.skipped["unknown_feature"] += 1
                continue
            dropped = tracker.add(np.ravel(np.asarray(values)))
            if dropped:
                self.skipped["nonfinite_value"] += dropped
            w = tracker.window
            if w.n >= self.config.min_n and w.fresh >= self.config.every:
                w.fresh = 0
                due.append(name)
        return self._judge(due) if due else []

    def observe_matrices(
        self, values: npt.NDArray[np.float64], rows: RowSpans
    ) -> list[list[Finding]]:
        """observe() of a run of events whose features are numeric matrices, stacked as in
        SchemaChecker.check_matrices: per event the findings observe() would have returned.

        Each feature's values for the whole run go into its window in at most a few slices: the
        events after which observe() would judge (its window full enough and `every` values
        fresh) are found from the running count of finite values, and the window is judged
        exactly there (all features due after one event together), so levels, findings and
        gauges come out as one event at a time."""
        out: list[list[Finding]] = [[] for _ in range(len(rows))]
        need, every = self.config.min_n, self.config.every
        finite = np.isfinite(values)
        all_finite = bool(finite.all())
        shared_ends: npt.NDArray[np.int64] | None = None
        # Per event that judges: (feature, where its window's slice ends), in feature order.
        due: dict[int, list[tuple[str, int]]] = {}
        codes_of: dict[str, npt.NDArray[np.int64]] = {}  # the run's cell codes per feature
        plans: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (n, fresh) -> judgements
        for j, f in enumerate(self.baseline.features):
            tracker = self._trackers.get(f.name)
            if tracker is None:
                self.skipped["unknown_feature"] += len(rows)
                continue
            assert isinstance(tracker, _NumericTracker)  # matrices: all-numeric baselines
            if all_finite:
                kept = values[:, j]
                if shared_ends is None:
                    shared_ends = np.cumsum(rows.count_per_event(finite[:, 0]))
                ends = shared_ends
            else:
                kept = values[:, j][finite[:, j]]
                if len(kept) != len(values):
                    self.skipped["nonfinite_value"] += len(values) - len(kept)
                ends = np.cumsum(rows.count_per_event(finite[:, j]))
            codes = tracker.codes(np.ascontiguousarray(kept))
            w = tracker.window
            key = (w.n, w.fresh)
            plan = plans.get(key) if all_finite else None
            if plan is None:
                plan = _judgements(ends, w.n, w.fresh, w.size, need, every)
                if all_finite:
                    plans[key] = plan
            for i, end in plan:
                due.setdefault(i, []).append((f.name, end))
            codes_of[f.name] = codes
        taken = dict.fromkeys(codes_of, 0)  # codes already in the window, per feature
        for i in sorted(due):
            names = []
            for name, end in due[i]:
                w = self._trackers[name].window
                w.extend(codes_of[name][taken[name] : end])
                taken[name] = end
                w.fresh = 0
                names.append(name)
            out[i].extend(self._judge(names))
        for name, codes in codes_of.items():
            self._trackers[name].window.extend(codes[taken[name] :])
        return out

    def _epsilon(self, n: int) -> float:
        # An empty live bin means a share under about one value in the window, not 1e-4: the
        # floor is half a value (a continuity correction), or epsilon when that is larger.
        return max(self.config.epsilon, 0.5 / max(n, 1))

    def _judge(self, names: list[str]) -> list[Finding]:
        """Judge these features' windows now (the numeric ones together); findings in the
        order of `names`."""
        numeric = [name for name in names if name in self._index]
        stats: dict[str, _Stats] = {}
        if numeric:
            which = tuple(self._index[name] for name in numeric)
            eps = [self._epsilon(self._trackers[name].window.n) for name in numeric]
            stats = dict(zip(numeric, self._stats.judge(which, eps), strict=True))
        findings: list[Finding] = []
        for name in names:
            tracker = self._trackers[name]
            n = tracker.window.n
            values = stats.get(name)
            if values is None:
                assert isinstance(tracker, _CategoricalTracker)
                values = tracker.judge(self._epsilon(n))
            findings += self._level_changes(name, tracker, n, values)
        return findings

    def _thresholds(
        self, name: str, tracker: _NumericTracker | _CategoricalTracker, n: int
    ) -> list[tuple[int, str, Thresholds, Thresholds, tuple[str, str]]]:
        """(place in STATS, stat, configured, in force, level key) per configured statistic,
        for a window of n values of this feature (chance_thresholds depends on nothing else:
        worked out once per n)."""
        key = (name, n)
        found = self._chance.get(key)
        if found is None:
            if len(self._chance) >= 4096:  # features x window sizes seen: bounded anyway
                self._chance.clear()
            found = self._chance[key] = [
                (
                    i,
                    stat,
                    c,
                    chance_thresholds(stat, c, tracker.base_n, n, tracker.nonzero_bins),
                    (name, stat),
                )
                for i, stat in enumerate(STATS)
                if (c := self.config.thresholds.get(stat)) is not None
            ]
        return found

    def _level_changes(
        self,
        name: str,
        tracker: _NumericTracker | _CategoricalTracker,
        n: int,
        stats: _Stats,
    ) -> list[Finding]:
        findings: list[Finding] = []
        worst: Severity | None = None
        base_n = tracker.base_n
        levels = self._levels
        for i, stat, configured, t, key in self._thresholds(name, tracker, n):
            value = stats[i]
            if value is None:
                continue
            level: Severity | None = (
                "alert" if value >= t.alert else "warn" if value >= t.warn else None
            )
            if level == "alert" or (level == "warn" and worst is None):
                worst = level
            if level == levels.get(key):
                continue
            levels[key] = level
            if level is None:
                msg = f"{stat} {value:.3f} back under warn {t.warn:.3g} over the last {n} values"
            else:
                limit = t.alert if level == "alert" else t.warn
                msg = f"{stat} {value:.3f} >= {level} {limit:.3g} over the last {n} values"
            if t != configured:
                msg += f" (raised from {configured.warn:g}/{configured.alert:g} for {base_n:.0f}"
                msg += " baseline values)"
            findings.append(
                Finding(
                    kind="drift",
                    model=self.model,
                    type=stat,
                    location=name,
                    severity=level or "info",
                    value=value,
                    message=msg,
                )
            )
        self._current[name] = FeatureDrift(name, n, stats[0], stats[1], stats[2], worst)
        return findings

    def current(self) -> dict[str, FeatureDrift]:
        """The latest judgement per feature (features not judged yet are absent)."""
        return dict(self._current)

    def bins(self) -> dict[str, FeatureBins]:
        """Per feature: the baseline's share and every live value seen so far, per bin."""
        out: dict[str, FeatureBins] = {}
        for name, tracker in self._trackers.items():
            total = tracker.expected.sum()
            shares = tracker.expected / total if total > 0 else tracker.expected
            out[name] = FeatureBins(tuple(shares.tolist()), tuple(tracker.seen.tolist()))
        return out

    def metrics(self) -> dict[tuple[str, str], float]:
        """(feature, stat) -> latest value: the infertap_feature_drift gauge for this model."""
        return {
            (name, stat): value
            for name, fd in self._current.items()
            for stat, value in fd.stats().items()
        }


def _judgements(
    ends: npt.NDArray[np.int64], n: int, fresh: int, size: int, need: int, every: int
) -> list[tuple[int, int]]:
    """The events after which observe() judges a window of `size` holding `n` values (`fresh`
    of them new since its last judgement) that is fed events whose values end at `ends`:
    (event, values fed by its end). observe() judges after the first event that brings both
    `need` values and `every` fresh ones in reach."""
    out: list[tuple[int, int]] = []
    taken = first = 0
    while first < len(ends):
        target = taken + max(every - fresh, need - n)
        i = first + int(np.searchsorted(ends[first:], target, side="left"))
        if i >= len(ends):
            break
        end = int(ends[i])
        n, fresh = min(size, n + end - taken), 0
        taken, first = end, i + 1
        out.append((i, end))
    return out
