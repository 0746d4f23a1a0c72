"""Training baselines: statistics against numpy, the three input formats, sampling of large files,
progress, the JSON round trip, and one clear error per problem for bad input and bad files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from infertap.agent.inspect.baseline import (
    SCHEMA_VERSION,
    Baseline,
    BaselineError,
    CategoricalFeature,
    NumericFeature,
    build_baseline,
)

FloatArray = npt.NDArray[np.float64]


def _data(n: int = 3000, seed: int = 0) -> tuple[FloatArray, FloatArray, list[str]]:
    rng = np.random.default_rng(seed)
    a = rng.normal(50, 10, n)
    b = rng.exponential(2.0, n)
    b[rng.random(n) < 0.05] = np.nan  # 5% missing
    city = rng.choice(["paris", "lyon", "nice", "lille"], p=[0.5, 0.25, 0.15, 0.1], size=n)
    return a, b, [str(c) for c in city]


def _write_all(d: Path, a: FloatArray, b: FloatArray, city: list[str]) -> dict[str, Path]:
    paths = {"csv": d / "t.csv", "parquet": d / "t.parquet", "npy": d / "t.npy"}
    lines = ["a,b,city"] + [
        f"{x!r},{'' if np.isnan(y) else repr(y)},{c}"
        for x, y, c in zip(a.tolist(), b.tolist(), city, strict=True)
    ]
    paths["csv"].write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"a": a, "b": b, "city": city}), paths["parquet"])
    rec = np.zeros(len(a), dtype=[("a", "f8"), ("b", "f8"), ("city", "U8")])
    rec["a"], rec["b"], rec["city"] = a, b, city
    np.save(paths["npy"], rec)
    return paths


def test_statistics_match_numpy_in_every_format(tmp_path: Path) -> None:
    a, b, city = _data()
    for fmt, path in _write_all(tmp_path, a, b, city).items():
        base = build_baseline(path, "fraud", tmp_path / f"{fmt}.json")
        assert base.source_format == fmt and base.rows == len(a)
        assert base.feature_names == ("a", "b", "city")
        fa, fb, fc = base.features
        assert isinstance(fa, NumericFeature) and isinstance(fb, NumericFeature)
        assert isinstance(fc, CategoricalFeature)
        finite_b = b[~np.isnan(b)]
        for f, x in ((fa, a), (fb, finite_b)):
            assert f.min == pytest.approx(x.min()) and f.max == pytest.approx(x.max())
            assert f.mean == pytest.approx(x.mean(), rel=1e-12)
            assert f.std == pytest.approx(x.std(), rel=1e-9)
            assert f.quantiles == pytest.approx(np.quantile(x, np.linspace(0, 1, 101)).tolist())
            assert sum(f.counts) == len(x)
            # Quantile bins: each of the 10 holds about a tenth of the training values.
            assert len(f.edges) == 9 and max(f.counts) - min(f.counts) <= 0.01 * len(x)
        assert fa.nan_share == 0.0
        assert fb.nan_share == pytest.approx(1 - len(finite_b) / len(b))
        assert dict(zip(fc.categories, fc.counts, strict=True)) == {
            c: city.count(c) for c in set(city)
        }
        assert fc.categories[0] == "paris" and fc.other_count == 0 and fc.n_distinct == 4


def test_same_content_same_hash_and_round_trip(tmp_path: Path) -> None:
    a, b, city = _data()
    path = _write_all(tmp_path, a, b, city)["parquet"]
    one = build_baseline(path, "fraud", tmp_path / "1.json")
    two = build_baseline(path, "fraud", tmp_path / "2.json")
    assert one.content_hash == two.content_hash and one.content_hash.startswith("sha256:")
    loaded = Baseline.load(tmp_path / "1.json")
    assert loaded == one
    raw = json.loads((tmp_path / "1.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION and raw["model"] == "fraud"
    assert raw["created"]["by"].startswith("infertap ") and raw["created"]["at"]
    other = build_baseline(path, "churn", tmp_path / "3.json")
    assert other.content_hash != one.content_hash


def test_feature_selection_and_npy_layouts(tmp_path: Path) -> None:
    a, b, city = _data(500)
    paths = _write_all(tmp_path, a, b, city)
    sel = build_baseline(paths["csv"], "m", tmp_path / "s.json", features=["city", "a"])
    assert sel.feature_names == ("city", "a")
    with pytest.raises(BaselineError) as e:
        build_baseline(paths["parquet"], "m", tmp_path / "x.json", features=["a", "zz", "yy"])
    assert e.value.problems == ["no column named 'zz'", "no column named 'yy'"]
    m2 = np.column_stack([a, np.round(a)]).astype(np.float32)
    np.save(tmp_path / "m.npy", m2)
    named = build_baseline(tmp_path / "m.npy", "m", tmp_path / "m.json", features=["x", "x_int"])
    assert named.feature_names == ("x", "x_int")
    assert build_baseline(tmp_path / "m.npy", "m", tmp_path / "m.json").feature_names == (
        "f0",
        "f1",
    )
    with pytest.raises(BaselineError, match="3 feature names given for 2 columns"):
        build_baseline(tmp_path / "m.npy", "m", tmp_path / "m.json", features=["a", "b", "c"])
    np.save(tmp_path / "one.npy", a)
    assert build_baseline(tmp_path / "one.npy", "m", tmp_path / "o.json").feature_names == ("f0",)


def test_large_file_is_sampled_with_exact_moments_and_progress(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.lognormal(0, 1, size=(300_000, 2))
    np.save(tmp_path / "big.npy", x)
    calls: list[tuple[int, int]] = []
    base = build_baseline(
        tmp_path / "big.npy",
        "m",
        tmp_path / "big.json",
        sample_rows=20_000,
        progress=lambda done, total: calls.append((done, total)),
    )
    f = base.feature("f0")
    assert isinstance(f, NumericFeature)
    assert f.count == 300_000 and sum(f.counts) == 20_000  # histogram from the sample
    assert f.mean == pytest.approx(x[:, 0].mean(), rel=1e-12)  # moments over every row
    assert f.min == x[:, 0].min() and f.max == x[:, 0].max()
    true_q = np.quantile(x[:, 0], [0.1, 0.5, 0.9])
    sketch = np.asarray(f.quantiles)[[10, 50, 90]]
    assert np.allclose(sketch, true_q, rtol=0.05), (sketch, true_q)
    assert len(calls) == 5 and calls[-1] == (300_000, 300_000)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_csv_progress_in_bytes(tmp_path: Path) -> None:
    a, b, city = _data(2000)
    csv = _write_all(tmp_path, a, b, city)["csv"]
    calls: list[tuple[int, int]] = []
    build_baseline(csv, "m", tmp_path / "b.json", progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1] == (csv.stat().st_size, csv.stat().st_size)


def test_edge_columns(tmp_path: Path) -> None:
    n = 200
    pq.write_table(
        pa.table(
            {
                "const": np.full(n, 3.0),
                "empty": pa.nulls(n, pa.float64()),
                "flag": np.arange(n) % 4 == 0,
                "ids": [f"id{i}" for i in range(n)],
            }
        ),
        tmp_path / "e.parquet",
    )
    base = build_baseline(tmp_path / "e.parquet", "m", tmp_path / "e.json", max_categories=5)
    const, empty, flag, ids = base.features
    assert isinstance(const, NumericFeature) and const.edges == (3.0,) and const.std == 0.0
    assert const.counts == (n, 0)
    assert isinstance(empty, NumericFeature) and empty.nan_share == 1.0 and empty.min is None
    assert isinstance(flag, NumericFeature) and flag.dtype == "bool" and flag.mean == 0.25
    assert isinstance(ids, CategoricalFeature)
    assert len(ids.categories) == 5 and ids.other_count == n - 5 and ids.n_distinct == n
    assert Baseline.load(tmp_path / "e.json") == base  # None stats survive the round trip


def _valid_json(tmp_path: Path) -> dict[str, Any]:
    a, b, city = _data(300)
    build_baseline(_write_all(tmp_path, a, b, city)["parquet"], "m", tmp_path / "v.json")
    data: dict[str, Any] = json.loads((tmp_path / "v.json").read_text())
    return data


def test_load_reports_each_problem_on_its_own_line(tmp_path: Path) -> None:
    data = _valid_json(tmp_path)
    data["model"] = ""
    data["features"][0]["edges"] = [3.0, 2.0, 1.0]
    data["features"][1]["nan_share"] = 1.5
    data["features"][2]["counts"] = [1, -2]
    data["features"].append({"name": "a", "kind": "numeric"})
    with pytest.raises(BaselineError) as e:
        Baseline.from_json(data, "bad.json")
    problems = e.value.problems
    assert problems[0] == "model: missing or not a non-empty string"
    assert "features[0] ('a').edges: not strictly increasing" in problems
    assert "features[0] ('a').counts: 10 counts for 3 edges (needs +1)" in problems
    assert "features[1] ('b').nan_share: missing or not a number in [0, 1]" in problems
    assert "features[2] ('city').counts: missing or not a list of integers >= 0" in problems
    assert "features[3] ('a'): duplicate feature name" in problems
    assert str(e.value).startswith(f"bad.json: {len(problems)} problems:\n  - ")
    assert str(e.value).count("\n") == len(problems)


def test_load_rejects_edits_versions_and_garbage(tmp_path: Path) -> None:
    data = _valid_json(tmp_path)
    edited = json.loads(json.dumps(data))
    edited["features"][0]["max"] += 1.0
    p = tmp_path / "edited.json"
    p.write_text(json.dumps(edited))
    with pytest.raises(BaselineError, match="content_hash does not match"):
        Baseline.load(p)
    newer = dict(data, schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(BaselineError, match=f"reads version {SCHEMA_VERSION}") as e:
        Baseline.from_json(newer)
    assert len(e.value.problems) == 1
    (tmp_path / "g.json").write_text("{not json")
    with pytest.raises(BaselineError, match="not JSON"):
        Baseline.load(tmp_path / "g.json")
    with pytest.raises(BaselineError, match="cannot read"):
        Baseline.load(tmp_path / "missing.json")
    with pytest.raises(BaselineError, match="top level is not a JSON object"):
        Baseline.from_json([1, 2])


def test_build_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(BaselineError, match=r"unknown format '\.xlsx'"):
        build_baseline(tmp_path / "t.xlsx", "m", tmp_path / "o.json")
    with pytest.raises(BaselineError, match="no such file"):
        build_baseline(tmp_path / "nope.csv", "m", tmp_path / "o.json")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BaselineError, match="without pickles"):
        build_baseline(tmp_path / "obj.npy", "m", tmp_path / "o.json")
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2)))
    with pytest.raises(BaselineError, match="needs 1 or 2"):
        build_baseline(tmp_path / "cube.npy", "m", tmp_path / "o.json")
    (tmp_path / "head.csv").write_text("a,b\n")
    with pytest.raises(BaselineError, match="no data rows"):
        build_baseline(tmp_path / "head.csv", "m", tmp_path / "o.json")
    # A numeric column that turns to garbage past the first block (where types are inferred).
    rows = ["x,y"] + [f"{i},{i * 0.5}" for i in range(400_000)] + ["7,abc"]
    (tmp_path / "late.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(BaselineError, match="bad value") as e:
        build_baseline(tmp_path / "late.csv", "m", tmp_path / "o.json")
    assert "abc" in str(e.value)
    assert not (tmp_path / "o.json").exists()


def test_build_warns_on_a_baseline_too_small_for_psi(tmp_path: Path) -> None:
    """89 rows of scikit-learn's wine data: `baseline build` writes it, records its row count,
    and warns on stderr that drift thresholds will be raised; 3000 rows get no warning."""
    import subprocess
    import sys

    from sklearn.datasets import load_wine  # type: ignore[import-untyped]

    wine = load_wine()
    names = [str(n).replace("/", "_") for n in wine.feature_names]
    small = tmp_path / "wine.csv"
    np.savetxt(small, wine.data[:89], delimiter=",", header=",".join(names), comments="")
    a, b, city = _data()
    big = _write_all(tmp_path, a, b, city)["csv"]

    def build(path: Path) -> subprocess.CompletedProcess[str]:
        cli = [sys.executable, "-m", "infertap.cli.main"]
        args = ["baseline", "build", str(path), "--model", "m", "--out"]
        return subprocess.run(
            [*cli, *args, str(path.with_suffix(".json"))],
            capture_output=True,
            text=True,
            timeout=60,
        )

    r = build(small)
    assert r.returncode == 0, r.stderr
    assert "89 rows, 13 features" in r.stdout
    (warning,) = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert warning.startswith("infertap: warning: only 89 rows: PSI over 10 bins is unreliable")
    assert Baseline.load(small.with_suffix(".json")).rows == 89
    r = build(big)
    assert r.returncode == 0 and "3000 rows" in r.stdout and "warning" not in r.stderr
