"""The policy as plain frozen dataclasses, its normalized document form and its content hash.

Nothing here knows YAML: loader.py validates a file into these types, and the rest of the agent
reads only these. `to_document()` is the one normalized form (every default filled in, durations
in seconds, paths resolved): `infertap policy show` prints it, and the content hash is taken over
it, so key order, comments and spelling of defaults do not change the hash while any effective
setting does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

from infertap.agent.defaults import DEFAULT_CAPTURE, DEFAULT_SAMPLE_BYTES
from infertap.agent.discovery.pod_watch import LabelSelector
from infertap.agent.export.tracing_spec import TracingSpec
from infertap.agent.flows.records import Endpoint
from infertap.agent.inspect.drift import DEFAULT_THRESHOLDS, DriftConfig, Thresholds
from infertap.agent.inspect.findings import FindingKind, Severity
from infertap.agent.inspect.pii import BUILTIN_TYPES
from infertap.agent.inspect.schema import DEFAULT_MAX_PAYLOAD_BYTES, SchemaConfig
from infertap.agent.kernel.steering import Route
from infertap.agent.mirror.spec import MirrorSpec, mirror_document

Action = Literal["log", "alert", "block_flow", "circuit_break"]
ACTIONS: Final[tuple[Action, ...]] = get_args(Action)
KINDS: Final[tuple[FindingKind, ...]] = get_args(FindingKind)
SCHEMA_VERSION: Final = 1
HASH_LENGTH: Final = 12  # hex digits of sha256 shown as the policy's short hash


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A model-serving endpoint: the server's port, on any address unless `ip` is given."""

    name: str
    port: int
    ip: str | None = None  # normalized (ipaddress's compressed form)

    def matches(self, endpoint: Endpoint) -> bool:
        if endpoint.port != self.port:
            return False
        if self.ip is None:
            return True
        try:
            return ipaddress.ip_address(endpoint.ip) == ipaddress.ip_address(self.ip)
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class DriftSpec:
    window: int = 500  # values per feature compared with the baseline (DriftConfig.window)
    psi: Thresholds = DEFAULT_THRESHOLDS["psi"]
    ks: Thresholds = DEFAULT_THRESHOLDS["ks"]
    js: Thresholds = DEFAULT_THRESHOLDS["js"]

    def to_config(self) -> DriftConfig:
        return DriftConfig(
            window=self.window, thresholds={"psi": self.psi, "ks": self.ks, "js": self.js}
        )


@dataclass(frozen=True, slots=True)
class SchemaSpec:
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    range_tolerance: float = 0.1  # share of the training range allowed beyond it

    def to_config(self) -> SchemaConfig:
        return SchemaConfig(
            range_tolerance=self.range_tolerance, max_payload_bytes=self.max_payload_bytes
        )


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    version: str | None  # None: every version of the model
    baseline: str | None  # absolute path of the baseline file; None: no drift or schema checks
    features: tuple[str, ...]  # features watched for drift; empty: all the baseline's
    drift: DriftSpec  # the policy's drift section with this model's overrides applied
    schema: SchemaSpec  # likewise


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    sample_bytes: int = DEFAULT_SAMPLE_BYTES
    sample_one_in: int = 1  # sample one flow in N; 0 samples none
    # Where bytes are sampled: "skb" (cgroup_skb/egress; sockets join the sockhash only for a
    # verdict or acceleration) or "sk_msg" (every socket in the sockhash). Fixed at agent start.
    capture: str = DEFAULT_CAPTURE


@dataclass(frozen=True, slots=True)
class AccelerationSpec:
    """Same-node acceleration: sk_msg sends straight to an intercepted peer socket."""

    enabled: bool = False


@dataclass(frozen=True, slots=True)
class PiiSpec:
    enabled: bool = True
    types: tuple[str, ...] = BUILTIN_TYPES  # built-in types scanned
    custom: tuple[tuple[str, str], ...] = ()  # (name, regex), in file order; each compiles

    def custom_patterns(self) -> dict[str, str]:
        """For PiiScanner(custom=...)."""
        return dict(self.custom)


@dataclass(frozen=True, slots=True)
class SeverityActions:
    info: Action
    warn: Action
    alert: Action

    def for_severity(self, severity: Severity) -> Action:
        action: Action = getattr(self, severity)
        return action


@dataclass(frozen=True, slots=True)
class ActionsSpec:
    """What happens to a finding, by its kind and severity."""

    pii: SeverityActions = SeverityActions("log", "alert", "circuit_break")
    drift: SeverityActions = SeverityActions("log", "alert", "circuit_break")
    schema: SeverityActions = SeverityActions("log", "log", "alert")

    def action_for(self, kind: FindingKind, severity: Severity) -> Action:
        per_kind: SeverityActions = getattr(self, kind)
        return per_kind.for_severity(severity)


@dataclass(frozen=True, slots=True)
class CircuitSpec:
    """Circuit breaker settings (agent/enforce/breaker.py). Findings whose action is
    `circuit_break` trip it: one drift or schema finding opens it, PII findings open it once
    `pii_hits` of them arrive within `pii_window_s`."""

    pii_hits: int = 5
    pii_window_s: float = 60.0
    cooldown_s: float = 30.0  # open this long before the first half-open probe
    max_cooldown_s: float = 600.0  # the cooldown doubles on each failed probe, up to this
    probe_s: float = 10.0  # half-open: traffic is allowed this long, then judged


@dataclass(frozen=True, slots=True)
class Discovery:
    # Pods in namespaces matching this are inspected (None: only pods that opt in themselves).
    namespace_selector: LabelSelector | None = None


@dataclass(frozen=True, slots=True)
class PolyfillSpec:
    """Request polyfill (agent/polyfill): `client`'s KServe V2 requests to `service` for `model`
    (and `version`, when given) get the parameters of `set_parameters` they lack."""

    client: str  # the client pod: namespace/name (discovered pods) or a cgroup path (/...)
    service: Endpoint  # IPv4 ip:port
    model: str
    version: str | None
    set_parameters: tuple[tuple[str, str | int | float | bool], ...]  # sorted by name


@dataclass(frozen=True, slots=True)
class Policy:
    version: int
    discovery: Discovery
    services: tuple[ServiceSpec, ...]
    models: tuple[ModelSpec, ...]
    sampling: SamplingSpec
    pii: PiiSpec
    drift: DriftSpec  # defaults for models without overrides, and for models not listed
    schema: SchemaSpec
    actions: ActionsSpec
    circuit: CircuitSpec
    routes: tuple[Route, ...] = ()  # weighted routing at connect (agent/kernel/steering.py)
    mirror: MirrorSpec = field(default_factory=MirrorSpec)  # shadows and sink (agent/mirror)
    acceleration: AccelerationSpec = field(default_factory=AccelerationSpec)
    polyfill: tuple[PolyfillSpec, ...] = ()  # request polyfill rules (agent/polyfill)
    tracing: TracingSpec = field(default_factory=TracingSpec)  # OTLP spans (agent/export/tracing)
    source: str = field(default="<built-in>", compare=False)  # where it was loaded from

    @property
    def hash(self) -> str:
        """Short content hash: the `hash` label of infertap_policy_info."""
        return content_hash(self)

    def is_model_service(self, endpoint: Endpoint) -> bool:
        return any(s.matches(endpoint) for s in self.services)

    def model(self, name: str, version: str = "") -> ModelSpec | None:
        """The entry for a model: the one naming this version, else the one naming none."""
        fallback = None
        for m in self.models:
            if m.name == name and m.version is not None and m.version == version:
                return m
            if m.name == name and m.version is None:
                fallback = m
        return fallback

    def action_for(self, kind: FindingKind, severity: Severity) -> Action:
        return self.actions.action_for(kind, severity)


# --- normalized document and hash ------------------------------------------------------------


def _seconds(value: float) -> int | float:
    # Whole seconds print as integers so `infertap policy show` reads "cooldown: 30".
    return int(value) if float(value).is_integer() else value


def _thresholds(t: Thresholds) -> dict[str, float]:
    return {"warn": t.warn, "alert": t.alert}


def _drift_doc(d: DriftSpec) -> dict[str, Any]:
    return {
        "window": d.window,
        "thresholds": {"psi": _thresholds(d.psi), "ks": _thresholds(d.ks), "js": _thresholds(d.js)},
    }


def _schema_doc(s: SchemaSpec) -> dict[str, Any]:
    return {"max_payload_bytes": s.max_payload_bytes, "range_tolerance": s.range_tolerance}


def _selector_doc(selector: LabelSelector) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if selector.match_labels:
        doc["matchLabels"] = dict(selector.match_labels)
    if selector.match_expressions:
        doc["matchExpressions"] = [
            {
                "key": r.key,
                "operator": r.operator,
                **({"values": list(r.values)} if r.values else {}),
            }
            for r in selector.match_expressions
        ]
    return doc


def _route_doc(route: Route) -> dict[str, Any]:
    return {
        "service": str(route.service),
        "backends": [{"endpoint": str(b.endpoint), "weight": b.weight} for b in route.backends],
    }


def _polyfill_doc(spec: PolyfillSpec) -> dict[str, Any]:
    return {
        "client": spec.client,
        "service": str(spec.service),
        "model": spec.model,
        **({"version": spec.version} if spec.version is not None else {}),
        "set_parameters": dict(spec.set_parameters),
    }


def to_document(policy: Policy) -> dict[str, Any]:
    """The normalized policy as plain data: valid policy YAML, every setting explicit."""
    discovery: dict[str, Any] = {}
    if policy.discovery.namespace_selector is not None:
        discovery["namespaceSelector"] = _selector_doc(policy.discovery.namespace_selector)
    models: list[dict[str, Any]] = []
    for m in policy.models:
        entry: dict[str, Any] = {"name": m.name}
        if m.version is not None:
            entry["version"] = m.version
        if m.baseline is not None:
            entry["baseline"] = m.baseline
        entry["features"] = list(m.features)
        entry["drift"] = _drift_doc(m.drift)
        entry["schema"] = _schema_doc(m.schema)
        models.append(entry)
    c = policy.circuit
    return {
        "version": policy.version,
        "discovery": discovery,
        "services": [
            {"name": s.name, "port": s.port, **({"ip": s.ip} if s.ip is not None else {})}
            for s in policy.services
        ],
        "models": models,
        "sampling": {
            "sample_bytes": policy.sampling.sample_bytes,
            "sample_one_in": policy.sampling.sample_one_in,
            # Only when not the default, so policies written before it keep their hash.
            **(
                {"capture": policy.sampling.capture}
                if policy.sampling.capture != DEFAULT_CAPTURE
                else {}
            ),
        },
        "pii": {
            "enabled": policy.pii.enabled,
            "types": list(policy.pii.types),
            "custom": dict(policy.pii.custom),
        },
        "drift": _drift_doc(policy.drift),
        "schema": _schema_doc(policy.schema),
        "actions": {
            kind: {
                sev: getattr(policy.actions, kind).for_severity(sev)
                for sev in ("info", "warn", "alert")
            }
            for kind in KINDS
        },
        "circuit": {
            "pii_hits": c.pii_hits,
            "pii_window": _seconds(c.pii_window_s),
            "cooldown": _seconds(c.cooldown_s),
            "max_cooldown": _seconds(c.max_cooldown_s),
            "probe": _seconds(c.probe_s),
        },
        # Only when set: policies without routes keep the hash they had before routes existed.
        **({"routes": [_route_doc(x) for x in policy.routes]} if policy.routes else {}),
        # Only when set: policies without mirroring keep the hash they had before it existed.
        **({"mirror": mirror_document(policy.mirror)} if policy.mirror.configured else {}),
        # Only when on, so policies written before this section keep their hash.
        **({"acceleration": {"enabled": True}} if policy.acceleration.enabled else {}),
        # Only when set, so policies written before this section keep their hash.
        **({"polyfill": [_polyfill_doc(x) for x in policy.polyfill]} if policy.polyfill else {}),
        # Only when on, so policies written before this section keep their hash.
        **({"tracing": _tracing_doc(policy.tracing)} if policy.tracing.enabled else {}),
    }


def _tracing_doc(spec: TracingSpec) -> dict[str, object]:
    return {
        "endpoint": spec.endpoint,
        "sample_ratio": spec.sample_ratio,
        "insecure": spec.insecure,
        "link_window": _seconds(spec.link_window_s),
    }


def content_hash(policy: Policy) -> str:
    """sha256 of the canonical JSON of to_document(), first HASH_LENGTH hex digits."""
    canonical = json.dumps(
        to_document(policy), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_LENGTH]


def observe_only(policy: Policy) -> Policy:
    """The same policy with every action at most "alert": what runs when no policy file was
    given, so infertap never blocks traffic unless an operator asked it to."""

    def soften(a: SeverityActions) -> SeverityActions:
        def one(x: Action) -> Action:
            return "alert" if x in ("block_flow", "circuit_break") else x

        return SeverityActions(one(a.info), one(a.warn), one(a.alert))

    actions = ActionsSpec(
        pii=soften(policy.actions.pii),
        drift=soften(policy.actions.drift),
        schema=soften(policy.actions.schema),
    )
    return dataclasses.replace(policy, actions=actions, source=f"{policy.source} (observe only)")
