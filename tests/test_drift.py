"""Drift statistics against scipy and direct formulas, the sliding window, findings on level
changes, and detection on a real data set (scikit-learn's breast cancer data, shipped with it)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy.spatial.distance import jensenshannon  # type: ignore[import-untyped]
from scipy.stats import ks_2samp  # type: ignore[import-untyped]
from sklearn.datasets import load_breast_cancer, load_wine  # type: ignore[import-untyped]
from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

from infertap.agent.flows.records import Endpoint
from infertap.agent.inspect.baseline import Baseline, NumericFeature, bin_counts, build_baseline
from infertap.agent.inspect.drift import (
    DriftConfig,
    DriftMonitor,
    Thresholds,
    _CutIndex,
    chance_thresholds,
    js_distance,
    ks_sorted,
    ks_statistic,
    psi,
)
from infertap.agent.inspect.features import stack_matrices
from infertap.agent.inspect.findings import Finding
from infertap.agent.models.inference_event import InferenceEvent

FloatArray = npt.NDArray[np.float64]


def _event(inputs: dict[str, npt.NDArray[Any]], model: str = "m") -> InferenceEvent:
    return InferenceEvent(
        service=Endpoint("10.0.0.2", 8000),
        model=model,
        version="",
        protocol="kserve-v2-rest",
        ts_ns=0,
        inputs=inputs,
    )


def _psi_direct(expected: list[int], actual: list[int], eps: float) -> float:
    """PSI written out bin by bin, as a textbook gives it."""
    te, ta = sum(expected), sum(actual)
    total = 0.0
    for e_count, a_count in zip(expected, actual, strict=True):
        e = max(e_count / te, eps)
        a = max(a_count / ta, eps)
        total += (a - e) * math.log(a / e)
    return total


def _bins_direct(edges: list[float], values: list[float]) -> list[int]:
    """Open-ended bins (-inf, e0], (e0, e1], ..., (e_last, inf), one value at a time."""
    counts = [0] * (len(edges) + 1)
    for v in values:
        i = 0
        while i < len(edges) and v > edges[i]:
            i += 1
        counts[i] += 1
    return counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ks_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cases = [
        (rng.normal(size=700), rng.normal(0.3, 1.2, size=300)),
        (rng.integers(0, 5, size=500).astype(float), rng.integers(0, 6, size=200).astype(float)),
        (rng.exponential(size=50), rng.exponential(size=1000)),
    ]
    for ref, sample in cases:
        ours = ks_statistic(ref, sample)
        theirs = float(ks_2samp(ref, sample).statistic)
        assert ours == pytest.approx(theirs, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_js_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 50, size=12).astype(float)
    q = rng.integers(0, 50, size=12).astype(float)
    p[3] = 0  # empty bins on one side, then on both
    q[5] = 0
    p[7] = q[7] = 0
    ours = js_distance(p, q)
    theirs = float(jensenshannon(p, q, base=2))
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert js_distance(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)


def test_psi_and_bins_match_direct_formula(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    train = rng.normal(10, 2, size=5000)
    np.save(tmp_path / "t.npy", train)
    b = build_baseline(tmp_path / "t.npy", "m", tmp_path / "b.json", features=["x"])
    f = b.feature("x")
    assert isinstance(f, NumericFeature)
    live = rng.normal(11, 2.5, size=400)
    live[:3] = [-100.0, 100.0, f.edges[0]]  # both open ends, and a value exactly on an edge
    ours_bins = bin_counts(f.edges, live)
    assert ours_bins.tolist() == _bins_direct(list(f.edges), live.tolist())
    assert list(f.counts) == _bins_direct(list(f.edges), train.tolist())
    ours = psi(f.counts, ours_bins, 1e-4)
    assert ours == pytest.approx(_psi_direct(list(f.counts), ours_bins.tolist(), 1e-4), rel=1e-12)
    # An empty bin is floored at epsilon, not infinite.
    assert math.isfinite(psi([10, 10, 0], [0, 10, 10]))


def _monitor_for(
    train: FloatArray, tmp_path: Path, names: list[str], **cfg: Any
) -> tuple[Baseline, DriftMonitor]:
    np.save(tmp_path / "train.npy", train)
    b = build_baseline(tmp_path / "train.npy", "m", tmp_path / "b.json", features=names)
    return b, DriftMonitor(Baseline.load(tmp_path / "b.json"), DriftConfig(**cfg))


def test_monitor_values_match_scipy_on_the_window(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    train = rng.normal(size=(4000, 2))
    b, mon = _monitor_for(train, tmp_path, ["a", "b"], window=300)
    stream = np.column_stack([rng.normal(0.5, 1.0, 1000), rng.normal(size=1000)])
    for i in range(0, 1000, 50):
        mon.observe(_event({"x": stream[i : i + 50]}))
    window = stream[-300:, 0]  # the ring buffer holds the last 300 values
    fd = mon.current()["a"]
    fa = b.feature("a")
    assert isinstance(fa, NumericFeature)
    counts = bin_counts(fa.edges, window)
    assert fd.n == 300
    assert fd.psi == pytest.approx(_psi_direct(list(fa.counts), counts.tolist(), 1e-4), rel=1e-12)
    assert fd.js == pytest.approx(float(jensenshannon(fa.counts, counts, base=2)), abs=1e-12)
    # KS runs against the 101-point quantile sketch, standing in for the 4000 training values.
    full = float(ks_2samp(train[:, 0], window).statistic)
    assert fd.ks is not None and abs(fd.ks - full) < 0.015, (fd.ks, full)
    assert fd.ks > 0.15 and fd.severity is not None  # a half-sigma shift is visible...
    assert mon.current()["b"].severity is None  # ...and the untouched feature is quiet
    assert set(mon.metrics()) == {(n, s) for n in ("a", "b") for s in ("psi", "ks", "js")}


def test_findings_on_level_changes_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    train = rng.normal(size=(5000, 1))
    _, mon = _monitor_for(train, tmp_path, ["x"], window=200, evaluate_every=50)

    def feed(values: FloatArray) -> list[Finding]:
        out: list[Finding] = []
        for i in range(0, len(values), 25):
            out += mon.observe(_event({"x": values[i : i + 25]}))
        return out

    assert feed(rng.normal(size=400)) == []  # quiet while in distribution
    up = feed(rng.normal(3.0, 1.0, size=400))
    # As the window fills with shifted values a statistic may pass warn on its way to alert, but
    # it is reported once per level, not once per evaluation.
    last = {f.type: f.severity for f in up}
    assert last == {"psi": "alert", "ks": "alert", "js": "alert"}
    assert all(f.kind == "drift" and f.location == "x" and f.value for f in up)
    assert len(up) <= 6 and len({(f.type, f.severity) for f in up}) == len(up)
    down = feed(rng.normal(size=600))
    assert {f.type: f.severity for f in down} == {"psi": "info", "ks": "info", "js": "info"}
    assert mon.current()["x"].severity is None


def test_window_judges_only_when_full_and_counts_skips(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    _, mon = _monitor_for(rng.normal(size=(1000, 2)), tmp_path, ["a", "b"], window=100)
    mon.observe(_event({"a": rng.normal(5, 1, 98), "b": rng.normal(5, 1, 98)}))
    assert mon.current() == {}  # 98 < window: nothing judged yet
    findings = mon.observe(_event({"a": np.array([np.nan, 5.0]), "b": np.array([5.0, 5.0])}))
    assert {f.location for f in findings} == {"b"}  # a: the NaN is dropped, 99 values
    assert mon.skipped["nonfinite_value"] == 1
    mon.observe(_event({"other": np.array([1.0])}))
    mon.observe(_event({"a": np.array(["x", "y"], dtype=object)}))
    assert mon.skipped["event_without_features"] == 2
    assert mon.skipped["dtype"] == 1 and mon.skipped["missing"] >= 2


def test_categorical_drift(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    csv = tmp_path / "t.csv"
    colors = rng.choice(["red", "green", "blue"], p=[0.6, 0.3, 0.1], size=3000)
    csv.write_text("color,v\n" + "".join(f"{c},{i % 7}\n" for i, c in enumerate(colors)))
    b = build_baseline(csv, "m", tmp_path / "b.json")
    mon = DriftMonitor(b, DriftConfig(window=300))
    same = rng.choice(["red", "green", "blue"], p=[0.6, 0.3, 0.1], size=300)
    assert mon.observe(_event({"color": np.array([c.encode() for c in same], dtype=object)})) == []
    assert mon.current()["color"].ks is None  # no order among categories
    quiet = mon.current()["color"].psi
    assert quiet is not None and quiet < 0.05
    new = rng.choice(["red", "purple"], size=300)  # unseen categories land in "other"
    found = mon.observe(_event({"color": new.astype(object)}))
    assert {(f.type, f.severity) for f in found} == {("psi", "alert"), ("js", "alert")}


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="window"):
        DriftConfig(window=1)
    with pytest.raises(ValueError, match="warn <= alert"):
        DriftConfig(thresholds={"psi": Thresholds(0.3, 0.2)})
    with pytest.raises(ValueError, match="unknown statistic"):
        DriftConfig(thresholds={"chi2": Thresholds(1, 2)})


# --- a real data set -----------------------------------------------------------------------------

SHIFTED = ["mean radius", "worst texture"]
WINDOW = 150


@pytest.fixture(scope="module")
def cancer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Baseline, FloatArray, list[str]]:
    data = load_breast_cancer()
    names = [str(n) for n in data.feature_names]
    x_train, x_test = train_test_split(
        data.data, test_size=0.33, random_state=0, stratify=data.target
    )
    d = tmp_path_factory.mktemp("cancer")
    # Through the CSV path, as a user would hand it over.
    header = ",".join(names)
    np.savetxt(d / "train.csv", x_train, delimiter=",", header=header, comments="", fmt="%.10g")
    b = build_baseline(d / "train.csv", "breast-cancer", d / "baseline.json")
    assert b.rows == len(x_train) and b.feature_names == tuple(names)
    return Baseline.load(d / "baseline.json"), np.asarray(x_test, dtype=np.float64), names


def _feed_matrix(mon: DriftMonitor, rows: FloatArray, batch: int = 10) -> list[tuple[int, Finding]]:
    """Feed rows as [batch, 30] tensors; returns (rows fed so far, finding) pairs."""
    out: list[tuple[int, Finding]] = []
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch].astype(np.float32)  # what a client sends as FP32
        for f in mon.observe(_event({"input__0": part}, "breast-cancer")):
            out.append((min(i + batch, len(rows)), f))
    return out


def test_real_data_unshifted_gives_no_alert(cancer: tuple[Baseline, FloatArray, list[str]]) -> None:
    b, x_test, _ = cancer
    mon = DriftMonitor(b, DriftConfig(window=WINDOW))
    found = _feed_matrix(mon, x_test)
    worst = max(fd.psi or 0.0 for fd in mon.current().values())
    print(f"\nheld-out {len(x_test)} rows, window {WINDOW}: max PSI {worst:.3f}; findings:")
    for n, f in found:
        print(f"  after {n} rows: {f.location} {f.type}={f.value:.3f} {f.severity}")
    assert len(mon.current()) == 30
    assert [f for _, f in found if f.severity == "alert"] == []
    assert worst < 0.25


def test_real_data_shift_detected_within_one_window(
    cancer: tuple[Baseline, FloatArray, list[str]],
) -> None:
    b, x_test, names = cancer
    shifted = x_test.copy()
    for name in SHIFTED:
        feat = b.feature(name)
        assert isinstance(feat, NumericFeature) and feat.std is not None
        shifted[:, names.index(name)] += 2 * feat.std
    mon = DriftMonitor(b, DriftConfig(window=WINDOW))
    found = _feed_matrix(mon, shifted)
    alerts = [(n, f) for n, f in found if f.severity == "alert"]
    first: dict[str, int] = {}
    for n, f in alerts:
        first.setdefault(f.location, n)
    print(f"\nshifted {SHIFTED} by +2 std: first alert after {first} rows (window {WINDOW})")
    for name in SHIFTED:
        fd = mon.current()[name]
        print(f"  {name}: psi {fd.psi:.2f} ks {fd.ks:.2f} js {fd.js:.2f}")
    assert set(first) == set(SHIFTED)  # exactly the shifted features, no others
    assert all(n <= WINDOW for n in first.values())
    assert {f.type for _, f in alerts} >= {"psi", "ks", "js"}


def test_real_data_one_input_per_feature(cancer: tuple[Baseline, FloatArray, list[str]]) -> None:
    b, x_test, names = cancer
    shifted = x_test.copy()
    j = names.index("mean smoothness")
    shifted[:, j] += 2 * np.std(x_test[:, j])
    mon = DriftMonitor(b, DriftConfig(window=WINDOW))
    alerted: set[str] = set()
    for i in range(0, WINDOW, 15):
        inputs = {n: shifted[i : i + 15, k].reshape(-1, 1) for k, n in enumerate(names)}
        alerted |= {f.location for f in mon.observe(_event(inputs)) if f.severity == "alert"}
    assert alerted == {"mean smoothness"}


def test_bins_count_every_value_seen_in_the_baselines_bins(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    b, mon = _monitor_for(rng.normal(size=(2000, 1)), tmp_path, ["x"], window=100)
    fx = b.feature("x")
    assert isinstance(fx, NumericFeature)
    assert mon.bins()["x"].seen == (0,) * (len(fx.edges) + 1)  # every bin exported from the start
    stream = rng.normal(1.0, 1.0, 450)
    for i in range(0, 450, 30):
        mon.observe(_event({"x": stream[i : i + 30]}))
    mon.observe(_event({"x": np.array([np.nan, np.inf])}))  # not counted: not in any bin
    bins = mon.bins()["x"]
    # Every value since the start, not only the 100-value window, binned as the baseline was.
    assert bins.seen == tuple(_bins_direct(list(fx.edges), stream.tolist()))
    assert bins.baseline_share == pytest.approx([c / sum(fx.counts) for c in fx.counts])
    assert sum(bins.baseline_share) == pytest.approx(1.0)


def test_categorical_bins_are_the_categories_then_other(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("color\n" + "red\n" * 6 + "green\n" * 3 + "blue\n")
    b = build_baseline(csv, "m", tmp_path / "b.json")
    mon = DriftMonitor(b, DriftConfig(window=10))
    mon.observe(_event({"color": np.array(["green", "purple", "red", "green"], dtype=object)}))
    bins = mon.bins()["color"]
    fc = b.feature("color")
    assert not isinstance(fc, NumericFeature)
    seen = dict(zip([*fc.categories, "(other)"], bins.seen, strict=True))
    assert seen == {"red": 1, "green": 2, "blue": 0, "(other)": 1}
    assert bins.baseline_share == pytest.approx([0.6, 0.3, 0.1, 0.0])


# -- small baselines: scikit-learn's wine data, 89 training rows --------------------------------

WINE_SHIFTED = "alcohol"


def _wine(seed: int, tmp_path: Path) -> tuple[Baseline, FloatArray, list[str]]:
    data = load_wine()
    names = [str(n).replace("/", "_") for n in data.feature_names]
    train, held = train_test_split(
        data.data, train_size=89, random_state=seed, stratify=data.target
    )
    np.save(tmp_path / f"wine-{seed}.npy", np.asarray(train, dtype=np.float64))
    b = build_baseline(
        tmp_path / f"wine-{seed}.npy", "wine", tmp_path / f"wine-{seed}.json", features=names
    )
    assert b.rows == 89  # the baseline records its row count
    return b, np.asarray(held, dtype=np.float64), names


def _judge_once(b: Baseline, live: FloatArray, names: list[str]) -> list[Finding]:
    n = len(live)  # one window holding the whole split, judged once
    mon = DriftMonitor(b, DriftConfig(window=n, min_samples=n, evaluate_every=n))
    return mon.observe_columns({name: live[:, i] for i, name in enumerate(names)})


@pytest.mark.parametrize("seed", range(5))
def test_small_baseline_held_out_split_gives_no_alert(seed: int, tmp_path: Path) -> None:
    """89 rows against 89: fixed thresholds (PSI alert 0.25) alerted on 1 to 7 unshifted
    features of these splits (two on seed 0), since PSI's no-drift level is about
    9 x (1/89 + 1/89) = 0.2 here. Confidence-aware thresholds raise no alert."""
    b, held, names = _wine(seed, tmp_path)
    alerts = [(f.location, f.type) for f in _judge_once(b, held, names) if f.severity == "alert"]
    assert alerts == []


@pytest.mark.parametrize("seed", range(5))
def test_small_baseline_one_std_shift_alerts_on_that_feature_only(
    seed: int, tmp_path: Path
) -> None:
    b, held, names = _wine(seed, tmp_path)
    feat = b.feature(WINE_SHIFTED)
    assert isinstance(feat, NumericFeature) and feat.std is not None
    shifted = held.copy()
    shifted[:, names.index(WINE_SHIFTED)] += feat.std
    found = _judge_once(b, shifted, names)
    alerts = {(f.location, f.type) for f in found if f.severity == "alert"}
    assert {loc for loc, _ in alerts} == {WINE_SHIFTED}
    assert {stat for _, stat in alerts} == {"psi", "ks", "js"}
    psi_alert = next(f for f in found if (f.location, f.type) == (WINE_SHIFTED, "psi"))
    assert "raised from 0.1/0.25 for 89 baseline values" in psi_alert.message


def test_chance_thresholds_change_nothing_on_large_samples() -> None:
    configured = Thresholds(0.1, 0.25)
    assert chance_thresholds("psi", configured, 100_000, 500, 10) == configured
    assert chance_thresholds("ks", Thresholds(0.2, 0.3), 100_000, 500, 10) == Thresholds(0.2, 0.3)
    small = chance_thresholds("psi", configured, 89, 89, 10)
    # chi2(9) at 0.99 and 0.999 (scipy: 21.666, 27.877) times 2/89.
    assert small.warn == pytest.approx(21.666 * 2 / 89, rel=0.01)
    assert small.alert == pytest.approx(27.877 * 2 / 89, rel=0.01)
    ks = chance_thresholds("ks", Thresholds(0.2, 0.3), 89, 89, 10)
    assert ks.warn == pytest.approx(1.6276 * math.sqrt(2 / 89), rel=1e-3)  # c(0.01) = 1.6276
    assert ks.alert == 0.3  # c(0.001) sqrt(2/89) = 0.292: the configured level is higher


def _exact_reference(f: NumericFeature, window: FloatArray, epsilon: float) -> tuple[float, ...]:
    """psi(), ks_sorted() and js_distance() of a window's values, as the monitor once computed
    them on the values themselves (it now keeps cell codes and judges features together)."""
    counts = bin_counts(f.edges, window)
    sketch = np.sort(np.asarray(f.quantiles, dtype=np.float64))
    return (
        psi(f.counts, counts, epsilon),
        ks_sorted(sketch, window),
        js_distance(f.counts, counts),
    )


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_judgement_equals_the_per_feature_formulas_to_the_bit(
    seed: int, tmp_path: Path
) -> None:
    """Every judgement of every feature (continuous, integer with ties, binary, a bin with no
    training value, NaN and inf in the stream) equals psi/ks_sorted/js_distance on the window's
    values exactly, for windows filling and full, fed one event at a time and as matrices."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(20, 400))
    train = np.column_stack(
        [
            rng.normal(size=3000),
            rng.integers(0, 6, size=3000).astype(np.float64),  # ties in bins and the sketch
            (rng.random(3000) < 0.1).astype(np.float64),  # binary: three bins, one empty
            rng.exponential(2.0, size=3000),
            rng.integers(0, 40, size=3000).astype(np.float64),
        ]
    )
    names = ["c", "small_int", "flag", "skewed", "wide_int"]
    bins = int(rng.choice([4, 10, 13]))
    np.save(tmp_path / "train.npy", train)
    build_baseline(tmp_path / "train.npy", "m", tmp_path / "b.json", features=names, bins=bins)
    baseline = Baseline.load(tmp_path / "b.json")
    cfg = DriftConfig(window=size, min_samples=max(1, size // 3), evaluate_every=1)
    one, batched = DriftMonitor(baseline, cfg), DriftMonitor(baseline, cfg)
    history: list[FloatArray] = []
    events: list[InferenceEvent] = []
    for _ in range(40):
        rows = int(rng.integers(1, 30))
        x = np.column_stack(
            [
                rng.normal(rng.choice([0.0, 1.5]), size=rows),
                rng.integers(0, 8, size=rows),
                (rng.random(rows) < rng.choice([0.1, 0.9])).astype(np.float64),
                rng.exponential(2.0, size=rows),
                rng.integers(0, 50, size=rows),
            ]
        ).astype(np.float64)
        if rng.random() < 0.2:
            x[rng.integers(0, rows), rng.integers(0, 5)] = rng.choice([np.nan, np.inf])
        history.append(x)
        events.append(_event({"x": x}))
        one.observe(events[-1])
        seen = np.concatenate(history)
        for j, name in enumerate(names):
            f = baseline.feature(name)
            assert isinstance(f, NumericFeature)
            col = seen[:, j][np.isfinite(seen[:, j])][-size:]
            fd = one.current().get(name)
            if len(col) < cfg.min_n:
                assert fd is None
                continue
            assert fd is not None and fd.n == len(col)
            eps = max(cfg.epsilon, 0.5 / len(col))
            assert (fd.psi, fd.ks, fd.js) == _exact_reference(f, col, eps), name
    matrices = [e.inputs["x"] for e in events]
    values, spans = stack_matrices(matrices)
    batched_findings = batched.observe_matrices(values, spans)
    assert batched.current() == one.current()
    assert batched.skipped == one.skipped
    replay = DriftMonitor(baseline, cfg)
    assert batched_findings == [replay.observe(e) for e in events]


def _codes_by_search(cuts: FloatArray, v: FloatArray) -> npt.NDArray[np.int64]:
    left = np.searchsorted(cuts, v, side="left")
    right = np.searchsorted(cuts, v, side="right")
    return (left + right).astype(np.int64)


@pytest.mark.parametrize("seed", range(8))
def test_cut_index_equals_searchsorted_for_every_value(seed: int) -> None:
    """The grid lookup of a window value's cell is searchsorted's answer, on the cuts, next to
    them (one ulp either side), far outside them, and for crowded and spread cuts alike."""
    rng = np.random.default_rng(seed)
    kind = seed % 4
    if kind == 0:
        cuts = np.unique(rng.normal(size=101))
    elif kind == 1:
        cuts = np.unique(rng.exponential(1e-3, size=101))  # crowded near 0
    elif kind == 2:
        cuts = np.unique(rng.integers(0, 30, size=60).astype(np.float64))
    else:
        cuts = np.unique(np.concatenate([rng.normal(size=50), [-1e300, 1e300]]))
    index = _CutIndex(cuts)
    near = np.concatenate([cuts, np.nextafter(cuts, np.inf), np.nextafter(cuts, -np.inf)])
    far = np.array([-1e308, 1e308, -np.finfo(np.float64).max, np.finfo(np.float64).max, 0.0, -0.0])
    v = np.concatenate([near, far, rng.normal(size=2000) * rng.choice([1e-3, 1, 1e3])])
    assert np.array_equal(index.codes(v), _codes_by_search(cuts, v))
    if kind == 0:
        assert index.grid is not None  # the fast path is what this checks


def test_cut_index_of_one_cut_or_none() -> None:
    for cuts in (np.array([]), np.array([2.5])):
        v = np.array([-1.0, 2.5, 3.0, np.nextafter(2.5, 0)])
        assert np.array_equal(_CutIndex(cuts).codes(v), _codes_by_search(cuts, v))


def test_cut_index_of_cuts_a_denormal_apart() -> None:
    cuts = np.array([0.0, 5e-324, 1e-323])
    v = np.array([0.0, 5e-324, -1.0, 1.0, 7e-324])
    assert np.array_equal(_CutIndex(cuts).codes(v), _codes_by_search(cuts, v))
