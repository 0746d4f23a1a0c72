"""TLS plaintext records through the pipeline: ring records as bpf/tls.c writes them (packed with
the same layouts the reader decodes), on sockets whose ciphertext sk_msg samples too."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from prometheus_client import CollectorRegistry
from support import Recorder, wired_pipeline
from wire_streams import h1_request, h1_response

from infertap.agent.export.event_hub import EventHub
from infertap.agent.export.metrics import InferenceMetrics, TrafficMetrics
from infertap.agent.flows.tls_streams import is_virtual, virtual_cookie
from infertap.agent.kernel import decode, structs
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.pipeline import Pipeline
from infertap.agent.pod_labels import PodDirectory

CLIENT_IP, SERVER_IP, CPORT, SPORT = "10.9.0.2", "10.9.0.3", 40000, 8443
CLIENT_COOKIE, SERVER_COOKIE = 501, 502


def flow_record(kind: int, cookie: int, role: int, ts: int) -> bytes:
    """A flow record as the kernel writes it, built from the ctypes mirror of struct itap_flow
    (so it follows the header's layout)."""
    local, remote = (CLIENT_IP, CPORT), (SERVER_IP, SPORT)
    if role == structs.ROLE_SERVER:
        local, remote = remote, local
    flow = structs.Flow()
    flow.cookie, flow.cgroup_id, flow.start_ns, flow.role, flow.sampled = cookie, 7, ts, role, 1
    flow.key.family = socket.AF_INET
    flow.key.local_port, flow.key.remote_port = local[1], remote[1]
    flow.key.local_ip[0] = int.from_bytes(socket.inet_aton(local[0]), "little")
    flow.key.remote_ip[0] = int.from_bytes(socket.inet_aton(remote[0]), "little")
    return decode.RECORD.pack(kind, 0, ts, cookie, 0, 0, role, 0, 0) + bytes(flow)


def sample_record(
    cookie: int, role: int, offset: int, data: bytes, ts: int, flags: int, msg_len: int = -1
) -> bytes:
    size = len(data) if msg_len < 0 else msg_len
    return (
        decode.RECORD.pack(structs.REC_SAMPLE, len(data), ts, cookie, offset, size, role, flags, 0)
        + data
    )


def pipeline() -> tuple[Pipeline, list[InferenceEvent]]:
    reg = CollectorRegistry()
    recorder = Recorder()
    pipe = wired_pipeline(
        EventHub(),
        TrafficMetrics(reg),
        InferenceMetrics(reg),
        PodDirectory(Path("/nonexistent")),
        sinks=(recorder,),
    )
    return pipe, recorder.inferences


BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.5, -2.0]}]}
).encode()
OUT = json.dumps(
    {
        "model_name": "fraud",
        "outputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": [0.25]}],
    }
).encode()
REQUEST = h1_request("POST", "/v2/models/fraud/infer", BODY, [("Content-Type", "application/json")])
RESPONSE = h1_response(200, OUT, [("Content-Type", "application/json")], for_method="POST")
TLS = structs.SAMPLE_TLS
RECEIVED = structs.SAMPLE_TLS | structs.SAMPLE_TLS_RECEIVED


def start(pipe: Pipeline) -> None:
    pipe.handle(memoryview(flow_record(structs.REC_FLOW_START, CLIENT_COOKIE, 1, 10)))
    pipe.handle(memoryview(flow_record(structs.REC_FLOW_START, SERVER_COOKIE, 2, 11)))
    # Ciphertext on both sockets, as sk_msg samples it: ignored as unknown bytes.
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64)
    pipe.handle(memoryview(sample_record(CLIENT_COOKIE, 1, 0, hello, 20, 0)))
    pipe.handle(memoryview(sample_record(SERVER_COOKIE, 2, 0, hello, 21, 0)))


def end(pipe: Pipeline) -> None:
    pipe.handle(memoryview(flow_record(structs.REC_FLOW_END, CLIENT_COOKIE, 1, 900)))
    pipe.handle(memoryview(flow_record(structs.REC_FLOW_END, SERVER_COOKIE, 2, 901)))


def test_plaintext_of_both_ends_is_decoded_and_the_receivers_copy_is_not_fed_twice() -> None:
    pipe, events = pipeline()
    start(pipe)
    cut = len(REQUEST) // 2
    # Client SSL_write (two calls), then the server's SSL_read of the same bytes.
    pipe.handle(memoryview(sample_record(CLIENT_COOKIE, 1, 0, REQUEST[:cut], 100, TLS)))
    pipe.handle(memoryview(sample_record(CLIENT_COOKIE, 1, cut, REQUEST[cut:], 101, TLS)))
    pipe.handle(memoryview(sample_record(SERVER_COOKIE, 1, 0, REQUEST, 102, RECEIVED)))
    # Server SSL_write; the client's SSL_read of it.
    pipe.handle(memoryview(sample_record(SERVER_COOKIE, 2, 0, RESPONSE, 200, TLS)))
    pipe.handle(memoryview(sample_record(CLIENT_COOKIE, 2, 0, RESPONSE, 201, RECEIVED)))
    end(pipe)
    assert len(events) == 1
    (e,) = events
    assert e.model == "fraud" and e.status == "ok" and e.inputs["x"].tolist() == [1.5, -2.0]
    assert e.outputs["y"].tolist() == [0.25]
    assert e.client_cgroup == 7 and e.server_cgroup == 7  # the real sockets' pods
    assert e.latency_ns == 100
    assert pipe.tls.counts["tls_samples_duplicate"] == 2
    assert pipe.decoder.stats["flows_unknown"] == 2  # the ciphertext, once per socket
    assert len(pipe.tls) == 0  # virtual flows ended with their sockets


def test_a_peer_without_hooks_is_seen_through_the_other_ends_reads() -> None:
    """Only the client's TLS library is hooked (say the server's BoringSSL is stripped): the
    request from its SSL_write, the response from its SSL_read."""
    pipe, events = pipeline()
    start(pipe)
    pipe.handle(memoryview(sample_record(CLIENT_COOKIE, 1, 0, REQUEST, 100, TLS)))
    pipe.handle(memoryview(sample_record(CLIENT_COOKIE, 2, 0, RESPONSE, 201, RECEIVED)))
    end(pipe)
    assert [e.outputs["y"].tolist() for e in events] == [[0.25]]


def test_truncated_plaintext_is_flagged_not_guessed() -> None:
    pipe, events = pipeline()
    start(pipe)
    cap = len(REQUEST) - 10  # the sample limit cut the body
    rec = sample_record(
        CLIENT_COOKIE, 1, 0, REQUEST[:cap], 100, TLS | structs.SAMPLE_TRUNCATED, len(REQUEST)
    )
    pipe.handle(memoryview(rec))
    pipe.handle(memoryview(sample_record(SERVER_COOKIE, 2, 0, RESPONSE, 200, TLS)))
    end(pipe)
    assert len(events) == 1 and events[0].request_truncated and "x" not in events[0].inputs


def test_virtual_cookies_never_collide_with_kernel_cookies() -> None:
    assert is_virtual(virtual_cookie(0, False)) and not is_virtual((1 << 64) - 1)
    assert virtual_cookie(5, False) != virtual_cookie(5, True)
    tls = decode.decode_record(memoryview(sample_record(1, 1, 0, b"x", 1, RECEIVED)))
    assert tls is not None and getattr(tls, "tls", False) and getattr(tls, "received", False)
