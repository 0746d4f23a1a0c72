"""HttpExchange -> InferenceEvent: pick the model protocol and decode it, never raising.

Dispatch is by path (and by content-type for gRPC):
- gRPC (`application/grpc*` over h2) to `/inference.GRPCInferenceService/ModelInfer` or
  `ModelStreamInfer`: KServe V2 gRPC. Other gRPC methods (health, metadata) are not inference.
- `POST /v2/models/{m}[/versions/{v}]/infer`: KServe V2 REST (JSON or binary extension).
- `POST /v1/models/{m}[/versions/{v}|/labels/{l}]:predict`: TF Serving REST.
- `POST .../v1/chat/completions`, `/v1/completions`, `/v1/embeddings`: OpenAI-style.
Anything else is not model traffic: None.

Model names, versions, paths and errors come from the client or the server: they are redacted of
PII and bounded here (agent/inspect/traffic_names.py), before anything reads the event.

Garbage never raises: each adapter reports what did not decode in `error`, and a failure inside an
adapter itself becomes an event whose `error` names the exception type only (exception texts can
quote payload bytes, which may be PII). Counters (`adapter_counters()`) tell how often each case
happened, for the agent's metrics.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from infertap.agent.flows.records import Endpoint
from infertap.agent.inspect.traffic_names import safe_name, safe_path
from infertap.agent.models import kserve_v2, openai, tfserving
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.protocols.messages import HttpExchange, HttpMessage

Decoder = Callable[[HttpExchange, Endpoint], InferenceEvent]

_lock = threading.Lock()
_counters: Counter[str] = Counter()


def _count(key: str) -> None:
    with _lock:
        _counters[key] += 1


def adapter_counters() -> dict[str, int]:
    """Counts since start: events by protocol, not_model, headers_unknown, decode_errors,
    adapter_failures, request_truncated, response_truncated."""
    with _lock:
        return dict(_counters)


@dataclass(frozen=True, slots=True)
class ModelAdapter:
    """One model protocol: which requests are its calls (by path, without the query string),
    and the decoder of such an exchange."""

    protocol: str
    grpc: bool  # gRPC requests (application/grpc over h2) or REST POSTs
    matches: Callable[[str], bool]
    decode: Decoder


# The registry, in the order requests are tried. A new model protocol is one entry here.
ADAPTERS: tuple[ModelAdapter, ...] = (
    ModelAdapter(
        kserve_v2.PROTOCOL_GRPC,
        True,
        lambda path: path in kserve_v2.GRPC_INFER_METHODS,
        kserve_v2.decode_grpc_exchange,
    ),
    ModelAdapter(
        kserve_v2.PROTOCOL_REST,
        False,
        lambda path: kserve_v2.parse_infer_path(path) is not None,
        kserve_v2.decode_rest_exchange,
    ),
    ModelAdapter(
        tfserving.PROTOCOL,
        False,
        lambda path: tfserving.parse_predict_path(path) is not None,
        tfserving.decode_exchange,
    ),
    ModelAdapter(openai.PROTOCOL, False, openai.is_openai_path, openai.decode_exchange),
)


def classify(request: HttpMessage) -> tuple[str, Decoder] | None:
    """(protocol, decoder) for a request, or None when it is not a model call we decode. Other
    gRPC methods (health, metadata) and REST requests other than POST are not model calls."""
    path = request.path.split("?", 1)[0]
    grpc = request.is_grpc
    if not grpc and request.method != "POST":
        return None
    for adapter in ADAPTERS:
        if adapter.grpc == grpc and adapter.matches(path):
            return adapter.protocol, adapter.decode
    return None


def to_inference_events(
    exchange: HttpExchange,
    service: Endpoint,
    client_cgroup: int = 0,
    server_cgroup: int = 0,
) -> list[InferenceEvent]:
    """The model calls in an exchange: one for a unary call, one per request message of a
    V2 gRPC stream (ModelStreamInfer), none for traffic that is not a model call."""
    req = exchange.request
    if (
        req.is_grpc
        and not req.headers_unknown
        and req.path.split("?", 1)[0] == kserve_v2.GRPC_STREAM_INFER
    ):
        try:
            events = kserve_v2.decode_grpc_stream_exchange(exchange, service)
        except Exception as exc:  # an adapter bug must not take the sample path down
            _count("adapter_failures")
            events = [_failed(exchange, service, kserve_v2.PROTOCOL_GRPC, exc)]
        for event in events:
            _finish(event, exchange, client_cgroup, server_cgroup)
            if event.unpaired:
                _count("stream_unpaired")
        return events
    unary = to_inference_event(exchange, service, client_cgroup, server_cgroup)
    return [] if unary is None else [unary]


def _failed(
    exchange: HttpExchange, service: Endpoint, protocol: str, exc: Exception
) -> InferenceEvent:
    req = exchange.request
    return InferenceEvent(
        service=service,
        model="",
        version="",
        protocol=protocol,
        ts_ns=req.ts_ns,
        error=f"adapter failure: {type(exc).__name__}",
        request_truncated=req.body_truncated,
    )


def _finish(
    event: InferenceEvent, exchange: HttpExchange, client_cgroup: int, server_cgroup: int
) -> None:
    """What every event gets from its exchange, and the counters."""
    req = exchange.request
    # Names the client chose leave here redacted of PII and bounded (agent/inspect/traffic_names):
    # metrics, events, the mirror sink, top and logs all read them from this event.
    event.model = safe_name(event.model)
    event.version = safe_name(event.version)
    event.endpoint = safe_path(req.path)
    event.error = safe_name(event.error, 512)  # servers quote names back ("unknown model 'x'")
    event.client_cgroup = client_cgroup
    event.server_cgroup = server_cgroup
    if event.stream_index is None:  # a streamed call has its own, from its messages
        event.latency_ns = exchange.latency_ns
    if event.stream_index is None:
        event.payload_bytes = req.content_length if req.content_length >= 0 else len(req.body)
    elif 0 <= event.stream_index - exchange.stream_offset < len(req.grpc_messages):
        event.payload_bytes = len(req.grpc_messages[event.stream_index - exchange.stream_offset])
    _count(f"events_{event.protocol}")
    if event.error:
        _count("decode_errors")
    if event.request_truncated:
        _count("request_truncated")
    if event.response_truncated:
        _count("response_truncated")


def to_inference_event(
    exchange: HttpExchange,
    service: Endpoint,
    client_cgroup: int = 0,
    server_cgroup: int = 0,
) -> InferenceEvent | None:
    """The model call in an exchange, or None for traffic that is not a model call. (A stream's
    first call only: the pipeline uses to_inference_events.)"""
    req = exchange.request
    if req.headers_unknown:
        # HPACK state was lost: path and content-type cannot be trusted, so the call cannot be
        # told apart from other traffic. Counted so the gap is visible.
        _count("headers_unknown")
        return None
    try:
        kind = classify(req)
    except Exception:
        _count("adapter_failures")
        return None
    if kind is None:
        _count("not_model")
        return None
    protocol, decode = kind
    try:
        event = decode(exchange, service)
    except Exception as exc:  # an adapter bug must not take the sample path down
        _count("adapter_failures")
        event = _failed(exchange, service, protocol, exc)
    _finish(event, exchange, client_cgroup, server_cgroup)
    return event
