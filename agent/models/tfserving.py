"""TensorFlow Serving REST predict: `POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict`.

Request formats: row (`"instances": [...]`, each row a value or an object of named inputs) and
columnar (`"inputs": value` or `"inputs": {name: value}`). Responses: `"predictions"` (row) or
`"outputs"` (columnar), or `"error"`. Binary strings travel as `{"b64": "..."}`.

TF Serving's JSON parser accepts NaN and Infinity literals (RapidJSON's NanAndInf flag: NaN, Inf,
Infinity, each optionally negative); Python's json accepts NaN/Infinity/-Infinity, so the other
spellings are rewritten outside strings before parsing.

JSON carries no dtypes: the signature decides them on the server. Arrays come out as INT64 when
every number is an integer, FP64 when any is not (JSON numbers are doubles, so FP64 holds exactly
what was sent), BOOL, or BYTES (object array of bytes). `input_datatypes` records that choice.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import urllib.parse
from typing import Any

import numpy as np
import numpy.typing as npt

from infertap.agent.flows.records import Endpoint
from infertap.agent.models.common import add_error as _add_error
from infertap.agent.models.common import read_rest_response, request_event
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.protocols.messages import HttpExchange, HttpMessage

PROTOCOL = "tfserving-rest"

_PREDICT = re.compile(
    r"^/v1/models/([^/:]+)(?:/versions/([^/:]+)|/labels/([^/:]+))?:predict$",
)
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NEG_NAN = re.compile(r"-NaN\b")
_INF = re.compile(r"(-?)Inf(?!inity)\b")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
MAX_DIMS = 64  # numpy's limit on ndim


class TfDecodeError(ValueError):
    """A payload that does not decode. The message never contains values."""


def parse_predict_path(path: str) -> tuple[str, str] | None:
    """(model, version) of a predict path; a label comes back as "label:NAME"."""
    m = _PREDICT.match(path.split("?", 1)[0])
    if m is None:
        return None
    version = m.group(2) or (f"label:{m.group(3)}" if m.group(3) else "")
    return urllib.parse.unquote(m.group(1)), urllib.parse.unquote(version)


def _normalise_nonfinite(text: str) -> str:
    out: list[str] = []
    pos = 0
    for m in _JSON_STRING.finditer(text):
        out.append(_INF.sub(r"\1Infinity", _NEG_NAN.sub("NaN", text[pos : m.start()])))
        out.append(m.group(0))
        pos = m.end()
    out.append(_INF.sub(r"\1Infinity", _NEG_NAN.sub("NaN", text[pos:])))
    return "".join(out)


def loads_lenient(body: bytes) -> Any:
    """JSON that may hold NaN/Inf literals as TF Serving writes and accepts them."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TfDecodeError("body is not UTF-8") from exc
    try:
        return json.loads(text)
    except ValueError:
        pass
    except RecursionError as exc:
        raise TfDecodeError("body nests too deeply") from exc
    try:
        return json.loads(_normalise_nonfinite(text))
    except (ValueError, RecursionError) as exc:
        raise TfDecodeError("body is not JSON") from exc


def _shape_and_leaves(value: Any) -> tuple[list[int], list[Any]]:
    """Shape of a rectangular nested list and its leaves, row-major."""
    if not isinstance(value, list):
        return [], [value]
    if not value:
        return [0], []
    first_shape: list[int] | None = None
    leaves: list[Any] = []
    for item in value:
        shape, sub = _shape_and_leaves(item)
        if first_shape is None:
            first_shape = shape
        elif shape != first_shape:
            raise TfDecodeError("ragged nested list")
        leaves.extend(sub)
    return [len(value), *(first_shape or [])], leaves


def to_array(value: Any) -> tuple[npt.NDArray[Any], str, list[str]]:
    """(array, inferred datatype, text strings) of a JSON tensor value."""
    try:
        shape, leaves = _shape_and_leaves(value)
    except RecursionError as exc:
        raise TfDecodeError("value nests too deeply") from exc
    if len(shape) > MAX_DIMS:
        raise TfDecodeError("value has more dimensions than numpy supports")
    texts: list[str] = []
    if all(isinstance(v, bool) for v in leaves) and leaves:
        return np.array(leaves, dtype=np.bool_).reshape(shape), "BOOL", texts
    if all(isinstance(v, int) and not isinstance(v, bool) for v in leaves):
        if any(v < _INT64_MIN or v > _INT64_MAX for v in leaves):
            raise TfDecodeError("integer outside int64")
        return np.array(leaves, dtype=np.int64).reshape(shape), "INT64", texts
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in leaves):
        try:
            return np.array(leaves, dtype=np.float64).reshape(shape), "FP64", texts
        except OverflowError as exc:
            raise TfDecodeError("number outside float64") from exc
    elements: list[bytes] = []
    for v in leaves:
        if isinstance(v, str):
            texts.append(v)
            elements.append(v.encode("utf-8"))
        elif isinstance(v, dict) and set(v) == {"b64"} and isinstance(v["b64"], str):
            try:
                elements.append(base64.b64decode(v["b64"], validate=True))
            except (binascii.Error, ValueError) as exc:
                raise TfDecodeError("bad b64 value") from exc
        else:
            raise TfDecodeError("values of mixed or unsupported types")
    arr = np.empty(len(elements), dtype=object)
    arr[:] = elements
    return arr.reshape(shape), "BYTES", texts


def _named_rows(rows: list[Any]) -> dict[str, list[Any]] | None:
    """Row format with named inputs: every row an object with the same keys."""
    if not rows or not all(isinstance(r, dict) for r in rows):
        return None
    keys = list(rows[0])
    if any(set(r) != set(keys) for r in rows):
        raise TfDecodeError("rows name different inputs")
    # A row that is exactly {"b64": ...} is one binary value, not a named input.
    if keys == ["b64"]:
        return None
    return {k: [r[k] for r in rows] for k in keys}


def _decode_tensors(
    value: Any, default_name: str, row_format: bool
) -> tuple[dict[str, npt.NDArray[Any]], dict[str, str], list[str], list[str]]:
    """(tensors, datatypes, texts, problems) of an instances/inputs/predictions/outputs value."""
    named: dict[str, Any] | None
    if row_format:
        if not isinstance(value, list):
            raise TfDecodeError("row format value is not a list")
        named = _named_rows(value)
    else:
        named = value if isinstance(value, dict) and set(value) != {"b64"} else None
    items = list(named.items()) if named is not None else [(default_name, value)]
    tensors: dict[str, npt.NDArray[Any]] = {}
    datatypes: dict[str, str] = {}
    texts: list[str] = []
    problems: list[str] = []
    for name, v in items:
        try:
            arr, dt, t = to_array(v)
        except TfDecodeError as exc:
            problems.append(f"{name}: {exc}")
            continue
        tensors[name], datatypes[name] = arr, dt
        texts.extend(t)
    return tensors, datatypes, texts, problems


def decode_exchange(exchange: HttpExchange, service: Endpoint) -> InferenceEvent:
    """An InferenceEvent from a TF Serving predict exchange."""
    req = exchange.request
    model, version = parse_predict_path(req.path) or ("", "")
    event, body = request_event(exchange, service, PROTOCOL, model, version)
    if body is not None:
        try:
            doc = loads_lenient(body)
            if not isinstance(doc, dict):
                raise TfDecodeError("body is not a JSON object")
            if isinstance(doc.get("signature_name"), str):
                event.parameters["signature_name"] = doc["signature_name"]
            if "instances" in doc:
                t, d, texts, problems = _decode_tensors(doc["instances"], "instances", True)
                event.parameters["format"] = "row"
            elif "inputs" in doc:
                t, d, texts, problems = _decode_tensors(doc["inputs"], "inputs", False)
                event.parameters["format"] = "columnar"
            else:
                raise TfDecodeError("neither instances nor inputs")
            event.inputs, event.input_datatypes, event.texts = t, d, texts
            if problems:
                _add_error(event, "request: " + ", ".join(problems))
        except TfDecodeError as exc:
            _add_error(event, f"request: {exc}")

    def decode_body(resp: HttpMessage) -> None:
        rdoc = loads_lenient(resp.body)
        if not isinstance(rdoc, dict):
            raise TfDecodeError("body is not a JSON object")
        if "error" in rdoc:
            _add_error(event, str(rdoc["error"]))
        if "predictions" in rdoc:
            t, d, _, problems = _decode_tensors(rdoc["predictions"], "predictions", True)
        elif "outputs" in rdoc:
            t, d, _, problems = _decode_tensors(rdoc["outputs"], "outputs", False)
        else:
            t, d, problems = {}, {}, []
        event.outputs, event.output_datatypes = t, d
        if problems:
            _add_error(event, "response: " + ", ".join(problems))

    read_rest_response(event, exchange.response, decode_body, (TfDecodeError,))
    return event
