"""Labels and names that come from traffic stay bounded and PII-free on every output.

Driven through the real path: genuine HTTP/1.1 bytes (h11) cut into kernel samples, the wire
decoder, the model adapters, the pipeline, the metrics and the circuit breaker, as the agent wires
them (agent/runtime.py, agent/governor.py), with clocks the test moves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from support import wired_pipeline
from wire_streams import (
    CLIENT_COOKIE,
    SERVER,
    SERVER_COOKIE,
    h1_request,
    h1_response,
    run_connection,
    samples_of,
    stream_sends,
)

from infertap.agent.api import infertap_pb2 as pb
from infertap.agent.enforce.breaker import CircuitBreaker
from infertap.agent.export.event_hub import EventHub
from infertap.agent.export.events import http_dict
from infertap.agent.export.metrics import (
    LABEL_TTL_S,
    MAX_MODELS,
    MAX_VERSIONS,
    BoundedLabel,
    InferenceMetrics,
    ModelStateCollector,
    TrafficMetrics,
)
from infertap.agent.flows.records import Endpoint, Role
from infertap.agent.inspect.engine import InspectionEngine
from infertap.agent.inspect.traffic_names import safe_name, safe_path
from infertap.agent.mirror.sink import record_of
from infertap.agent.mirror.spec import SinkSpec
from infertap.agent.models.adapt import to_inference_event
from infertap.agent.pipeline import Inspected, PipelineSink
from infertap.agent.pod_labels import PodDirectory
from infertap.agent.policy.loader import default_policy
from infertap.agent.protocols.messages import HttpExchange
from infertap.cli.top.state import TopState

EMAIL = "jane.doe@example.com"
CARD = "4111111111111111"
V2_BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
).encode()


def v2_calls(models: list[tuple[str, str]], status: int = 404) -> list[HttpExchange]:
    """One keep-alive connection: a KServe V2 REST call per (model, version), each answered."""
    body = json.dumps({"error": "unknown model"}).encode()
    client, server = [], []
    for i, (model, version) in enumerate(models):
        t = 1_000_000 + i * 10
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        client.append(
            (h1_request("POST", path, V2_BODY, [("Content-Type", "application/json")]), t)
        )
        server.append(
            (
                h1_response(
                    status, body, [("Content-Type", "application/json")], for_method="POST"
                ),
                t + 5,
            )
        )
    exchanges, _ = run_connection(
        samples_of(stream_sends(client), CLIENT_COOKIE, Role.CLIENT),
        samples_of(stream_sends(server), SERVER_COOKIE, Role.SERVER),
    )
    assert len(exchanges) == len(models)
    return exchanges


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class NoKernel:
    def block_service(self, service: Endpoint, reason: str) -> None:
        pass

    def unblock_service(self, service: Endpoint) -> None:
        pass


class BreakerSink(PipelineSink):
    """What the findings' actions tell the breaker of every call: the model's service."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    def on_inference(self, inspected: Inspected) -> None:
        self.breaker.note_service(inspected.event.model, inspected.event.service)


@dataclass
class Wired:
    """The pipeline, metrics and breaker as the agent wires them."""

    clock: Clock = field(default_factory=Clock)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    events: EventHub = field(default_factory=EventHub)

    def __post_init__(self) -> None:
        self.inference = InferenceMetrics(self.registry, clock=self.clock)
        self.traffic = TrafficMetrics(self.registry, clock=self.clock)
        self.breaker = CircuitBreaker.from_policy(default_policy(), NoKernel(), clock=self.clock)
        self.subscription = self.events.subscribe(maxlen=100_000)
        self.pipeline = wired_pipeline(
            self.events,
            self.traffic,
            self.inference,
            PodDirectory(Path("/nonexistent")),
            engine=InspectionEngine(),
            sinks=(BreakerSink(self.breaker),),
        )
        self.registry.register(
            ModelStateCollector(
                lambda: {},
                lambda: {m: int(s) for m, s in self.breaker.states().items()},
                lambda: "hash",
                model_label=self.inference.model_label.peek,
            )
        )

    def page(self) -> str:
        return generate_latest(self.registry).decode()

    def published(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        while (ev := self.subscription.get(timeout=0)) is not None:
            out.append((ev.kind, ev.data))
        return out


def series(page: str, name: str) -> list[str]:
    return [ln for ln in page.splitlines() if ln.startswith(name + "{")]


def label_values(page: str, label: str) -> set[str]:
    out = set()
    for ln in page.splitlines():
        if f'{label}="' in ln and not ln.startswith("#"):
            out.add(ln.split(f'{label}="', 1)[1].split('"', 1)[0])
    return out


# -- bounded labels ---------------------------------------------------------------------------


def test_the_page_stays_bounded_under_5000_junk_model_names_and_versions() -> None:
    w = Wired()
    w.pipeline._exchanges(v2_calls([(f"junk-{i:05d}", f"v{i}") for i in range(5000)]))
    page = w.page()
    lines = page.splitlines()
    # Before bounding: 90,016 lines and 12.0 MB (one version and one circuit series per name).
    assert len(lines) < 1500 and len(page) < 250_000, (len(lines), len(page))
    models = label_values(page, "model")
    assert len(models) == MAX_MODELS + 1 and "other" in models
    assert len(series(page, "infertap_circuit_state")) == MAX_MODELS + 1
    assert len(series(page, "infertap_inference_requests_total")) == MAX_MODELS + 1
    # Every junk call is still counted: the ones past the limit under "other".
    total = sum(
        float(ln.rsplit(" ", 1)[1]) for ln in series(page, "infertap_inference_requests_total")
    )
    assert total == 5000


def test_versions_are_bounded_per_model() -> None:
    w = Wired()
    w.pipeline._exchanges(v2_calls([("fraud", f"build-{i}") for i in range(300)]))
    versions = {
        ln.split('version="', 1)[1].split('"', 1)[0]
        for ln in series(w.page(), "infertap_inference_requests_total")
    }
    assert len(versions) == MAX_VERSIONS + 1 and "other" in versions


def test_series_of_models_not_seen_for_a_while_expire() -> None:
    w = Wired()
    w.inference.model_label.set_known(["fraud"])  # the policy's models, as the governor sets
    w.pipeline._exchanges(v2_calls([(f"junk-{i:05d}", "1") for i in range(200)]))
    assert len(series(w.page(), "infertap_circuit_state")) == MAX_MODELS + 1
    w.clock.t += LABEL_TTL_S / 2
    w.pipeline._exchanges(v2_calls([("fraud", "3")]))  # a policy model, still in use: its
    # own label although junk took every free place
    w.clock.t += LABEL_TTL_S / 2 + 1  # the junk is now older than the TTL; fraud is not
    w.breaker.tick()  # the governor's ticker: forgets idle closed circuits
    page = w.page()  # a scrape expires series first
    assert label_values(page, "model") == {"fraud"}
    assert [ln.split(" ")[0] for ln in series(page, "infertap_circuit_state")] == [
        'infertap_circuit_state{model="fraud"}'
    ]
    assert len(w.breaker.states()) == 1  # the breaker's memory is bounded too
    services = label_values(page, "service")
    assert services == {str(SERVER)}  # the service is still in use
    # Places freed: new models get their own label again, not "other".
    w.pipeline._exchanges(v2_calls([(f"new-{i}", "1") for i in range(5)]))
    assert {f"new-{i}" for i in range(5)} <= label_values(w.page(), "model")
    w.clock.t += LABEL_TTL_S + 1
    w.breaker.tick()
    page = w.page()
    assert series(page, "infertap_inference_requests_total") == []
    assert series(page, "infertap_http_requests_total") == []
    assert series(page, "infertap_circuit_state") == []


def test_bounded_label_keeps_policy_models_and_folds_the_rest() -> None:
    label = BoundedLabel(known=["fraud"], limit=2, ttl_s=10)
    assert [label(m, now=0) for m in ("a", "b", "c", "fraud", "")] == [
        "a",
        "b",
        "other",
        "fraud",
        "other",  # "" is "unknown", which no longer fits
    ]
    assert label.peek("a") == "a" and label.peek("c") == "other"
    assert label("a", now=5) == "a"
    assert sorted(label.expire(now=12)) == ["b", "fraud", "other"]  # "a" was seen at 5
    assert label("c", now=12) == "c"  # b's place is free


# -- PII in names: every output ---------------------------------------------------------------


def test_safe_names_redact_and_bound() -> None:
    assert safe_name(EMAIL) == "<email:j***@e***.com>"
    assert safe_name(CARD) == "<credit_card:************1111>"
    assert safe_name("fraud") == "fraud" and safe_name("resnet50-v1.2") == "resnet50-v1.2"
    assert len(safe_name("m" * 5000)) == 128
    assert safe_name("model 'jane.doe%40example.com' not found") == (
        "model '<email:j***@e***.com>' not found"
    )
    long = "x" * 120 + " " + EMAIL  # cut after redaction: no half-value survives
    assert EMAIL not in safe_name(long) and "jane" not in safe_name(long)
    assert safe_path(f"/v2/models/{EMAIL}/infer?user=bob@x.io") == (
        "/v2/models/<email:j***@e***.com>/infer"
    )
    # As tritonclient sends it (percent-encoded), and encoded twice.
    for encoded in ("jane.doe%40example.com", "jane.doe%2540example.com"):
        assert safe_path(f"/v2/models/{encoded}/infer") == "/v2/models/<email:j***@e***.com>/infer"


REAL_NAMES = [
    "gpt-4o-2024-08-06",
    "llama-3.1-8b-instruct",
    "resnet50_v1.5",
    "mistral-7b-instruct-v0.2",
    "claude-3-5-sonnet-20241022",
    "Qwen2.5-72B-Instruct",
    "text-embedding-3-small",
    "yolov8n-640x640",
    "fraud-6b8f9",
    "v1.2.3",
    "2.1.0.post1",
    "20240115",
    "sha256:abcdef0123",
]


def test_real_model_names_and_versions_are_left_as_they_are() -> None:
    assert [safe_name(n) for n in REAL_NAMES] == REAL_NAMES


def _raw_leaks(text: str) -> list[str]:
    return [raw for raw in (EMAIL, CARD, "jane.doe") if raw in text]


def test_a_model_named_like_an_email_or_card_is_redacted_on_every_output(tmp_path: Path) -> None:
    w = Wired()
    exchanges = v2_calls([(EMAIL, CARD), ("fraud", CARD)], status=400)
    w.pipeline._exchanges(exchanges)
    # Metric labels.
    page = w.page()
    assert _raw_leaks(page) == []
    assert 'model="<email:j***@e***.com>"' in page
    assert 'version="<credit_card:************1111>"' in page
    # Events (what `infertap events` and `top` receive), HTTP and inference alike.
    published = w.published()
    assert {k for k, _ in published} >= {"http", "inference"}
    assert _raw_leaks(json.dumps(published)) == []
    inference = [d for k, d in published if k == "inference"]
    assert inference[0]["model"] == "<email:j***@e***.com>"
    # The mirror sink's records.
    event = to_inference_event(exchanges[0], SERVER)
    assert event is not None
    record = record_of(event, "ns/pod", SinkSpec(str(tmp_path), values=True))
    assert _raw_leaks(json.dumps(record)) == []
    assert record["model"] == "<email:j***@e***.com>"
    # top, fed the published events as the API streams them.
    top = TopState(clock=lambda: 0)
    top.apply_events(
        pb.Event(ts_ns=i + 1, kind=k, data_json=json.dumps(d)) for i, (k, d) in enumerate(published)
    )
    rows = top.model_rows()
    assert _raw_leaks(repr(rows) + repr(top.models)) == []
    assert "<email:j***@e***.com>" in {r.name for r in rows}
    # The HTTP event's path, on its own.
    assert _raw_leaks(json.dumps(http_dict(exchanges[0].request))) == []


def test_circuit_events_and_log_lines_carry_the_redacted_name(caplog: Any) -> None:
    from infertap.agent.inspect.findings import Finding

    w = Wired()
    (ex,) = v2_calls([(EMAIL, "")])
    w.pipeline._exchanges([ex])
    (name,) = w.breaker.states()  # the breaker only ever saw the redacted name
    assert name == "<email:j***@e***.com>"
    with caplog.at_level("INFO"):
        events = w.breaker.record(Finding("drift", name, "psi", "amount", "alert", value=0.5))
    assert events and _raw_leaks(json.dumps(events[0].to_data())) == []
    assert caplog.records and _raw_leaks(caplog.text) == []


# -- tokens -----------------------------------------------------------------------------------


def openai_call(model: str, usage: dict[str, int]) -> list[HttpExchange]:
    req = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    resp = json.dumps(
        {
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
            "usage": usage,
        }
    ).encode()
    hdr = [("Content-Type", "application/json")]
    exchanges, _ = run_connection(
        samples_of(
            stream_sends([(h1_request("POST", "/v1/chat/completions", req, hdr), 10)]),
            CLIENT_COOKIE,
            Role.CLIENT,
        ),
        samples_of(
            stream_sends([(h1_response(200, resp, hdr, for_method="POST"), 20)]),
            SERVER_COOKIE,
            Role.SERVER,
        ),
    )
    return exchanges


def test_tokens_are_counted_by_model_and_kind_and_put_in_events() -> None:
    w = Wired()
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    w.pipeline._exchanges(openai_call("tiny-chat", usage))
    w.pipeline._exchanges(openai_call(EMAIL, {**usage, "jane@x.io": 5, "cached_tokens": 2}))
    page = w.page()
    assert {
        ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in series(page, "infertap_tokens_total")
    } == {
        'infertap_tokens_total{kind="prompt",model="tiny-chat"}': 7.0,
        'infertap_tokens_total{kind="completion",model="tiny-chat"}': 3.0,
        'infertap_tokens_total{kind="total",model="tiny-chat"}': 10.0,
        'infertap_tokens_total{kind="prompt",model="<email:j***@e***.com>"}': 7.0,
        'infertap_tokens_total{kind="completion",model="<email:j***@e***.com>"}': 3.0,
        'infertap_tokens_total{kind="total",model="<email:j***@e***.com>"}': 10.0,
    }
    inference = [d for k, d in w.published() if k == "inference"]
    assert [d["usage"] for d in inference] == [usage, usage]  # only the known keys
    assert _raw_leaks(page + json.dumps(inference)) == [] and "jane@x.io" not in page
    w.clock.t += LABEL_TTL_S + 1
    assert series(w.page(), "infertap_tokens_total") == []  # expired with their models
