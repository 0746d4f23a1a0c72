"""What the agent's events say: the JSON shapes of flow, HTTP, finding and inference events, and
the pipeline sink that publishes them to the event hub (the API's StreamEvents, the CLI's `top`).

Redacted by construction: no header values, no query strings, no tensor values; findings carry
redacted values only; an adapter's error text goes through the PII scanner first.
"""

from __future__ import annotations

from typing import Any

from infertap.agent.export.event_hub import AgentEvent, EventHub
from infertap.agent.export.metrics import TOKEN_KINDS
from infertap.agent.flows.records import FlowEnd, FlowInfo
from infertap.agent.inspect.engine import InspectionEngine
from infertap.agent.inspect.findings import Finding
from infertap.agent.inspect.traffic_names import safe_name, safe_path
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.pipeline import Inspected, PipelineSink
from infertap.agent.pod_labels import PodLabels
from infertap.agent.protocols.messages import HttpExchange, HttpMessage


def flow_dict(flow: FlowInfo) -> dict[str, Any]:
    return {
        "id": flow.cookie,
        "role": flow.role.name.lower(),
        "local": str(flow.local),
        "remote": str(flow.remote),
        "service": str(flow.service),
        "cgroup_id": flow.cgroup_id,
        "messages": flow.messages,
        "bytes": flow.bytes,
        "drops": flow.drops,
        "unseen_bytes": flow.unseen_bytes,
        "stream_bytes": flow.stream_bytes,
    }


def finding_dict(f: Finding) -> dict[str, Any]:
    """Findings carry redacted values only (the inspectors never hold raw ones in a Finding)."""
    return {
        "kind": f.kind,
        "model": f.model,
        "type": f.type,
        "location": f.location,
        "severity": f.severity,
        "redacted": f.redacted,
        "value": f.value,
        "message": f.message,
    }


def http_dict(msg: HttpMessage) -> dict[str, Any]:
    """Header names and values are left out on purpose: they may carry PII."""
    return {
        "direction": msg.direction.value,
        "protocol": msg.protocol,
        "method": msg.method,
        "path": safe_path(msg.path),  # no query string, PII redacted, bounded
        "status": msg.status,
        "content_length": msg.content_length,
        "stream_id": msg.stream_id,
        "client": str(msg.connection.client),
        "service": str(msg.connection.server),
    }


def pod_name(pod: PodLabels) -> str:
    """ "namespace/name", or what is known of it."""
    return "/".join(p for p in pod if p)


def exchange_dict(ex: HttpExchange, pod: PodLabels) -> dict[str, Any]:
    data: dict[str, Any] = {"request": http_dict(ex.request), "pod": pod_name(pod)}
    if ex.response is not None:
        data["response"] = http_dict(ex.response)
    if ex.latency_ns is not None:
        data["latency_ms"] = ex.latency_ns / 1e6
    return data


AMBIGUOUS_FRAMING = (
    "Content-Length and Transfer-Encoding disagree: the body length depends on who reads it"
)


def framing_finding_dict(ex: HttpExchange, msg: HttpMessage, pod: str) -> dict[str, Any]:
    """A message whose body length depends on who reads it (Content-Length against
    Transfer-Encoding: request smuggling) is a finding of its own, model call or not."""
    return {
        "kind": "protocol",
        "model": "",
        "type": "http_ambiguous_framing",
        "location": msg.direction.value,
        "severity": "alert",
        "redacted": "",
        "value": None,
        "message": AMBIGUOUS_FRAMING,
        "service": str(msg.connection.server),
        "client": str(msg.connection.client),
        "path": safe_path(ex.request.path),
        "pod": pod,
    }


def inference_dict(e: InferenceEvent, pod: PodLabels, error: str) -> dict[str, Any]:
    """A redacted summary: names, shapes and types of tensors, never their values. `error` is
    the event's error text, already redacted and bounded."""
    return {
        "model": e.model,
        "version": e.version,
        "protocol": e.protocol,
        "service": str(e.service),
        "pod": pod_name(pod),
        "status": e.status,
        "error": error,
        "latency_ms": e.latency_ns / 1e6 if e.latency_ns is not None else None,
        "inputs": [
            {
                "name": n,
                "shape": list(a.shape),
                "datatype": e.input_datatypes.get(n, str(a.dtype)),
            }
            for n, a in e.inputs.items()
        ],
        "outputs": sorted(e.outputs),
        "request_truncated": e.request_truncated,
        "payload_bytes": e.payload_bytes,
        "stream_index": e.stream_index,
        "unpaired": e.unpaired,
        # OpenAI-style token usage, the known keys only (the server chooses the names).
        "usage": {k: v for k, v in e.usage.items() if k in TOKEN_KINDS},
    }


class EventSink(PipelineSink):
    """Publishes flow_start, flow_end, http, finding and inference events."""

    def __init__(self, hub: EventHub, engine: InspectionEngine | None = None) -> None:
        self._hub = hub
        self._engine = engine  # its PII scanner redacts adapters' error texts

    def on_flow_start(self, flow: FlowInfo, ts_ns: int) -> None:
        self._hub.publish(AgentEvent("flow_start", ts_ns, flow_dict(flow)))

    def on_flow_end(self, end: FlowEnd) -> None:
        self._hub.publish(AgentEvent("flow_end", end.ts_ns, flow_dict(end.flow)))

    def on_exchange(self, exchange: HttpExchange, pod: PodLabels) -> None:
        if self._hub.wants("http"):  # most agents have no one watching every request
            data = exchange_dict(exchange, pod)
            self._hub.publish(AgentEvent("http", exchange.request.ts_ns, data))
        for msg in (exchange.request, exchange.response):
            if msg is not None and msg.framing_ambiguous:
                data = framing_finding_dict(exchange, msg, pod_name(pod))
                self._hub.publish(AgentEvent("finding", msg.ts_ns, data))

    def on_inference(self, inspected: Inspected) -> None:
        event = inspected.event
        for f in inspected.findings:
            self._hub.publish(AgentEvent("finding", event.ts_ns, finding_dict(f)))
        if not self._hub.wants("inference"):
            return
        pii = self._engine.pii if self._engine is not None else None
        # Errors can quote what the client sent (a server's "model 'x' not found"): redacted even
        # when the policy turns PII findings off, and with the policy's custom types when on.
        error = pii.redact_text(event.error) if (pii is not None and event.error) else event.error
        error = safe_name(error, 200)
        data = inference_dict(event, inspected.pod, error)
        self._hub.publish(AgentEvent("inference", event.ts_ns, data))
