"""What happens to each record the kernel sends up, on the ring-buffer reader's thread.

    ring record -> decode -> Sample / FlowStart / FlowCgroup / FlowEnd / Shed
    Sample (TLS plaintext: routed to a virtual flow first, agent/flows/tls_streams.py)
        -> WireDecoder (reassembly, HTTP/1, HTTP/2) -> HttpExchange
    HttpExchange -> model adapters -> InferenceEvent -> inspectors (in batches) -> Findings

Everything that acts on the results is a PipelineSink, registered once (`add_sink`): metrics
(agent/export/metrics.py), events (agent/export/events.py), the findings' actions
(agent/enforce/actions.py), mirroring (agent/mirror/mirror.py), and in-process observers in tests
and benchmarks. Sinks run on the reader thread: they must never block or raise (a sink that
raises costs the record, which is logged).

The one flow table is the wire decoder's (agent/flows/table.py): each exchange comes out stamped
with its connection's client and server flows. Other threads (the API) read state only through
`snapshot()`.

Kept free of lifecycle concerns (runtime.py owns threads and the kernel), so it can be driven by
recorded input in tests.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from infertap.agent.flows.records import (
    ConnectionId,
    Endpoint,
    FlowCgroup,
    FlowEnd,
    FlowInfo,
    FlowStart,
    Role,
    Sample,
    Shed,
)
from infertap.agent.flows.tls_streams import TlsStreams
from infertap.agent.inspect.engine import InspectionEngine
from infertap.agent.inspect.findings import Finding
from infertap.agent.kernel.decode import decode_record
from infertap.agent.models.adapt import to_inference_events
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.pod_labels import PodDirectory, PodLabels
from infertap.agent.protocols.messages import HttpExchange
from infertap.agent.protocols.wire import WireDecoder

log = logging.getLogger(__name__)

# Reasons of infertap_inspection_skipped_total: a fixed set.
SKIP_OVERLOAD = "overload"  # one HTTP/1 request (with its response) not sampled
SKIP_OVERLOAD_CONNECTION = "overload_connection"  # a whole connection not sampled
SKIP_REASONS = (SKIP_OVERLOAD, SKIP_OVERLOAD_CONNECTION)
# Connections and services whose model is remembered for skipped-call labels (LRU bound).
MAX_MODEL_MEMORY = 65536
_K = TypeVar("_K")


@dataclass(slots=True)
class Inspected:
    """A decoded model call and what the inspectors found in it."""

    exchange: HttpExchange  # with the request bytes the event no longer holds (mirroring)
    event: InferenceEvent
    pod: PodLabels  # the server's pod when intercepted, else the client's
    findings: list[Finding] = field(default_factory=list)
    client_flow: int | None = None  # the client flow's cookie, when intercepted (block_flow)


class PipelineSink:
    """What the pipeline hands on. Override the methods you need; the others cost nothing (the
    pipeline calls a sink only for the methods it overrides)."""

    def on_sample(self, sample: Sample) -> None:
        """Every payload sample, before decoding. The payload must never leave the process."""

    def on_flow_start(self, flow: FlowInfo, ts_ns: int) -> None:
        """A flow the kernel started intercepting."""

    def on_flow_end(self, end: FlowEnd) -> None:
        """A flow's socket closed (its cgroup filled in when it became known later), after the
        exchanges its end completed."""

    def on_exchange(self, exchange: HttpExchange, pod: PodLabels) -> None:
        """Every HTTP exchange (request, and its response when seen). A stream handed out in
        pieces (`partial`) comes here once, whole, when it closes."""

    def on_inference(self, inspected: Inspected) -> None:
        """Every model call an adapter decoded, with its findings (often none). A stream
        (gRPC ModelStreamInfer) gives one per message, all with the same exchange; the first
        has `event.stream_index` 0."""

    def on_skipped(self, model: str, reason: str) -> None:
        """A call (or, reason overload_connection, a connection) not inspected on purpose:
        the kernel shed it under overload. `model`: the connection's last decoded model, else
        its service's, else "" (unknown)."""


_METHODS = (
    "on_sample",
    "on_flow_start",
    "on_flow_end",
    "on_exchange",
    "on_inference",
    "on_skipped",
)


@dataclass(frozen=True)
class PipelineSnapshot:
    """A consistent copy of the pipeline's state, safe to read from any thread."""

    protocols: dict[int, str]  # flow cookie -> protocol detected ("" not yet)
    uninspected: dict[int, str]  # flow cookie -> why none of it is decoded (only such flows)
    decoder_stats: dict[str, int]
    records: int
    unknown_records: int
    exchanges: int
    skipped: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, reason) -> n


def _remember(memory: OrderedDict[_K, str], key: _K, model: str) -> None:
    """Note a key's model in a bounded LRU memory."""
    if memory.get(key) == model:
        return
    memory[key] = model
    memory.move_to_end(key)
    if len(memory) > MAX_MODEL_MEMORY:
        memory.popitem(last=False)


class Pipeline:
    def __init__(
        self,
        pods: PodDirectory,
        sinks: Iterable[PipelineSink] = (),
        *,
        engine: InspectionEngine | None = None,
        decoder: WireDecoder | None = None,
        batch_size: int = 1,
    ) -> None:
        """`batch_size`: model calls inspected together (InspectionEngine.inspect_batch); the
        owner of the read loop calls flush() after each drain so none waits longer than that."""
        self.pods = pods
        self.engine = engine
        self.decoder = decoder or WireDecoder()
        self._sinks: list[PipelineSink] = []
        self._by_method: dict[str, list[PipelineSink]] = {m: [] for m in _METHODS}
        for sink in sinks:
            self.add_sink(sink)
        # handle() and tick() hold it; snapshot() takes it to copy a consistent state.
        self._lock = threading.Lock()
        self.batch_size = max(1, batch_size)
        # Decoded calls waiting for inspection: (exchange, event, pod, client flow cookie).
        self._pending: list[tuple[HttpExchange, InferenceEvent, PodLabels, int | None]] = []
        self.tls = TlsStreams()
        self.records = 0
        self.unknown_records = 0
        self.exchanges = 0
        # Calls skipped under overload by (model, reason); the model each connection and each
        # service last decoded, to name the model of what is skipped.
        self.skipped: Counter[tuple[str, str]] = Counter()
        self._conn_model: OrderedDict[ConnectionId, str] = OrderedDict()
        self._service_model: OrderedDict[Endpoint, str] = OrderedDict()

    def add_sink(self, sink: PipelineSink) -> None:
        """Register a sink (safe while the reader runs: the lists are replaced, not changed)."""
        self._sinks = [*self._sinks, sink]
        by_method = {}
        for name in _METHODS:
            base = getattr(PipelineSink, name)
            by_method[name] = [s for s in self._sinks if getattr(type(s), name, base) is not base]
        self._by_method = by_method
        self._on_sample = by_method["on_sample"]
        self._on_flow_start = by_method["on_flow_start"]
        self._on_flow_end = by_method["on_flow_end"]
        self._on_exchange = by_method["on_exchange"]
        self._on_inference = by_method["on_inference"]
        self._on_skipped = by_method["on_skipped"]

    @property
    def sinks(self) -> list[PipelineSink]:
        return list(self._sinks)

    def handle(self, view: memoryview) -> None:
        """One ring-buffer record. Must not raise: the reader thread is the data path's heart."""
        with self._lock:
            self.records += 1
            try:
                rec = decode_record(view)
                if rec is None:
                    self.unknown_records += 1
                    return
                if isinstance(rec, Sample):
                    for sink in self._on_sample:
                        sink.on_sample(rec)
                    if rec.tls:
                        self._tls_sample(rec)
                    else:
                        self._exchanges(self.decoder.on_sample(rec))
                elif isinstance(rec, FlowStart):
                    self.decoder.on_flow_start(rec.flow)
                    for sink in self._on_flow_start:
                        sink.on_flow_start(rec.flow, rec.ts_ns)
                elif isinstance(rec, FlowCgroup):
                    self.decoder.flows.set_cgroup(rec.flow.cookie, rec.flow.cgroup_id)
                elif isinstance(rec, Shed):
                    self._shed(rec)
                elif isinstance(rec, FlowEnd):
                    self._flow_end(rec)
            except Exception:  # a bug, not bad input: log it with its traceback, keep reading
                log.exception("record handling failed")

    def _tls_sample(self, rec: Sample) -> None:
        """TLS plaintext: fed as a virtual flow of its own (agent/flows/tls_streams.py)."""
        routed, new_flow = self.tls.route(rec, self.decoder.flows.get(rec.cookie))
        if self.tls.dropped(routed):
            return
        if new_flow is not None:
            self.decoder.on_flow_start(new_flow, virtual=True)
        self._exchanges(self.decoder.on_sample(routed))

    def _shed(self, rec: Shed) -> None:
        """A request (or connection) the kernel shed: counted once per call, on the client's
        record (on the server's only when the client end is not intercepted)."""
        flow = self.decoder.flows.get(rec.cookie)
        count = True
        model = ""
        if flow is not None:
            conn = flow.connection
            if rec.role is Role.SERVER and self.decoder.flows.ends(conn)[0] is not None:
                count = False
            model = self._conn_model.get(conn) or self._service_model.get(flow.service, "")
        if count:
            reason = SKIP_OVERLOAD_CONNECTION if rec.connection else SKIP_OVERLOAD
            self.skipped[(model, reason)] += 1
            for sink in self._on_skipped:
                sink.on_skipped(model, reason)
        self._exchanges(self.decoder.on_shed(rec))

    def _remember_model(self, conn: ConnectionId, model: str) -> None:
        _remember(self._conn_model, conn, model)
        _remember(self._service_model, conn.server, model)

    def _flow_end(self, rec: FlowEnd) -> None:
        # The socket's plaintext flows end first, while the connection still knows its pods.
        for vcookie in self.tls.socket_ended(rec.flow.cookie):
            self._exchanges(self.decoder.on_flow_end(vcookie))
        flow = rec.flow
        known = self.decoder.flows.get(flow.cookie)
        if not flow.cgroup_id and known is not None:
            flow.cgroup_id = known.cgroup_id
        self._exchanges(self.decoder.on_flow_end(flow.cookie, final_offset=flow.stream_bytes))
        for sink in self._on_flow_end:
            sink.on_flow_end(rec)

    def tick(self, now_ns: int) -> None:
        """Called between batches: evict idle streams."""
        with self._lock:
            self._exchanges(self.decoder.evict_idle(now_ns))

    def snapshot(self) -> PipelineSnapshot:
        with self._lock:
            return PipelineSnapshot(
                protocols=self.decoder.protocols(),
                uninspected=self.decoder.uninspected_reasons(),
                decoder_stats=self.decoder.stats,
                records=self.records,
                unknown_records=self.unknown_records,
                exchanges=self.exchanges,
                skipped=dict(self.skipped),
            )

    def skipped_counts(self) -> dict[tuple[str, str], int]:
        """Calls skipped under overload by (model, reason) (any thread)."""
        with self._lock:
            return dict(self.skipped)

    def _exchanges(self, exchanges: list[HttpExchange]) -> None:
        for ex in exchanges:
            self.exchanges += 1
            # The pod a request is counted for: the server's when we see it, else the client's.
            flow = ex.server_flow or ex.client_flow
            pod = self.pods.labels(flow.cgroup_id if flow is not None else 0)
            if ex.partial:  # a piece of an open stream: its calls now, the request at its end
                self._inference(ex, pod)
                continue
            for sink in self._on_exchange:
                sink.on_exchange(ex, pod)
            self._inference(ex, pod)

    def _inference(self, ex: HttpExchange, pod: PodLabels) -> None:
        client, server = ex.client_flow, ex.server_flow
        events = to_inference_events(
            ex,
            ex.request.connection.server,
            client_cgroup=client.cgroup_id if client else 0,
            server_cgroup=server.cgroup_id if server else 0,
        )
        client_cookie = client.cookie if client is not None else None
        if events and events[0].model:
            self._remember_model(ex.request.connection, events[0].model)
        for event in events:  # several for a stream: each message is its own call
            if event.unpaired:
                self.decoder.losses.lost("http2", "stream_unpaired", ex.request.connection)
            self._pending.append((ex, event, pod, client_cookie))
            if len(self._pending) >= self.batch_size:
                self._flush()

    def flush(self) -> None:
        """Inspect the model calls decoded since the last flush, as one batch, then hand them
        to the sinks. The reader calls it after every drain; with batch_size 1 every call is
        inspected as soon as it is decoded."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self._inspect(pending)
        except Exception:  # a bug, not bad input: as in handle(), log it and keep reading
            log.exception("inspection of %d calls failed", len(pending))

    def _inspect(
        self, pending: list[tuple[HttpExchange, InferenceEvent, PodLabels, int | None]]
    ) -> None:
        if self.engine is not None:
            results = self.engine.inspect_batch([event for _ex, event, _pod, _c in pending])
        else:
            results = [[] for _ in pending]
        sinks = self._on_inference
        for (ex, event, pod, cookie), findings in zip(pending, results, strict=True):
            inspected = Inspected(ex, event, pod, findings, cookie)
            for sink in sinks:
                sink.on_inference(inspected)
