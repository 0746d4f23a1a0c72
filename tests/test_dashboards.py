"""The Grafana dashboard and the alert rules ask only for metrics infertap exports.

Every PromQL expression is parsed with a real PromQL parser (promql-parser), not matched with a
regular expression, so function names, aggregation keywords (sum, by, on, group_left...), label
names and strings can never be taken for metric names. Each selector's metric must be in
infertap.agent.export.metric_names, be used the way its type allows (counters and histogram
series through rate/increase, gauges not), and be filtered only on labels it has.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import promql_parser as pq
import pytest
import yaml

from infertap.agent.export.metric_names import ALL_METRICS, series_names

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "daemonset" / "grafana" / "infertap-dashboard.json"
ALERTS = ROOT / "daemonset" / "prometheus" / "alerts.yaml"
RECORDING = ROOT / "daemonset" / "prometheus" / "recording-rules.yaml"
POLICY = ROOT / "daemonset" / "base" / "policy.yaml"

RANGE_FUNCTIONS = {"rate", "irate", "increase"}
# Labels Prometheus adds to every scraped series, and histogram buckets' own.
TARGET_LABELS = {"instance", "job"}


class Use(NamedTuple):
    """One selector in an expression: the series named and how it is used."""

    series: str
    labels: frozenset[str]  # label names it is filtered on
    range_function: str | None  # rate/increase/... directly around it, if any


# --- Expressions out of Grafana and Prometheus files -------------------------------------------


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables with values PromQL accepts where they stand."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)  # $namespace, ${pod}: only inside =~"..." here


def label_values_query(query: str) -> str:
    """The selector inside a Grafana variable query `label_values(<selector>, <label>)`."""
    match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip(), re.S)
    assert match, f"unexpected variable query {query!r}"
    return match.group(1)


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = []
    dash = dashboard()
    for panel in walk_panels(dash["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", grafana_to_promql(target["expr"])))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            selector = label_values_query(var["query"]["query"])
            out.append((f"variable {var['name']}", grafana_to_promql(selector)))
    return out


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def recording_file_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RECORDING.read_text())
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def recorded_series() -> dict[str, frozenset[str]]:
    """Series the recording rules write, with the labels they keep: by Prometheus' naming
    convention level:metric:operations, the level names them (model_feature_bin: model, feature,
    bin), and the rule's outermost aggregation must keep exactly those."""
    out = {}
    for rule in recording_file_rules():
        if "record" in rule:
            level = rule["record"].split(":")[0]
            out[rule["record"]] = frozenset(level.split("_")) - {""}
    return out


def all_expressions() -> list[tuple[str, str]]:
    rules = [(f"alert {r['alert']}", str(r["expr"])) for r in alert_rules()]
    for r in recording_file_rules():
        kind, name = ("record", r["record"]) if "record" in r else ("alert", r["alert"])
        rules.append((f"{kind} {name}", str(r["expr"])))
    return dashboard_expressions() + rules


# --- Metric names out of PromQL ---------------------------------------------------------------


def uses(expr: str) -> list[Use]:
    """Every vector selector in expr, from the parsed AST."""
    found: list[Use] = []

    def visit(node: Any, range_function: str | None) -> None:
        if isinstance(node, pq.VectorSelector):
            matchers = node.matchers.matchers
            name = node.name
            if name is None:  # {__name__="..."} form
                (name,) = [m.value for m in matchers if m.name == "__name__"]
            labels = frozenset(m.name for m in matchers if m.name != "__name__")
            found.append(Use(name, labels, range_function))
        elif isinstance(node, pq.MatrixSelector):
            visit(node.vector_selector, range_function)
        elif isinstance(node, pq.Call):
            name = node.func.name
            for arg in node.args:
                visit(arg, name if name in RANGE_FUNCTIONS else None)
        elif isinstance(node, pq.AggregateExpr):
            visit(node.expr, None)
            if isinstance(node.param, pq.Expr):
                visit(node.param, None)
        elif isinstance(node, pq.BinaryExpr) and str(node.op) == "unless":
            # `c unless c offset 5m`: counters born in the window, whose value counts from zero.
            visit(node.lhs, "unless")
            visit(node.rhs, "unless")
        elif isinstance(node, pq.BinaryExpr):
            visit(node.lhs, None)
            visit(node.rhs, None)
        elif isinstance(node, pq.ParenExpr | pq.UnaryExpr | pq.SubqueryExpr):
            visit(node.expr, None)
        elif not isinstance(node, pq.NumberLiteral | pq.StringLiteral):
            raise TypeError(f"unhandled PromQL node {type(node).__name__}")

    visit(pq.parse(expr), None)
    return found


def test_extraction_skips_functions_keywords_and_labels() -> None:
    expr = (
        'sum by (model, le) (rate(foo_bucket{code!~"5..", sum="rate"}[5m])) '
        "/ on (instance) group_left (hash) max without (job) (bar) "
        'and histogram_quantile(0.9, baz) + count_values("x", qux offset 1h) '
        '+ {__name__="quux"} + sum(rate(by[1m]))'
    )
    got = {(u.series, u.range_function) for u in uses(expr)}
    assert got == {
        ("foo_bucket", "rate"),
        ("bar", None),
        ("baz", None),
        ("qux", None),
        ("quux", None),
        ("by", "rate"),  # a metric may be called `by`; the parser knows where it is one
    }
    (foo,) = [u for u in uses(expr) if u.series == "foo_bucket"]
    assert foo.labels == {"code", "sum"}
    with pytest.raises(ValueError):
        pq.parse("sum by (model) (rate(foo[5m])")  # unbalanced: a parse error, not a guess


# --- The checks -------------------------------------------------------------------------------


EXPRESSIONS = all_expressions()


@pytest.mark.parametrize(("where", "expr"), EXPRESSIONS, ids=[w for w, _ in EXPRESSIONS])
def test_expression_uses_only_exported_metrics(where: str, expr: str) -> None:
    names = series_names()
    recorded = recorded_series()
    found = uses(expr)
    assert found, f"{where}: no metric in {expr!r}"
    for use in found:
        if use.series in recorded:  # a recording rule's output: a gauge with the level's labels
            assert use.range_function is None, f"{where}: {use.series} is recorded, not a counter"
            assert use.labels <= recorded[use.series] | TARGET_LABELS, where
            continue
        assert use.series in names, f"{where}: {use.series} is not in metric_names.py"
        metric = names[use.series]
        spec = ALL_METRICS[metric]
        cumulative = spec.type == "counter" or spec.type == "histogram"
        if cumulative and use.range_function is None:
            # Grafana's label_values() only lists series; any selector will do there.
            assert where.startswith("variable"), f"{where}: {use.series} is cumulative: rate it"
        if not cumulative:
            assert use.range_function in (None, "unless"), f"{where}: {metric} is a gauge"
        allowed = set(spec.labels) | TARGET_LABELS
        if use.series.endswith("_bucket") and spec.type == "histogram":
            allowed.add("le")
        assert use.labels <= allowed, f"{where}: {metric} has no label {use.labels - allowed}"


def test_dashboard_covers_every_infertap_metric() -> None:
    recorded = recorded_series()
    used = {
        series_names()[u.series]
        for _, expr in EXPRESSIONS
        for u in uses(expr)
        if u.series not in recorded
    }
    assert used == set(ALL_METRICS)


def test_recorded_series_keep_the_labels_their_names_promise() -> None:
    for rule in recording_file_rules():
        if "record" not in rule:
            continue
        labels = recorded_series()[rule["record"]]
        assert labels, rule["record"]
        expr = pq.parse(rule["expr"])
        # Down to the outermost aggregation: through sqrt(clamp_min(...)), parentheses, and the
        # left side of binary operators (`a / on (...) group_left () b` keeps a's labels).
        while isinstance(expr, pq.Call | pq.ParenExpr | pq.BinaryExpr):
            if isinstance(expr, pq.Call):
                expr = expr.args[0]
            elif isinstance(expr, pq.ParenExpr):
                expr = expr.expr
            else:
                expr = expr.lhs
        if isinstance(expr, pq.AggregateExpr):
            assert expr.modifier is not None, rule["record"]
            assert set(expr.modifier.labels) == labels, rule["record"]
        else:  # a recorded series used as it stands
            assert isinstance(expr, pq.VectorSelector), rule["record"]
            assert expr.name in recorded_series(), rule["record"]


def test_dashboard_shows_the_cluster_wide_drift() -> None:
    exprs = " ".join(e for _, e in dashboard_expressions())
    for record in recorded_series():
        if record.startswith("model_feature:"):
            assert record in exprs, f"no panel shows {record}"


# --- Dashboard shape --------------------------------------------------------------------------


def test_dashboard_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "pod", "model"):
        assert variables[name]["type"] == "query"
        assert variables[name]["multi"] and variables[name]["includeAll"]
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert label_values_query(variables[name]["query"]["query"])
    # Pod follows namespace, and model follows both.
    assert "$namespace" in variables["pod"]["query"]["query"]
    assert {"$namespace", "$pod"} <= set(re.findall(r"\$\w+", variables["model"]["query"]["query"]))


def test_dashboard_panels() -> None:
    dash = dashboard()
    panels = list(walk_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == [
        "Requests per model (RED)",
        "Traffic",
        "Drift",
        "PII",
        "Circuit breakers",
        "Agent health",
    ]
    titles = " | ".join(p["title"] for p in panels)
    for needed in ("Request rate", "Error ratio", "Latency", "PSI", "PII", "Circuit state"):
        assert needed in titles
    for needed in ("Samples lost", "CPU", "memory"):
        assert needed in titles
    # Per-pod series follow the namespace/pod variables.
    for panel in panels:
        for target in panel.get("targets", []):
            for use in uses(grafana_to_promql(target["expr"])):
                if use.series in recorded_series():
                    continue  # per model and feature: no pod label
                spec = ALL_METRICS[series_names()[use.series]]
                if "pod" in spec.labels:
                    assert {"namespace", "pod"} <= use.labels, panel["title"]


# --- Alert rules ------------------------------------------------------------------------------


def test_alert_rules_shape() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    groups = doc["spec"]["groups"]
    assert len({g["name"] for g in groups}) == len(groups)
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert {
        "InfertapFeatureDriftAlert",
        "InfertapPIISeen",
        "InfertapCircuitOpen",
        "InfertapSamplesLost",
    } <= set(names)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_drift_thresholds_follow_the_policy() -> None:
    psi = yaml.safe_load(POLICY.read_text())["drift"]["thresholds"]["psi"]
    rules = {r["alert"]: r for r in alert_rules()}
    for alert, level in (
        ("InfertapFeatureDriftAlert", "alert"),
        ("InfertapFeatureDriftWarning", "warn"),
    ):
        expr = pq.parse(rules[alert]["expr"])
        assert isinstance(expr, pq.BinaryExpr)
        assert isinstance(expr.rhs, pq.NumberLiteral)
        assert expr.rhs.val == psi[level], alert


def test_circuit_open_means_state_two() -> None:
    expr = pq.parse(next(r for r in alert_rules() if r["alert"] == "InfertapCircuitOpen")["expr"])
    assert isinstance(expr, pq.BinaryExpr)
    assert isinstance(expr.rhs, pq.NumberLiteral)
    assert expr.rhs.val == 2  # metric_names: 0 closed, 1 half-open, 2 open
