"""Distributed tracing: an OpenTelemetry span for every decoded model call, exported over OTLP.

    pipeline (reader thread) -> CallTracer.on_inference (a PipelineSink)  plain CallRecord, queued
    worker thread -> CallLinker (who is whose parent) -> OpenTelemetry SDK -> OTLP/gRPC exporter

One call gives up to two spans: a CLIENT span when the client's socket is intercepted and a
SERVER span (its child) when the server's is, so the two views of one call are linked. Times are
the kernel's timestamps of the first and last bytes sent (CLOCK_MONOTONIC, turned into wall time).

Parents, in this order:
1. A W3C `traceparent` (and `tracestate`) the application sent, in HTTP/1 headers or gRPC
   metadata (both are HTTP headers on the wire): infertap's spans join the application's trace.
2. Containment within a pod: a call made by pod P while exactly one inbound call to P was in
   flight (the outbound one started after and ended before it) is a child of that inbound call's
   SERVER span. This follows a chain of services (client -> feature service -> model) with no
   change to them, as long as each hop's two sockets are intercepted. A call contained in two
   inbound calls is not guessed at: it becomes a root, counted `ambiguous`.
3. None: a root span.
Every call waits `link_window_s` for the inbound call that may contain it (children complete
before their parent does), then goes out with everything it contains.

What a span carries: method, path without the query, status, addresses, ports, model name,
version and protocol, pod names, OpenTelemetry's rpc.* / http.* / url.* / server.* and gen_ai.*
(OpenAI-style calls: model, operation, token counts). Never a header value (the trace context is
parsed, not copied), a query string, a body, a tensor, a prompt or an error text.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from infertap.agent.export.tracing_spec import TracingSpec
from infertap.agent.flows.records import Endpoint
from infertap.agent.inspect.traffic_names import safe_path
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.pipeline import Inspected, PipelineSink
from infertap.agent.protocols.messages import HttpExchange, HttpMessage

log = logging.getLogger(__name__)

AttrValue = str | int | float | bool
PodLabels = tuple[str, str]  # (namespace, name); ("", cgroup path) for unnamed cgroups
QUEUE_LIMIT = 10_000  # calls waiting for the worker; more are dropped and counted
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_MAX_TRACESTATE = 512  # W3C: receivers may drop longer ones


@dataclass(frozen=True, slots=True)
class RemoteParent:
    """The trace context an application sent with a call (already validated)."""

    trace_id: int
    span_id: int
    sampled: bool
    tracestate: str = ""


def parse_traceparent(value: str) -> RemoteParent | None:
    """A W3C traceparent header (version 00 and future versions read as 00), or None."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    if parts[0] == "00" and len(parts) != 4:
        return None
    version, trace_hex, span_hex, flags_hex = parts[:4]
    if len(trace_hex) != 32 or len(span_hex) != 16 or len(flags_hex) != 2:
        return None
    try:
        int(version, 16)
        trace_id, span_id, flags = int(trace_hex, 16), int(span_hex, 16), int(flags_hex, 16)
    except ValueError:
        return None
    if trace_hex != trace_hex.lower() or span_hex != span_hex.lower():
        return None
    if trace_id == 0 or span_id == 0:
        return None
    return RemoteParent(trace_id, span_id, bool(flags & 1))


def remote_parent(msg: HttpMessage) -> RemoteParent | None:
    """The trace context a request carries: HTTP/1 headers and gRPC metadata alike."""
    raw = msg.header(TRACEPARENT)
    if raw is None:
        return None
    parent = parse_traceparent(raw)
    if parent is None:
        return None
    state = msg.header(TRACESTATE) or ""
    if len(state) > _MAX_TRACESTATE:
        state = ""
    return RemoteParent(parent.trace_id, parent.span_id, parent.sampled, state)


@dataclass(slots=True)
class CallRecord:
    """One model call, as the spans need it: no payload, no header values."""

    name: str
    start_ns: int  # kernel time: the client's first request byte
    server_start_ns: int  # kernel time: the last request byte (the server has it all)
    end_ns: int  # kernel time: the last response byte (or request byte, if no response)
    attributes: dict[str, AttrValue]
    client_attributes: dict[str, AttrValue]
    server_attributes: dict[str, AttrValue]
    client_cgroup: int  # 0: the client's socket is not intercepted (no CLIENT span)
    server_cgroup: int  # 0: the server's socket is not intercepted (no SERVER span)
    client_error: bool
    server_error: bool
    error_type: str
    parent: RemoteParent | None
    arrived_s: float = 0.0  # monotonic time the worker got it


def _grpc_method(path: str) -> tuple[str, str]:
    service, _, method = path.strip("/").partition("/")
    return service, method


def _openai_operation(path: str) -> str:
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/embeddings"):
        return "embeddings"
    return "text_completion"


def _endpoint_attrs(prefix: str, ep: Endpoint) -> dict[str, AttrValue]:
    return {f"{prefix}.address": ep.ip, f"{prefix}.port": ep.port} if ep.port else {}


def _pod_attrs(labels: PodLabels) -> dict[str, AttrValue]:
    namespace, name = labels
    if namespace:
        return {"k8s.namespace.name": namespace, "k8s.pod.name": name}
    return {"infertap.cgroup": name} if name else {}


def call_record(
    exchange: HttpExchange,
    event: InferenceEvent,
    client_pod: PodLabels,
    server_pod: PodLabels,
    *,
    tls: bool = False,
) -> CallRecord:
    """Everything the spans of one call need, read on the reader thread (cheap, no OTel)."""
    req, resp = exchange.request, exchange.response
    path = safe_path(req.path)  # no query, PII redacted (agent/inspect/traffic_names.py)
    conn = req.connection
    attrs: dict[str, AttrValue] = {
        **_endpoint_attrs("server", conn.server),
        "infertap.model.protocol": event.protocol,
    }
    if event.model:
        attrs["infertap.model.name"] = event.model
    if event.version:
        attrs["infertap.model.version"] = event.version
    if event.request_truncated:
        attrs["infertap.request.truncated"] = True
    if event.response_truncated:
        attrs["infertap.response.truncated"] = True
    client_error = server_error = False
    error_type = ""
    if req.is_grpc:
        service, method = _grpc_method(path)
        name = f"{service}/{method}"
        attrs.update(
            {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": method,
                "network.protocol.name": "http",
                "network.protocol.version": "2",
            }
        )
        code = resp.grpc_status() if resp is not None else None
        if code is not None:
            attrs["rpc.grpc.status_code"] = code
            # gRPC semantic conventions: these codes are a server error; any non-zero is a
            # client error.
            client_error = code != 0
            server_error = code in (2, 4, 12, 13, 14, 15)
            error_type = str(code) if code != 0 else ""
    else:
        name = f"{req.method} {path}"
        attrs.update(
            {
                "http.request.method": req.method,
                "url.path": path,
                "url.scheme": "https" if tls else "http",
                "network.protocol.name": "http",
                "network.protocol.version": req.protocol.removeprefix("http/").replace("h2", "2"),
            }
        )
        if resp is not None and resp.status:
            attrs["http.response.status_code"] = resp.status
            client_error = resp.status >= 400
            server_error = resp.status >= 500
            error_type = str(resp.status) if client_error else ""
    if event.protocol == "openai":
        attrs.update(
            {
                "gen_ai.system": "openai",
                "gen_ai.provider.name": "openai",
                "gen_ai.operation.name": _openai_operation(path),
            }
        )
        if event.model:
            attrs["gen_ai.request.model"] = event.model
        if "prompt_tokens" in event.usage:
            attrs["gen_ai.usage.input_tokens"] = event.usage["prompt_tokens"]
        if "completion_tokens" in event.usage:
            attrs["gen_ai.usage.output_tokens"] = event.usage["completion_tokens"]
    if resp is None:
        client_error = server_error = True
        error_type = "no_response"
    if error_type:
        attrs["error.type"] = error_type
    end_ns = max(req.end_ts_ns, resp.end_ts_ns if resp is not None else 0)
    server_start = req.end_ts_ns if resp is None else min(req.end_ts_ns, resp.ts_ns)
    return CallRecord(
        name=name,
        start_ns=req.ts_ns,
        server_start_ns=max(req.ts_ns, server_start),
        end_ns=max(end_ns, req.ts_ns),
        attributes=attrs,
        client_attributes=_pod_attrs(client_pod),
        server_attributes={**_endpoint_attrs("client", conn.client), **_pod_attrs(server_pod)},
        client_cgroup=event.client_cgroup,
        server_cgroup=event.server_cgroup,
        client_error=client_error,
        server_error=server_error,
        error_type=error_type,
        parent=remote_parent(req),
    )


@dataclass(eq=False, slots=True)
class CallNode:
    """A call in the linker, with the calls it contains (its outbound calls)."""

    call: CallRecord
    children: list[CallNode] = field(default_factory=list)
    parent: CallNode | None = None
    released: bool = False  # handed out for export

    def root(self) -> CallNode:
        node = self
        while node.parent is not None:
            node = node.parent
        return node


class CallLinker:
    """Decides each call's parent (see the module doc). Pure logic, driven by the worker; `now`
    is monotonic seconds. Bounded: a call is held at most `window_s` and at most `limit` are
    held; inbound calls are remembered `window_s` for ambiguity checks."""

    def __init__(self, window_s: float, limit: int = QUEUE_LIMIT) -> None:
        self.window_s = window_s
        self.limit = limit
        self._held: list[CallNode] = []  # calls with no parent yet, oldest first
        self._recent_inbound: list[CallNode] = []  # calls with a SERVER side, oldest first
        self.stats: Counter[str] = Counter()

    def add(self, call: CallRecord, now: float) -> list[CallNode]:
        """Take a call; returns trees ready to export now."""
        call.arrived_s = now
        node = CallNode(call)
        if call.parent is not None:
            self.stats["parent_traceparent"] += 1
        if call.server_cgroup:
            self._claim_children(node)
            self._recent_inbound.append(node)
        self._held.append(node)
        ready: list[CallNode] = []
        while len(self._held) > self.limit:
            ready.append(self._release(self._held[0]))
        return ready + self.due(now)

    def due(self, now: float) -> list[CallNode]:
        """Trees whose root waited out the window (in arrival order)."""
        limit = now - self.window_s
        self._recent_inbound = [n for n in self._recent_inbound if n.call.arrived_s >= limit]
        return [self._release(n) for n in [n for n in self._held if n.call.arrived_s < limit]]

    def flush(self) -> list[CallNode]:
        ready = [self._release(n) for n in list(self._held)]
        self._recent_inbound.clear()
        return ready

    def _release(self, node: CallNode) -> CallNode:
        self._held.remove(node)
        node.released = True
        if node.call.parent is None:
            self.stats["roots"] += 1
        return node

    def _claim_children(self, inbound: CallNode) -> None:
        """Held calls made by the pod `inbound` arrived at, during it, become its children."""
        pod = inbound.call.server_cgroup
        lo, hi = inbound.call.start_ns, inbound.call.end_ns

        def inside(c: CallRecord) -> bool:
            return (
                c.parent is None and c.client_cgroup == pod and lo <= c.start_ns <= c.end_ns <= hi
            )

        for node in [n for n in self._held if inside(n.call)]:
            self._held.remove(node)
            node.parent = inbound
            inbound.children.append(node)
            self.stats["parent_contained"] += 1
        # A child an earlier inbound call (not exported yet) claimed that this one contains too:
        # which of the two it belongs to cannot be told from timing, so it becomes a root.
        for other in self._recent_inbound:
            if other.call.server_cgroup != pod or other.root().released:
                continue
            for child in [c for c in other.children if inside(c.call)]:
                other.children.remove(child)
                child.parent = None
                self.stats["parent_contained"] -= 1
                self.stats["ambiguous"] += 1
                self._held.append(child)


class _Exporter:
    """The OpenTelemetry SDK side: a tracer provider with a batch OTLP/gRPC exporter."""

    def __init__(self, spec: TracingSpec, exporter: Any = None) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        self.provider = TracerProvider(
            resource=Resource.create({"service.name": "infertap"}),
            sampler=ParentBased(root=TraceIdRatioBased(spec.sample_ratio)),
        )
        if exporter is None:
            exporter = OTLPSpanExporter(endpoint=spec.endpoint, insecure=spec.insecure)
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=500, max_queue_size=QUEUE_LIMIT)
        )
        self.tracer = self.provider.get_tracer("infertap")
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC; spans want wall time.
        self.wall_offset_ns = time.time_ns() - time.monotonic_ns()

    def emit(self, node: CallNode, parent_ctx: Any = None) -> int:
        """Spans for a call and everything it contains. Returns how many were made."""
        from opentelemetry import trace
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
            TraceState,
        )

        call = node.call
        off = self.wall_offset_ns
        if parent_ctx is None and call.parent is not None:
            p = call.parent
            state = _trace_state(TraceState, p.tracestate)
            remote = SpanContext(
                p.trace_id,
                p.span_id,
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED if p.sampled else 0),
                trace_state=state,
            )
            parent_ctx = trace.set_span_in_context(NonRecordingSpan(remote))
        made = 0
        ctx = parent_ctx
        client_span = None
        if call.client_cgroup:
            client_span = self.tracer.start_span(
                call.name,
                context=ctx,
                kind=SpanKind.CLIENT,
                attributes={**call.attributes, **call.client_attributes},
                start_time=call.start_ns + off,
            )
            if call.client_error:
                client_span.set_status(Status(StatusCode.ERROR))
            ctx = trace.set_span_in_context(client_span)
            made += 1
        server_ctx = ctx
        server_span = None
        if call.server_cgroup:
            server_span = self.tracer.start_span(
                call.name,
                context=ctx,
                kind=SpanKind.SERVER,
                attributes={**call.attributes, **call.server_attributes},
                start_time=call.server_start_ns + off,
            )
            if call.server_error:
                server_span.set_status(Status(StatusCode.ERROR))
            server_ctx = trace.set_span_in_context(server_span)
            made += 1
        for child in node.children:
            made += self.emit(child, server_ctx)
        if server_span is not None:
            server_span.end(end_time=call.end_ns + off)
        if client_span is not None:
            client_span.end(end_time=call.end_ns + off)
        return made

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what is queued


def _trace_state(cls: Any, header: str) -> Any:
    try:
        return cls.from_header([header]) if header else cls()
    except Exception:  # a malformed tracestate is dropped, the traceparent still counts
        return cls()


_STOP = object()


class CallTracer(PipelineSink):
    """The pipeline's tracing sink. `tap` runs on the reader thread: it never blocks or raises.
    Off until `configure` gets an enabled spec; `configure` with a disabled one flushes and stops
    exporting. `exporter` replaces the OTLP exporter (tests)."""

    def __init__(
        self,
        labels: Any = None,
        exporter: Any = None,
        is_tls: Any = None,
    ) -> None:
        self._labels = labels  # cgroup id -> PodLabels (PodDirectory.labels)
        self._is_tls = is_tls  # ConnectionId -> bool: decoded from TLS plaintext (url.scheme)
        self._custom_exporter = exporter
        self.spec = TracingSpec()
        self.stats: Counter[str] = Counter()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_LIMIT)
        self._lock = threading.Lock()
        self._exporter: _Exporter | None = None
        self._linker = CallLinker(self.spec.link_window_s)
        self._thread: threading.Thread | None = None
        self._enabled = False

    @property
    def enabled(self) -> bool:
        return self._enabled

    def configure(self, spec: TracingSpec) -> None:
        """Put a tracing spec in force (from the policy or the flags)."""
        with self._lock:
            if spec == self.spec and (self._thread is not None) == spec.enabled:
                return
            self._stop_locked()
            self.spec = spec
            if not spec.enabled:
                return
            self._exporter = _Exporter(spec, self._custom_exporter)
            self._linker = CallLinker(spec.link_window_s)
            self._queue = queue.Queue(maxsize=QUEUE_LIMIT)
            self._thread = threading.Thread(target=self._run, name="tracing", daemon=True)
            self._thread.start()
            self._enabled = True
            log.info("tracing: spans to %s (sample ratio %s)", spec.endpoint, spec.sample_ratio)

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        self._enabled = False
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)  # the worker drains what is queued, flushes, then ends
            thread.join(timeout=10)
        exporter, self._exporter = self._exporter, None
        if exporter is not None:
            exporter.shutdown()

    # -- the pipeline's sink (reader thread) --------------------------------------------------

    def on_inference(self, inspected: Inspected) -> None:
        if inspected.event.stream_index:  # a stream's exchange is traced once: its first call
            return
        self.tap(inspected.exchange, inspected.event, inspected.pod)

    def tap(self, exchange: HttpExchange, event: InferenceEvent, pod: PodLabels) -> None:
        if not self._enabled:
            return
        try:
            labels = self._labels
            client_pod = labels(event.client_cgroup) if labels else ("", "")
            server_pod = labels(event.server_cgroup) if labels else ("", "")
            tls = bool(self._is_tls(exchange.request.connection)) if self._is_tls else False
            record = call_record(exchange, event, client_pod, server_pod, tls=tls)
        except Exception:
            self.stats["record_failures"] += 1
            log.debug("tracing: call not recorded", exc_info=False)
            return
        try:
            self._queue.put_nowait(record)
            self.stats["calls"] += 1
        except queue.Full:
            self.stats["dropped_queue_full"] += 1

    # -- worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        exporter, linker, q = self._exporter, self._linker, self._queue
        assert exporter is not None
        while True:
            try:
                item = q.get(timeout=min(0.25, self.spec.link_window_s))
            except queue.Empty:
                item = None
            now = time.monotonic()
            if item is _STOP:
                self._export(exporter, linker.flush())
                break
            ready = linker.add(item, now) if item is not None else linker.due(now)
            self._export(exporter, ready)

    def _export(self, exporter: _Exporter, trees: list[CallNode]) -> None:
        for tree in trees:
            try:
                self.stats["spans"] += exporter.emit(tree)
            except Exception:
                self.stats["export_failures"] += 1
                log.exception("tracing: spans not made")

    def counters(self) -> dict[str, int]:
        out = dict(self.stats)
        out.update({f"linker_{k}": v for k, v in self._linker.stats.items()})
        return out
