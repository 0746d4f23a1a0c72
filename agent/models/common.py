"""What every model adapter does the same way: the request half (the event for the call, and the
request body only when whole), collecting errors, and reading an HTTP response (status,
truncation, then a protocol-specific body decoder)."""

from __future__ import annotations

from collections.abc import Callable

from infertap.agent.flows.records import Endpoint
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.protocols.messages import HttpExchange, HttpMessage


def request_event(
    exchange: HttpExchange, service: Endpoint, protocol: str, model: str = "", version: str = ""
) -> tuple[InferenceEvent, bytes | None]:
    """The event for a call, and the request body to decode: None when the sampling cut the
    body (bytes may be missing from its middle, so any tensor could be misaligned: nothing of it
    is decoded, and the event says `request_truncated`)."""
    req = exchange.request
    event = InferenceEvent(
        service=service, model=model, version=version, protocol=protocol, ts_ns=req.ts_ns
    )
    if req.body_truncated:
        event.request_truncated = True
        return event, None
    return event, req.body


def add_error(event: InferenceEvent, text: str) -> None:
    event.error = f"{event.error}; {text}" if event.error else text


def read_rest_response(
    event: InferenceEvent,
    resp: HttpMessage | None,
    decode_body: Callable[[HttpMessage], None],
    decode_errors: tuple[type[Exception], ...],
) -> None:
    """Status and outputs from a REST response. A truncated body is flagged, never decoded; a
    body the decoder rejects becomes an error on the event, never an exception."""
    if resp is None:
        return
    event.status = "ok" if resp.status == 200 else str(resp.status)
    if resp.body_truncated:
        event.response_truncated = True
        return
    if not resp.body:
        return
    try:
        decode_body(resp)
    except decode_errors as exc:
        add_error(event, f"response: {exc}")
