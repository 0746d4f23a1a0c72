"""The policy's `mirror:` section, validated with agent/policy/loader.py's _Reader so its
messages read like the rest: `FILE:LINE: mirror.models[0].share: must be a number from 0 to 1`.

    mirror:
      queue: 256            # shadow requests waiting; more are skipped (counted)
      workers: 2
      timeout: 2s           # per shadow call
      models:
        - model: fraud
          endpoint: 10.0.0.7:8001   # the shadow V2 server
          protocol: grpc            # rest | grpc: requests of the other protocol are skipped
          share: 0.1                # of the model's whole requests
          shadow_model: fraud       # optional: model name on the shadow (default: the same)
          shadow_version: "2"       # optional
          outputs: [is_fraud]       # optional: outputs compared (default: all)
          agreement: values         # values | argmax | threshold
          threshold: 0.5            # for agreement: threshold
          atol: 1.0e-6              # for agreement: values
          rtol: 1.0e-5
      sink:
        directory: /var/lib/infertap/mirror   # relative to the policy file
        max_bytes: 67108864         # per file
        max_files: 5
        values: false               # also numeric tensor values (never BYTES or parameters)

Read by loader.py with the reader both share (agent/policy/reader.py).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Final, cast

from infertap.agent.flows.records import Endpoint
from infertap.agent.mirror.spec import (
    AGREEMENTS,
    DEFAULT_SINK_MAX_BYTES,
    DEFAULT_SINK_MAX_FILES,
    SHADOW_PROTOCOLS,
    Agreement,
    MirrorSpec,
    ShadowProtocol,
    ShadowSpec,
    SinkSpec,
)
from infertap.agent.policy.reader import _field, _join, _Reader, _required
from infertap.agent.policy.yamltree import YMap, YNode, YScalar

_TOP: Final = ("queue", "workers", "timeout", "models", "sink")
_MODEL: Final = (
    "model",
    "endpoint",
    "protocol",
    "share",
    "shadow_model",
    "shadow_version",
    "outputs",
    "agreement",
    "threshold",
    "atol",
    "rtol",
)
_SINK: Final = ("directory", "max_bytes", "max_files", "values", "max_value_elements")
_HOST_PORT: Final = re.compile(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)")


def _endpoint(r: _Reader, node: YNode, path: str) -> Endpoint | None:
    """ip:port or [ipv6]:port. An address, not a name: the agent resolves nothing."""
    text = node.value if isinstance(node, YScalar) else None
    m = _HOST_PORT.fullmatch(text) if isinstance(text, str) else None
    if m is not None:
        host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        try:
            ip = ipaddress.ip_address(host).compressed
        except ValueError:
            ip = None
        if ip is not None and 1 <= int(port) <= 65535:
            return Endpoint(ip, int(port))
    r.error(node.line, path, "must be ip:port (or [ipv6]:port) with a port from 1 to 65535")
    return None


def _names(r: _Reader, node: YNode, path: str) -> tuple[str, ...]:
    names: list[str] = []
    for j, item in enumerate(r.sequence(node, path)):
        text = r.string(item, f"{path}[{j}]")
        if text is not None and text in names:
            r.error(item.line, f"{path}[{j}]", f"duplicate output {text!r}")
        elif text is not None:
            names.append(text)
    return tuple(names)


def _shadow(r: _Reader, node: YNode, path: str) -> ShadowSpec | None:
    m = r.mapping(node, path, _MODEL)
    if m is None:
        return None
    model = _required(r, m, path, "model", r.string)
    endpoint = _required(r, m, path, "endpoint", lambda n, p: _endpoint(r, n, p))
    protocol = _required(r, m, path, "protocol", lambda n, p: r.choice(n, p, SHADOW_PROTOCOLS))
    d = ShadowSpec("", Endpoint("0.0.0.0", 1), "rest")
    share = _field(r, m, path, "share", lambda n, p: r.number(n, p, 0.0, 1.0, "from 0 to 1"), 1.0)
    agreement: str = _field(
        r, m, path, "agreement", lambda n, p: r.choice(n, p, AGREEMENTS), str(d.agreement)
    )
    tolerance = "of at least 0"
    spec = ShadowSpec(
        model=model or "",
        endpoint=endpoint or d.endpoint,
        protocol=cast(ShadowProtocol, protocol or "rest"),
        share=share,
        shadow_model=_field(r, m, path, "shadow_model", r.string, None),
        shadow_version=_field(r, m, path, "shadow_version", r.string, None),
        outputs=_field(r, m, path, "outputs", lambda n, p: _names(r, n, p), ()),
        agreement=cast(Agreement, agreement),
        threshold=_field(
            r,
            m,
            path,
            "threshold",
            lambda n, p: r.number(n, p, -1e300, 1e300, "that is finite"),
            d.threshold,
        ),
        atol=_field(r, m, path, "atol", lambda n, p: r.number(n, p, 0.0, 1e300, tolerance), d.atol),
        rtol=_field(r, m, path, "rtol", lambda n, p: r.number(n, p, 0.0, 1e300, tolerance), d.rtol),
    )
    if model is None or endpoint is None or protocol is None:
        return None
    return spec


def _sink(r: _Reader, node: YNode, path: str, base_dir: Path) -> SinkSpec | None:
    m = r.mapping(node, path, _SINK)
    if m is None:
        return None
    directory = _required(r, m, path, "directory", r.string)
    spec = SinkSpec(
        # Relative to the policy file, like baselines.
        directory=str((base_dir / directory).absolute()) if directory else "",
        max_bytes=_field(
            r,
            m,
            path,
            "max_bytes",
            lambda n, p: r.integer(n, p, 4096, 1 << 40),
            DEFAULT_SINK_MAX_BYTES,
        ),
        max_files=_field(
            r, m, path, "max_files", lambda n, p: r.integer(n, p, 1, 10_000), DEFAULT_SINK_MAX_FILES
        ),
        values=_field(r, m, path, "values", r.boolean, False),
        max_value_elements=_field(
            r, m, path, "max_value_elements", lambda n, p: r.integer(n, p, 1, 1 << 24), 4096
        ),
    )
    return spec if directory is not None else None


def read_mirror(r: _Reader, node: YNode, path: str, base_dir: Path) -> MirrorSpec:
    """The `mirror:` section; problems go to `r` (the caller refuses the policy if any)."""
    m = r.mapping(node, path, _TOP)
    if m is None:
        return MirrorSpec()
    d = MirrorSpec()
    shadows: list[ShadowSpec] = []
    if "models" in m.items:
        mpath = _join(path, "models")
        seen: dict[str, int] = {}
        for i, item in enumerate(r.sequence(m.items["models"], mpath)):
            ipath = f"{mpath}[{i}]"
            spec = _shadow(r, item, ipath)
            if spec is None:
                continue
            if spec.model in seen:
                line = item.key_lines.get("model", item.line) if isinstance(item, YMap) else 0
                r.error(line, _join(ipath, "model"), f"duplicate of {mpath}[{seen[spec.model]}]")
            seen.setdefault(spec.model, i)
            shadows.append(spec)
    sink = _sink(r, m.items["sink"], _join(path, "sink"), base_dir) if "sink" in m.items else None
    return MirrorSpec(
        shadows=tuple(sorted(shadows, key=lambda s: s.model)),
        sink=sink,
        queue=_field(r, m, path, "queue", lambda n, p: r.integer(n, p, 1, 1_000_000), d.queue),
        workers=_field(r, m, path, "workers", lambda n, p: r.integer(n, p, 1, 64), d.workers),
        timeout_s=_field(r, m, path, "timeout", r.duration, d.timeout_s),
    )
