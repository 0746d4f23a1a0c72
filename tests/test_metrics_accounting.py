"""Counters read from the kernel at scrape time never go backwards; events never block."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, generate_latest

from infertap.agent.export.event_hub import AgentEvent, EventHub
from infertap.agent.export.metric_names import METRICS
from infertap.agent.export.metrics import (
    MAX_BIN_SERIES_PER_MODEL,
    FlowAccounting,
    KernelCollector,
    ModelStateCollector,
    TrafficMetrics,
    VisibilityCollector,
)
from infertap.agent.flows.records import Endpoint, FlowInfo, Role
from infertap.agent.inspect.drift import FeatureBins

POD = ("", "/pod-a")


def flow(cookie: int, msgs: int, nbytes: int) -> FlowInfo:
    return FlowInfo(
        cookie=cookie,
        role=Role.CLIENT,
        local=Endpoint("10.0.0.1", 40000 + cookie),
        remote=Endpoint("10.0.0.2", 8000),
        cgroup_id=9,
        start_ns=0,
        sampled=True,
        messages=msgs,
        bytes=nbytes,
    )


def test_totals_do_not_dip_while_a_closing_flow_is_in_neither_place() -> None:
    acc = FlowAccounting(grace_s=60)
    acc.observe([(POD, flow(1, 5, 500)), (POD, flow(2, 1, 10))], now=0.0)
    assert acc.totals()[POD].messages == 6
    # The kernel deleted flow 1; its FLOW_END has not been read yet.
    acc.observe([(POD, flow(2, 2, 20))], now=1.0)
    assert acc.totals()[POD].messages == 7 and acc.totals()[POD].bytes == 520
    acc.flow_ended(POD, flow(1, 6, 600))  # final counters are at least what we saw
    assert acc.totals()[POD].messages == 8 and acc.totals()[POD].bytes == 620


def test_a_lost_flow_end_is_settled_after_the_grace_period() -> None:
    acc = FlowAccounting(grace_s=5)
    acc.observe([(POD, flow(1, 5, 500))], now=0.0)
    acc.observe([], now=10.0)
    assert acc.totals()[POD].messages == 5
    acc.observe([], now=20.0)
    assert acc.totals()[POD].messages == 5  # counted once


def test_exporter_serves_the_listed_names_with_their_labels() -> None:
    reg = CollectorRegistry()
    acc = FlowAccounting()
    traffic = TrafficMetrics(reg)
    reg.register(
        KernelCollector(
            lambda: [flow(1, 3, 30)],
            lambda: {"samples": 4, "samples_lost": 1, "events_lost": 1, "verdict_drops": 2},
            lambda cg: POD,
            acc,
        )
    )
    reg.register(
        VisibilityCollector(
            lambda: {("http2", "hpack_lost"): 3, ("http1", "header_gap"): 1},
            lambda: {"pre_existing": 2},
        )
    )
    traffic.count_http(POD, "10.0.0.2:8000", "post", 200)
    traffic.count_http(POD, "10.0.0.2:8000", "BREW", None)
    text = generate_latest(reg).decode()
    assert 'infertap_messages_total{namespace="",pod="/pod-a"} 3.0' in text
    assert "infertap_samples_lost_total 2.0" in text
    assert 'infertap_decode_lost_total{protocol="http2",reason="hpack_lost"} 3.0' in text
    assert 'infertap_connections_uninspected{reason="pre_existing"} 2.0' in text
    assert 'method="POST"' in text and 'method="OTHER"' in text and 'code="none"' in text
    served = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line.startswith("infertap_")
    }
    for name in served:
        base = name.removesuffix("_created")
        assert base in METRICS, f"{name} is not in metric_names.METRICS"


def test_a_slow_subscriber_loses_its_oldest_events_and_never_blocks() -> None:
    hub = EventHub()
    sub = hub.subscribe(maxlen=3)
    for i in range(5):
        hub.publish(AgentEvent("http", i))
    assert sub.dropped == 2
    assert [sub.get(0.1).ts_ns for _ in range(3)] == [2, 3, 4]  # type: ignore[union-attr]
    assert sub.get(0.01) is None
    done = threading.Event()

    def waiter() -> None:
        sub.get(5.0)
        done.set()

    threading.Thread(target=waiter).start()
    hub.close()
    assert done.wait(2.0)


def test_bin_counters_and_baseline_shares_are_served_bounded() -> None:
    reg = CollectorRegistry()
    bins = {
        ("fraud", "amount"): FeatureBins((0.5, 0.25, 0.25), (7, 0, 3)),
        ("fraud", "hour"): FeatureBins((1.0,), (10,)),
    }
    reg.register(ModelStateCollector(dict, dict, lambda: "h", lambda: bins))
    text = generate_latest(reg).decode()
    assert 'infertap_feature_bin_total{bin="0",feature="amount",model="fraud"} 7.0' in text
    assert 'infertap_feature_bin_total{bin="1",feature="amount",model="fraud"} 0.0' in text
    assert 'infertap_feature_baseline_share{bin="2",feature="amount",model="fraud"} 0.25' in text
    assert 'infertap_feature_bin_total{bin="0",feature="hour",model="fraud"} 10.0' in text
    # A model's features x bins are capped: past the cap, further features are left out.
    wide = {("m", f"f{i:04d}"): FeatureBins((0.1,) * 10, (1,) * 10) for i in range(300)}
    reg = CollectorRegistry()
    reg.register(ModelStateCollector(dict, dict, lambda: "h", lambda: wide))
    text = generate_latest(reg).decode()
    served = text.count("infertap_feature_bin_total{")
    assert served == MAX_BIN_SERIES_PER_MODEL
