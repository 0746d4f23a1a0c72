"""What the policy (or `run --otlp-endpoint`) says about tracing: plain data, no OpenTelemetry
import, so a policy can be read and validated without the exporter loaded."""

from __future__ import annotations

from dataclasses import dataclass, replace

DEFAULT_LINK_WINDOW_S = 1.0


@dataclass(frozen=True, slots=True)
class TracingSpec:
    """Spans for decoded model calls, exported over OTLP/gRPC. Off while `endpoint` is empty."""

    endpoint: str = ""  # host:port of an OTLP/gRPC receiver (a collector); "" = no tracing
    sample_ratio: float = 1.0  # share of new traces kept (calls that arrive with one follow it)
    insecure: bool = True  # plaintext gRPC to the receiver (a node-local collector)
    # How long a call without a traceparent waits for the call that contains it (the inbound
    # request of the pod that made it) before it is exported as a root span.
    link_window_s: float = DEFAULT_LINK_WINDOW_S

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)


def with_flags(spec: TracingSpec, endpoint: str | None, sample_ratio: float | None) -> TracingSpec:
    """A policy's tracing section with the command line's flags (given: not None) over it."""
    if endpoint is not None:
        spec = replace(spec, endpoint=endpoint)
    if sample_ratio is not None:
        spec = replace(spec, sample_ratio=sample_ratio)
    return spec
