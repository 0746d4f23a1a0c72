"""TF Serving predict and OpenAI-style adapters: tensors, texts, usage, streaming, garbage."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infertap.agent.flows.records import ConnectionId, Direction, Endpoint
from infertap.agent.models import tfserving
from infertap.agent.models.adapt import adapter_counters, to_inference_event
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.protocols.messages import HttpExchange, HttpMessage

SERVICE = Endpoint("10.1.0.5", 8501)
CONN = ConnectionId(Endpoint("10.1.0.9", 40000), SERVICE)


def exchange(
    path: str,
    body: bytes,
    resp_body: bytes | None = None,
    status: int = 200,
    resp_headers: list[tuple[str, str]] | None = None,
    method: str = "POST",
) -> HttpExchange:
    req = HttpMessage(
        CONN,
        Direction.REQUEST,
        "http/1.1",
        ts_ns=1_000,
        end_ts_ns=1_100,
        method=method,
        path=path,
        headers=[("content-type", "application/json"), ("content-length", str(len(body)))],
        body=body,
        content_length=len(body),
    )
    resp = None
    if resp_body is not None:
        resp = HttpMessage(
            CONN,
            Direction.RESPONSE,
            "http/1.1",
            ts_ns=9_000,
            end_ts_ns=9_500,
            status=status,
            headers=resp_headers or [("content-type", "application/json")],
            body=resp_body,
        )
    return HttpExchange(req, resp)


def event(ex: HttpExchange) -> InferenceEvent:
    ev = to_inference_event(ex, SERVICE, 1, 2)
    assert ev is not None
    return ev


def exact(got: npt.NDArray[Any] | None, want: npt.NDArray[Any]) -> None:
    assert got is not None
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=want.dtype.kind == "f")


def objs(*items: Any) -> npt.NDArray[Any]:
    a = np.empty(len(items), dtype=object)
    a[:] = list(items)
    return a


# ---------------------------------------------------------------------------------------------
# TF Serving


def test_tfserving_row_format_named_inputs() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\xff"
    body = {
        "signature_name": "serving_default",
        "instances": [
            {
                "age": 31,
                "tags": ["a", "b"],
                "score": 0.5,
                "img": {"b64": base64.b64encode(png).decode()},
            },
            {"age": -4, "tags": ["c", "déjà"], "score": 2, "img": {"b64": ""}},
        ],
    }
    resp = {"predictions": [[0.125, 0.875], [0.75, 0.25]]}
    ev = event(
        exchange(
            "/v1/models/churn/versions/3:predict",
            json.dumps(body).encode(),
            json.dumps(resp).encode(),
        )
    )
    assert (ev.protocol, ev.model, ev.version, ev.status, ev.error) == (
        "tfserving-rest",
        "churn",
        "3",
        "ok",
        "",
    )
    assert ev.parameters == {"signature_name": "serving_default", "format": "row"}
    exact(ev.inputs["age"], np.array([31, -4], dtype=np.int64))
    exact(ev.inputs["score"], np.array([0.5, 2.0]))
    tags = np.empty((2, 2), dtype=object)
    tags[:] = [[b"a", b"b"], [b"c", "déjà".encode()]]
    exact(ev.inputs["tags"], tags)
    exact(ev.inputs["img"], objs(png, b""))
    assert ev.input_datatypes == {"age": "INT64", "tags": "BYTES", "score": "FP64", "img": "BYTES"}
    assert ev.texts == ["a", "b", "c", "déjà"]  # b64 binaries are not text
    exact(ev.outputs["predictions"], np.array([[0.125, 0.875], [0.75, 0.25]]))
    assert ev.latency_ns == 8_000 and ev.endpoint == "/v1/models/churn/versions/3:predict"


def test_tfserving_row_format_unnamed_and_bools() -> None:
    body = b'{"instances": [[1.0, 2.5], [3, -0.0]]}'
    resp = b'{"predictions": [true, false]}'
    ev = event(exchange("/v1/models/m:predict", body, resp))
    exact(ev.inputs["instances"], np.array([[1.0, 2.5], [3.0, -0.0]]))
    exact(ev.outputs["predictions"], np.array([True, False]))
    assert ev.version == ""


def test_tfserving_columnar_format() -> None:
    body = b'{"inputs": {"x": [[1, 2], [3, 4]], "q": "what is my balance?"}}'
    resp = b'{"outputs": {"scores": [[0.5], [0.25]], "classes": [["yes"], ["no"]]}}'
    ev = event(exchange("/v1/models/m/labels/stable:predict", body, resp))
    assert ev.version == "label:stable" and ev.parameters["format"] == "columnar"
    exact(ev.inputs["x"], np.array([[1, 2], [3, 4]], dtype=np.int64))
    q = np.empty((), dtype=object)
    q[()] = b"what is my balance?"
    exact(ev.inputs["q"], q)
    assert ev.texts == ["what is my balance?"]
    exact(ev.outputs["scores"], np.array([[0.5], [0.25]]))
    classes = np.empty((2, 1), dtype=object)
    classes[:] = [[b"yes"], [b"no"]]
    exact(ev.outputs["classes"], classes)
    ev = event(exchange("/v1/models/m:predict", b'{"inputs": [1, 2, 3]}', b'{"outputs": [7]}'))
    exact(ev.inputs["inputs"], np.array([1, 2, 3], dtype=np.int64))
    exact(ev.outputs["outputs"], np.array([7], dtype=np.int64))


def test_tfserving_nan_and_infinity_literals() -> None:
    body = (
        b'{"instances": [[NaN, Infinity, -Infinity], [Inf, -Inf, -NaN]], '
        b'"signature_name": "keep NaN and Inf and -Infinity in strings"}'
    )
    resp = b'{"predictions": [NaN, -Inf]}'
    ev = event(exchange("/v1/models/m:predict", body, resp))
    assert ev.error == ""
    want = np.array([[np.nan, np.inf, -np.inf], [np.inf, -np.inf, np.nan]])
    exact(ev.inputs["instances"], want)
    exact(ev.outputs["predictions"], np.array([np.nan, -np.inf]))
    assert ev.parameters["signature_name"] == "keep NaN and Inf and -Infinity in strings"
    assert tfserving.loads_lenient(b'["Inf", "-NaN", "x\\"Inf"]') == ["Inf", "-NaN", 'x"Inf']


def test_tfserving_errors_and_ragged() -> None:
    ev = event(
        exchange(
            "/v1/models/m:predict",
            b'{"instances": [[1, 2], [3]]}',
            b'{"error": "Input tensor has incompatible shape"}',
            status=400,
        )
    )
    assert ev.status == "400"
    assert "incompatible shape" in ev.error and "ragged" in ev.error
    assert ev.inputs == {}
    ev = event(exchange("/v1/models/m:predict", b'{"instances": [{"a": 1}, {"b": 2}]}'))
    assert "different inputs" in ev.error and ev.inputs == {}
    ev = event(exchange("/v1/models/m:predict", b'{"instances": [1, "x"]}'))
    assert "mixed" in ev.error and ev.inputs == {}
    ev = event(exchange("/v1/models/m:predict", b'{"instances": [2e400]}'))  # json: inf
    exact(ev.inputs["instances"], np.array([np.inf]))
    ev = event(exchange("/v1/models/m:predict", b'{"instances": [99999999999999999999]}'))
    assert "int64" in ev.error and ev.inputs == {}


def test_tfserving_non_predict_is_not_model_traffic() -> None:
    assert to_inference_event(exchange("/v1/models/m", b"", method="GET"), SERVICE) is None
    assert to_inference_event(exchange("/v1/models/m:classify", b"{}"), SERVICE) is None
    assert to_inference_event(exchange("/v1/models/m/metadata", b"", method="GET"), SERVICE) is None


def test_tfserving_truncated() -> None:
    body = json.dumps({"instances": [[1.5] * 50] * 4}).encode()
    ex = exchange("/v1/models/m:predict", body[:100], b'{"predictions": [1, 2, 3, 4]}')
    ex.request.body_truncated = True
    ex.request.content_length = len(body)  # the header said the whole size
    ev = event(ex)
    assert ev.request_truncated and ev.inputs == {}
    assert ev.payload_bytes == len(body)
    exact(ev.outputs["predictions"], np.array([1, 2, 3, 4], dtype=np.int64))
    assert ev.response_truncated is False


# ---------------------------------------------------------------------------------------------
# OpenAI


CHAT_REQ = {
    "model": "llama-3-8b",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "My card 4111 1111 1111 1111 was declined."},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
    ],
    "temperature": 0.2,
    "max_tokens": 64,
    "user": "customer-8841",
    "stream": False,
}
CHAT_RESP = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "llama-3-8b",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Call your bank."}},
    ],
    "usage": {"prompt_tokens": 31, "completion_tokens": 4, "total_tokens": 35},
}


def test_openai_chat() -> None:
    ev = event(
        exchange(
            "/v1/chat/completions", json.dumps(CHAT_REQ).encode(), json.dumps(CHAT_RESP).encode()
        )
    )
    assert (ev.protocol, ev.model, ev.status, ev.error) == ("openai", "llama-3-8b", "ok", "")
    assert ev.texts == ["You are terse.", "My card 4111 1111 1111 1111 was declined."]
    assert ev.parameters == {"temperature": 0.2, "max_tokens": 64, "stream": False}
    assert ev.usage == {"prompt_tokens": 31, "completion_tokens": 4, "total_tokens": 35}
    assert ev.output_texts == ["Call your bank."]
    assert (ev.client_cgroup, ev.server_cgroup) == (1, 2)


def test_openai_completions_and_prefixed_path() -> None:
    req = {"model": "gpt-x", "prompt": ["Hello", "World"], "n": 1, "suffix": "!"}
    resp = {
        "choices": [{"index": 1, "text": " two"}, {"index": 0, "text": " one"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
    }
    ev = event(
        exchange("/openai/v1/completions", json.dumps(req).encode(), json.dumps(resp).encode())
    )
    assert ev.texts == ["Hello", "World", "!"]
    assert ev.output_texts == [" one", " two"]
    assert ev.usage["total_tokens"] == 4
    ev = event(exchange("/v1/completions", b'{"model": "m", "prompt": [[1, 2, 3]]}', b"{}"))
    assert ev.texts == [] and ev.parameters["prompt_token_ids"] is True


def test_openai_embeddings_float_and_base64() -> None:
    vecs = [[0.1, -0.25, 3.0], [1e-9, 0.0, -7.5]]
    resp = {
        "object": "list",
        "data": [{"index": i, "embedding": v, "object": "embedding"} for i, v in enumerate(vecs)],
        "model": "bge-small",
        "usage": {"prompt_tokens": 6, "total_tokens": 6},
    }
    req = {"model": "bge-small", "input": ["first text", "second text"]}
    ev = event(exchange("/v1/embeddings", json.dumps(req).encode(), json.dumps(resp).encode()))
    assert ev.texts == ["first text", "second text"]
    exact(ev.outputs["embeddings"], np.array(vecs))
    assert ev.output_datatypes == {"embeddings": "FP64"}
    assert ev.usage == {"prompt_tokens": 6, "total_tokens": 6}
    f32 = np.array([[0.1, -0.25, 3.0], [1e-9, 0.0, -7.5]], dtype=np.float32)
    resp["data"] = [
        {"index": i, "embedding": base64.b64encode(f32[i].astype("<f4").tobytes()).decode()}
        for i in range(2)
    ]
    ev = event(exchange("/v1/embeddings", json.dumps(req).encode(), json.dumps(resp).encode()))
    exact(ev.outputs["embeddings"], f32)


def _sse(chunks: list[Any], sep: str = "\n") -> bytes:
    parts = [f"data: {json.dumps(c)}{sep}{sep}" for c in chunks]
    return ("".join(parts) + f"data: [DONE]{sep}{sep}").encode()


def test_openai_streaming_with_and_without_usage() -> None:
    req = dict(CHAT_REQ, stream=True, stream_options={"include_usage": True})
    chunks: list[Any] = [
        {"model": "llama-3-8b", "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"choices": [{"index": 0, "delta": {"content": "Call "}}]},
        {"choices": [{"index": 0, "delta": {"content": "your bank."}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": 4, "total_tokens": 35}},
    ]
    sse_headers = [("content-type", "text/event-stream; charset=utf-8")]
    for sep in ("\n", "\r\n"):
        ev = event(
            exchange(
                "/v1/chat/completions",
                json.dumps(req).encode(),
                _sse(chunks, sep),
                200,
                sse_headers,
            )
        )
        assert ev.error == ""
        assert ev.output_texts == ["Call your bank."]
        assert ev.usage == {"prompt_tokens": 31, "completion_tokens": 4, "total_tokens": 35}
        assert ev.parameters["stream"] is True
    ev = event(
        exchange(
            "/v1/chat/completions", json.dumps(req).encode(), _sse(chunks[:-1]), 200, sse_headers
        )
    )
    assert ev.usage == {} and ev.error == "" and ev.output_texts == ["Call your bank."]
    # A stream cut off mid-chunk (not flagged): what was whole is kept, the rest reported.
    cut = _sse(chunks)[:-30]
    ev = event(exchange("/v1/chat/completions", json.dumps(req).encode(), cut, 200, sse_headers))
    assert ev.output_texts == ["Call your bank."] and "not JSON" in ev.error


def test_openai_error_and_truncation() -> None:
    err = {"error": {"message": "Rate limit reached", "type": "requests", "code": "429"}}
    ev = event(
        exchange(
            "/v1/chat/completions", json.dumps(CHAT_REQ).encode(), json.dumps(err).encode(), 429
        )
    )
    assert ev.status == "429" and ev.error == "Rate limit reached"
    body = json.dumps(CHAT_REQ).encode()
    ex = exchange("/v1/chat/completions", body[:50], json.dumps(CHAT_RESP).encode())
    ex.request.body_truncated = True
    ev = event(ex)
    assert ev.request_truncated and ev.texts == [] and ev.parameters == {}
    assert ev.model == "llama-3-8b"  # from the whole response
    ex = exchange("/v1/chat/completions", body, json.dumps(CHAT_RESP).encode()[:40])
    assert ex.response is not None
    ex.response.body_truncated = True
    ev = event(ex)
    assert ev.response_truncated and ev.usage == {} and ev.texts


def test_openai_non_model_paths() -> None:
    assert to_inference_event(exchange("/v1/models", b"", method="GET"), SERVICE) is None
    assert to_inference_event(exchange("/v1/chat/completions", b"", method="GET"), SERVICE) is None


# ---------------------------------------------------------------------------------------------
# Garbage


PATHS = [
    "/v1/models/m:predict",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
]


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300), resp=st.binary(max_size=300), sse=st.booleans())
def test_random_bytes_never_raise(body: bytes, resp: bytes, sse: bool) -> None:
    headers = [("content-type", "text/event-stream")] if sse else None
    for path in PATHS:
        assert to_inference_event(exchange(path, body, resp, 200, headers), SERVICE) is not None


_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6))
_json = st.recursive(
    _leaf,
    lambda k: st.lists(k, max_size=4) | st.dictionaries(st.text(max_size=8), k, max_size=4),
    max_leaves=25,
)
_keys = st.sampled_from(
    [
        "instances",
        "inputs",
        "predictions",
        "outputs",
        "messages",
        "prompt",
        "input",
        "choices",
        "usage",
        "data",
        "model",
        "error",
        "b64",
        "content",
        "text",
        "embedding",
    ]
)
_doc = st.dictionaries(_keys, _json, max_size=5)


@settings(max_examples=300, deadline=None)
@given(req=_doc, resp=_doc)
def test_structured_garbage_never_raises(req: dict[str, Any], resp: dict[str, Any]) -> None:
    for path in PATHS:
        ev = to_inference_event(
            exchange(path, json.dumps(req).encode(), json.dumps(resp).encode()), SERVICE
        )
        assert ev is not None
    assert adapter_counters().get("adapter_failures", 0) == 0


@pytest.mark.parametrize("depth", [65, 500, 990, 100_000])
def test_deep_nesting_never_raises(depth: int) -> None:
    deep = b"[" * depth + b"1" + b"]" * depth
    for path in [*PATHS, "/v2/models/m/infer"]:
        for body in (deep, b'{"instances": %s, "inputs": %s}' % (deep, deep)):
            ev = to_inference_event(exchange(path, body, body), SERVICE)
            assert ev is not None
    v2 = b'{"inputs": [{"name": "a", "datatype": "INT64", "shape": %s, "data": %s}]}' % (
        json.dumps([1] * depth).encode(),
        deep,
    )
    ev = to_inference_event(exchange("/v2/models/m/infer", v2, v2), SERVICE)
    assert ev is not None and ev.error and ev.inputs == {}
    assert adapter_counters().get("adapter_failures", 0) == 0


@pytest.mark.parametrize("path", PATHS)
def test_non_object_bodies(path: str) -> None:
    for body in (b"[]", b"1", b'"s"', b"null", b""):
        ev = event(exchange(path, body, body))
        assert ev.error


def test_openai_stream_that_did_not_finish_is_marked_incomplete_never_complete() -> None:
    req = dict(CHAT_REQ, stream=True)
    first = [
        {"model": "m", "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hello"}}]},
    ]
    sse_headers = [("content-type", "text/event-stream")]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in first).encode()  # no finish, no [DONE]
    ev = event(exchange("/v1/chat/completions", json.dumps(req).encode(), body, 200, sse_headers))
    assert ev.output_texts == ["Hello"] and ev.response_truncated
    assert "stream ended before its last chunk" in ev.error
    # The body cut by lost bytes mid-event: the whole events before the hole still count.
    ex = exchange(
        "/v1/chat/completions", json.dumps(req).encode(), body + b'data: {"cho', 200, sse_headers
    )
    assert ex.response is not None
    ex.response.body_truncated = True
    ev = event(ex)
    assert ev.output_texts == ["Hello"] and ev.response_truncated and ev.status == "ok"
