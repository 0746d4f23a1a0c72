"""OpenAI-style APIs: /v1/chat/completions, /v1/completions, /v1/embeddings.

What is kept: the model, the text sent (messages, prompt, input) in `texts`, scalar request
options (temperature, max_tokens, stream, ...) in `parameters`, token usage from the response,
generated text in `output_texts`, and embeddings as an output tensor. Streaming responses
(server-sent events, `data: {...}` chunks ending in `data: [DONE]`) are read chunk by chunk:
deltas are joined per choice and usage is taken from the chunk that carries it, if any does.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
import numpy.typing as npt

from infertap.agent.flows.records import Endpoint
from infertap.agent.models.common import add_error as _add_error
from infertap.agent.models.common import read_rest_response, request_event
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.protocols.messages import HttpExchange, HttpMessage

PROTOCOL = "openai"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")

# Request keys whose values are text (go to `texts`) or identify a person (dropped), never
# copied into `parameters`.
_TEXT_KEYS = frozenset({"messages", "prompt", "input", "suffix", "instructions"})
_DROPPED_KEYS = frozenset({"user", "model"})


class OpenAIDecodeError(ValueError):
    """A payload that does not decode. The message never contains text."""


def is_openai_path(path: str) -> bool:
    return path.split("?", 1)[0].endswith(ENDPOINTS)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise OpenAIDecodeError("body is not JSON") from exc


def _content_texts(content: Any) -> list[str]:
    """Text of a chat message's content: a string, or a list of parts with text."""
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
    return out


def _prompt_texts(prompt: Any) -> list[str]:
    """A prompt/input: a string, a list of strings, or token ids (which carry no text here)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        return [p for p in prompt if isinstance(p, str)]
    return []


def request_texts(doc: dict[str, Any]) -> list[str]:
    texts: list[str] = []
    if isinstance(doc.get("instructions"), str):
        texts.append(doc["instructions"])
    messages = doc.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                texts.extend(_content_texts(m.get("content")))
    texts.extend(_prompt_texts(doc.get("prompt")))
    texts.extend(_prompt_texts(doc.get("input")))
    if isinstance(doc.get("suffix"), str):
        texts.append(doc["suffix"])
    return texts


def _usage(obj: Any) -> dict[str, int]:
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(v, int) and not isinstance(v, bool)}


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _embeddings(data: Any) -> npt.NDArray[Any] | None:
    """(N, dim) array of embeddings: FP64 from JSON floats, FP32 from base64 (float32 bytes)."""
    if not isinstance(data, list) or not data:
        return None
    vectors = [d.get("embedding") for d in data if isinstance(d, dict)]
    if len(vectors) != len(data):
        return None
    encoded = [v for v in vectors if isinstance(v, str)]
    if len(encoded) == len(vectors):
        try:
            raw = [base64.b64decode(v, validate=True) for v in encoded]
        except (binascii.Error, ValueError):
            return None
        if len({len(r) for r in raw}) != 1 or len(raw[0]) % 4:
            return None
        return np.stack([np.frombuffer(r, dtype="<f4").astype(np.float32) for r in raw])
    lists = [v for v in vectors if isinstance(v, list) and all(_is_number(x) for x in v)]
    if len(lists) == len(vectors) and len({len(v) for v in lists}) == 1:
        return np.array(lists, dtype=np.float64)
    return None


def _choice_texts(choices: Any, into: dict[int, list[str]], delta: bool) -> None:
    if not isinstance(choices, list):
        return
    for i, c in enumerate(choices):
        if not isinstance(c, dict):
            continue
        idx = c.get("index", i)
        idx = idx if isinstance(idx, int) else i
        if isinstance(c.get("text"), str):
            into.setdefault(idx, []).append(c["text"])
        msg = c.get("delta" if delta else "message")
        if isinstance(msg, dict):
            into.setdefault(idx, []).extend(_content_texts(msg.get("content")))


def sse_events(body: bytes) -> list[str]:
    """The data payloads of a server-sent event stream (multi-line data joined by newlines)."""
    text = body.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    out: list[str] = []
    data: list[str] = []
    for line in text.split("\n"):
        if not line:
            if data:
                out.append("\n".join(data))
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        out.append("\n".join(data))  # a stream cut off without its final blank line
    return out


def _is_sse(msg: HttpMessage) -> bool:
    ctype = (msg.header("content-type") or "").lower()
    return ctype.startswith("text/event-stream") or msg.body.lstrip().startswith(b"data:")


def _finish_reason(choices: Any) -> bool:
    return isinstance(choices, list) and any(
        isinstance(c, dict) and c.get("finish_reason") for c in choices
    )


def _complete_sse_prefix(body: bytes) -> bytes:
    """The events of an SSE body cut short that were whole (up to the last blank line)."""
    text = body.replace(b"\r\n", b"\n")
    end = text.rfind(b"\n\n")
    return text[: end + 2] if end >= 0 else b""


def _error_text(err: Any) -> str:
    if isinstance(err, dict):
        return str(err.get("message", "error"))
    return str(err)


def _decode_response(event: InferenceEvent, resp: HttpMessage) -> None:
    texts: dict[int, list[str]] = {}
    if _is_sse(resp):
        finished = False  # [DONE], or a finish_reason: the stream ran to its end
        for data in sse_events(resp.body):
            if data.strip() == "[DONE]":
                finished = True
                break
            try:
                chunk = json.loads(data)
            except (ValueError, RecursionError):
                _add_error(event, "response: stream chunk is not JSON")
                continue
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                _add_error(event, _error_text(chunk["error"]))
            if isinstance(chunk.get("model"), str) and not event.model:
                event.model = chunk["model"]
            usage = _usage(chunk.get("usage"))
            if usage:
                event.usage = usage
            _choice_texts(chunk.get("choices"), texts, delta=True)
            finished = finished or _finish_reason(chunk.get("choices"))
        event.parameters.setdefault("stream", True)
        if not finished:
            # What came is kept, but the completion is not whole: never one complete-looking
            # event of a stream's first chunks.
            event.response_truncated = True
            _add_error(event, "response: stream ended before its last chunk")
    else:
        doc = _json(resp.body)
        if not isinstance(doc, dict):
            raise OpenAIDecodeError("body is not a JSON object")
        if "error" in doc:
            _add_error(event, _error_text(doc["error"]))
        if isinstance(doc.get("model"), str) and not event.model:
            event.model = doc["model"]
        event.usage = _usage(doc.get("usage"))
        _choice_texts(doc.get("choices"), texts, delta=False)
        emb = _embeddings(doc.get("data"))
        if emb is not None:
            event.outputs["embeddings"] = emb
            event.output_datatypes["embeddings"] = "FP32" if emb.dtype == np.float32 else "FP64"
    event.output_texts = ["".join(parts) for _, parts in sorted(texts.items())]


def decode_exchange(exchange: HttpExchange, service: Endpoint) -> InferenceEvent:
    """An InferenceEvent from an OpenAI-style exchange."""
    event, body = request_event(exchange, service, PROTOCOL)
    if body is not None:
        try:
            doc = _json(body)
            if not isinstance(doc, dict):
                raise OpenAIDecodeError("body is not a JSON object")
            if isinstance(doc.get("model"), str):
                event.model = doc["model"]
            event.texts = request_texts(doc)
            event.parameters = {
                k: v
                for k, v in doc.items()
                if k not in _TEXT_KEYS
                and k not in _DROPPED_KEYS
                and isinstance(v, str | int | float | bool)
            }
            if isinstance(doc.get("prompt"), list) and not event.texts:
                event.parameters["prompt_token_ids"] = True  # tokens, not text
        except OpenAIDecodeError as exc:
            _add_error(event, f"request: {exc}")
    resp = exchange.response
    if resp is not None and resp.body_truncated and _is_sse(resp):
        # A streamed answer with a hole: its whole events before the hole still decode (each
        # is a JSON document of its own), and the event says it is incomplete.
        event.status = "ok" if resp.status == 200 else str(resp.status)
        prefix = HttpMessage(
            resp.connection,
            resp.direction,
            resp.protocol,
            resp.ts_ns,
            resp.end_ts_ns,
            status=resp.status,
            headers=resp.headers,
            body=_complete_sse_prefix(resp.body),
        )
        _decode_response(event, prefix)
        event.response_truncated = True
        return event
    read_rest_response(
        event, exchange.response, lambda resp: _decode_response(event, resp), (OpenAIDecodeError,)
    )
    return event
