"""The `mirror:` policy section as plain frozen dataclasses, and its normalized document form.

policy.py validates YAML into these; schema.py's Policy holds one MirrorSpec and puts
`mirror_document()` into the content hash only when something is configured, so policies that
say nothing about mirroring keep the hash they had before this section existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from infertap.agent.flows.records import Endpoint

ShadowProtocol = Literal["rest", "grpc"]
SHADOW_PROTOCOLS: Final[tuple[ShadowProtocol, ...]] = get_args(ShadowProtocol)
# How a shadow's outputs are judged against the primary's (compare.py).
Agreement = Literal["values", "argmax", "threshold"]
AGREEMENTS: Final[tuple[Agreement, ...]] = get_args(Agreement)

DEFAULT_SINK_MAX_BYTES: Final = 64 * 1024 * 1024
DEFAULT_SINK_MAX_FILES: Final = 5


@dataclass(frozen=True, slots=True)
class ShadowSpec:
    """Mirror `share` of `model`'s requests to a shadow V2 server at `endpoint`."""

    model: str
    endpoint: Endpoint  # the shadow server's ip:port
    protocol: ShadowProtocol  # requests of the other protocol are skipped, never translated
    share: float = 1.0  # 0..1 of the model's whole requests
    shadow_model: str | None = None  # None: the primary's model name
    shadow_version: str | None = None  # None: the primary's version (none with shadow_model)
    outputs: tuple[str, ...] = ()  # outputs compared; empty: every output the primary returned
    agreement: Agreement = "values"
    threshold: float = 0.5  # agreement "threshold": float outputs compared as x >= threshold
    atol: float = 1e-6  # agreement "values": floats agree when allclose(atol, rtol)
    rtol: float = 1e-5


@dataclass(frozen=True, slots=True)
class SinkSpec:
    """Redacted inference records as JSONL files in `directory`, rotated by size and count."""

    directory: str  # absolute
    max_bytes: int = DEFAULT_SINK_MAX_BYTES  # per file
    max_files: int = DEFAULT_SINK_MAX_FILES  # oldest files are deleted beyond this
    values: bool = False  # also write values of numeric tensors (never BYTES, never parameters)
    max_value_elements: int = 4096  # per tensor; larger tensors are written without values


@dataclass(frozen=True, slots=True)
class MirrorSpec:
    shadows: tuple[ShadowSpec, ...] = ()
    sink: SinkSpec | None = None
    queue: int = 256  # shadow requests waiting to be replayed; more are skipped and counted
    workers: int = 2
    timeout_s: float = 2.0  # per shadow call

    @property
    def configured(self) -> bool:
        return bool(self.shadows) or self.sink is not None

    def shadow_for(self, model: str) -> ShadowSpec | None:
        for s in self.shadows:
            if s.model == model:
                return s
        return None


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def mirror_document(spec: MirrorSpec) -> dict[str, Any]:
    """Normalized plain data: valid policy YAML for the `mirror:` section."""
    doc: dict[str, Any] = {
        "queue": spec.queue,
        "workers": spec.workers,
        "timeout": _number(spec.timeout_s),
        "models": [
            {
                "model": s.model,
                "endpoint": str(s.endpoint),
                "protocol": s.protocol,
                "share": s.share,
                **({"shadow_model": s.shadow_model} if s.shadow_model is not None else {}),
                **({"shadow_version": s.shadow_version} if s.shadow_version is not None else {}),
                "outputs": list(s.outputs),
                "agreement": s.agreement,
                "threshold": s.threshold,
                "atol": s.atol,
                "rtol": s.rtol,
            }
            for s in spec.shadows
        ],
    }
    if spec.sink is not None:
        k = spec.sink
        doc["sink"] = {
            "directory": k.directory,
            "max_bytes": k.max_bytes,
            "max_files": k.max_files,
            "values": k.values,
            "max_value_elements": k.max_value_elements,
        }
    return doc
