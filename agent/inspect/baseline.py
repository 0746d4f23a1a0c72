"""Training baselines: what a model's input features looked like in training.

Built once from the training data (CSV, NPY or Parquet) by `build_baseline`, saved as JSON, and
loaded by the drift monitor and schema checks. Per numeric feature: quantile-based histogram bin
edges (the outer bins are open-ended, so live values beyond the training range still land in a
bin) with counts, a quantile sketch, min/max, mean/std, dtype and the share of NaN/inf values.
Per categorical (string) feature: the most frequent categories with counts.

Moments, min/max and NaN shares are exact over every row. Edges, counts and quantiles come from
a uniform random sample of at most `sample_rows` values per feature (exact below that), so a
file larger than memory can be summarised in one streaming pass.

The JSON carries a schema version, the model name, creation info and a content hash over
everything but the hash and the creation info; `Baseline.load` checks all of it and reports every
problem found, one line each, in a single BaselineError.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, TypeGuard

import numpy as np
import numpy.typing as npt

import infertap
from infertap.agent.errors import InfertapError

SCHEMA_VERSION: Final = 1
DEFAULT_BINS: Final = 10
DEFAULT_QUANTILES: Final = 101  # probabilities 0, 0.01, ..., 1: KS against it is within ~0.01
DEFAULT_SAMPLE_ROWS: Final = 200_000
DEFAULT_MAX_CATEGORIES: Final = 50
_MAX_TRACKED_CATEGORIES: Final = 100_000  # past this, new categories count as "other"
_BATCH_ROWS: Final = 65_536

# Below this many rows per bin, PSI's no-drift level ((bins - 1) / rows from the baseline side
# alone) is a sizeable share of the default warn level 0.1: `baseline build` warns, and the drift
# monitor raises its thresholds to the no-drift levels (agent/inspect/drift.py).
RELIABLE_ROWS_PER_BIN: Final = 100

Progress = Callable[[int, int], None]
FloatArray = npt.NDArray[np.float64]


class BaselineError(InfertapError, ValueError):
    """A baseline that cannot be built or loaded. `problems` has one line per problem."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = f"{source}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            text = f"{source}: {len(self.problems)} problems:\n{lines}"
        super().__init__(text)


@dataclass(frozen=True, slots=True)
class NumericFeature:
    name: str
    dtype: str  # numpy dtype name of the source column ("float64", "int64", "bool", ...)
    count: int  # rows
    nan_share: float  # share of rows that were NaN, inf or missing
    min: float | None  # None when the feature has no finite value
    max: float | None
    mean: float | None
    std: float | None  # population standard deviation
    edges: tuple[float, ...]  # interior bin edges, strictly increasing; bin i is (e[i-1], e[i]]
    counts: tuple[int, ...]  # len(edges) + 1 counts: below e[0], ..., above e[-1]
    quantiles: tuple[float, ...]  # values at probabilities linspace(0, 1, len(quantiles))

    kind: Literal["numeric"] = "numeric"

    @property
    def finite(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True, slots=True)
class CategoricalFeature:
    name: str
    dtype: str  # "string"
    count: int
    nan_share: float  # share of rows that were missing
    categories: tuple[str, ...]  # most frequent first
    counts: tuple[int, ...]  # one per category
    other_count: int  # values of categories not kept
    n_distinct: int  # distinct categories seen (at most the tracking limit)

    kind: Literal["categorical"] = "categorical"


Feature = NumericFeature | CategoricalFeature


@dataclass(frozen=True, slots=True)
class Baseline:
    model: str
    features: tuple[Feature, ...]
    rows: int
    source_file: str
    source_format: str  # "csv", "npy" or "parquet"
    sample_rows: int  # per-feature sample limit for edges, counts and quantiles
    created_at: str = ""  # ISO 8601, UTC
    created_by: str = ""
    schema_version: int = SCHEMA_VERSION
    content_hash: str = ""  # "sha256:<hex>" over the content (see module doc)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    # -- JSON --

    def _content(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "source": {"file": self.source_file, "format": self.source_format, "rows": self.rows},
            "sample_rows": self.sample_rows,
            "features": [_feature_to_json(f) for f in self.features],
        }

    def compute_hash(self) -> str:
        return _hash_content(self._content())

    def to_json(self) -> dict[str, Any]:
        return {
            **self._content(),
            "created": {"at": self.created_at, "by": self.created_by},
            "content_hash": self.compute_hash(),
        }

    def save(self, path: Path) -> None:
        """Write as JSON, atomically (a reader never sees half a baseline)."""
        text = json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Baseline:
        """Read and validate a baseline file; raises BaselineError listing every problem."""
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BaselineError(source, [f"cannot read: {e}"]) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BaselineError(source, [f"not JSON: {e}"]) from None
        return cls.from_json(data, source)

    @classmethod
    def from_json(cls, data: Any, source: str = "<baseline>") -> Baseline:
        problems = _validate(data)
        if problems:
            raise BaselineError(source, problems)
        content = {k: data[k] for k in ("schema_version", "model", "source", "sample_rows")}
        content["features"] = data["features"]
        if _hash_content(content) != data["content_hash"]:
            raise BaselineError(
                source, ["content_hash does not match the content (edited or corrupted?)"]
            )
        return cls(
            model=data["model"],
            features=tuple(_feature_from_json(f) for f in data["features"]),
            rows=data["source"]["rows"],
            source_file=data["source"]["file"],
            source_format=data["source"]["format"],
            sample_rows=data["sample_rows"],
            created_at=data["created"]["at"],
            created_by=data["created"]["by"],
            schema_version=data["schema_version"],
            content_hash=data["content_hash"],
        )


def small_sample_warning(b: Baseline) -> str | None:
    """One line when the baseline has too few rows for PSI to be reliable; None otherwise."""
    bins = max(
        (len(f.counts) if isinstance(f, NumericFeature) else len(f.counts) + 1 for f in b.features),
        default=0,
    )
    needed = RELIABLE_ROWS_PER_BIN * bins
    if bins < 2 or b.rows >= needed:
        return None
    return (
        f"only {b.rows} rows: PSI over {bins} bins is unreliable below {needed} (its no-drift"
        f" level is about {bins - 1}/{b.rows} = {(bins - 1) / max(b.rows, 1):.2f} from the"
        " baseline alone); drift thresholds for it will be raised to their no-drift 99%/99.9%"
        " levels, so only larger shifts alert"
    )


def _hash_content(content: Mapping[str, Any]) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _feature_to_json(f: Feature) -> dict[str, Any]:
    if isinstance(f, NumericFeature):
        return {
            "name": f.name,
            "kind": f.kind,
            "dtype": f.dtype,
            "count": f.count,
            "nan_share": f.nan_share,
            "min": f.min,
            "max": f.max,
            "mean": f.mean,
            "std": f.std,
            "edges": list(f.edges),
            "counts": list(f.counts),
            "quantiles": list(f.quantiles),
        }
    return {
        "name": f.name,
        "kind": f.kind,
        "dtype": f.dtype,
        "count": f.count,
        "nan_share": f.nan_share,
        "categories": list(f.categories),
        "counts": list(f.counts),
        "other_count": f.other_count,
        "n_distinct": f.n_distinct,
    }


def _feature_from_json(d: Mapping[str, Any]) -> Feature:
    if d["kind"] == "numeric":
        return NumericFeature(
            name=d["name"],
            dtype=d["dtype"],
            count=d["count"],
            nan_share=float(d["nan_share"]),
            min=_opt_float(d["min"]),
            max=_opt_float(d["max"]),
            mean=_opt_float(d["mean"]),
            std=_opt_float(d["std"]),
            edges=tuple(float(x) for x in d["edges"]),
            counts=tuple(int(x) for x in d["counts"]),
            quantiles=tuple(float(x) for x in d["quantiles"]),
        )
    return CategoricalFeature(
        name=d["name"],
        dtype=d["dtype"],
        count=d["count"],
        nan_share=float(d["nan_share"]),
        categories=tuple(d["categories"]),
        counts=tuple(int(x) for x in d["counts"]),
        other_count=d["other_count"],
        n_distinct=d["n_distinct"],
    )


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


# --- validation ----------------------------------------------------------------------------------


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> TypeGuard[float]:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _validate(data: Any) -> list[str]:
    """Every problem with a parsed baseline, one line each; [] when it is valid."""
    if not isinstance(data, dict):
        return ["top level is not a JSON object"]
    p: list[str] = []
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        # Nothing else can be trusted to mean what this code thinks under another version.
        return [f"schema_version is {version!r}; this infertap reads version {SCHEMA_VERSION}"]
    if not isinstance(data.get("model"), str) or not data["model"]:
        p.append("model: missing or not a non-empty string")
    if not isinstance(data.get("content_hash"), str) or not data["content_hash"].startswith(
        "sha256:"
    ):
        p.append("content_hash: missing or not 'sha256:<hex>'")
    created = data.get("created")
    if not (
        isinstance(created, dict)
        and isinstance(created.get("at"), str)
        and isinstance(created.get("by"), str)
    ):
        p.append("created: missing, or 'at'/'by' not strings")
    src = data.get("source")
    if not (
        isinstance(src, dict)
        and isinstance(src.get("file"), str)
        and src.get("format") in ("csv", "npy", "parquet")
        and _is_int(src.get("rows"))
        and src["rows"] >= 0
    ):
        p.append("source: needs file (string), format (csv|npy|parquet) and rows (integer >= 0)")
    if not _is_int(data.get("sample_rows")) or data["sample_rows"] < 1:
        p.append("sample_rows: missing or not a positive integer")
    feats = data.get("features")
    if not isinstance(feats, list) or not feats:
        p.append("features: missing or empty")
        return p
    seen: set[str] = set()
    for i, f in enumerate(feats):
        where = f"features[{i}]"
        if not isinstance(f, dict):
            p.append(f"{where}: not an object")
            continue
        name = f.get("name")
        if not isinstance(name, str) or not name:
            p.append(f"{where}.name: missing or empty")
        else:
            where = f"features[{i}] ({name!r})"
            if name in seen:
                p.append(f"{where}: duplicate feature name")
            seen.add(name)
        p.extend(_validate_feature(where, f))
    return p


def _validate_feature(where: str, f: Mapping[str, Any]) -> list[str]:
    p: list[str] = []
    if not isinstance(f.get("dtype"), str):
        p.append(f"{where}.dtype: missing or not a string")
    if not _is_int(f.get("count")) or f["count"] < 0:
        p.append(f"{where}.count: missing or not an integer >= 0")
    share = f.get("nan_share")
    if not _is_num(share) or not 0.0 <= share <= 1.0:
        p.append(f"{where}.nan_share: missing or not a number in [0, 1]")
    counts = f.get("counts")
    if not isinstance(counts, list) or not all(_is_int(c) and c >= 0 for c in counts):
        p.append(f"{where}.counts: missing or not a list of integers >= 0")
        counts = None
    kind = f.get("kind")
    if kind == "numeric":
        stats: dict[str, Any] = {k: f.get(k) for k in ("min", "max", "mean", "std")}
        if all(v is None for v in stats.values()):
            pass  # a feature with no finite value
        elif not all(_is_num(v) for v in stats.values()):
            p.append(f"{where}: min, max, mean, std must all be finite numbers (or all null)")
        elif stats["min"] > stats["max"] or stats["std"] < 0:
            p.append(f"{where}: min > max or std < 0")
        edges = f.get("edges")
        if not isinstance(edges, list) or not all(_is_num(e) for e in edges):
            p.append(f"{where}.edges: missing or not a list of finite numbers")
        else:
            if any(b <= a for a, b in itertools.pairwise(edges)):
                p.append(f"{where}.edges: not strictly increasing")
            if counts is not None and len(counts) != len(edges) + 1:
                p.append(f"{where}.counts: {len(counts)} counts for {len(edges)} edges (needs +1)")
        qs = f.get("quantiles")
        if not isinstance(qs, list) or not all(_is_num(q) for q in qs):
            p.append(f"{where}.quantiles: missing or not a list of finite numbers")
        elif any(b < a for a, b in itertools.pairwise(qs)):
            p.append(f"{where}.quantiles: not non-decreasing")
        elif len(qs) == 1:
            p.append(f"{where}.quantiles: needs 0 or at least 2 values")
    elif kind == "categorical":
        cats = f.get("categories")
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            p.append(f"{where}.categories: missing or not a list of strings")
        else:
            if len(set(cats)) != len(cats):
                p.append(f"{where}.categories: duplicates")
            if counts is not None and len(counts) != len(cats):
                p.append(f"{where}.counts: {len(counts)} counts for {len(cats)} categories")
        for k in ("other_count", "n_distinct"):
            if not _is_int(f.get(k)) or f[k] < 0:
                p.append(f"{where}.{k}: missing or not an integer >= 0")
    else:
        p.append(f"{where}.kind: {kind!r} is not 'numeric' or 'categorical'")
    return p


# --- building ------------------------------------------------------------------------------------


class _NumericAcc:
    """Streaming summary of one numeric column: exact moments, a bounded random sample."""

    def __init__(self, name: str, dtype: str, sample_rows: int, rng: np.random.Generator):
        self.name, self.dtype, self.k, self.rng = name, dtype, sample_rows, rng
        self.rows = 0
        self.n = 0  # finite values
        self.mean = 0.0
        self.m2 = 0.0
        self.lo = math.inf
        self.hi = -math.inf
        self.keys: FloatArray = np.empty(0)
        self.vals: FloatArray = np.empty(0)

    def add(self, x: FloatArray) -> None:
        self.rows += len(x)
        x = x[np.isfinite(x)]
        if len(x) == 0:
            return
        # Chan et al.'s pairwise update: numerically stable and vectorised per batch.
        bn, bmean = len(x), float(x.mean())
        bm2 = float(((x - bmean) ** 2).sum())
        total = self.n + bn
        delta = bmean - self.mean
        self.mean += delta * bn / total
        self.m2 += bm2 + delta * delta * self.n * bn / total
        self.n = total
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        # Bottom-k by random key is a uniform sample without replacement, mergeable per batch.
        self.keys = np.concatenate([self.keys, self.rng.random(len(x))])
        self.vals = np.concatenate([self.vals, x])
        if len(self.keys) > 2 * self.k:
            self._trim()

    def _trim(self) -> None:
        if len(self.keys) > self.k:
            keep = np.argpartition(self.keys, self.k)[: self.k]
            self.keys, self.vals = self.keys[keep], self.vals[keep]

    def finish(self, bins: int, n_quantiles: int) -> NumericFeature:
        self._trim()
        nan_share = (self.rows - self.n) / self.rows if self.rows else 0.0
        if self.n == 0:
            return NumericFeature(
                self.name, self.dtype, self.rows, nan_share, None, None, None, None, (), (0,), ()
            )
        sample = np.sort(self.vals)
        edges = np.unique(np.quantile(sample, np.linspace(0, 1, bins + 1)[1:-1]))
        counts = bin_counts(edges, sample)
        qs = np.quantile(sample, np.linspace(0, 1, n_quantiles))
        return NumericFeature(
            name=self.name,
            dtype=self.dtype,
            count=self.rows,
            nan_share=nan_share,
            min=self.lo,
            max=self.hi,
            mean=self.mean,
            std=math.sqrt(max(self.m2 / self.n, 0.0)),
            edges=tuple(float(e) for e in edges),
            counts=tuple(int(c) for c in counts),
            quantiles=tuple(float(q) for q in np.maximum.accumulate(qs)),
        )


class _CategoricalAcc:
    def __init__(self, name: str) -> None:
        self.name = name
        self.rows = 0
        self.missing = 0
        self.freq: dict[str, int] = {}
        self.overflow = 0

    def add(self, values: npt.NDArray[Any], missing: int) -> None:
        self.rows += len(values) + missing
        self.missing += missing
        if len(values) == 0:
            return
        uniq, counts = np.unique(values.astype(str), return_counts=True)
        for v, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            if v in self.freq:
                self.freq[v] += c
            elif len(self.freq) < _MAX_TRACKED_CATEGORIES:
                self.freq[v] = c
            else:
                self.overflow += c

    def finish(self, max_categories: int) -> CategoricalFeature:
        ranked = sorted(self.freq.items(), key=lambda kv: (-kv[1], kv[0]))
        kept = ranked[:max_categories]
        other = sum(c for _, c in ranked[max_categories:]) + self.overflow
        return CategoricalFeature(
            name=self.name,
            dtype="string",
            count=self.rows,
            nan_share=self.missing / self.rows if self.rows else 0.0,
            categories=tuple(k for k, _ in kept),
            counts=tuple(c for _, c in kept),
            other_count=other,
            n_distinct=len(self.freq),
        )


def bin_counts(edges: npt.ArrayLike, values: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Counts of `values` in the open-ended bins that interior `edges` define.

    Bin 0 is (-inf, e0], bin i is (e[i-1], e[i]], the last is (e[-1], inf). NaNs must be removed
    first. Used for the baseline and for live windows, so both bin values identically.
    """
    e = np.asarray(edges, dtype=np.float64)
    idx = np.searchsorted(e, np.asarray(values, dtype=np.float64), side="left")
    return np.bincount(idx, minlength=len(e) + 1).astype(np.int64)


# A column batch: (name, numeric float64 values) or (name, categorical values, missing count).
_Batch = dict[str, tuple[npt.NDArray[Any], int]]
_Kinds = dict[str, tuple[Literal["numeric", "categorical"], str]]


def _read_npy(
    path: Path, features: list[str] | None
) -> tuple[_Kinds, int, Iterator[tuple[_Batch, int]]]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BaselineError(
            str(path), [f"not a readable .npy array without pickles: {e}"]
        ) from None
    if not isinstance(arr, np.ndarray):
        raise BaselineError(str(path), ["not a single .npy array"])
    rows = int(arr.shape[0]) if arr.ndim else 0
    # Where each feature is in a chunk of rows: a field name, a column index, or the whole chunk.
    where: dict[str, str | int | None] = {}
    kinds: _Kinds = {}

    def kind_of(dt: np.dtype[Any], name: str) -> None:
        if dt.kind in "biuf":
            kinds[name] = ("numeric", dt.name)
        elif dt.kind in "US":
            kinds[name] = ("categorical", "string")
        else:
            raise BaselineError(str(path), [f"column {name!r}: unsupported dtype {dt}"])

    if arr.dtype.names:  # structured: fields are the columns
        names = features or list(arr.dtype.names)
        missing = [n for n in names if n not in arr.dtype.names]
        if missing:
            raise BaselineError(str(path), [f"no column named {n!r}" for n in missing])
        for n in names:
            kind_of(arr.dtype[n], n)
            where[n] = n
    elif arr.ndim in (1, 2):
        ncols = 1 if arr.ndim == 1 else int(arr.shape[1])
        names = features or [f"f{i}" for i in range(ncols)]
        if len(names) != ncols:
            raise BaselineError(
                str(path), [f"{len(names)} feature names given for {ncols} columns in the array"]
            )
        for i, n in enumerate(names):
            kind_of(arr.dtype, n)
            where[n] = None if arr.ndim == 1 else i
    else:
        raise BaselineError(str(path), [f"array has {arr.ndim} dimensions; needs 1 or 2"])

    def batches() -> Iterator[tuple[_Batch, int]]:
        for a in range(0, rows, _BATCH_ROWS):
            b = min(rows, a + _BATCH_ROWS)
            chunk = np.asarray(arr[a:b])
            out: _Batch = {}
            for n, sel in where.items():
                v = chunk if sel is None else chunk[sel] if isinstance(sel, str) else chunk[:, sel]
                if kinds[n][0] == "numeric":
                    out[n] = (v.astype(np.float64), 0)
                else:
                    out[n] = (v, 0)
            yield out, b

    return kinds, rows, batches()


def _arrow_kinds(schema: Any, names: list[str], path: Path) -> _Kinds:
    import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]

    kinds: _Kinds = {}
    problems: list[str] = []
    for n in names:
        t = schema.field(n).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
            dtype = "float64" if pa.types.is_decimal(t) else np.dtype(t.to_pandas_dtype()).name
            kinds[n] = ("numeric", dtype)
        elif pa.types.is_boolean(t):
            kinds[n] = ("numeric", "bool")
        elif pa.types.is_null(t):
            kinds[n] = ("numeric", "float64")  # an all-empty column
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            kinds[n] = ("categorical", "string")
        else:
            problems.append(f"column {n!r}: unsupported type {t}")
    if problems:
        raise BaselineError(str(path), problems)
    return kinds


def _arrow_batch(batch: Any, kinds: _Kinds) -> _Batch:
    import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]
    import pyarrow.compute as pc  # type: ignore[import-untyped,unused-ignore]

    out: _Batch = {}
    for n, (kind, _) in kinds.items():
        col = batch.column(n)
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        if kind == "numeric":
            out[n] = (pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), 0)
        else:
            valid = col.drop_null()
            out[n] = (
                np.asarray(valid.to_numpy(zero_copy_only=False), dtype=object),
                col.null_count,
            )
    return out


def _select(available: list[str], features: list[str] | None, path: Path) -> list[str]:
    if features is None:
        return available
    missing = [n for n in features if n not in available]
    if missing:
        raise BaselineError(str(path), [f"no column named {n!r}" for n in missing])
    return list(features)


def _read_csv(
    path: Path, features: list[str] | None
) -> tuple[_Kinds, int, Iterator[tuple[_Batch, int]]]:
    import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]
    import pyarrow.csv as pacsv  # type: ignore[import-untyped,unused-ignore]

    total = path.stat().st_size
    read_opts = pacsv.ReadOptions(block_size=1 << 22)
    try:
        with path.open("rb") as f:
            schema = pacsv.open_csv(f, read_options=read_opts).schema
    except (pa.ArrowInvalid, OSError) as e:
        raise BaselineError(str(path), [f"not readable as CSV: {e}"]) from None
    names = _select(list(schema.names), features, path)
    kinds = _arrow_kinds(schema, names, path)
    # Types inferred from the first block may be too narrow (ints, then a "1.5" later): read
    # every numeric column as float64 so later blocks cannot fail on that.
    types = {n: pa.float64() for n, (k, _) in kinds.items() if k == "numeric"}
    types.update({n: pa.string() for n, (k, _) in kinds.items() if k == "categorical"})
    conv = pacsv.ConvertOptions(column_types=types, include_columns=names, strings_can_be_null=True)

    def batches() -> Iterator[tuple[_Batch, int]]:
        with path.open("rb") as f:
            reader = pacsv.open_csv(f, read_options=read_opts, convert_options=conv)
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except pa.ArrowInvalid as e:
                    raise BaselineError(str(path), [f"bad value: {e}"]) from None
                yield _arrow_batch(batch, kinds), min(f.tell(), total)

    return kinds, total, batches()


def _read_parquet(
    path: Path, features: list[str] | None
) -> tuple[_Kinds, int, Iterator[tuple[_Batch, int]]]:
    import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]
    import pyarrow.parquet as pq  # type: ignore[import-untyped,unused-ignore]

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise BaselineError(str(path), [f"not readable as Parquet: {e}"]) from None
    schema = pf.schema_arrow
    names = _select(list(schema.names), features, path)
    kinds = _arrow_kinds(schema, names, path)
    rows = int(pf.metadata.num_rows)

    def batches() -> Iterator[tuple[_Batch, int]]:
        done = 0
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=names):
            done += batch.num_rows
            yield _arrow_batch(batch, kinds), done

    return kinds, rows, batches()


_READERS: Final = {
    ".csv": ("csv", _read_csv),
    ".npy": ("npy", _read_npy),
    ".parquet": ("parquet", _read_parquet),
    ".pq": ("parquet", _read_parquet),
}


def build_baseline(
    path: Path,
    model: str,
    out: Path,
    *,
    features: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    bins: int = DEFAULT_BINS,
    n_quantiles: int = DEFAULT_QUANTILES,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    max_categories: int = DEFAULT_MAX_CATEGORIES,
    seed: int = 0,
) -> Baseline:
    """Summarise training data at `path` into a baseline for `model`, save it to `out`, return it.

    The format comes from the suffix: .csv (header row), .npy (2-D [rows, features], 1-D, or a
    structured array) or .parquet/.pq. `features` picks and orders columns; for an unstructured
    .npy it names the columns instead (default f0, f1, ...). `progress(done, total)` is called
    after each batch, in bytes for CSV and in rows otherwise. Raises BaselineError.
    """
    path = Path(path)
    if not model:
        raise BaselineError(str(path), ["model name is empty"])
    if not 2 <= bins <= 1000 or n_quantiles < 2 or sample_rows < 1 or max_categories < 1:
        raise BaselineError(
            str(path), ["bins, n_quantiles, sample_rows or max_categories out of range"]
        )
    entry = _READERS.get(path.suffix.lower())
    if entry is None:
        raise BaselineError(
            str(path), [f"unknown format {path.suffix!r}: use .csv, .npy or .parquet"]
        )
    if not path.is_file():
        raise BaselineError(str(path), ["no such file"])
    fmt, reader = entry
    kinds, total, batches = reader(path, features)
    if not kinds:
        raise BaselineError(str(path), ["no feature columns"])
    rng = np.random.default_rng(seed)
    accs: dict[str, _NumericAcc | _CategoricalAcc] = {
        n: _NumericAcc(n, dt, sample_rows, rng) if k == "numeric" else _CategoricalAcc(n)
        for n, (k, dt) in kinds.items()
    }
    rows = 0
    for batch, done in batches:
        for n, (values, missing) in batch.items():
            acc = accs[n]
            if isinstance(acc, _NumericAcc):
                acc.add(values)
            else:
                acc.add(values, missing)
        first_values, first_missing = next(iter(batch.values()))
        rows += len(first_values) + first_missing
        if progress is not None:
            progress(done, total)
    if rows == 0:
        raise BaselineError(str(path), ["no data rows"])
    feats = tuple(
        a.finish(bins, n_quantiles) if isinstance(a, _NumericAcc) else a.finish(max_categories)
        for a in accs.values()
    )
    baseline = Baseline(
        model=model,
        features=feats,
        rows=rows,
        source_file=path.name,
        source_format=fmt,
        sample_rows=sample_rows,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        created_by=f"infertap {infertap.__version__}",
    )
    baseline = replace(baseline, content_hash=baseline.compute_hash())
    baseline.save(Path(out))
    return baseline
