"""InferenceEvent: one model call, whatever protocol carried it.

Model adapters (kserve_v2, tfserving, openai) turn an HttpExchange into one of these; inspectors
(PII, drift, schema) and exporters read it. Tensors are numpy arrays keyed by input/output name
with shape and dtype kept; BYTES tensors are object arrays of `bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from infertap.agent.flows.records import Endpoint


@dataclass(slots=True)
class InferenceEvent:
    service: Endpoint  # server ip:port
    model: str
    version: str  # "" when the request names none
    protocol: str  # "kserve-v2-rest", "kserve-v2-grpc", "tfserving-rest", "openai"
    ts_ns: int  # kernel time the request was sent
    inputs: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    outputs: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    input_datatypes: dict[str, str] = field(default_factory=dict)  # wire type, e.g. "FP32"
    parameters: dict[str, Any] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)  # free text sent to the model (prompts, BYTES)
    status: str = ""  # "ok", or the HTTP status / gRPC code as text
    error: str = ""
    latency_ns: int | None = None
    client_cgroup: int = 0
    server_cgroup: int = 0
    request_truncated: bool = False  # some request bytes were not seen: tensors may be missing
    usage: dict[str, int] = field(default_factory=dict)  # OpenAI token usage
    endpoint: str = ""  # path, e.g. /v2/models/fraud/infer
    payload_bytes: int = 0
    # Added by the model adapters (agent/models):
    output_datatypes: dict[str, str] = field(default_factory=dict)  # wire type per output
    response_truncated: bool = False  # some response bytes were not seen: outputs may be missing
    request_id: str = ""  # the protocol's own request id (V2 "id"), when sent
    requested_outputs: list[str] = field(default_factory=list)  # V2 outputs asked for by name
    output_texts: list[str] = field(default_factory=list)  # free text the model returned (OpenAI)
    # Streaming calls (gRPC ModelStreamInfer): each request message is its own event. Its
    # position on the stream, or None for a unary call; `unpaired`: no counterpart message could
    # be paired with it (a request never answered, or an answer to no request seen): incomplete.
    stream_index: int | None = None
    unpaired: bool = False

    def input_array(self, name: str) -> npt.NDArray[Any] | None:
        a = self.inputs.get(name)
        return None if a is None else np.asarray(a)
