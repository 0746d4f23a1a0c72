"""Every metric name infertap's /metrics serves: the one list the exporter, the Grafana dashboard
and the Prometheus alert rules agree on.

Names are written as Prometheus scrapes them, so a counter's key ends in `_total`
(prometheus_client's `Counter("infertap_messages_total", ...)` accepts that name and serves it
unchanged). A histogram's key is its base name; Prometheus also stores `<name>_bucket`,
`<name>_sum` and `<name>_count`, which `series_names()` lists.

Labels are the full label set the exporter declares, in order. Series about traffic of one pod
also carry `namespace` and `pod` (from agent/discovery's `pod_for_cgroup`), listed here so the
exporter, dashboard and alerts can rely on them; agent-wide series (samples, drops, drift per
model, circuit state, policy) do not.

tests/test_dashboards.py checks every PromQL expression against this module, and the exporter's
test checks that it registers exactly `METRICS`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

MetricType = Literal["counter", "gauge", "histogram"]

# Added to every series that describes one pod's traffic.
POD_LABELS: tuple[str, ...] = ("namespace", "pod")


class MetricSpec(NamedTuple):
    """How one metric is exported: a (type, labels) pair."""

    type: MetricType
    labels: tuple[str, ...]


# Registered by infertap's exporter: exactly these names, types and labels.
METRICS: dict[str, MetricSpec] = {
    # Flows and bytes seen by sockops/sk_msg, per pod.
    "infertap_flows_active": MetricSpec("gauge", POD_LABELS),
    "infertap_messages_total": MetricSpec("counter", POD_LABELS),
    "infertap_bytes_total": MetricSpec("counter", POD_LABELS),
    # The kernel-to-user sample path, agent-wide: what was sampled, what the ring buffer lost.
    "infertap_samples_total": MetricSpec("counter", ()),
    "infertap_samples_lost_total": MetricSpec("counter", ()),
    # Messages the sk_msg verdict program dropped (enforcement), agent-wide.
    "infertap_verdict_drops_total": MetricSpec("counter", ()),
    # Decoded traffic, per pod.
    "infertap_http_requests_total": MetricSpec(
        "counter", (*POD_LABELS, "service", "method", "code")
    ),
    "infertap_inference_requests_total": MetricSpec(
        "counter", (*POD_LABELS, "model", "version", "protocol", "code")
    ),
    "infertap_inference_latency_seconds": MetricSpec(
        "histogram", (*POD_LABELS, "model", "version", "protocol")
    ),
    # Model-level state, aggregated over every pod serving the model.
    "infertap_feature_drift": MetricSpec("gauge", ("model", "feature", "stat")),
    # Live values per baseline bin (counter) and the baseline's share of each bin (gauge), per
    # watched model and feature: summed over agents by daemonset/prometheus/recording-rules.yaml
    # into cluster-wide PSI and JS. Bins are numbered from 0 in the baseline's order.
    "infertap_feature_bin_total": MetricSpec("counter", ("model", "feature", "bin")),
    "infertap_feature_baseline_share": MetricSpec("gauge", ("model", "feature", "bin")),
    "infertap_pii_findings_total": MetricSpec("counter", (*POD_LABELS, "model", "type")),
    "infertap_inspection_skipped_total": MetricSpec("counter", ("model", "reason")),
    # OpenAI-style calls' token usage as the server reported it; kind: prompt, completion, total.
    "infertap_tokens_total": MetricSpec("counter", ("model", "kind")),
    # 0 closed, 1 half-open, 2 open.
    "infertap_circuit_state": MetricSpec("gauge", ("model",)),
    # Always 1; the label is the hash of the loaded policy, so a rollout can be followed.
    "infertap_policy_info": MetricSpec("gauge", ("hash",)),
    # What was not decoded or not seen (agent/protocols/losses.py): decode losses by protocol
    # (http1, http2, unknown) and reason (a fixed set); connections not inspected by reason
    # ("pre_existing": opened before the agent started; "not_http", "mid_stream",
    # "decoder_failed": intercepted, but no byte of it is decoded).
    "infertap_decode_lost_total": MetricSpec("counter", ("protocol", "reason")),
    "infertap_connections_uninspected": MetricSpec("gauge", ("reason",)),
    # Inspection worker processes (run --workers N) restarted after they died; agent-wide.
    "infertap_worker_restarts_total": MetricSpec("counter", ()),
    # Shadow mirroring (agent/mirror), per mirrored model; result: agree, disagree, error, skipped.
    "infertap_shadow_requests_total": MetricSpec("counter", ("model", "result")),
    # Largest absolute output difference, shadow against primary, per mirrored request.
    "infertap_shadow_max_abs_diff": MetricSpec("histogram", ("model",)),
}

# Served by prometheus_client's default process collector, not registered by infertap.
DEFAULT_COLLECTOR_METRICS: dict[str, MetricSpec] = {
    "process_cpu_seconds_total": MetricSpec("counter", ()),
    "process_resident_memory_bytes": MetricSpec("gauge", ()),
}

# Written by Prometheus itself for every scrape target (1: the last scrape worked, 0: it failed).
SCRAPE_METRICS: dict[str, MetricSpec] = {
    "up": MetricSpec("gauge", ()),
}

ALL_METRICS: dict[str, MetricSpec] = {**METRICS, **DEFAULT_COLLECTOR_METRICS, **SCRAPE_METRICS}

CIRCUIT_CLOSED = 0
CIRCUIT_HALF_OPEN = 1
CIRCUIT_OPEN = 2

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def series_names() -> dict[str, str]:
    """Every series name a query may use, mapped to the metric it belongs to.

    A histogram contributes its three stored series; prometheus_client also serves `_created`
    series, which dashboards have no use for and so are not offered.
    """
    names: dict[str, str] = {}
    for name, spec in ALL_METRICS.items():
        if spec.type == "histogram":
            for suffix in _HISTOGRAM_SUFFIXES:
                names[name + suffix] = name
        else:
            names[name] = name
    return names
