"""What happens to each record the kernel sends up, on the ring-buffer reader's thread.

    ring record -> decode -> Sample / FlowStart / FlowEnd
    Sample -> WireDecoder (reassembly, HTTP/1, HTTP/2) -> HttpExchange -> metrics, events
    HttpExchange -> model adapters -> InferenceEvent -> inspectors -> Findings
        -> metrics, redacted events, `on_findings` (policy actions, circuit breaker)

Kept free of lifecycle concerns (runtime.py owns threads and the kernel), so it can be driven by
recorded input in tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from infertap.agent.export.event_hub import AgentEvent, EventHub
from infertap.agent.export.metrics import (
    TOKEN_KINDS,
    FlowAccounting,
    InferenceMetrics,
    TrafficMetrics,
)
from infertap.agent.flows.records import (
    ConnectionId,
    FlowCgroup,
    FlowEnd,
    FlowInfo,
    FlowStart,
    Role,
    Sample,
)
from infertap.agent.flows.tls_streams import TlsStreams
from infertap.agent.inspect.engine import InspectionEngine
from infertap.agent.inspect.findings import Finding
from infertap.agent.inspect.traffic_names import safe_name, safe_path
from infertap.agent.kernel.decode import decode_record
from infertap.agent.models.adapt import to_inference_events
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.pod_labels import PodDirectory
from infertap.agent.protocols.messages import HttpExchange, HttpMessage
from infertap.agent.protocols.wire import WireDecoder

log = logging.getLogger(__name__)


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


class Pipeline:
    def __init__(
        self,
        events: EventHub,
        traffic: TrafficMetrics,
        accounting: FlowAccounting,
        pods: PodDirectory,
        on_flow_end: Callable[[FlowInfo], None] = lambda f: None,
        decoder: WireDecoder | None = None,
        inference: InferenceMetrics | None = None,
        engine: InspectionEngine | None = None,
        on_inspected: Callable[[InferenceEvent, list[Finding], int | None], None] = (
            lambda e, f, c: None
        ),
        batch_size: int = 1,
    ) -> None:
        """`batch_size`: model calls inspected together (InspectionEngine.inspect_batch); the
        owner of the read loop calls flush() after each drain so none waits longer than that."""
        self.events = events
        self.traffic = traffic
        self.accounting = accounting
        self.pods = pods
        self.decoder = decoder or WireDecoder()
        self._on_flow_end = on_flow_end
        self.inference = inference
        self.engine = engine
        self._on_inspected = on_inspected
        self.inference_taps: list[Callable[[InferenceEvent], None]] = []
        # The exchange with its decoded call and pod, for mirroring (agent/mirror): it needs the
        # request bytes the event no longer holds. Taps must queue, never block or raise.
        self.exchange_taps: list[
            Callable[[HttpExchange, InferenceEvent, tuple[str, str]], None]
        ] = []
        self._flows: dict[int, FlowInfo] = {}  # cookie -> flow
        # connection -> {role: flow}: which pod a request belongs to, without a scan
        self._by_conn: dict[ConnectionId, dict[Role, FlowInfo]] = {}
        # In-process observers of raw samples (tests, benchmarks). Payload never leaves the process.
        self.sample_taps: list[Callable[[Sample], None]] = []
        self.flow_end_taps: list[Callable[[FlowEnd], None]] = []
        self.batch_size = max(1, batch_size)
        # Decoded calls waiting for inspection: (event, pod, client flow cookie).
        self._pending: list[tuple[InferenceEvent, tuple[str, str], int | None]] = []
        self.tls = TlsStreams()
        self.records = 0
        self.unknown_records = 0
        self.exchanges = 0

    def handle(self, view: memoryview) -> None:
        """One ring-buffer record. Must not raise: the reader thread is the data path's heart."""
        self.records += 1
        try:
            rec = decode_record(view)
            if rec is None:
                self.unknown_records += 1
                return
            if isinstance(rec, Sample):
                for tap in self.sample_taps:
                    tap(rec)
                if rec.tls:
                    self._tls_sample(rec)
                else:
                    self._exchanges(self.decoder.on_sample(rec))
            elif isinstance(rec, FlowStart):
                self._flows[rec.flow.cookie] = rec.flow
                self._by_conn.setdefault(rec.flow.connection, {})[rec.flow.role] = rec.flow
                self.decoder.on_flow_start(rec.flow)
                self.events.publish(AgentEvent("flow_start", rec.ts_ns, flow_dict(rec.flow)))
            elif isinstance(rec, FlowCgroup):
                known = self._flows.get(rec.flow.cookie)
                if known is not None:  # the same object _by_conn holds
                    known.cgroup_id = rec.flow.cgroup_id
            elif isinstance(rec, FlowEnd):
                for end_tap in self.flow_end_taps:
                    end_tap(rec)
                self._flow_end(rec)
        except Exception:  # a bug, not bad input: log it with its traceback, keep reading
            log.exception("record handling failed")

    def _tls_sample(self, rec: Sample) -> None:
        """TLS plaintext: fed as a virtual flow of its own (agent/flows/tls_streams.py)."""
        routed, new_flow = self.tls.route(rec, self._flows.get(rec.cookie))
        if self.tls.dropped(routed):
            return
        if new_flow is not None:
            self.decoder.on_flow_start(new_flow)
        self._exchanges(self.decoder.on_sample(routed))

    def _flow_end(self, rec: FlowEnd) -> None:
        # The socket's plaintext flows end first, while the connection still knows its pods.
        for vcookie in self.tls.socket_ended(rec.flow.cookie):
            self._exchanges(self.decoder.on_flow_end(vcookie))
        known = self._flows.pop(rec.flow.cookie, None)
        flow = rec.flow
        if not flow.cgroup_id and known is not None:
            flow.cgroup_id = known.cgroup_id
        self._exchanges(self.decoder.on_flow_end(flow.cookie, final_offset=flow.stream_bytes))
        ends = self._by_conn.get(flow.connection)
        if ends is not None:
            ends.pop(flow.role, None)
            if not ends:
                del self._by_conn[flow.connection]
        self.accounting.flow_ended(self.pods.labels(flow.cgroup_id), flow)
        self._on_flow_end(flow)
        self.events.publish(AgentEvent("flow_end", rec.ts_ns, flow_dict(flow)))

    def tick(self, now_ns: int) -> None:
        """Called between batches: evict idle streams."""
        self._exchanges(self.decoder.evict_idle(now_ns))

    def _exchanges(self, exchanges: list[HttpExchange]) -> None:
        for ex in exchanges:
            self.exchanges += 1
            req = ex.request
            pod = self.pods.labels(self._cgroup_for(ex))
            if ex.partial:  # a piece of an open stream: its calls now, the request at its end
                if self.inference is not None:
                    self._inference(ex, pod)
                continue
            status = ex.response.status if ex.response is not None else None
            self.traffic.count_http(pod, str(req.connection.server), req.method, status)
            pod_text = "/".join(p for p in pod if p)
            if self.events.wants("http"):  # most agents have no one watching every request
                data: dict[str, Any] = {"request": http_dict(req), "pod": pod_text}
                if ex.response is not None:
                    data["response"] = http_dict(ex.response)
                if ex.latency_ns is not None:
                    data["latency_ms"] = ex.latency_ns / 1e6
                self.events.publish(AgentEvent("http", req.ts_ns, data))
            self._framing_findings(ex, pod_text)
            if self.inference is not None:
                self._inference(ex, pod)

    def _framing_findings(self, ex: HttpExchange, pod: str) -> None:
        """A message whose body length depends on who reads it (Content-Length against
        Transfer-Encoding: request smuggling) is a finding of its own, model call or not."""
        for msg in (ex.request, ex.response):
            if msg is None or not msg.framing_ambiguous:
                continue
            self.events.publish(
                AgentEvent(
                    "finding",
                    msg.ts_ns,
                    {
                        "kind": "protocol",
                        "model": "",
                        "type": "http_ambiguous_framing",
                        "location": msg.direction.value,
                        "severity": "alert",
                        "redacted": "",
                        "value": None,
                        "message": "Content-Length and Transfer-Encoding disagree: the body"
                        " length depends on who reads it",
                        "service": str(msg.connection.server),
                        "client": str(msg.connection.client),
                        "path": safe_path(ex.request.path),
                        "pod": pod,
                    },
                )
            )

    def _inference(self, ex: HttpExchange, pod: tuple[str, str]) -> None:
        ends = self._by_conn.get(ex.request.connection, {})
        client, server = ends.get(Role.CLIENT), ends.get(Role.SERVER)
        events = to_inference_events(
            ex,
            ex.request.connection.server,
            client_cgroup=client.cgroup_id if client else 0,
            server_cgroup=server.cgroup_id if server else 0,
        )
        for event in events:  # several for a stream: each message is its own call
            self._one_inference(ex, event, pod, client)

    def _one_inference(
        self,
        ex: HttpExchange,
        event: InferenceEvent,
        pod: tuple[str, str],
        client: FlowInfo | None,
    ) -> None:
        if self.inference is None:
            return
        if event.unpaired:
            self.decoder.losses.lost("http2", "stream_unpaired", ex.request.connection)
        for tap in self.inference_taps:
            tap(event)
        if not event.stream_index:  # mirroring replays an exchange once: its first call
            for ex_tap in self.exchange_taps:
                ex_tap(ex, event, pod)
        self._pending.append((event, pod, client.cookie if client is not None else None))
        if len(self._pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Inspect the model calls decoded since the last flush, as one batch, then count them
        and hand them on. The reader calls it after every drain; with batch_size 1 every call is
        inspected as soon as it is decoded."""
        pending, self._pending = self._pending, []
        if not pending or self.inference is None:
            return
        try:
            self._inspect(pending)
        except Exception:  # a bug, not bad input: as in handle(), log it and keep reading
            log.exception("inspection of %d calls failed", len(pending))

    def _inspect(self, pending: list[tuple[InferenceEvent, tuple[str, str], int | None]]) -> None:
        assert self.inference is not None
        if self.engine is not None:
            inspected = self.engine.inspect_batch([event for event, _pod, _cookie in pending])
        else:
            inspected = [[] for _ in pending]
        for (event, pod, cookie), findings in zip(pending, inspected, strict=True):
            latency = event.latency_ns / 1e9 if event.latency_ns is not None else None
            self.inference.count(
                pod, event.model, event.version, event.protocol, event.status, latency
            )
            self.inference.count_tokens(event.model, event.usage)
            for f in findings:
                if f.kind == "pii":
                    self.inference.count_pii(pod, event.model, f.type)
                self.events.publish(AgentEvent("finding", event.ts_ns, finding_dict(f)))
            if self.events.wants("inference"):
                summary = self._inference_dict(event, pod)
                self.events.publish(AgentEvent("inference", event.ts_ns, summary))
            self._on_inspected(event, findings, cookie)

    def _inference_dict(self, e: InferenceEvent, pod: tuple[str, str]) -> dict[str, Any]:
        """A redacted summary: names, shapes and types of tensors, never their values."""
        pii = self.engine.pii if self.engine is not None else None
        # Errors can quote what the client sent (a server's "model 'x' not found"): redacted even
        # when the policy turns PII findings off, and with the policy's custom types when on.
        error = pii.redact_text(e.error) if (pii is not None and e.error) else e.error
        error = safe_name(error, 200)
        return {
            "model": e.model,
            "version": e.version,
            "protocol": e.protocol,
            "service": str(e.service),
            "pod": "/".join(p for p in pod if p),
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

    def _cgroup_for(self, exchange: HttpExchange) -> int:
        """The pod a request is counted for: the server's when we see it, else the client's."""
        ends = self._by_conn.get(exchange.request.connection, {})
        flow = ends.get(Role.SERVER) or ends.get(Role.CLIENT)
        return flow.cgroup_id if flow is not None else 0
