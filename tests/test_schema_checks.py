"""Schema and sanity checks of events against a baseline: shape, dtype, missing features, NaN/inf,
training range with tolerance, unseen categories, payload size; and garbage in, findings out."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from infertap.agent.flows.records import Endpoint
from infertap.agent.inspect.baseline import Baseline, build_baseline
from infertap.agent.inspect.findings import Finding
from infertap.agent.inspect.schema import SchemaChecker, SchemaConfig
from infertap.agent.models.inference_event import InferenceEvent


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    """age: int 18..90; income: float 1000..9000, no NaN; city: four cities, all kept."""
    d = tmp_path_factory.mktemp("schema")
    rng = np.random.default_rng(0)
    rows = ["age,income,city"]
    for i in range(1000):
        age = 18 + i % 73
        income = 1000 + 8000 * rng.random()
        rows.append(f"{age},{income:.2f},{['paris', 'lyon', 'nice', 'lille'][i % 4]}")
    (d / "t.csv").write_text("\n".join(rows) + "\n")
    return build_baseline(d / "t.csv", "credit", d / "b.json")


def _event(inputs: dict[str, npt.NDArray[Any]], payload_bytes: int = 0) -> InferenceEvent:
    return InferenceEvent(
        service=Endpoint("10.0.0.3", 8080),
        model="credit",
        version="",
        protocol="kserve-v2-rest",
        ts_ns=0,
        inputs=inputs,
        payload_bytes=payload_bytes,
    )


def _named(age: list[Any], income: list[float], city: list[str]) -> dict[str, npt.NDArray[Any]]:
    return {
        "age": np.array(age, dtype=np.int64),
        "income": np.array(income, dtype=np.float64),
        "city": np.array([c.encode() for c in city], dtype=object),
    }


def _kinds(findings: list[Finding]) -> set[tuple[str, str]]:
    return {(f.type, f.location) for f in findings}


def test_clean_event_has_no_findings(baseline: Baseline) -> None:
    checker = SchemaChecker(baseline)
    ok = _named([30, 45], [2000.0, 8500.5], ["paris", "nice"])
    assert checker.check(_event(ok)) == []


def test_nan_inf_and_range(baseline: Baseline) -> None:
    checker = SchemaChecker(baseline)
    # Training range: age 18..90 (slack 7.2), income about 1000..9000 (slack about 800).
    inputs = _named([95, 200, 10, 17], [np.nan, np.inf, 9500.0, 12_000.0], ["lyon"] * 4)
    found = {f.type: f for f in checker.check(_event(inputs))}
    assert set(found) == {"nan", "inf", "range"}
    assert found["nan"].location == "income" and found["nan"].value == 1
    assert found["inf"].location == "income" and found["inf"].value == 1
    ranges = [f for f in checker.check(_event(inputs)) if f.type == "range"]
    assert {(f.location, f.value) for f in ranges} == {("age", 2.0), ("income", 1.0)}
    age = next(f for f in ranges if f.location == "age")
    assert "2 of 4 values outside the training range [18, 90]" in age.message
    assert "furthest 200" in age.message and age.severity == "warn"
    strict = SchemaChecker(baseline, SchemaConfig(range_tolerance=0.0))
    strict_found = [f for f in strict.check(_event(inputs)) if f.type == "range"]
    assert {(f.location, f.value) for f in strict_found} == {("age", 4.0), ("income", 2.0)}


def test_matrix_layout_shape_and_dtype(baseline: Baseline) -> None:
    checker = SchemaChecker(baseline)
    good = np.array([[30, 5000.0, "paris"], [40, 6000.0, "lyon"]], dtype=object)
    assert checker.check(_event({"input__0": good})) == []
    narrow = np.zeros((2, 2), dtype=np.float32)
    found = checker.check(_event({"input__0": narrow}))
    assert ("shape", "input__0") in _kinds(found)
    assert next(f for f in found if f.type == "shape").severity == "alert"
    assert {"age", "income", "city"} == {f.location for f in found if f.type == "missing"}
    # A per-feature input with the wrong shape, and one whose values are not numbers.
    inputs = _named([30, 40], [1.0, 2.0], ["paris", "lyon"])
    inputs["age"] = np.zeros((2, 3), dtype=np.int64)
    inputs["income"] = np.array([b"12.5", b"lots"], dtype=object)
    found = checker.check(_event(inputs))
    assert _kinds(found) == {("shape", "age"), ("dtype", "income")}


def test_dtype_unlike_baseline(baseline: Baseline) -> None:
    checker = SchemaChecker(baseline)
    inputs = _named([30, 40], [2000.0, 3000.0], ["paris", "lyon"])
    inputs["age"] = np.array([30.5, 40.0], dtype=np.float32)  # trained on int64
    found = checker.check(_event(inputs))
    assert _kinds(found) == {("dtype", "age")}
    assert found[0].message == "float32 values; trained on int64"
    inputs["age"] = np.array([b"30", b"40"], dtype=object)  # numbers sent as BYTES
    assert _kinds(checker.check(_event(inputs))) == {("dtype", "age")}


def test_unseen_category_never_echoes_the_value(baseline: Baseline) -> None:
    checker = SchemaChecker(baseline)
    inputs = _named([30, 40, 50], [2000.0] * 3, ["paris", "jane.doe@example.com", "oslo"])
    found = checker.check(_event(inputs))
    assert _kinds(found) == {("category", "city")}
    assert found[0].value == 2 and found[0].severity == "info"
    assert "jane" not in repr(found[0]) and "oslo" not in repr(found[0])


def test_payload_size(baseline: Baseline) -> None:
    checker = SchemaChecker(baseline, SchemaConfig(max_payload_bytes=1000))
    ok = _named([30], [2000.0], ["paris"])
    assert checker.check(_event(ok, payload_bytes=999)) == []
    found = checker.check(_event(ok, payload_bytes=5000))
    assert [(f.type, f.value, f.severity) for f in found] == [("payload_size", 5000.0, "warn")]
    # Without a payload size from the decoder, the tensors' own size counts.
    big = _named([30] * 200, [2000.0] * 200, ["paris"] * 200)
    assert ("payload_size", "$") in _kinds(checker.check(_event(big)))


def test_garbage_gives_findings_not_exceptions(baseline: Baseline) -> None:
    checker = SchemaChecker(baseline)
    garbage: list[dict[str, npt.NDArray[Any]]] = [
        {},
        {"age": np.array(None)},
        {"age": np.array([[[1]]])},
        {"income": np.array([object(), None], dtype=object)},
        {"x": np.array([b"\xff\xfe", b""], dtype=object)},
        {"city": np.array([1.5, np.nan])},
        {"input__0": np.empty((0, 3))},
    ]
    for inputs in garbage:
        found = checker.check(_event(inputs))
        assert all(f.kind == "schema" for f in found)
    with pytest.raises(ValueError, match="range_tolerance"):
        SchemaConfig(range_tolerance=-1)
