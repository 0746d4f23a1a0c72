"""What `infertap top` shows, folded from the agent's events and polled snapshots.

Plain Python with no UI in it, so every number on screen is unit-tested here:
- per model and protocol (a model called over REST and gRPC gets a row for each), over the last
  WINDOW_S seconds of inference events: request rate, p50/p99 latency (nearest rank) and error
  rate; circuit state (per model) from "circuit" events and ListModels;
- per (model, feature): the latest PSI/KS/JS and a trend of recent values;
- PII findings: counts by type and by model, and the latest few redacted examples;
- flows and verdicts as last polled.

Time is the agent's event clock (kernel monotonic ns). Between events it is extrapolated with the
local monotonic clock, so rates decay to zero when traffic stops even when the agent's clock is
not ours (an API reached over TCP from another host).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from infertap.agent.api import infertap_pb2 as pb

WINDOW_S: Final = 10.0
WINDOW_NS: Final = int(WINDOW_S * 1e9)
# Calls kept per model for the window: bounds memory at very high request rates (the rate then
# reads as at least MAX_CALLS / WINDOW_S, which is still far above anything worth a closer look).
MAX_CALLS: Final = 50_000
TREND_POINTS: Final = 16
PII_EXAMPLES: Final = 5
ACTIVITY: Final = 20

CIRCUIT_NAMES: Final = {0: "closed", 1: "half-open", 2: "open"}
# The agent's default drift thresholds (agent/inspect/drift.py DEFAULT_THRESHOLDS), repeated here
# so the UI does not import numpy and the drift engine; a policy may set others, and then the
# agent's findings (severity) say so in the activity log.
DRIFT_THRESHOLDS: Final[Mapping[str, tuple[float, float]]] = {
    "psi": (0.1, 0.25),
    "ks": (0.2, 0.3),
    "js": (0.2, 0.3),
}
SPARK_CHARS: Final = "▁▂▃▄▅▆▇█"

MODEL_SORTS: Final = ("name", "rate", "p99", "errors", "circuit")
_CIRCUIT_RANK: Final = {"open": 0, "half-open": 1, "closed": 2}


def circuit_name(value: object) -> str:
    """ListModels gives 0/1/2; circuit events give names. Both end up as one spelling."""
    if isinstance(value, int):
        return CIRCUIT_NAMES.get(value, str(value))
    return str(value).strip().lower().replace("_", "-") or "closed"


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least p% of values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


def sparkline(values: Sequence[float], width: int = TREND_POINTS) -> str:
    """The last `width` values as block characters, scaled from 0 (drift stats are >= 0)."""
    tail = list(values)[-width:]
    if not tail:
        return ""
    top = max(tail)
    if top <= 0:
        return SPARK_CHARS[0] * len(tail)
    last = len(SPARK_CHARS) - 1
    return "".join(SPARK_CHARS[min(last, round(v / top * last))] for v in tail)


def drift_level(stat: str, value: float | None) -> str:
    """ "alert", "warn" or "ok" against the default thresholds for that statistic."""
    if value is None or stat not in DRIFT_THRESHOLDS:
        return "ok"
    warn, alert = DRIFT_THRESHOLDS[stat]
    return "alert" if value >= alert else "warn" if value >= warn else "ok"


def split_hostport(text: str) -> tuple[str, int] | None:
    """ "10.0.0.5:8000" or "[::1]:8000" (how the agent prints endpoints) -> (ip, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def endpoint_text(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class Call:
    ts_ns: int
    latency_ms: float | None
    ok: bool


@dataclass(slots=True)
class ProtocolStats:
    """One model's calls over one protocol (a model served over REST and gRPC has two)."""

    calls: deque[Call] = field(default_factory=lambda: deque(maxlen=MAX_CALLS))
    total: int = 0
    errors: int = 0
    service: str = ""  # the last "ip:port" it was called on over this protocol


@dataclass(slots=True)
class ModelStats:
    name: str
    protocols: dict[str, ProtocolStats] = field(default_factory=dict)
    service: str = ""  # the last "ip:port" it was served on: what `b` blocks
    protocol: str = ""  # the last protocol it was called over
    version: str = ""
    pod: str = ""
    last_error: str = ""
    circuit: str = "closed"
    circuit_reason: str = ""
    schema_findings: int = 0


@dataclass(frozen=True, slots=True)
class ModelRow:
    name: str
    service: str
    protocol: str
    rate: float  # requests per second over the window
    p50_ms: float | None
    p99_ms: float | None
    error_rate: float | None  # None: no calls in the window
    window_calls: int
    total: int
    errors: int
    circuit: str


@dataclass(slots=True)
class DriftSeries:
    values: deque[float] = field(default_factory=lambda: deque(maxlen=TREND_POINTS))

    def add(self, value: float) -> None:
        # ListModels repeats the current value on every poll; only a change is a new point.
        if not self.values or self.values[-1] != value:
            self.values.append(value)

    @property
    def current(self) -> float | None:
        return self.values[-1] if self.values else None


@dataclass(frozen=True, slots=True)
class DriftRow:
    model: str
    feature: str
    psi: float | None
    ks: float | None
    js: float | None
    trend_stat: str  # the statistic the trend shows: psi when there is one
    trend: tuple[float, ...]
    level: str  # worst of the three: "alert", "warn" or "ok"


@dataclass(frozen=True, slots=True)
class PiiExample:
    ts_ns: int
    model: str
    type: str
    location: str
    redacted: str


@dataclass(frozen=True, slots=True)
class FlowRow:
    id: int
    role: str
    local: str
    remote: str
    service: str  # the serving end: local for a server-side flow, remote for a client-side one
    cgroup: str
    protocol: str
    messages: int
    bytes: int
    drops: int


@dataclass(frozen=True, slots=True)
class VerdictRow:
    key: str
    target: str
    action: str
    reason: str
    flow_id: int | None
    service: tuple[str, int] | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One poll of the agent's unary calls."""

    status: pb.Status
    flows: pb.ListFlowsResponse
    verdicts: pb.ListVerdictsResponse
    models: pb.ListModelsResponse


def _matches(needle: str, *haystack: str) -> bool:
    return not needle or any(needle in h.lower() for h in haystack)


class TopState:
    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._event_ns = 0  # latest event timestamp seen (agent clock)
        self._event_local_ns = 0  # our clock when it arrived
        self.models: dict[str, ModelStats] = {}
        self.drift: dict[tuple[str, str, str], DriftSeries] = {}
        self.pii_by_type: Counter[str] = Counter()
        self.pii_by_model: Counter[str] = Counter()
        self.pii_by_model_type: Counter[tuple[str, str]] = Counter()
        self.pii_examples: deque[PiiExample] = deque(maxlen=PII_EXAMPLES)
        self.flows: list[FlowRow] = []
        self.verdicts: list[VerdictRow] = []
        self.activity: deque[str] = deque(maxlen=ACTIVITY)
        self.status: pb.Status | None = None
        self.policy_hash = ""
        self.events_seen = 0
        self.bad_events = 0

    # -- time --

    def now_ns(self) -> int:
        if not self._event_local_ns:
            return self._event_ns
        return self._event_ns + max(0, self._clock() - self._event_local_ns)

    # -- folding --

    def apply_events(self, events: Iterable[pb.Event]) -> None:
        for ev in events:
            self.apply_event(ev)

    def apply_event(self, ev: pb.Event) -> None:
        try:
            data = json.loads(ev.data_json) if ev.data_json else {}
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            self.bad_events += 1
            return
        self.apply(ev.kind, ev.ts_ns, data)

    def apply(self, kind: str, ts_ns: int, data: Mapping[str, Any]) -> None:
        self.events_seen += 1
        if ts_ns >= self._event_ns:
            self._event_ns = ts_ns
            self._event_local_ns = self._clock()
        try:
            if kind == "inference":
                self._inference(ts_ns, data)
            elif kind == "finding":
                self._finding(ts_ns, data)
            elif kind == "circuit":
                self._circuit(data)
            elif kind in ("verdict", "gap", "uninspected"):
                text = str(data.get("description") or data.get("message") or kind)
                self.activity.append(f"{kind}: {text}")
        except (KeyError, TypeError, ValueError):
            # An event of a newer agent with other fields: count it, never crash the view.
            self.bad_events += 1

    def _model(self, name: str) -> ModelStats:
        m = self.models.get(name)
        if m is None:
            m = self.models[name] = ModelStats(name)
        return m

    def _inference(self, ts_ns: int, d: Mapping[str, Any]) -> None:
        m = self._model(str(d["model"]))
        ok = str(d.get("status") or "ok") == "ok"
        latency = d.get("latency_ms")
        m.protocol = str(d.get("protocol") or m.protocol)
        m.service = str(d.get("service") or m.service)
        ps = m.protocols.get(m.protocol)
        if ps is None:
            ps = m.protocols[m.protocol] = ProtocolStats()
        ps.calls.append(Call(ts_ns, float(latency) if latency is not None else None, ok))
        ps.total += 1
        ps.service = m.service
        if not ok:
            ps.errors += 1
            m.last_error = str(d.get("error") or d.get("status"))
        m.version = str(d.get("version") or m.version)
        m.pod = str(d.get("pod") or m.pod)

    def _finding(self, ts_ns: int, d: Mapping[str, Any]) -> None:
        kind, model = str(d["kind"]), str(d["model"])
        if kind == "pii":
            typ = str(d["type"])
            self.pii_by_type[typ] += 1
            self.pii_by_model[model] += 1
            self.pii_by_model_type[(model, typ)] += 1
            self.pii_examples.append(
                PiiExample(
                    ts_ns, model, typ, str(d.get("location", "")), str(d.get("redacted", ""))
                )
            )
        elif kind == "drift":
            # type is the statistic, location the feature (agent/inspect/drift.py).
            if d.get("value") is not None:
                key = (model, str(d["location"]), str(d["type"]))
                self.drift.setdefault(key, DriftSeries()).add(float(d["value"]))
            if d.get("message"):
                self.activity.append(f"drift {model}: {d['location']} {d['message']}")
        elif kind == "schema":
            self._model(model).schema_findings += 1
        elif kind == "protocol":  # e.g. http_ambiguous_framing: not tied to a model
            self.activity.append(f"{d['type']} {d.get('location', '')} to {d.get('service', '?')}")

    def _circuit(self, d: Mapping[str, Any]) -> None:
        m = self._model(str(d["model"]))
        m.circuit = circuit_name(d["to_state"])
        m.circuit_reason = str(d.get("reason", ""))
        if d.get("service") and not m.service:
            m.service = str(d["service"])
        self.activity.append(
            f"circuit {m.name}: {circuit_name(d.get('from_state', ''))} -> {m.circuit}"
            + (f" ({m.circuit_reason})" if m.circuit_reason else "")
        )

    def apply_snapshot(self, snap: Snapshot) -> None:
        self.status = snap.status
        self.policy_hash = snap.models.policy_hash
        for ms in snap.models.models:
            m = self._model(ms.name)
            m.circuit = circuit_name(ms.circuit_state)
            for dv in ms.drift:
                self.drift.setdefault((ms.name, dv.feature, dv.stat), DriftSeries()).add(dv.value)
        self.flows = [_flow_row(f) for f in snap.flows.flows]
        self.verdicts = [_verdict_row(v) for v in snap.verdicts.verdicts]

    # -- what the panels show --

    def _window(self, ps: ProtocolStats, now: int) -> list[Call]:
        # Calls arrive roughly in order; drop the expired ones from the left for good.
        while ps.calls and ps.calls[0].ts_ns <= now - WINDOW_NS:
            ps.calls.popleft()
        return [c for c in ps.calls if c.ts_ns <= now]

    def model_row(
        self, name: str, now_ns: int | None = None, *, protocol: str | None = None
    ) -> ModelRow:
        """The model's numbers over one protocol, or (protocol None) over all of them."""
        now = self.now_ns() if now_ns is None else now_ns
        m = self.models[name]
        chosen = [(proto, ps) for proto, ps in m.protocols.items() if protocol in (None, proto)]
        calls = sorted(
            (c for _, ps in chosen for c in self._window(ps, now)), key=lambda c: c.ts_ns
        )
        latencies = [c.latency_ms for c in calls if c.latency_ms is not None]
        errors = sum(1 for c in calls if not c.ok)
        one = m.protocols.get(protocol) if protocol is not None else None
        return ModelRow(
            name=m.name,
            service=one.service if one is not None and one.service else m.service,
            protocol=protocol if protocol is not None else m.protocol,
            rate=len(calls) / WINDOW_S,
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
            error_rate=errors / len(calls) if calls else None,
            window_calls=len(calls),
            total=sum(ps.total for _, ps in chosen),
            errors=sum(ps.errors for _, ps in chosen),
            circuit=m.circuit,
        )

    def model_rows(
        self, filter_text: str = "", sort: str = "name", now_ns: int | None = None
    ) -> list[ModelRow]:
        """One row per model and protocol (a model called over REST and gRPC has two rows; one
        known only from circuits or ListModels has one, without a protocol)."""
        needle = filter_text.strip().lower()
        rows = [
            self.model_row(name, now_ns, protocol=proto)
            for name, m in self.models.items()
            for proto in (sorted(m.protocols) or [""])
            if _matches(
                needle,
                name,
                m.pod,
                m.protocols[proto].service if proto in m.protocols else m.service,
            )
        ]
        rows.sort(key=lambda r: (r.name, r.protocol))
        if sort == "rate":
            rows.sort(key=lambda r: -r.rate)
        elif sort == "p99":
            rows.sort(key=lambda r: -(r.p99_ms or 0.0))
        elif sort == "errors":
            rows.sort(key=lambda r: -(r.error_rate or 0.0))
        elif sort == "circuit":
            rows.sort(key=lambda r: _CIRCUIT_RANK.get(r.circuit, -1))
        return rows

    def drift_rows(self, filter_text: str = "") -> list[DriftRow]:
        needle = filter_text.strip().lower()
        features: dict[tuple[str, str], dict[str, DriftSeries]] = {}
        for (model, feature, stat), series in self.drift.items():
            svc = self.models[model].service if model in self.models else ""
            if _matches(needle, model, feature, svc):
                features.setdefault((model, feature), {})[stat] = series
        rows = []
        for (model, feature), stats in features.items():
            trend_stat = "psi" if "psi" in stats else sorted(stats)[0]
            current = {s: stats[s].current if s in stats else None for s in ("psi", "ks", "js")}
            levels = [drift_level(s, v) for s, v in current.items()]
            level = "alert" if "alert" in levels else "warn" if "warn" in levels else "ok"
            rows.append(
                DriftRow(
                    model,
                    feature,
                    current["psi"],
                    current["ks"],
                    current["js"],
                    trend_stat,
                    tuple(stats[trend_stat].values),
                    level,
                )
            )
        # Worst first, then by name: what needs a look is at the top of a short panel.
        rank = {"alert": 0, "warn": 1, "ok": 2}
        rows.sort(key=lambda r: (rank[r.level], r.model, r.feature))
        return rows

    def pii_counts(self, filter_text: str = "") -> list[tuple[str, str, int]]:
        """(model, type, count), most frequent first."""
        needle = filter_text.strip().lower()
        rows = [
            (model, typ, n)
            for (model, typ), n in self.pii_by_model_type.items()
            if _matches(needle, model, typ, self._service_of(model))
        ]
        rows.sort(key=lambda r: (-r[2], r[0], r[1]))
        return rows

    def pii_recent(self, filter_text: str = "") -> list[PiiExample]:
        """The latest redacted examples, newest first."""
        needle = filter_text.strip().lower()
        return [
            e
            for e in reversed(self.pii_examples)
            if _matches(needle, e.model, e.type, self._service_of(e.model))
        ]

    def flow_rows(self, filter_text: str = "") -> list[FlowRow]:
        needle = filter_text.strip().lower()
        models_here = {m.service: name for name, m in self.models.items()}
        return [
            f
            for f in self.flows
            if _matches(
                needle, f.local, f.remote, f.cgroup, f.protocol, models_here.get(f.service, "")
            )
        ]

    def verdict_rows(self, filter_text: str = "") -> list[VerdictRow]:
        needle = filter_text.strip().lower()
        return [v for v in self.verdicts if _matches(needle, v.target, v.reason)]

    def _service_of(self, model: str) -> str:
        m = self.models.get(model)
        return m.service if m is not None else ""


def _flow_row(f: pb.Flow) -> FlowRow:
    local = endpoint_text(f.local.ip, f.local.port)
    remote = endpoint_text(f.remote.ip, f.remote.port)
    return FlowRow(
        id=f.id,
        role=f.role,
        local=local,
        remote=remote,
        service=local if f.role == "server" else remote,
        cgroup=f.cgroup or (str(f.cgroup_id) if f.cgroup_id else ""),
        protocol=f"not inspected: {f.uninspected}" if f.uninspected else f.protocol,
        messages=f.messages,
        bytes=f.bytes,
        drops=f.drops,
    )


def _verdict_row(v: pb.Verdict) -> VerdictRow:
    if v.target.WhichOneof("target") == "flow_id":
        return VerdictRow(
            f"flow:{v.target.flow_id}",
            f"flow {v.target.flow_id}",
            v.action,
            v.reason,
            v.target.flow_id,
            None,
        )
    svc = v.target.service
    text = endpoint_text(svc.ip, svc.port)
    return VerdictRow(
        f"service:{text}", f"service {text}", v.action, v.reason, None, (svc.ip, svc.port)
    )
