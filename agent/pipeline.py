"""What happens to each record the kernel sends up, on the ring-buffer reader's thread.

    ring record -> decode -> Sample / FlowStart / FlowEnd
    Sample -> WireDecoder (reassembly, HTTP/1, HTTP/2) -> HttpExchange -> metrics, events

Kept free of lifecycle concerns (runtime.py owns threads and the kernel), so it can be driven by
recorded input in tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from infertap.agent.export.events import AgentEvent, EventHub
from infertap.agent.export.metrics import FlowAccounting, TrafficMetrics
from infertap.agent.flows.records import ConnectionId, FlowEnd, FlowInfo, FlowStart, Role, Sample
from infertap.agent.kernel.decode import decode_record
from infertap.agent.pods import PodDirectory
from infertap.agent.protocols.classify import WireDecoder
from infertap.agent.protocols.messages import HttpExchange, HttpMessage

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


def http_dict(msg: HttpMessage) -> dict[str, Any]:
    """Header names and values are left out on purpose: they may carry PII."""
    return {
        "direction": msg.direction.value,
        "protocol": msg.protocol,
        "method": msg.method,
        "path": msg.path.split("?", 1)[0],  # query strings may carry PII
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
    ) -> None:
        self.events = events
        self.traffic = traffic
        self.accounting = accounting
        self.pods = pods
        self.decoder = decoder or WireDecoder()
        self._on_flow_end = on_flow_end
        self._flows: dict[int, FlowInfo] = {}  # cookie -> flow
        # connection -> {role: flow}: which pod a request belongs to, without a scan
        self._by_conn: dict[ConnectionId, dict[Role, FlowInfo]] = {}
        # In-process observers of raw samples (tests, benchmarks). Payload never leaves the process.
        self.sample_taps: list[Callable[[Sample], None]] = []
        self.flow_end_taps: list[Callable[[FlowEnd], None]] = []
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
                self._exchanges(self.decoder.on_sample(rec))
            elif isinstance(rec, FlowStart):
                self._flows[rec.flow.cookie] = rec.flow
                self._by_conn.setdefault(rec.flow.connection, {})[rec.flow.role] = rec.flow
                self.decoder.on_flow_start(rec.flow)
                self.events.publish(AgentEvent("flow_start", rec.ts_ns, flow_dict(rec.flow)))
            elif isinstance(rec, FlowEnd):
                for end_tap in self.flow_end_taps:
                    end_tap(rec)
                self._flow_end(rec)
        except Exception:  # a bug, not bad input: log it with its traceback, keep reading
            log.exception("record handling failed")

    def _flow_end(self, rec: FlowEnd) -> None:
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
            status = ex.response.status if ex.response is not None else None
            self.traffic.count_http(pod, str(req.connection.server), req.method, status)
            data: dict[str, Any] = {"request": http_dict(req), "pod": "/".join(p for p in pod if p)}
            if ex.response is not None:
                data["response"] = http_dict(ex.response)
            if ex.latency_ns is not None:
                data["latency_ms"] = ex.latency_ns / 1e6
            self.events.publish(AgentEvent("http", req.ts_ns, data))

    def _cgroup_for(self, exchange: HttpExchange) -> int:
        """The pod a request is counted for: the server's when we see it, else the client's."""
        ends = self._by_conn.get(exchange.request.connection, {})
        flow = ends.get(Role.SERVER) or ends.get(Role.CLIENT)
        return flow.cgroup_id if flow is not None else 0
