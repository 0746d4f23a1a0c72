"""Load and validate a policy file into agent/policy/schema.py's dataclasses.

Every problem is reported as one line, `FILE:LINE: FIELD.PATH: what is wrong`, and all problems
of a file are collected (not just the first) so `infertap policy validate` lists them at once.
Unknown keys are errors: a typo must not silently leave a setting at its default. Sections left
out take their defaults, except `version`, which must be written: a policy file cut short (an
editor's partial write, a truncated ConfigMap) should fail rather than look like "all defaults".
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal, TypeVar, cast, get_args

import yaml

from infertap.agent.defaults import CAPTURE_CHOICES
from infertap.agent.discovery.pod_watch import LabelSelector, Requirement
from infertap.agent.export.tracing_spec import TracingSpec
from infertap.agent.flows.records import Endpoint
from infertap.agent.inspect.drift import Thresholds
from infertap.agent.inspect.pii import BUILTIN_TYPES, compile_custom
from infertap.agent.kernel.steering import MAX_BACKENDS, MAX_TOTAL_WEIGHT, Backend, Route
from infertap.agent.kernel.structs import SAMPLE_MAX
from infertap.agent.mirror.policy import read_mirror
from infertap.agent.mirror.spec import MirrorSpec

# PolicyError is defined with the reader; loader is where callers import it from (re-exported).
from infertap.agent.policy.reader import PolicyError as PolicyError
from infertap.agent.policy.reader import _field, _join, _Reader, _required
from infertap.agent.policy.schema import (
    ACTIONS,
    KINDS,
    SCHEMA_VERSION,
    AccelerationSpec,
    Action,
    ActionsSpec,
    CircuitSpec,
    Discovery,
    DriftSpec,
    ModelSpec,
    PiiSpec,
    Policy,
    PolyfillSpec,
    SamplingSpec,
    SchemaSpec,
    ServiceSpec,
    SeverityActions,
    to_document,
)
from infertap.agent.policy.yamltree import YamlError, YMap, YNode, YScalar, YSeq, parse

T = TypeVar("T")

MAX_POLICY_BYTES: Final = 1 << 20  # a policy is a few KiB; refuse to parse something else
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]
_OPERATORS: Final[tuple[str, ...]] = get_args(_Operator)


# --- sections ----------------------------------------------------------------------------------


def _discovery(r: _Reader, node: YNode, path: str) -> Discovery:
    m = r.mapping(node, path, ("namespaceSelector",))
    if m is None or "namespaceSelector" not in m.items:
        return Discovery()
    spath = _join(path, "namespaceSelector")
    sel = r.mapping(m.items["namespaceSelector"], spath, ("matchLabels", "matchExpressions"))
    if sel is None:
        return Discovery()
    labels: dict[str, str] = {}
    if "matchLabels" in sel.items:
        lpath = _join(spath, "matchLabels")
        lm = r.mapping(sel.items["matchLabels"], lpath, tuple(_keys(sel.items["matchLabels"])))
        for key, value in (lm.items if lm else {}).items():
            text = r.string(value, _join(lpath, key))
            if text is not None:
                labels[key] = text
    requirements: list[Requirement] = []
    if "matchExpressions" in sel.items:
        epath = _join(spath, "matchExpressions")
        for i, item in enumerate(r.sequence(sel.items["matchExpressions"], epath)):
            ipath = f"{epath}[{i}]"
            em = r.mapping(item, ipath, ("key", "operator", "values"))
            if em is None:
                continue
            label = _required(r, em, ipath, "key", r.string)
            op = _required(r, em, ipath, "operator", lambda n, p: r.choice(n, p, _OPERATORS))
            values: list[str] = []
            if "values" in em.items:
                vpath = _join(ipath, "values")
                for j, v in enumerate(r.sequence(em.items["values"], vpath)):
                    text = r.string(v, f"{vpath}[{j}]")
                    if text is not None:
                        values.append(text)
            if op is not None and (op in ("In", "NotIn")) != bool(values):
                r.error(em.line, ipath, f"{op} needs values exactly when it is In or NotIn")
            if label is not None and op is not None:
                requirements.append(Requirement(label, cast(_Operator, op), tuple(values)))
    # A read-only view: the selector is part of a frozen policy shared across threads.
    return Discovery(LabelSelector(MappingProxyType(labels), tuple(requirements)))


def _keys(node: YNode) -> list[str]:
    return list(node.key_lines) if isinstance(node, YMap) else []


def _services(r: _Reader, node: YNode, path: str) -> tuple[ServiceSpec, ...]:
    services: list[ServiceSpec] = []
    names: dict[str, int] = {}
    endpoints: dict[tuple[str | None, int], int] = {}
    for i, item in enumerate(r.sequence(node, path)):
        ipath = f"{path}[{i}]"
        m = r.mapping(item, ipath, ("name", "port", "ip"))
        if m is None:
            continue
        name = _required(r, m, ipath, "name", r.string)
        port = _required(r, m, ipath, "port", lambda n, p: r.integer(n, p, 1, 65535))
        ip = _field(r, m, ipath, "ip", lambda n, p: _ip(r, n, p), None)
        if name is not None:
            if name in names:
                r.error(
                    m.items["name"].line,
                    _join(ipath, "name"),
                    f"duplicate of {path}[{names[name]}]",
                )
            names.setdefault(name, i)
        if port is not None:
            if (ip, port) in endpoints:
                r.error(m.line, ipath, f"same endpoint as {path}[{endpoints[(ip, port)]}]")
            endpoints.setdefault((ip, port), i)
        if name is not None and port is not None:
            services.append(ServiceSpec(name, port, ip))
    return tuple(sorted(services, key=lambda s: (s.port, s.ip or "", s.name)))


def _ip(r: _Reader, node: YNode, path: str) -> str | None:
    text = node.value if isinstance(node, YScalar) else None
    if isinstance(text, str):
        try:
            return ipaddress.ip_address(text).compressed
        except ValueError:
            pass
    r.error(node.line, path, "must be an IPv4 or IPv6 address")
    return None


def _thresholds(r: _Reader, node: YNode, path: str, stat: str, base: Thresholds) -> Thresholds:
    m = r.mapping(node, path, ("warn", "alert"))
    top = 1.0 if stat in ("ks", "js") else 1e6  # KS and JS distances lie in [0, 1]
    within = "from 0 to 1" if top == 1.0 else "of at least 0"
    warn = _field(r, m, path, "warn", lambda n, p: r.number(n, p, 0.0, top, within), base.warn)
    alert = _field(r, m, path, "alert", lambda n, p: r.number(n, p, 0.0, top, within), base.alert)
    if m is not None and not alert > warn:
        # Point at what was written: the alert if given, else the warn that passed it.
        if "alert" in m.items:
            r.error(
                m.items["alert"].line,
                _join(path, "alert"),
                f"must be a number greater than warn ({warn:g})",
            )
        elif "warn" in m.items:
            r.error(
                m.items["warn"].line,
                _join(path, "warn"),
                f"must be a number less than alert ({alert:g})",
            )
    return Thresholds(warn, alert)


def _drift(r: _Reader, node: YNode, path: str, base: DriftSpec) -> DriftSpec:
    m = r.mapping(node, path, ("window", "thresholds"))
    window = _field(r, m, path, "window", lambda n, p: r.integer(n, p, 2, 1_000_000), base.window)
    spec = replace(base, window=window)
    if m is None or "thresholds" not in m.items:
        return spec
    tpath = _join(path, "thresholds")
    tm = r.mapping(m.items["thresholds"], tpath, ("psi", "ks", "js"))
    if tm is None:
        return spec

    def stat(name: str, old: Thresholds) -> Thresholds:
        if name not in tm.items:
            return old
        return _thresholds(r, tm.items[name], _join(tpath, name), name, old)

    return replace(spec, psi=stat("psi", spec.psi), ks=stat("ks", spec.ks), js=stat("js", spec.js))


def _schema(r: _Reader, node: YNode, path: str, base: SchemaSpec) -> SchemaSpec:
    m = r.mapping(node, path, ("max_payload_bytes", "range_tolerance"))
    size = _field(
        r,
        m,
        path,
        "max_payload_bytes",
        lambda n, p: r.integer(n, p, 1, 1 << 31),
        base.max_payload_bytes,
    )
    tolerance = _field(
        r,
        m,
        path,
        "range_tolerance",
        lambda n, p: r.number(n, p, 0.0, 1e6, "of at least 0"),
        base.range_tolerance,
    )
    return SchemaSpec(size, tolerance)


def _models(
    r: _Reader, node: YNode, path: str, drift: DriftSpec, schema: SchemaSpec, base_dir: Path
) -> tuple[ModelSpec, ...]:
    models: list[ModelSpec] = []
    seen: dict[tuple[str, str | None], int] = {}
    known = ("name", "version", "baseline", "features", "drift", "schema")
    for i, item in enumerate(r.sequence(node, path)):
        ipath = f"{path}[{i}]"
        m = r.mapping(item, ipath, known)
        if m is None:
            continue
        name = _required(r, m, ipath, "name", r.string)
        version = _field(r, m, ipath, "version", r.string, None)
        baseline = _field(r, m, ipath, "baseline", r.string, None)
        features: list[str] = []
        if "features" in m.items:
            fpath = _join(ipath, "features")
            for j, f in enumerate(r.sequence(m.items["features"], fpath)):
                text = r.string(f, f"{fpath}[{j}]")
                if text is not None and text in features:
                    r.error(f.line, f"{fpath}[{j}]", f"duplicate feature {text!r}")
                elif text is not None:
                    features.append(text)
        mdrift = (
            _drift(r, m.items["drift"], _join(ipath, "drift"), drift)
            if "drift" in m.items
            else drift
        )
        mschema = (
            _schema(r, m.items["schema"], _join(ipath, "schema"), schema)
            if "schema" in m.items
            else schema
        )
        if name is None:
            continue
        if (name, version) in seen:
            r.error(
                m.line,
                ipath,
                f"model {name!r} version {version} is also {path}[{seen[(name, version)]}]",
            )
        seen.setdefault((name, version), i)
        # Relative to the policy file, so a policy and its baselines can travel together.
        resolved = str((base_dir / baseline).absolute()) if baseline is not None else None
        models.append(ModelSpec(name, version, resolved, tuple(features), mdrift, mschema))
    return tuple(sorted(models, key=lambda x: (x.name, x.version or "")))


def _acceleration(r: _Reader, node: YNode, path: str) -> AccelerationSpec:
    m = r.mapping(node, path, ("enabled",))
    return AccelerationSpec(_field(r, m, path, "enabled", r.boolean, False))


def _tracing(r: _Reader, node: YNode, path: str) -> TracingSpec:
    m = r.mapping(node, path, ("endpoint", "sample_ratio", "insecure", "link_window"))
    d = TracingSpec()
    if m is not None and "endpoint" not in m.items:
        r.error(m.line, _join(path, "endpoint"), "required (host:port of an OTLP/gRPC receiver)")
    endpoint = _field(r, m, path, "endpoint", lambda n, p: _otlp_endpoint(r, n, p), "")
    return TracingSpec(
        endpoint=endpoint,
        sample_ratio=_field(
            r, m, path, "sample_ratio", lambda n, p: r.number(n, p, 0.0, 1.0, "from 0 to 1"), 1.0
        ),
        insecure=_field(r, m, path, "insecure", r.boolean, d.insecure),
        link_window_s=_field(r, m, path, "link_window", r.duration, d.link_window_s),
    )


def _otlp_endpoint(r: _Reader, node: YNode, path: str) -> str | None:
    text = r.string(node, path)
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        r.error(node.line, path, f"must be host:port, got {text!r}")
        return None
    return text


def _sampling(r: _Reader, node: YNode, path: str) -> SamplingSpec:
    m = r.mapping(node, path, ("sample_bytes", "sample_one_in", "capture"))
    d = SamplingSpec()
    return SamplingSpec(
        _field(
            r, m, path, "sample_bytes", lambda n, p: r.integer(n, p, 1, SAMPLE_MAX), d.sample_bytes
        ),
        _field(
            r, m, path, "sample_one_in", lambda n, p: r.integer(n, p, 0, 1 << 30), d.sample_one_in
        ),
        _field(r, m, path, "capture", lambda n, p: r.choice(n, p, CAPTURE_CHOICES), d.capture),
    )


def _pii(r: _Reader, node: YNode, path: str) -> PiiSpec:
    m = r.mapping(node, path, ("enabled", "types", "custom"))
    d = PiiSpec()
    enabled = _field(r, m, path, "enabled", r.boolean, d.enabled)
    types = d.types
    if m is not None and "types" in m.items:
        tpath = _join(path, "types")
        chosen: set[str] = set()
        for j, t in enumerate(r.sequence(m.items["types"], tpath)):
            text = r.choice(t, f"{tpath}[{j}]", BUILTIN_TYPES)
            if text is not None and text in chosen:
                r.error(t.line, f"{tpath}[{j}]", f"duplicate type {text!r}")
            elif text is not None:
                chosen.add(text)
        types = tuple(t for t in BUILTIN_TYPES if t in chosen)  # one order: the scanner's
    custom: list[tuple[str, str]] = []
    if m is not None and "custom" in m.items:
        cpath = _join(path, "custom")
        cm = r.mapping(m.items["custom"], cpath, tuple(_keys(m.items["custom"])))
        for name, value in (cm.items if cm else {}).items():
            npath = _join(cpath, name)
            line = cm.key_lines[name] if cm else value.line
            if name in BUILTIN_TYPES or not _IDENT.fullmatch(name):
                r.error(
                    line, npath, "a custom type name must be an identifier, not a built-in type"
                )
                continue
            pattern = r.string(value, npath)
            if pattern is None:
                continue
            try:
                compiled = compile_custom(pattern)  # RE2: the scanner's engine
            except ValueError as e:
                r.error(value.line, npath, str(e))
                continue
            if compiled.fullmatch(""):
                r.error(value.line, npath, "bad regex: it matches the empty string")
                continue
            custom.append((name, pattern))
    return PiiSpec(enabled, types, tuple(sorted(custom)))


def _actions(r: _Reader, node: YNode, path: str) -> ActionsSpec:
    m = r.mapping(node, path, KINDS)
    d = ActionsSpec()
    per_kind: dict[str, SeverityActions] = {}
    for kind in KINDS:
        base: SeverityActions = getattr(d, kind)
        if m is None or kind not in m.items:
            per_kind[kind] = base
            continue
        kpath = _join(path, kind)
        km = r.mapping(m.items[kind], kpath, ("info", "warn", "alert"))
        # Drift is judged over a model's whole window, not one connection: no flow to block.
        allowed = tuple(a for a in ACTIONS if not (kind == "drift" and a == "block_flow"))
        chosen = {
            sev: _field(r, km, kpath, sev, _action_reader(r, allowed), base.for_severity(sev))
            for sev in ("info", "warn", "alert")
        }
        per_kind[kind] = SeverityActions(chosen["info"], chosen["warn"], chosen["alert"])
    return ActionsSpec(per_kind["pii"], per_kind["drift"], per_kind["schema"])


def _action_reader(
    r: _Reader, allowed: tuple[Action, ...]
) -> Callable[[YNode, str], Action | None]:
    def read(node: YNode, path: str) -> Action | None:
        return cast(Action | None, r.choice(node, path, allowed))

    return read


def _circuit(r: _Reader, node: YNode, path: str) -> CircuitSpec:
    known = ("pii_hits", "pii_window", "cooldown", "max_cooldown", "probe")
    m = r.mapping(node, path, known)
    d = CircuitSpec()
    spec = CircuitSpec(
        pii_hits=_field(
            r, m, path, "pii_hits", lambda n, p: r.integer(n, p, 1, 1_000_000), d.pii_hits
        ),
        pii_window_s=_field(r, m, path, "pii_window", r.duration, d.pii_window_s),
        cooldown_s=_field(r, m, path, "cooldown", r.duration, d.cooldown_s),
        max_cooldown_s=_field(r, m, path, "max_cooldown", r.duration, d.max_cooldown_s),
        probe_s=_field(r, m, path, "probe", r.duration, d.probe_s),
    )
    if m is not None and spec.max_cooldown_s < spec.cooldown_s:
        key = "max_cooldown" if "max_cooldown" in m.items else "cooldown"
        r.error(
            m.items[key].line,
            _join(path, key),
            f"max_cooldown ({spec.max_cooldown_s:g}s) must be at least"
            f" cooldown ({spec.cooldown_s:g}s)",
        )
    return spec


_ENDPOINT: Final = re.compile(r"\[([^\]]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})")


def _endpoint(r: _Reader, node: YNode, path: str) -> Endpoint | None:
    """ip:port, an IPv6 address in brackets ([2001:db8::1]:80). IPv4-mapped IPv6 is normalized
    to IPv4, as the kernel sees it."""
    text = node.value if isinstance(node, YScalar) else None
    m = _ENDPOINT.fullmatch(text) if isinstance(text, str) else None
    if m:
        bracketed = m.group(1) is not None
        try:
            ip = ipaddress.ip_address(m.group(1) if bracketed else m.group(3))
        except ValueError:
            ip = None
        port = int(m.group(2) or m.group(4))
        if ip is not None and bracketed == (ip.version == 6) and 1 <= port <= 65535:
            mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
            return Endpoint((mapped or ip).compressed, port)
    r.error(node.line, path, "must be ip:port with a port from 1 to 65535 ([ip]:port for IPv6)")
    return None


def _routes(r: _Reader, node: YNode, path: str) -> tuple[Route, ...]:
    """Weighted routing at connect (agent/kernel/steering.py): each service ip:port to 1 to
    MAX_BACKENDS backends of the same address family, with positive integer weights."""
    routes: list[Route] = []
    services: dict[Endpoint, int] = {}
    for i, item in enumerate(r.sequence(node, path)):
        ipath = f"{path}[{i}]"
        m = r.mapping(item, ipath, ("service", "backends"))
        if m is None:
            continue
        errors_before = len(r.errors)
        service = _required(r, m, ipath, "service", lambda n, p: _endpoint(r, n, p))
        if service is not None:
            if service in services:
                r.error(
                    m.items["service"].line,
                    _join(ipath, "service"),
                    f"duplicate of {path}[{services[service]}]",
                )
            services.setdefault(service, i)
        backends: list[Backend] = []
        bpath = _join(ipath, "backends")
        if "backends" not in m.items:
            r.error(m.line, bpath, "required")
            continue
        bnode = m.items["backends"]
        bline = m.key_lines["backends"]  # a block list starts a line below its key
        items = r.sequence(bnode, bpath)
        if isinstance(bnode, YSeq | YScalar) and not 1 <= len(items) <= MAX_BACKENDS:
            r.error(bline, bpath, f"must list 1 to {MAX_BACKENDS} backends")
        seen: dict[Endpoint, int] = {}
        for j, b in enumerate(items):
            jpath = f"{bpath}[{j}]"
            bm = r.mapping(b, jpath, ("endpoint", "weight"))
            if bm is None:
                continue
            ep = _required(r, bm, jpath, "endpoint", lambda n, p: _endpoint(r, n, p))
            weight = _required(
                r, bm, jpath, "weight", lambda n, p: r.integer(n, p, 1, MAX_TOTAL_WEIGHT)
            )
            if ep is not None:
                epath, line = _join(jpath, "endpoint"), bm.items["endpoint"].line
                if ep in seen:
                    r.error(line, epath, f"duplicate of {bpath}[{seen[ep]}]")
                elif service is not None and (":" in ep.ip) != (":" in service.ip):
                    # connect() can be rewritten only within the socket's address family.
                    r.error(line, epath, "must be in the service's address family")
                seen.setdefault(ep, j)
            if ep is not None and weight is not None:
                backends.append(Backend(ep, weight))
        total = sum(b.weight for b in backends)
        if total > MAX_TOTAL_WEIGHT:
            r.error(bline, bpath, f"weights add up to {total}, more than {MAX_TOTAL_WEIGHT}")
        if service is not None and len(r.errors) == errors_before:
            # Backend order changes nothing in the split: sorted, so it does not change the hash.
            ordered = tuple(sorted(backends, key=lambda b: (b.endpoint.ip, b.endpoint.port)))
            routes.append(Route(service, ordered))
    return tuple(sorted(routes, key=lambda x: (x.service.ip, x.service.port)))


def _version(r: _Reader, node: YNode, path: str) -> str | None:
    # `version: 2` is read by YAML as an int; a model version is a string in KServe V2 paths.
    if (
        isinstance(node, YScalar)
        and isinstance(node.value, int)
        and not isinstance(node.value, bool)
    ):
        return str(node.value)
    return r.string(node, path)


def _polyfill(r: _Reader, node: YNode, path: str) -> tuple[PolyfillSpec, ...]:
    """Request polyfill rules: client pod (namespace/name), IPv4 service ip:port, model,
    optional version, and set_parameters (a non-empty mapping of names to scalars)."""
    specs: list[PolyfillSpec] = []
    seen: dict[tuple[str, Endpoint, str, str | None], int] = {}
    known = ("client", "service", "model", "version", "set_parameters")
    for i, item in enumerate(r.sequence(node, path)):
        ipath = f"{path}[{i}]"
        m = r.mapping(item, ipath, known)
        if m is None:
            continue
        errors_before = len(r.errors)
        client = _required(r, m, ipath, "client", r.string)
        if client is not None and not (client.startswith("/") or client.count("/") == 1):
            r.error(
                m.items["client"].line,
                _join(ipath, "client"),
                "must be namespace/name, or a cgroup path starting with /",
            )
        service = _required(r, m, ipath, "service", lambda n, p: _endpoint(r, n, p))
        if service is not None and ":" in service.ip:
            r.error(m.items["service"].line, _join(ipath, "service"), "must be an IPv4 ip:port")
        model = _required(r, m, ipath, "model", r.string)
        version = _field(r, m, ipath, "version", lambda n, p: _version(r, n, p), None)
        params: list[tuple[str, str | int | float | bool]] = []
        ppath = _join(ipath, "set_parameters")
        pnode = m.items.get("set_parameters")
        if pnode is None:
            r.error(m.line, ppath, "required")
        elif not isinstance(pnode, YMap) or not pnode.items:
            r.error(pnode.line, ppath, "must be a non-empty mapping of parameter names to values")
        else:
            for name, value in pnode.items.items():
                v = value.value if isinstance(value, YScalar) else None
                if isinstance(v, str | int | float | bool) and not (
                    isinstance(v, float) and not math.isfinite(v)
                ):
                    params.append((str(name), v))
                else:
                    r.error(value.line, _join(ppath, str(name)), "must be a string, number or bool")
        if client is None or service is None or model is None or len(r.errors) != errors_before:
            continue
        key = (client, service, model, version)
        if key in seen:
            r.error(m.line, ipath, f"duplicate of {path}[{seen[key]}]")
            continue
        seen[key] = i
        specs.append(PolyfillSpec(client, service, model, version, tuple(sorted(params))))
    return tuple(
        sorted(
            specs, key=lambda s: (s.client, s.service.ip, s.service.port, s.model, s.version or "")
        )
    )


# --- entry points ------------------------------------------------------------------------------

_TOP: Final = (
    "version",
    "discovery",
    "services",
    "models",
    "sampling",
    "pii",
    "drift",
    "schema",
    "actions",
    "circuit",
    "routes",
    "mirror",
    "acceleration",
    "polyfill",
    "tracing",
)


def load_policy_text(text: str, source: str = "<policy>", base_dir: Path | None = None) -> Policy:
    """Validate policy YAML; raises PolicyError listing every problem. Relative baseline paths
    are taken from `base_dir` (default: the working directory)."""
    r = _Reader(source)
    try:
        root = parse(text)
    except YamlError as e:
        raise PolicyError([f"{source}:{e.line}: {e.message}"]) from None
    if root is None:
        raise PolicyError([f"{source}:1: the policy is empty"])
    m = r.mapping(root, "", _TOP)
    if m is None:
        raise PolicyError(r.errors)
    version = _required(
        r, m, "", "version", lambda n, p: r.integer(n, p, SCHEMA_VERSION, SCHEMA_VERSION)
    )

    def section(key: str, read: Callable[[YNode, str], T], default: T) -> T:
        return read(m.items[key], key) if key in m.items else default

    drift = section("drift", lambda n, p: _drift(r, n, p, DriftSpec()), DriftSpec())
    schema = section("schema", lambda n, p: _schema(r, n, p, SchemaSpec()), SchemaSpec())
    policy = Policy(
        version=version or SCHEMA_VERSION,
        discovery=section("discovery", lambda n, p: _discovery(r, n, p), Discovery()),
        services=section("services", lambda n, p: _services(r, n, p), ()),
        models=section(
            "models", lambda n, p: _models(r, n, p, drift, schema, base_dir or Path.cwd()), ()
        ),
        sampling=section("sampling", lambda n, p: _sampling(r, n, p), SamplingSpec()),
        pii=section("pii", lambda n, p: _pii(r, n, p), PiiSpec()),
        drift=drift,
        schema=schema,
        actions=section("actions", lambda n, p: _actions(r, n, p), ActionsSpec()),
        circuit=section("circuit", lambda n, p: _circuit(r, n, p), CircuitSpec()),
        routes=section("routes", lambda n, p: _routes(r, n, p), ()),
        mirror=section(
            "mirror", lambda n, p: _mirror(r, n, p, base_dir or Path.cwd()), MirrorSpec()
        ),
        acceleration=section(
            "acceleration", lambda n, p: _acceleration(r, n, p), AccelerationSpec()
        ),
        polyfill=section("polyfill", lambda n, p: _polyfill(r, n, p), ()),
        tracing=section("tracing", lambda n, p: _tracing(r, n, p), TracingSpec()),
        source=source,
    )
    if r.errors:
        # Sorted by line so the list reads like the file.
        raise PolicyError(sorted(r.errors, key=_line_of))
    return policy


def _mirror(r: _Reader, node: YNode, path: str, base_dir: Path) -> MirrorSpec:
    return read_mirror(r, node, path, base_dir)


def _line_of(message: str) -> int:
    # "<source>:<line>: ..." (the source may itself contain colons: split from the right side
    # of the known prefix instead of guessing).
    match = re.search(r":(\d+): ", message)
    return int(match.group(1)) if match else 0


def read_policy_file(path: Path) -> str:
    """The file's text; PolicyError (one line) when it cannot be read."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise PolicyError([f"{path}: cannot read the policy: {e.strerror or e}"]) from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError([f"{path}: larger than {MAX_POLICY_BYTES} bytes: not a policy file"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError([f"{path}: not UTF-8 text (byte {e.start})"]) from None


def load_policy(path: Path | str) -> Policy:
    """Read and validate a policy file; raises PolicyError."""
    p = Path(path)
    return load_policy_text(read_policy_file(p), str(p), p.parent)


def validate_file(path: Path | str) -> list[str]:
    """Every problem of a policy file, one line each; [] when it is valid (`policy validate`)."""
    try:
        load_policy(path)
    except PolicyError as e:
        return e.messages
    return []


class _Dumper(yaml.SafeDumper):
    """Block style, lists indented under their key: how people write Kubernetes YAML."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def render_policy(policy: Policy) -> str:
    """The normalized policy as YAML (`policy show`): loads back to an equal policy."""
    header = f"# infertap policy {policy.hash} (normalized from {policy.source})\n"
    body = yaml.dump(to_document(policy), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    return header + body


# --- the built-in policy -----------------------------------------------------------------------

# Used when the agent (or the demo) runs without --policy: the usual model-server ports, every
# PII type, the default drift thresholds and actions. No models: drift and schema checks need a
# baseline, which only a policy file can name.
DEFAULT_POLICY_YAML: Final = """\
version: 1
services:
  - {name: kserve-http, port: 8000}     # Triton / KServe v2 REST
  - {name: kserve-grpc, port: 8001}     # Triton / KServe v2 gRPC
  - {name: mlserver-http, port: 8080}   # MLServer, KServe predictors
  - {name: tfserving-grpc, port: 8500}
  - {name: tfserving-http, port: 8501}
pii:
  enabled: true
sampling:
  sample_bytes: 4096
  sample_one_in: 1
"""


def default_policy() -> Policy:
    return load_policy_text(DEFAULT_POLICY_YAML, "<built-in>")
