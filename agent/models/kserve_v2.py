"""KServe V2 / Open Inference Protocol: REST (JSON and the binary tensor extension) and gRPC.

REST: `POST /v2/models/{name}[/versions/{v}]/infer`. The body is a JSON document; with the binary
tensor extension the `Inference-Header-Content-Length` header says how many leading bytes are JSON,
and each tensor whose `parameters.binary_data_size` is set has its raw bytes after the JSON, in
the order the tensors are listed.

gRPC: `/inference.GRPCInferenceService/ModelInfer` (and the first message of ModelStreamInfer).
Tensors come either as typed `contents` or as `raw_input_contents` / `raw_output_contents` (one
buffer per tensor, in order). The messages are tritonclient's generated V2 protobufs.

Raw layout (binary extension and raw_*_contents alike): little-endian, row-major; BOOL one byte
per element; BYTES a 4-byte little-endian length then the bytes, per element.

The decoders here are shared by the adapter and by the testbed server, so they are strict: a
tensor that does not add up (element count, byte count, value range, value type) raises
V2DecodeError instead of being coerced into something that was not sent. Error texts never quote
values: tensors may hold PII.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import ml_dtypes
import msgspec
import numpy as np
import numpy.typing as npt
from tritonclient.grpc import service_pb2

from infertap.agent.flows.records import Endpoint
from infertap.agent.models.common import add_error as _add_error
from infertap.agent.models.common import read_rest_response, request_event
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.protocols.messages import HttpExchange, HttpMessage

PROTOCOL_REST = "kserve-v2-rest"
PROTOCOL_GRPC = "kserve-v2-grpc"

GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_STREAM_INFER = GRPC_SERVICE + "ModelStreamInfer"
GRPC_INFER_METHODS = frozenset({GRPC_SERVICE + "ModelInfer", GRPC_STREAM_INFER})
HEADER_LENGTH = "inference-header-content-length"

# Wire datatype -> numpy dtype (native byte order; raw bytes are read as little-endian).
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "BYTES": np.dtype(object),
}

# Which InferTensorContents field carries each datatype (FP16/BF16 have none: raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

MAX_DIMS = 64  # numpy's limit on ndim

_REST_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")

_GRPC_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class V2DecodeError(ValueError):
    """A V2 payload that does not decode. The message never contains tensor values."""


@dataclass(slots=True)
class V2Payload:
    """The decoded half of a V2 call: a request's inputs or a response's outputs."""

    tensors: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    datatypes: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    tensor_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Requests only: the outputs asked for, with their parameters (e.g. binary_data).
    requested_outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    id: str = ""
    model_name: str = ""
    model_version: str = ""
    error: str = ""  # the server's error message (responses)
    problems: list[str] = field(default_factory=list)  # tensors that did not decode, and why


# ---------------------------------------------------------------------------------------------
# Tensors


def parse_infer_path(path: str) -> tuple[str, str] | None:
    """(model, version) of a REST infer path, or None. The query string is ignored."""
    # Asked twice per call (which adapter, then the call's model); only short paths are
    # remembered, so the cache stays small whatever the traffic sends.
    return _parse_short_path(path) if len(path) <= 256 else _parse_infer_path(path)


@functools.lru_cache(maxsize=1024)
def _parse_short_path(path: str) -> tuple[str, str] | None:
    return _parse_infer_path(path)


def _parse_infer_path(path: str) -> tuple[str, str] | None:
    m = _REST_INFER.match(path.split("?", 1)[0])
    if m is None:
        return None
    return urllib.parse.unquote(m.group(1)), urllib.parse.unquote(m.group(2) or "")


def element_count(shape: object) -> tuple[list[int], int]:
    """Validate a shape (a list of non-negative ints) and return it with its element count."""
    # The usual case, checked at C speed: a list of at most MAX_DIMS non-negative ints.
    if (
        type(shape) is list
        and len(shape) <= MAX_DIMS
        and set(map(type, shape)) <= {int}
        and (not shape or min(shape) >= 0)
    ):
        return list(shape), math.prod(shape)
    if not isinstance(shape, list | tuple):
        raise V2DecodeError("shape is not a list")
    if len(shape) > MAX_DIMS:
        raise V2DecodeError("shape has more dimensions than numpy supports")
    dims: list[int] = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise V2DecodeError("shape has a dimension that is not a non-negative integer")
        dims.append(d)
    return dims, math.prod(dims)


def _dtype(datatype: object) -> tuple[str, np.dtype[Any]]:
    if not isinstance(datatype, str) or datatype not in DTYPES:
        raise V2DecodeError("unknown datatype")
    return datatype, DTYPES[datatype]


def split_bytes_elements(buf: bytes) -> list[bytes]:
    """BYTES raw layout: per element a 4-byte little-endian length, then that many bytes."""
    out: list[bytes] = []
    pos = 0
    while pos < len(buf):
        if pos + 4 > len(buf):
            raise V2DecodeError("BYTES element length cut short")
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise V2DecodeError("BYTES element longer than its buffer")
        out.append(bytes(buf[pos : pos + n]))
        pos += n
    return out


def join_bytes_elements(elements: Iterable[bytes]) -> bytes:
    """The inverse of split_bytes_elements."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _object_array(elements: Sequence[bytes], dims: list[int]) -> npt.NDArray[Any]:
    arr = np.empty(len(elements), dtype=object)
    arr[:] = elements  # element-wise, so bytes stay bytes (np.array would make a bytes_ array)
    return arr.reshape(dims)


def decode_raw_tensor(datatype: object, shape: object, buf: bytes) -> npt.NDArray[Any]:
    """A tensor from its raw little-endian bytes; the byte count must match the shape exactly."""
    datatype, dt = _dtype(datatype)
    dims, n = element_count(shape)
    if datatype == "BYTES":
        elements = split_bytes_elements(buf)
        if len(elements) != n:
            raise V2DecodeError("BYTES element count does not match the shape")
        return _object_array(elements, dims)
    if len(buf) != n * dt.itemsize:
        raise V2DecodeError("byte count does not match shape and datatype")
    if datatype == "BOOL":
        # Any non-zero byte is true; reading the bytes as bool directly would keep e.g. 0x02.
        flags: npt.NDArray[np.bool_] = np.frombuffer(buf, dtype=np.uint8) != 0
        return flags.reshape(dims)
    raw = np.frombuffer(buf, dtype=dt.newbyteorder("<"))
    return raw.astype(dt).reshape(dims)


def encode_raw_tensor(datatype: str, array: npt.NDArray[Any]) -> bytes:
    """Raw little-endian bytes of a tensor (BYTES elements may be bytes or str)."""
    if datatype == "BYTES":
        flat = array.reshape(-1)
        return join_bytes_elements(e if isinstance(e, bytes) else str(e).encode() for e in flat)
    _, dt = _dtype(datatype)
    return np.ascontiguousarray(array, dtype=dt.newbyteorder("<")).tobytes()


def _flatten(data: object) -> list[Any]:
    """Leaves of flat or nested JSON data, row-major."""
    if not isinstance(data, list):
        return [data]  # a scalar tensor may be sent bare
    out: list[Any] = []
    stack: list[Iterable[Any]] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _check_json_leaves(datatype: str, leaves: list[Any]) -> None:
    # JSON numbers are only coerced where it is exact: ints into integer types, ints or floats
    # into float types, booleans into BOOL. Anything else would decode to values not sent.
    if datatype == "BOOL":
        ok = all(isinstance(v, bool) for v in leaves)
    elif datatype.startswith(("INT", "UINT")):
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in leaves)
    elif datatype.startswith(("FP", "BF")):
        ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in leaves)
    else:
        ok = all(isinstance(v, str) for v in leaves)
    if not ok:
        raise V2DecodeError("JSON data holds values of the wrong type for the datatype")


# The leaf types each datatype takes from JSON, for flat data: the types json makes are exact
# (bool is its own type here, not an int), so a set of leaf types decides what
# _check_json_leaves decides, at C speed.
_FLAT_LEAF_TYPES: dict[str, frozenset[type]] = {
    name: frozenset(
        {bool}
        if name == "BOOL"
        else {int}
        if name.startswith(("INT", "UINT"))
        else {int, float}
        if name.startswith(("FP", "BF"))
        else {str}
    )
    for name in DTYPES
}


def decode_json_tensor(datatype: object, shape: object, data: object) -> npt.NDArray[Any]:
    """A tensor from V2 JSON `data` (flat or nested, row-major)."""
    datatype, dt = _dtype(datatype)
    dims, n = element_count(shape)
    leaf_types = set(map(type, data)) if type(data) is list else None
    if leaf_types is not None and list not in leaf_types:  # flat: the leaves are the list
        leaves: list[Any] = data  # type: ignore[assignment]
        if len(leaves) != n:
            raise V2DecodeError("JSON element count does not match the shape")
        if not leaf_types <= _FLAT_LEAF_TYPES[datatype]:
            raise V2DecodeError("JSON data holds values of the wrong type for the datatype")
    else:
        leaves = _flatten(data)
        if len(leaves) != n:
            raise V2DecodeError("JSON element count does not match the shape")
        _check_json_leaves(datatype, leaves)
    if datatype == "BYTES":
        return _object_array([v.encode("utf-8") for v in leaves], dims)
    try:
        return np.array(leaves, dtype=dt).reshape(dims)
    except (OverflowError, ValueError, TypeError) as exc:
        raise V2DecodeError("JSON data out of range for the datatype") from exc


def json_data(datatype: str, array: npt.NDArray[Any]) -> list[Any]:
    """Flat JSON `data` for a tensor (BYTES as UTF-8 strings, as V2 JSON requires)."""
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [e.decode("utf-8") if isinstance(e, bytes) else str(e) for e in flat]
    if datatype in ("FP16", "BF16"):
        return [float(v) for v in flat.astype(np.float32)]
    values: list[Any] = flat.tolist()
    return values


# ---------------------------------------------------------------------------------------------
# REST


def split_rest_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a V2 REST body."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length.strip())
    except ValueError as exc:
        raise V2DecodeError("Inference-Header-Content-Length is not a number") from exc
    if n < 0 or n > len(body):
        raise V2DecodeError("Inference-Header-Content-Length is outside the body")
    return body[:n], body[n:]


_JSON = msgspec.json.Decoder()


def _json_object(doc: bytes) -> dict[str, Any]:
    try:
        # msgspec decodes strict UTF-8 JSON to the very objects json.loads makes (floats
        # correctly rounded, big ints kept), about four times faster. What it refuses (NaN and
        # Infinity literals, numbers out of float range, lone surrogates, a BOM, UTF-16/32,
        # nesting past its limit) goes to json.loads, which decides as it always has.
        value = _JSON.decode(doc)
    except Exception:  # DecodeError, and UnicodeDecodeError for bad UTF-8: json decides
        try:
            value = json.loads(doc)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise V2DecodeError("body is not JSON") from exc
    if not isinstance(value, dict):
        raise V2DecodeError("body is not a JSON object")
    return value


def _str_field(obj: Mapping[str, Any], key: str) -> str:
    v = obj.get(key, "")
    return v if isinstance(v, str) else str(v)


def _rest_tensors(specs: object, binary: bytes, out: V2Payload) -> None:
    """Decode a JSON `inputs`/`outputs` list, taking binary tensors from `binary` in order."""
    if not isinstance(specs, list):
        raise V2DecodeError("tensor list is not a list")
    pos = 0
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            out.problems.append(f"tensor {i}: not an object")
            continue
        name = _str_field(spec, "name") or f"#{i}"
        params = spec.get("parameters")
        params = params if isinstance(params, dict) else {}
        out.tensor_parameters[name] = params
        datatype = spec.get("datatype")
        if isinstance(datatype, str):
            out.datatypes[name] = datatype
        size = params.get("binary_data_size")
        try:
            if size is not None:
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise V2DecodeError("binary_data_size is not a non-negative integer")
                if pos + size > len(binary):
                    # Later tensors' offsets are unknown from here on: stop, do not guess.
                    out.problems.append(f"{name}: binary data runs past the body")
                    return
                chunk = binary[pos : pos + size]
                pos += size
                out.tensors[name] = decode_raw_tensor(datatype, spec.get("shape"), chunk)
            elif "data" in spec:
                out.tensors[name] = decode_json_tensor(datatype, spec.get("shape"), spec["data"])
            # A tensor with neither (e.g. a requested-output echo) carries no values.
        except V2DecodeError as exc:
            out.problems.append(f"{name}: {exc}")
    if pos != len(binary):
        out.problems.append("binary data left over after the last tensor")


def decode_rest_request(body: bytes, header_length: str | None) -> V2Payload:
    """Decode a V2 REST infer request body. Raises V2DecodeError if the JSON part is unusable."""
    out = V2Payload()
    doc, binary = split_rest_body(body, header_length)
    if header_length is not None and not doc:
        # Length 0: the whole body is one input's raw bytes, named only by the model config.
        raise V2DecodeError("raw binary request without a JSON header: input name unknown")
    obj = _json_object(doc)
    out.id = _str_field(obj, "id")
    params = obj.get("parameters")
    out.parameters = params if isinstance(params, dict) else {}
    _rest_tensors(obj.get("inputs", []), binary, out)
    outputs = obj.get("outputs", [])
    if isinstance(outputs, list):
        for spec in outputs:
            if isinstance(spec, dict) and isinstance(spec.get("name"), str):
                oparams = spec.get("parameters")
                out.requested_outputs[spec["name"]] = oparams if isinstance(oparams, dict) else {}
    return out


def decode_rest_response(body: bytes, header_length: str | None) -> V2Payload:
    """Decode a V2 REST infer response body (success or `{"error": ...}`)."""
    out = V2Payload()
    doc, binary = split_rest_body(body, header_length)
    obj = _json_object(doc)
    if "error" in obj:
        out.error = _str_field(obj, "error")
    out.id = _str_field(obj, "id")
    out.model_name = _str_field(obj, "model_name")
    out.model_version = _str_field(obj, "model_version")
    params = obj.get("parameters")
    out.parameters = params if isinstance(params, dict) else {}
    _rest_tensors(obj.get("outputs", []), binary, out)
    return out


# ---------------------------------------------------------------------------------------------
# gRPC


def infer_parameter_value(p: Any) -> Any:
    """The Python value of an inference.InferParameter (oneof)."""
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def set_infer_parameter(p: Any, value: Any) -> None:
    """Fill an inference.InferParameter from a Python value."""
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        if value >= 2**63:
            p.uint64_param = value
        else:
            p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def _grpc_params(params: Any) -> dict[str, Any]:
    return {k: infer_parameter_value(v) for k, v in params.items()}


def decode_grpc_tensor(tensor: Any, raw: bytes | None) -> npt.NDArray[Any]:
    """A tensor from an InferInputTensor/InferOutputTensor and its raw buffer, if raw was used."""
    datatype: str = tensor.datatype
    shape = list(tensor.shape)
    if raw is not None:
        return decode_raw_tensor(datatype, shape, raw)
    datatype, dt = _dtype(datatype)
    dims, n = element_count(shape)
    field_name = _CONTENTS_FIELD.get(datatype)
    if field_name is None:
        if n == 0:
            return np.empty(dims, dtype=dt)
        raise V2DecodeError("datatype can only travel as raw contents")
    values = list(getattr(tensor.contents, field_name))
    if len(values) != n:
        raise V2DecodeError("contents element count does not match the shape")
    if datatype == "BYTES":
        return _object_array(values, dims)
    try:
        # Narrow ints travel widened (int_contents is int32); a value that does not fit is an error.
        return np.array(values, dtype=dt).reshape(dims)
    except (OverflowError, ValueError) as exc:
        raise V2DecodeError("contents out of range for the datatype") from exc


def _grpc_tensors(tensors: Any, raws: Sequence[bytes], out: V2Payload) -> None:
    if raws and len(raws) != len(tensors):
        out.problems.append("raw contents count does not match the tensor count")
        return  # which buffer belongs to which tensor is then unknown
    for i, t in enumerate(tensors):
        name = t.name or f"#{i}"
        out.datatypes[name] = t.datatype
        out.tensor_parameters[name] = _grpc_params(t.parameters)
        try:
            out.tensors[name] = decode_grpc_tensor(t, raws[i] if raws else None)
        except V2DecodeError as exc:
            out.problems.append(f"{name}: {exc}")


def decode_grpc_request(msg: Any) -> V2Payload:
    """Decode an inference.ModelInferRequest."""
    out = V2Payload(id=msg.id, model_name=msg.model_name, model_version=msg.model_version)
    out.parameters = _grpc_params(msg.parameters)
    _grpc_tensors(msg.inputs, list(msg.raw_input_contents), out)
    for o in msg.outputs:
        out.requested_outputs[o.name] = _grpc_params(o.parameters)
    return out


def decode_grpc_response(msg: Any) -> V2Payload:
    """Decode an inference.ModelInferResponse."""
    out = V2Payload(id=msg.id, model_name=msg.model_name, model_version=msg.model_version)
    out.parameters = _grpc_params(msg.parameters)
    _grpc_tensors(msg.outputs, list(msg.raw_output_contents), out)
    return out


def _parse(cls: Any, data: bytes) -> Any:
    msg = cls()
    try:
        msg.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, and others on deep garbage
        raise V2DecodeError(f"not a valid {cls.__name__}") from exc
    return msg


def deframe_grpc(body: bytes) -> list[bytes]:
    """gRPC length-prefixed messages of a body; for bodies the wire layer did not de-frame."""
    out: list[bytes] = []
    pos = 0
    while pos < len(body):
        if pos + 5 > len(body):
            raise V2DecodeError("gRPC frame header cut short")
        flag, n = struct.unpack_from(">BI", body, pos)
        if flag != 0:
            raise V2DecodeError("compressed gRPC message not decompressed")
        if pos + 5 + n > len(body):
            raise V2DecodeError("gRPC message cut short")
        out.append(body[pos + 5 : pos + 5 + n])
        pos += 5 + n
    return out


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < len(data) and shift < 35:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None


def names_in_prefix(body: bytes) -> tuple[str, str]:
    """(model_name, model_version) from the start of a gRPC ModelInfer request or response whose
    body was cut: both are the message's first fields (1 and 2, strings), written first, so the
    captured prefix of the message usually holds them whole (the kernel keeps the first bytes of
    every DATA frame). ("", "") when it does not: nothing is guessed."""
    if len(body) < 5 or body[0] != 0:
        return "", ""
    found = {1: "", 2: ""}
    pos = 5
    while pos < len(body):
        tag = body[pos]
        if tag not in (0x0A, 0x12, 0x1A):  # fields 1, 2, 3 (id), length-delimited
            break
        got = _varint(body, pos + 1)
        if got is None or got[1] + got[0] > len(body):
            break
        n, start = got
        if tag != 0x1A:
            try:
                found[tag >> 3] = body[start : start + n].decode("utf-8")
            except UnicodeDecodeError:
                return "", ""
        pos = start + n
    return found[1], found[2]


def _grpc_messages(msg: HttpMessage) -> list[bytes]:
    return list(msg.grpc_messages) if msg.grpc_messages else deframe_grpc(msg.body)


def grpc_status(msg: HttpMessage) -> tuple[str, str]:
    """(status, error) of a gRPC response from its trailers (or headers, if trailers-only)."""
    code = message = None
    for k, v in [*msg.trailers, *msg.headers]:
        if k == "grpc-status" and code is None:
            code = v
        elif k == "grpc-message" and message is None:
            message = urllib.parse.unquote(v)
    if code is None:
        return "", ""
    try:
        name = _GRPC_CODE_NAMES.get(int(code), code)
    except ValueError:
        name = code
    status = "ok" if name == "OK" else name
    return status, (message or "") if status != "ok" else ""


# ---------------------------------------------------------------------------------------------
# Exchange -> InferenceEvent


def _texts(payload: V2Payload) -> list[str]:
    """Free text in BYTES tensors: elements that are valid UTF-8 (binary blobs are skipped)."""
    out: list[str] = []
    for name, arr in payload.tensors.items():
        if payload.datatypes.get(name) != "BYTES":
            continue
        for e in arr.reshape(-1):
            if isinstance(e, bytes):
                try:
                    out.append(e.decode("utf-8"))
                except UnicodeDecodeError:
                    continue
    return out


def _fill_request(event: InferenceEvent, payload: V2Payload) -> None:
    event.inputs = payload.tensors
    event.input_datatypes = payload.datatypes
    event.parameters = payload.parameters
    event.texts = _texts(payload)
    event.request_id = payload.id
    event.requested_outputs = list(payload.requested_outputs)


def _fill_response(event: InferenceEvent, payload: V2Payload) -> None:
    event.outputs = payload.tensors
    event.output_datatypes = payload.datatypes


def decode_rest_exchange(exchange: HttpExchange, service: Endpoint) -> InferenceEvent:
    """An InferenceEvent from a V2 REST infer exchange (the path must be an infer path)."""
    req = exchange.request
    model, version = parse_infer_path(req.path) or ("", "")
    event, body = request_event(exchange, service, PROTOCOL_REST, model, version)
    if body is not None:
        try:
            payload = decode_rest_request(body, req.header(HEADER_LENGTH))
            _fill_request(event, payload)
            if payload.problems:
                _add_error(event, "request: " + ", ".join(payload.problems))
        except V2DecodeError as exc:
            _add_error(event, f"request: {exc}")

    def decode_body(resp: HttpMessage) -> None:
        rpayload = decode_rest_response(resp.body, resp.header(HEADER_LENGTH))
        _fill_response(event, rpayload)
        if rpayload.error:
            _add_error(event, rpayload.error)
        if rpayload.problems:
            _add_error(event, "response: " + ", ".join(rpayload.problems))

    read_rest_response(event, exchange.response, decode_body, (V2DecodeError,))
    return event


def _stream_pairs(
    request_ids: list[str], response_ids: list[str]
) -> tuple[list[tuple[int, int | None]], list[int]]:
    """Pair the messages of a bidirectional stream: (request index, response index or None) for
    every request, and the responses paired with none. By `id` when every request carries a
    distinct one (responses echo it); else in order, one answer per request."""
    if request_ids and all(request_ids) and len(set(request_ids)) == len(request_ids):
        by_id = {rid: i for i, rid in enumerate(request_ids)}
        answer: dict[int, int] = {}
        extra: list[int] = []
        for j, rid in enumerate(response_ids):
            i = by_id.get(rid)
            if i is None or i in answer:  # unknown id, or a second answer (decoupled model)
                extra.append(j)
            else:
                answer[i] = j
        return [(i, answer.get(i)) for i in range(len(request_ids))], extra
    n = min(len(request_ids), len(response_ids))
    pairs: list[tuple[int, int | None]] = [
        (i, i if i < n else None) for i in range(len(request_ids))
    ]
    return pairs, list(range(n, len(response_ids)))


def decode_grpc_stream_exchange(exchange: HttpExchange, service: Endpoint) -> list[InferenceEvent]:
    """One InferenceEvent per request message of a ModelStreamInfer stream, each with the
    response message paired with it (see _stream_pairs) and its own latency (from the kernel
    times of the two messages' sends). A request with no answer, or an answer with no request,
    is its own event marked `unpaired` (and truncated on the missing side)."""
    req, resp = exchange.request, exchange.response
    requests: list[tuple[V2Payload | None, str]] = []  # (payload, decode problem)
    for raw in req.grpc_messages:
        try:
            requests.append((decode_grpc_request(_parse(service_pb2.ModelInferRequest, raw)), ""))
        except V2DecodeError as exc:
            requests.append((None, f"request: {exc}"))
    responses: list[tuple[V2Payload | None, str]] = []
    stream_status, stream_error = grpc_status(resp) if resp is not None else ("", "")
    for raw in resp.grpc_messages if resp is not None else []:
        try:
            smsg = _parse(service_pb2.ModelStreamInferResponse, raw)
            responses.append((decode_grpc_response(smsg.infer_response), smsg.error_message))
        except V2DecodeError as exc:
            responses.append((None, f"response: {exc}"))
    pairs, extra = _stream_pairs(
        [p.id if p is not None else "" for p, _ in requests],
        [p.id if p is not None else "" for p, _ in responses],
    )
    req_ts, resp_ts = req.grpc_message_ts, resp.grpc_message_ts if resp is not None else []
    events: list[InferenceEvent] = []
    offset = exchange.stream_offset  # a piece of a stream handed out while it was open

    def new(index: int, ts: int) -> InferenceEvent:
        ev = InferenceEvent(service=service, model="", version="", protocol=PROTOCOL_GRPC, ts_ns=ts)
        ev.stream_index = offset + index
        return ev

    def answer(ev: InferenceEvent, j: int) -> None:
        payload, problem = responses[j]
        if payload is not None:
            _fill_response(ev, payload)
            if not ev.model:
                ev.model, ev.version = payload.model_name, payload.model_version
            if payload.problems:
                _add_error(ev, "response: " + ", ".join(payload.problems))
        if problem:
            _add_error(ev, problem)
        # A per-message error (Triton's error_message) fails that call, not the stream.
        ev.status = "error" if problem else (stream_status or "ok")

    for i, j in pairs:
        ev = new(i, req_ts[i] if i < len(req_ts) else req.ts_ns)
        payload, problem = requests[i]
        if payload is not None:
            ev.model, ev.version = payload.model_name, payload.model_version
            _fill_request(ev, payload)
            if payload.problems:
                _add_error(ev, "request: " + ", ".join(payload.problems))
        if problem:
            _add_error(ev, problem)
        if j is None and resp is None:
            pass  # the server side is not seen: a request alone, as unary calls are
        elif j is None:
            ev.unpaired = True
            ev.response_truncated = True
            ev.status = stream_status if stream_status not in ("", "ok") else ""
            _add_error(ev, stream_error or "stream: no response message paired with this request")
        else:
            answer(ev, j)
            if j < len(resp_ts) and i < len(req_ts):
                ev.latency_ns = max(0, resp_ts[j] - req_ts[i])
        events.append(ev)
    for j in extra:
        ev = new(len(events), resp_ts[j] if j < len(resp_ts) else req.ts_ns)
        ev.unpaired = True
        ev.request_truncated = True
        answer(ev, j)
        _add_error(ev, "stream: response message paired with no request")
        events.append(ev)
    if req.body_truncated and events:
        # Messages after a hole in the request body were not seen: the last ones may miss.
        events[-1].request_truncated = True
    if resp is not None and resp.body_truncated and events:
        events[-1].response_truncated = True
    return events


def decode_grpc_exchange(exchange: HttpExchange, service: Endpoint) -> InferenceEvent:
    """An InferenceEvent from a V2 gRPC ModelInfer exchange (ModelStreamInfer: the stream's
    first messages; decode_grpc_stream_exchange decodes every message of a stream)."""
    req = exchange.request
    stream = req.path.endswith("/ModelStreamInfer")
    event = InferenceEvent(
        service=service, model="", version="", protocol=PROTOCOL_GRPC, ts_ns=req.ts_ns
    )
    if req.body_truncated:
        event.request_truncated = True
        if not stream:
            event.model, event.version = names_in_prefix(req.body)
    else:
        try:
            msgs = _grpc_messages(req)
            if msgs:
                rmsg = _parse(service_pb2.ModelInferRequest, msgs[0])
                payload = decode_grpc_request(rmsg)
                event.model, event.version = payload.model_name, payload.model_version
                _fill_request(event, payload)
                if payload.problems:
                    _add_error(event, "request: " + ", ".join(payload.problems))
            else:
                _add_error(event, "request: no gRPC message")
        except V2DecodeError as exc:
            _add_error(event, f"request: {exc}")
    resp = exchange.response
    if resp is not None:
        status, message = grpc_status(resp)
        event.status = status or (str(resp.status) if resp.status not in (0, 200) else "")
        if message:
            _add_error(event, message)
        if resp.body_truncated:
            event.response_truncated = True
            if not event.model and not stream:
                event.model, event.version = names_in_prefix(resp.body)
        else:
            try:
                msgs = _grpc_messages(resp)
                if msgs:
                    if stream:
                        smsg = _parse(service_pb2.ModelStreamInferResponse, msgs[0])
                        if smsg.error_message:
                            _add_error(event, smsg.error_message)
                        msg = smsg.infer_response
                    else:
                        msg = _parse(service_pb2.ModelInferResponse, msgs[0])
                    rpayload = decode_grpc_response(msg)
                    _fill_response(event, rpayload)
                    if not event.model:
                        event.model, event.version = rpayload.model_name, rpayload.model_version
                    if rpayload.problems:
                        _add_error(event, "response: " + ", ".join(rpayload.problems))
            except V2DecodeError as exc:
                _add_error(event, f"response: {exc}")
    return event
