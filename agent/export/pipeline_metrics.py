"""The pipeline's results as metrics: a PipelineSink over the metric objects of metrics.py."""

from __future__ import annotations

from infertap.agent.export.metrics import FlowAccounting, InferenceMetrics, TrafficMetrics
from infertap.agent.flows.records import FlowEnd
from infertap.agent.pipeline import Inspected, PipelineSink
from infertap.agent.pod_labels import PodDirectory, PodLabels
from infertap.agent.protocols.messages import HttpExchange


class PipelineMetrics(PipelineSink):
    """The pipeline's results as metrics: flows ended, HTTP requests, model calls, PII hits."""

    def __init__(
        self,
        traffic: TrafficMetrics,
        accounting: FlowAccounting,
        inference: InferenceMetrics,
        pods: PodDirectory,
    ) -> None:
        self._traffic = traffic
        self._accounting = accounting
        self._inference = inference
        self._pods = pods

    def on_flow_end(self, end: FlowEnd) -> None:
        self._accounting.flow_ended(self._pods.labels(end.flow.cgroup_id), end.flow)

    def on_exchange(self, exchange: HttpExchange, pod: PodLabels) -> None:
        req = exchange.request
        status = exchange.response.status if exchange.response is not None else None
        self._traffic.count_http(pod, str(req.connection.server), req.method, status)

    def on_skipped(self, model: str, reason: str) -> None:
        self._inference.count_skipped(model, reason)

    def on_inference(self, inspected: Inspected) -> None:
        e, pod = inspected.event, inspected.pod
        latency = e.latency_ns / 1e9 if e.latency_ns is not None else None
        self._inference.count(pod, e.model, e.version, e.protocol, e.status, latency)
        self._inference.count_tokens(e.model, e.usage)
        for f in inspected.findings:
            if f.kind == "pii":
                self._inference.count_pii(pod, e.model, f.type)
