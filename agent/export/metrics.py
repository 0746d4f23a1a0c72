"""Prometheus metrics, read from the kernel maps at scrape time where that fits.

Names, types and labels are exactly those in metric_names.py (a test checks it). No label ever
holds payload content: labels are pod identity, service ip:port, HTTP method (from a fixed set)
and status code, and model names and versions, which come from traffic and so are redacted of
PII where the event is made (agent/inspect/traffic_names.py) and bounded here: every label whose
values traffic chooses (model, version, service, code) keeps at most a fixed number of values,
the rest fold into "other", and the series of a value not seen for `LABEL_TTL_S` are removed, so
the page stays bounded whatever names clients send.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import Collector

from infertap.agent.export.metric_names import POD_LABELS
from infertap.agent.export.port_owner import PortInUse, port_owner
from infertap.agent.flows.records import FlowInfo
from infertap.agent.inspect.drift import FeatureBins

# `_created` series double the series count and no dashboard or alert uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

PodLabels = tuple[str, str]  # (namespace, pod)
KNOWN_METHODS = frozenset(
    {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PRI"}
)
MAX_SERVICES = 500  # distinct service label values before folding into "other"
MAX_MODELS = 50  # distinct model label values (beyond the policy's models) before "other"
MAX_VERSIONS = 10  # distinct version label values per model before "other"
MAX_CODES = 32  # distinct result codes before "other"
LABEL_TTL_S = 600.0  # a label value not seen for this long is forgotten and its series removed
OTHER = "other"


class BoundedLabel:
    """Keeps one label's values bounded: values the policy names (`known`), then the first
    `limit` others seen; past that, everything folds into "other". A value not seen for `ttl_s`
    is forgotten by expire(), which frees its place and returns it so its series can go.

    Thread-safe: traffic labels values on the reader thread, scrapes expire them.
    """

    def __init__(
        self,
        known: Iterable[str] = (),
        limit: int = MAX_MODELS,
        ttl_s: float = LABEL_TTL_S,
        empty: str = "unknown",
    ) -> None:
        self._lock = threading.Lock()
        self._known = frozenset(known)
        self._admitted: set[str] = set()  # values beyond the known ones: at most `limit`
        self._last: dict[str, float] = {}  # every value handed out (known, admitted, other)
        self._limit = limit
        self._ttl_s = ttl_s
        self._empty = empty

    def set_known(self, known: Iterable[str]) -> None:
        with self._lock:
            self._known = frozenset(known)

    def __call__(self, value: str, now: float | None = None) -> str:
        """The label for `value`, noting it as seen at `now` (monotonic seconds)."""
        value = value or self._empty
        t = time.monotonic() if now is None else now
        with self._lock:
            if value not in self._known and value not in self._admitted:
                if len(self._admitted) >= self._limit:
                    value = OTHER
                else:
                    self._admitted.add(value)
            self._last[value] = t
            return value

    def peek(self, value: str) -> str:
        """The label `value` has now, without noting it as seen."""
        value = value or self._empty
        with self._lock:
            return value if value in self._known or value in self._admitted else OTHER

    def expire(self, now: float | None = None) -> list[str]:
        """Forget the values not seen for ttl_s; returns them."""
        t = time.monotonic() if now is None else now
        with self._lock:
            gone = [v for v, last in self._last.items() if t - last > self._ttl_s]
            for v in gone:
                del self._last[v]
                self._admitted.discard(v)
            return gone

    def values(self) -> list[str]:
        with self._lock:
            return sorted(self._last)


class _Expirer(Collector):
    """Registered before the metrics it prunes, so a scrape removes expired series first."""

    def __init__(self, expire: Callable[[], object]) -> None:
        self._expire = expire

    def collect(self) -> Iterator[Metric]:
        self._expire()
        return iter(())


@dataclass
class _Totals:
    messages: int = 0
    bytes: int = 0


class FlowAccounting:
    """Per-pod message and byte totals that never go backwards.

    Live flows are read from the kernel table; a closed flow's final counters arrive with its
    FLOW_END record. Between the kernel deleting a flow and us reading that record, the flow is
    in neither place, so we keep the last counters seen per flow until its end arrives (or, if
    the end record was lost, until it has been gone for `grace_s`).
    """

    def __init__(self, grace_s: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._closed: dict[PodLabels, _Totals] = {}
        self._last: dict[int, tuple[PodLabels, int, int, float]] = {}  # cookie -> pod, m, b, seen
        self._grace_s = grace_s

    def observe(self, flows: Iterable[tuple[PodLabels, FlowInfo]], now: float) -> None:
        with self._lock:
            for pod, f in flows:
                self._last[f.cookie] = (pod, f.messages, f.bytes, now)
            for cookie, (pod, m, b, seen) in list(self._last.items()):
                if now - seen > self._grace_s:  # its FLOW_END was lost: settle from what we saw
                    self._settle(pod, m, b)
                    del self._last[cookie]

    def flow_ended(self, pod: PodLabels, flow: FlowInfo) -> None:
        with self._lock:
            self._last.pop(flow.cookie, None)
            self._settle(pod, flow.messages, flow.bytes)

    def _settle(self, pod: PodLabels, messages: int, nbytes: int) -> None:
        t = self._closed.setdefault(pod, _Totals())
        t.messages += messages
        t.bytes += nbytes

    def totals(self) -> dict[PodLabels, _Totals]:
        with self._lock:
            out = {pod: _Totals(t.messages, t.bytes) for pod, t in self._closed.items()}
            for pod, m, b, _seen in self._last.values():
                t = out.setdefault(pod, _Totals())
                t.messages += m
                t.bytes += b
            return out


class KernelCollector(Collector):
    """Flows, messages, bytes, samples and drops straight from the BPF maps at scrape time."""

    def __init__(
        self,
        flows: Callable[[], list[FlowInfo]],
        kernel_stats: Callable[[], dict[str, int]],
        pod_of: Callable[[int], PodLabels],
        accounting: FlowAccounting,
    ) -> None:
        self._flows = flows
        self._stats = kernel_stats
        self._pod_of = pod_of
        self._accounting = accounting

    def collect(self) -> Iterator[Metric]:
        flows = [(self._pod_of(f.cgroup_id), f) for f in self._flows()]
        self._accounting.observe(flows, time.monotonic())
        active: dict[PodLabels, int] = {}
        for pod, _f in flows:
            active[pod] = active.get(pod, 0) + 1

        g = GaugeMetricFamily(
            "infertap_flows_active", "TCP flows intercepted now.", labels=POD_LABELS
        )
        for pod, n in sorted(active.items()):
            g.add_metric(list(pod), n)
        yield g

        totals = self._accounting.totals()
        msgs = CounterMetricFamily(
            "infertap_messages_total", "Messages sent on intercepted flows.", labels=POD_LABELS
        )
        nbytes = CounterMetricFamily(
            "infertap_bytes_total", "Bytes sent on intercepted flows.", labels=POD_LABELS
        )
        for pod, t in sorted(totals.items()):
            msgs.add_metric(list(pod), t.messages)
            nbytes.add_metric(list(pod), t.bytes)
        yield msgs
        yield nbytes

        stats = self._stats()
        yield CounterMetricFamily(
            "infertap_samples_total",
            "Payload samples written to the ring buffer.",
            value=stats.get("samples", 0),
        )
        yield CounterMetricFamily(
            "infertap_samples_lost_total",
            "Samples (and flow records) lost because the ring buffer was full.",
            value=stats.get("samples_lost", 0) + stats.get("events_lost", 0),
        )
        yield CounterMetricFamily(
            "infertap_verdict_drops_total",
            "Messages dropped in the kernel by a block verdict.",
            value=stats.get("verdict_drops", 0),
        )


_Series = tuple[Counter | Histogram, tuple[str, ...]]  # a metric and one child's label values


class _SeriesIndex:
    """Which series each label value has, so an expired value's series can be removed; and
    each series' child, so a count is a dict lookup, not a labels() call per model call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple[str, str], set[_Series]] = {}
        self._children: dict[_Series, Any] = {}

    def child(
        self, key: tuple[str, str], metric: Counter | Histogram, labels: tuple[str, ...]
    ) -> Any:
        """metric.labels(*labels), its series noted under `key`. A child is remembered until
        its key expires; one a count takes while remove() runs may miss that count, as a
        labels() call then would."""
        series = (metric, labels)
        found = self._children.get(series)  # no lock: a dict read is atomic
        if found is not None:
            return found
        with self._lock:
            found = self._children[series] = metric.labels(*labels)
            self._by_key.setdefault(key, set()).add(series)
            return found

    def remove(self, match: Callable[[tuple[str, str]], bool]) -> int:
        """Remove the series of every key `match` accepts; returns how many went."""
        with self._lock:
            keys = [k for k in self._by_key if match(k)]
            gone = [series for k in keys for series in self._by_key.pop(k)]
            for series in gone:
                self._children.pop(series, None)
        for metric, labels in gone:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)
        return len(gone)


class TrafficMetrics:
    """Metrics of decoded traffic, updated by the pipeline as requests are seen."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ttl_s: float = LABEL_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        registry.register(_Expirer(self.expire))
        self.http_requests = Counter(
            "infertap_http_requests_total",
            "HTTP requests seen on intercepted flows, by service, method and status.",
            labelnames=(*POD_LABELS, "service", "method", "code"),
            registry=registry,
        )
        self._clock = clock
        self._services = BoundedLabel(limit=MAX_SERVICES, ttl_s=ttl_s, empty="none")
        self._series = _SeriesIndex()

    def count_http(self, pod: PodLabels, service: str, method: str, code: int | None) -> None:
        service = self._services(service, self._clock())
        method = method.upper() if method.upper() in KNOWN_METHODS else "OTHER"
        code_label = str(code) if code and 100 <= code <= 999 else "none"
        labels = (*pod, service, method, code_label)
        self._series.child((service, ""), self.http_requests, labels).inc()

    def expire(self, now: float | None = None) -> int:
        """Remove the series of services not seen for the TTL; returns how many went."""
        gone = set(self._services.expire(self._clock() if now is None else now))
        return self._series.remove(lambda k: k[0] in gone) if gone else 0


# OpenAI usage keys -> the infertap_tokens_total kind label (a fixed set: servers choose keys).
TOKEN_KINDS: Final = {
    "prompt_tokens": "prompt",
    "completion_tokens": "completion",
    "total_tokens": "total",
}
_ANY_VERSION: Final = "\x00"  # the series index key of a model's series without a version label
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class InferenceMetrics:
    """Per-model request counts and latency, and PII findings, updated by the pipeline.

    Model names and versions arrive redacted (agent/models/adapt.py); here they are bounded:
    MAX_MODELS models beyond the policy's, MAX_VERSIONS versions per model, MAX_CODES result
    codes, and the series of a model (or a model's version) not seen for `ttl_s` are removed.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        ttl_s: float = LABEL_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        registry.register(_Expirer(self.expire))
        self._clock = clock
        self._ttl_s = ttl_s
        self.model_label = BoundedLabel(limit=MAX_MODELS, ttl_s=ttl_s)
        self._versions: dict[str, BoundedLabel] = {}  # model label -> its version labels
        self._versions_lock = threading.Lock()
        self._codes = BoundedLabel(limit=MAX_CODES, ttl_s=float("inf"), empty="none")
        self._series = _SeriesIndex()
        self.tokens = Counter(
            "infertap_tokens_total",
            "Tokens of OpenAI-style calls, as the server reported them (usage), by model and kind.",
            labelnames=("model", "kind"),
            registry=registry,
        )
        self.requests = Counter(
            "infertap_inference_requests_total",
            "Model inference calls seen, by model, version, protocol and result code.",
            labelnames=(*POD_LABELS, "model", "version", "protocol", "code"),
            registry=registry,
        )
        self.latency = Histogram(
            "infertap_inference_latency_seconds",
            "Request sent to first response byte sent, from kernel timestamps.",
            labelnames=(*POD_LABELS, "model", "version", "protocol"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.skipped = Counter(
            "infertap_inspection_skipped_total",
            "Model calls not inspected on purpose, by model and reason (overload: one HTTP/1"
            " request shed by the kernel; overload_connection: a whole connection shed).",
            labelnames=("model", "reason"),
            registry=registry,
        )
        self.pii = Counter(
            "infertap_pii_findings_total",
            "PII found in model requests, by type (values are never exported).",
            labelnames=(*POD_LABELS, "model", "type"),
            registry=registry,
        )

    def count(
        self,
        pod: PodLabels,
        model: str,
        version: str,
        protocol: str,
        code: str,
        latency_s: float | None,
    ) -> None:
        now = self._clock()
        m = self.model_label(model, now)
        # Versions of models folded into "other" mean nothing together: one label for them.
        v = OTHER if m == OTHER else self._version_label(m)(version[:64], now)
        req = (*pod, m, v, protocol, self._codes(code[:32], now))
        self._series.child((m, v), self.requests, req).inc()
        if latency_s is not None:
            lat = (*pod, m, v, protocol)
            self._series.child((m, v), self.latency, lat).observe(latency_s)

    def count_skipped(self, model: str, reason: str) -> None:
        m = self.model_label(model, self._clock())
        self._series.child((m, _ANY_VERSION), self.skipped, (m, reason)).inc()

    def count_pii(self, pod: PodLabels, model: str, pii_type: str) -> None:
        labels = (*pod, self.model_label(model, self._clock()), pii_type[:40])
        self._series.child((labels[-2], _ANY_VERSION), self.pii, labels).inc()

    def count_tokens(self, model: str, usage: Mapping[str, int]) -> None:
        """An OpenAI-style call's token usage (prompt, completion, total)."""
        counts = {kind: usage[key] for key, kind in TOKEN_KINDS.items() if key in usage}
        if not counts:
            return
        m = self.model_label(model, self._clock())
        for kind, n in counts.items():
            if n >= 0:
                self._series.child((m, _ANY_VERSION), self.tokens, (m, kind)).inc(n)

    def _version_label(self, model_label: str) -> BoundedLabel:
        with self._versions_lock:
            label = self._versions.get(model_label)
            if label is None:
                label = self._versions[model_label] = BoundedLabel(
                    limit=MAX_VERSIONS, ttl_s=self._ttl_s, empty=""
                )
            return label

    def expire(self, now: float | None = None) -> int:
        """Remove the series of models, and of models' versions, not seen for the TTL."""
        t = self._clock() if now is None else now
        models = set(self.model_label.expire(t))
        with self._versions_lock:
            for m in models:
                self._versions.pop(m, None)
            versions = {(m, v) for m, label in self._versions.items() for v in label.expire(t)}
        if not models and not versions:
            return 0
        return self._series.remove(lambda k: k[0] in models or k in versions)


MAX_BIN_SERIES_PER_MODEL = 2000  # features x bins of one model's bin counters, at most


class ModelStateCollector(Collector):
    """Drift values and bin counts, circuit states and the policy hash, read at scrape time."""

    def __init__(
        self,
        drift: Callable[[], dict[tuple[str, str, str], float]],
        circuits: Callable[[], dict[str, int]],
        policy_hash: Callable[[], str],
        bins: Callable[[], Mapping[tuple[str, str], FeatureBins]] = dict,
        model_label: Callable[[str], str] = lambda m: m,
    ) -> None:
        self._drift = drift
        self._circuits = circuits
        self._policy_hash = policy_hash
        self._bins = bins
        # The model label a circuit is shown under (InferenceMetrics.model_label.peek): bounded
        # like every other model label; circuits folded into "other" show the worst state.
        self._model_label = model_label

    def collect(self) -> Iterator[Metric]:
        d = GaugeMetricFamily(
            "infertap_feature_drift",
            "Feature drift against the training baseline over the sliding window.",
            labels=("model", "feature", "stat"),
        )
        for (model, feature, stat), value in sorted(self._drift().items()):
            d.add_metric([model, feature, stat], value)
        yield d
        yield from self._bin_metrics()
        c = GaugeMetricFamily(
            "infertap_circuit_state",
            "Circuit breaker per model: 0 closed, 1 half-open, 2 open.",
            labels=("model",),
        )
        states: dict[str, int] = {}
        for model, state in self._circuits().items():
            label = self._model_label(model)
            states[label] = max(state, states.get(label, state))
        for model, state in sorted(states.items()):
            c.add_metric([model], state)
        yield c
        p = GaugeMetricFamily(
            "infertap_policy_info", "The loaded policy, by content hash.", labels=("hash",)
        )
        p.add_metric([self._policy_hash() or "none"], 1)
        yield p

    def _bin_metrics(self) -> Iterator[Metric]:
        """Per model, feature and baseline bin: live values counted (a counter, so Prometheus can
        sum a model's traffic over every node's agent) and the baseline's share (a gauge). Bins
        are the baseline's, so the series are bounded by features x bins; past
        MAX_BIN_SERIES_PER_MODEL a model's further features are left out."""
        counts = CounterMetricFamily(
            "infertap_feature_bin_total",
            "Live feature values per baseline bin since the agent (or policy) started.",
            labels=("model", "feature", "bin"),
        )
        shares = GaugeMetricFamily(
            "infertap_feature_baseline_share",
            "The training baseline's share of each feature bin.",
            labels=("model", "feature", "bin"),
        )
        used: dict[str, int] = {}
        for (model, feature), fb in sorted(self._bins().items()):
            if used.get(model, 0) + len(fb.seen) > MAX_BIN_SERIES_PER_MODEL:
                continue
            used[model] = used.get(model, 0) + len(fb.seen)
            for i, (share, seen) in enumerate(zip(fb.baseline_share, fb.seen, strict=True)):
                counts.add_metric([model, feature, str(i)], seen)
                shares.add_metric([model, feature, str(i)], share)
        yield counts
        yield shares


class VisibilityCollector(Collector):
    """What infertap could not decode or see, read at scrape time: decode losses by protocol and
    reason (agent/protocols/losses.py, a fixed set) and connections not inspected, by reason."""

    def __init__(
        self,
        decode_lost: Callable[[], dict[tuple[str, str], int]],
        uninspected: Callable[[], dict[str, int]],
    ) -> None:
        self._decode_lost = decode_lost
        self._uninspected = uninspected

    def collect(self) -> Iterator[Metric]:
        lost = CounterMetricFamily(
            "infertap_decode_lost_total",
            "Times decoding stopped or gave up on traffic, by protocol and reason.",
            labels=("protocol", "reason"),
        )
        for (protocol, reason), n in sorted(self._decode_lost().items()):
            lost.add_metric([protocol, reason], n)
        yield lost
        unseen = GaugeMetricFamily(
            "infertap_connections_uninspected",
            "Connections in watched pods whose traffic is not inspected, by reason.",
            labels=("reason",),
        )
        for reason, n in sorted(self._uninspected().items()):
            unseen.add_metric([reason], n)
        yield unseen


class WorkerCollector(Collector):
    """Inspection workers restarted after they died (agent/workers/pool.py), read at scrape
    time; 0 with one worker (the agent's own reader thread)."""

    def __init__(self, restarts: Callable[[], int]) -> None:
        self._restarts = restarts

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "infertap_worker_restarts_total",
            "Inspection worker processes restarted after they died.",
            value=self._restarts(),
        )


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """/metrics for Prometheus, plus /ready and /healthz for the DaemonSet's probes.

    Binds when made (raising PortInUse, naming the owner, when the port is taken) and serves
    from start(): the agent makes it before loading anything, so a taken port costs nothing.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        ready: Callable[[], bool],
        healthy: Callable[[], bool],
    ) -> None:
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "/")
            for probe, check in (("/ready", ready), ("/healthz", healthy)):
                if path == probe:
                    ok = check()
                    start_response(
                        "200 OK" if ok else "503 Service Unavailable",
                        [("Content-Type", "text/plain")],
                    )
                    return [b"ok\n" if ok else b"not ready\n"]
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        try:
            self._server = make_server(
                host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler
            )
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise PortInUse(shown, port_owner(port)) from None
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever: only if it runs
            self._server.shutdown()
        self._server.server_close()
