"""Shadow mirroring: replay a share of a model's requests to a shadow V2 server and compare.

`ShadowMirror.offer(exchange, event)` runs on the ring-buffer reader's thread, once per decoded
model call, after the primary's response was seen. It decides in microseconds and never waits
or raises: a request not chosen by the share is ignored; one that cannot be replayed whole
(request truncated, headers lost, another protocol than the shadow's, no usable primary
outputs to compare with) or that finds the bounded queue full is counted `skipped`. Worker
threads replay the rest and judge them `agree`, `disagree` or `error` (compare.py).

Replay:
- V2 REST: an HTTP/1.1 POST of the same path (model name/version rewritten to the shadow's
  when configured) with the body and the headers that give it meaning (content-type,
  Inference-Header-Content-Length). The body is the decoded one (de-chunked, decompressed),
  so Content-Encoding is not forwarded and Content-Length is recomputed.
- V2 gRPC: the request's first message parsed as a ModelInferRequest, model name/version
  rewritten, sent as a unary ModelInfer on a grpcio channel (ModelStreamInfer's first message
  is the same message type).

Nothing here logs or publishes a value: events carry the model, the result, the largest
difference and row counts. Error texts are exception type names and status codes only,
because servers quote inputs in their error messages.
"""

from __future__ import annotations

import http.client
import logging
import queue
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import numpy.typing as npt
from tritonclient.grpc import service_pb2, service_pb2_grpc

from infertap.agent.export.event_hub import AgentEvent, EventHub
from infertap.agent.flows.records import Endpoint
from infertap.agent.mirror.compare import Comparison, compare_outputs
from infertap.agent.mirror.shadow_metrics import ShadowMetrics, ShadowResult
from infertap.agent.mirror.spec import MirrorSpec, ShadowSpec
from infertap.agent.models import kserve_v2
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.protocols.messages import HttpExchange

log = logging.getLogger(__name__)

_PROTOCOL_OF: Final = {"rest": kserve_v2.PROTOCOL_REST, "grpc": kserve_v2.PROTOCOL_GRPC}
_FORWARDED_HEADERS: Final = ("content-type", kserve_v2.HEADER_LENGTH)
_DIFF_CAP: Final = 1e12  # a NaN against a number is an infinite difference; histograms need finite
_LOG_EVERY_S: Final = 30.0


@dataclass(slots=True)
class _Job:
    shadow: ShadowSpec
    protocol: str  # "rest" or "grpc"
    path: str  # REST: the rewritten path
    headers: dict[str, str]
    body: bytes  # REST body, or the gRPC request message
    primary: dict[str, npt.NDArray[Any]]
    enqueued: float = field(default_factory=time.monotonic)


def rewrite_rest_path(path: str, shadow: ShadowSpec) -> str | None:
    """The infer path on the shadow: model and version replaced as configured, query kept."""
    base, sep, query = path.partition("?")
    parsed = kserve_v2.parse_infer_path(base)
    if parsed is None:
        return None
    model, version = parsed
    if shadow.shadow_version is not None:
        version = shadow.shadow_version
    elif shadow.shadow_model is not None:
        version = ""  # the primary's version numbering says nothing about another model
    model = shadow.shadow_model or model
    out = "/v2/models/" + urllib.parse.quote(model, safe="")
    if version:
        out += "/versions/" + urllib.parse.quote(version, safe="")
    return out + "/infer" + sep + query


class ShadowMirror:
    """Bounded queue + worker threads; `configure()` swaps the shadows in force at any time."""

    def __init__(
        self,
        events: EventHub | None = None,
        metrics: ShadowMetrics | None = None,
        seed: int | None = None,
    ) -> None:
        self._events = events
        self._metrics = metrics
        self._rng = random.Random(seed)  # only the reader thread draws from it
        self._spec = MirrorSpec()
        self._by_model: dict[str, ShadowSpec] = {}
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=self._spec.queue)
        self._workers: list[threading.Thread] = []
        self._running = False
        self._generation = 0  # bumped by configure: workers drop connections to old shadows
        self._lock = threading.Lock()  # counters, and start/stop/configure
        self.counts: dict[str, int] = {}  # "<result>" and "skipped_<reason>", for tests and top
        self._last_log = 0.0

    # ---- configuration and lifecycle ----

    def configure(self, spec: MirrorSpec) -> None:
        with self._lock:
            resize = (spec.queue, spec.workers) != (self._spec.queue, self._spec.workers)
            running = self._running
        if resize and running:
            self.stop()  # a new queue size or worker count: drain and restart
        with self._lock:
            self._spec = spec
            self._by_model = {s.model: s for s in spec.shadows}
            self._generation += 1
            if resize:
                self._queue = queue.Queue(maxsize=spec.queue)
        if running and (resize or not self._workers):
            self.start()

    def start(self) -> None:
        with self._lock:
            if self._workers:
                return
            self._running = True
            if not self._by_model:
                return  # nothing to mirror: no threads until a policy asks for shadows
            for i in range(self._spec.workers):
                t = threading.Thread(target=self._work, name=f"shadow-{i}", daemon=True)
                t.start()
                self._workers.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            workers, self._workers = self._workers, []
            self._running = False
        # Drop what is waiting (it was never going to be waited for), then wake every worker.
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._skip(job.shadow.model, "stopped")
        for _ in workers:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                break
        for t in workers:
            t.join(timeout=timeout)

    # ---- the reader thread ----

    def offer(self, exchange: HttpExchange, event: InferenceEvent) -> bool:
        """Queue this call for its model's shadow if the share picks it. True if queued."""
        shadow = self._by_model.get(event.model)
        if shadow is None or not self._running:
            return False
        if shadow.share < 1.0 and self._rng.random() >= shadow.share:
            return False
        try:
            job = self._job(exchange, event, shadow)
        except Exception as exc:  # a bug here must not reach the reader thread
            self._skip(shadow.model, f"internal_{type(exc).__name__}")
            return False
        if isinstance(job, str):
            self._skip(shadow.model, job)
            return False
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._skip(shadow.model, "queue_full")
            return False
        return True

    def _job(self, ex: HttpExchange, event: InferenceEvent, shadow: ShadowSpec) -> _Job | str:
        """The replay of this call, or why it cannot be replayed whole."""
        req = ex.request
        if event.request_truncated or req.body_truncated or req.headers_unknown:
            return "truncated"
        if event.protocol != _PROTOCOL_OF[shadow.protocol]:
            return "protocol"
        if event.status != "ok" or event.response_truncated or not event.outputs:
            return "primary_unusable"  # nothing to compare the shadow with
        if shadow.protocol == "grpc":
            if not req.grpc_messages:
                return "truncated"
            return _Job(shadow, "grpc", "", {}, req.grpc_messages[0], event.outputs)
        path = rewrite_rest_path(req.path, shadow)
        if path is None:
            return "protocol"
        headers = {}
        for name in _FORWARDED_HEADERS:
            value = req.header(name)
            if value is not None:
                headers[name] = value
        return _Job(shadow, "rest", path, headers, req.body, event.outputs)

    # ---- accounting ----

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def _skip(self, model: str, reason: str) -> None:
        self._count("skipped")
        self._count(f"skipped_{reason}")
        if self._metrics is not None:
            self._metrics.count(model, "skipped")

    def _result(self, job: _Job, result: ShadowResult, cmp: Comparison | None, why: str) -> None:
        model = job.shadow.model
        self._count(result)
        if why:
            self._count(f"error_{why}")
        diff = None if cmp is None else cmp.max_abs_diff
        if self._metrics is not None:
            self._metrics.count(model, result)
            if diff is not None:
                self._metrics.observe_diff(model, min(diff, _DIFF_CAP))
        if self._events is not None:
            data: dict[str, Any] = {
                "model": model,
                "shadow_model": job.shadow.shadow_model or model,
                "shadow": str(job.shadow.endpoint),
                "protocol": job.protocol,
                "result": result,
                "agree": result == "agree",
                "max_abs_diff": diff,
                "latency_ms": round((time.monotonic() - job.enqueued) * 1e3, 3),
            }
            if cmp is not None:
                data["rows"] = cmp.rows
                data["rows_disagree"] = cmp.rows_disagree
                data["missing_outputs"] = list(cmp.missing)  # names from the policy or primary
            if why:
                data["error"] = why
            self._events.publish(AgentEvent("shadow", time.monotonic_ns(), data))

    # ---- workers ----

    def _work(self) -> None:
        conns: dict[Endpoint, http.client.HTTPConnection] = {}
        channels: dict[Endpoint, tuple[grpc.Channel, Any]] = {}
        generation = -1
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    return
                if generation != self._generation:  # policy changed: forget old shadows
                    _close_all(conns, channels)
                    generation = self._generation
                try:
                    self._replay(job, conns, channels)
                except Exception as exc:  # never let one request end the worker
                    self._result(job, "error", None, type(exc).__name__)
        finally:
            _close_all(conns, channels)

    def _replay(
        self,
        job: _Job,
        conns: dict[Endpoint, http.client.HTTPConnection],
        channels: dict[Endpoint, tuple[grpc.Channel, Any]],
    ) -> None:
        timeout = self._spec.timeout_s
        target = job.shadow.endpoint
        if job.protocol == "rest":
            status, payload = _rest_call(conns, target, job, timeout)
            if status != 200:
                self._result(job, "error", None, f"http_{status}")
                return
        else:
            try:
                payload = _grpc_call(channels, target, job, timeout)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                name = code.name if isinstance(code, grpc.StatusCode) else "rpc_error"
                self._result(job, "error", None, f"grpc_{name}")
                self._log_failure(target, name)
                return
        if payload.problems or payload.error:
            self._result(job, "error", None, "shadow_output_undecodable")
            return
        s = job.shadow
        cmp = compare_outputs(
            job.primary, payload.tensors, s.outputs, s.agreement, s.threshold, s.atol, s.rtol
        )
        self._result(job, "agree" if cmp.agree else "disagree", cmp, "")

    def _log_failure(self, target: Endpoint, what: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:  # a dead shadow must not flood the log
            self._last_log = now
            log.warning("shadow %s failing: %s", target, what)


def _close_all(
    conns: dict[Endpoint, http.client.HTTPConnection],
    channels: dict[Endpoint, tuple[grpc.Channel, Any]],
) -> None:
    for c in conns.values():
        c.close()
    for ch, _stub in channels.values():
        ch.close()
    conns.clear()
    channels.clear()


def _rest_call(
    conns: dict[Endpoint, http.client.HTTPConnection],
    target: Endpoint,
    job: _Job,
    timeout: float,
) -> tuple[int, kserve_v2.V2Payload]:
    """POST the job on a kept-alive connection; one retry on a fresh one if it had gone stale."""
    for attempt in (0, 1):
        conn = conns.get(target)
        fresh = conn is None
        if conn is None:
            conn = http.client.HTTPConnection(target.ip, target.port, timeout=timeout)
            conns[target] = conn
        try:
            conn.request("POST", job.path, body=job.body, headers=job.headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            del conns[target]
            if fresh or attempt:
                raise
            continue  # the server closed an idle keep-alive connection: retry once
        if resp.getheader("connection", "").lower() == "close":
            conn.close()
            del conns[target]
        if resp.status != 200:
            return resp.status, kserve_v2.V2Payload()
        try:
            return 200, kserve_v2.decode_rest_response(
                body, resp.getheader(kserve_v2.HEADER_LENGTH)
            )
        except kserve_v2.V2DecodeError:
            return 200, kserve_v2.V2Payload(problems=["undecodable"])
    raise AssertionError("unreachable")


def _grpc_call(
    channels: dict[Endpoint, tuple[grpc.Channel, Any]],
    target: Endpoint,
    job: _Job,
    timeout: float,
) -> kserve_v2.V2Payload:
    entry = channels.get(target)
    if entry is None:
        channel = grpc.insecure_channel(
            str(target),
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ],
        )
        entry = (channel, service_pb2_grpc.GRPCInferenceServiceStub(channel))
        channels[target] = entry
    request = service_pb2.ModelInferRequest.FromString(job.body)
    s = job.shadow
    if s.shadow_model is not None:
        request.model_name = s.shadow_model
        request.model_version = s.shadow_version or ""
    elif s.shadow_version is not None:
        request.model_version = s.shadow_version
    response = entry[1].ModelInfer(request, timeout=timeout)
    try:
        return kserve_v2.decode_grpc_response(response)
    except kserve_v2.V2DecodeError:
        return kserve_v2.V2Payload(problems=["undecodable"])
