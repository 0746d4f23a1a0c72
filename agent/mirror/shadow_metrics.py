"""Shadow metrics (names in agent/export/metric_names.py). The model label holds only models
the policy mirrors, so it stays bounded; values and payloads are never labels."""

from __future__ import annotations

from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram

ShadowResult = Literal["agree", "disagree", "error", "skipped"]
RESULTS: Final[tuple[ShadowResult, ...]] = ("agree", "disagree", "error", "skipped")
# Absolute differences span float rounding (1e-7) to "a different model" (1 and more).
DIFF_BUCKETS: Final = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0, 100.0)


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "infertap_shadow_requests_total",
            "Requests mirrored to a shadow model, by result: agree, disagree, error (the shadow"
            " call failed), skipped (truncated, queue full, protocol or primary unusable).",
            labelnames=("model", "result"),
            registry=registry,
        )
        self.max_abs_diff = Histogram(
            "infertap_shadow_max_abs_diff",
            "Largest absolute difference between shadow and primary outputs, per request.",
            labelnames=("model",),
            buckets=DIFF_BUCKETS,
            registry=registry,
        )

    def count(self, model: str, result: ShadowResult) -> None:
        self.requests.labels(model, result).inc()

    def observe_diff(self, model: str, diff: float) -> None:
        self.max_abs_diff.labels(model).observe(diff)
