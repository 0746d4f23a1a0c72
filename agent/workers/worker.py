"""One inspection worker process: ring buffer i -> Pipeline -> engine -> sinks, in its own
interpreter (its own GIL). Started by the agent's WorkerPool (agent/workers/pool.py) as

    python -m infertap.agent.workers.worker --ring-fd F --conn-fd C --parent PID

with the ring's and a socket pair's descriptors passed open. It dies with the agent
(PR_SET_PDEATHSIG, and an agent that is gone when it starts or a closed socket both end it).

Its metrics are prometheus-client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, set by the
agent): the agent's /metrics merges every worker's. Events, call summaries (for the circuit
breaker and the policy's actions), flow ends and snapshots of its state go to the agent as one
Report per read interval; events only of the kinds the agent's subscribers want.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path

from prometheus_client import CollectorRegistry

from infertap.agent.export.event_hub import AgentEvent, EventHub
from infertap.agent.export.events import EventSink
from infertap.agent.export.metrics import FlowAccounting, InferenceMetrics, TrafficMetrics
from infertap.agent.export.pipeline_metrics import PipelineMetrics
from infertap.agent.export.tracing import CallTracer
from infertap.agent.export.tracing_spec import with_flags
from infertap.agent.flows.records import Endpoint, FlowEnd, FlowInfo
from infertap.agent.inspect.engine import InspectionEngine
from infertap.agent.kernel.ringbuf import RingReader
from infertap.agent.mirror.mirror import Mirror
from infertap.agent.mirror.spec import MirrorSpec
from infertap.agent.pipeline import Inspected, Pipeline, PipelineSink
from infertap.agent.pod_labels import PodDirectory, PodLabels
from infertap.agent.policy.applier import inspection_config
from infertap.agent.policy.schema import Policy
from infertap.agent.workers.messages import (
    CallSummary,
    PodNames,
    PolicyInForce,
    Report,
    Stop,
    Wants,
    WorkerSetup,
    WorkerSnapshot,
)

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
TICK_S = 1.0  # idle streams evicted this often (as the agent's own reader does)


class WorkerHub(EventHub):
    """The worker's side of the agent's event hub: wants() is what the agent's subscribers
    want (sent by the agent on every change); published events are kept for the next report."""

    def __init__(self, wants: Wants) -> None:
        super().__init__()
        self.set_wants(wants)
        self.outbox: list[AgentEvent] = []
        self._out_lock = threading.Lock()  # the mirror and tracer publish from their threads

    def set_wants(self, wants: Wants) -> None:
        self._wants_all = wants.all
        self._wanted = wants.kinds

    def publish(self, event: AgentEvent) -> None:
        if not self.wants(event.kind):
            return  # nobody in the agent would take it: not worth sending
        self.published += 1
        with self._out_lock:
            self.outbox.append(event)

    def take(self) -> list[AgentEvent]:
        with self._out_lock:
            out, self.outbox = self.outbox, []
        return out


class Forward(PipelineSink):
    """What the agent acts on: findings (the breaker and the policy's actions see every
    worker's), the (model, service) pairs the breaker blocks when it opens, and flow ends
    (verdicts and per-pod accounting)."""

    def __init__(self) -> None:
        self.calls: list[CallSummary] = []
        self.services: set[tuple[str, Endpoint]] = set()
        self.ends: list[FlowEnd] = []
        self.flows_started = 0
        self.inspected = 0

    def on_flow_start(self, flow: FlowInfo, ts_ns: int) -> None:
        self.flows_started += 1

    def on_flow_end(self, end: FlowEnd) -> None:
        self.ends.append(end)

    def on_inference(self, inspected: Inspected) -> None:
        self.inspected += 1
        event = inspected.event
        self.services.add((event.model, event.service))
        if inspected.findings:
            self.calls.append(
                CallSummary(
                    event.model,
                    event.service,
                    inspected.pod,
                    tuple(inspected.findings),
                    inspected.client_flow,
                )
            )


class Worker:
    """Everything after the ring buffer, for the flows of one ring."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.registry = CollectorRegistry()  # values live in the multiprocess files
        self.traffic = TrafficMetrics(self.registry)
        self.inference = InferenceMetrics(self.registry)
        self.engine = InspectionEngine()
        self.pods = PodDirectory(Path(setup.cgroup_mount))
        self._named: dict[str, PodLabels] = {}
        self.set_pods(setup.pods)
        self.hub = WorkerHub(setup.wants)
        self.mirror = Mirror(self.hub, self.registry)
        self.forward = Forward()
        self.pipeline = Pipeline(
            self.pods,
            (
                PipelineMetrics(self.traffic, FlowAccounting(), self.inference, self.pods),
                EventSink(self.hub, self.engine),
                self.forward,
                self.mirror,
            ),
            engine=self.engine,
            batch_size=setup.batch_size,
        )
        self.tracer = CallTracer(self.pods.labels, is_tls=self.pipeline.tls.is_tls)
        self.pipeline.add_sink(self.tracer)
        self.policy_hash = ""
        self.apply(setup.policy)
        self._stop = threading.Event()

    def apply(self, policy: Policy) -> None:
        """The inspection half of PolicyApplier.apply (the kernel half is the agent's). Raises
        PolicyError, changing nothing, when the policy cannot be put in force here."""
        config = inspection_config(policy)  # loads baselines: may raise before any change
        self.mirror.configure(self._own_sink(policy.mirror))
        self.engine.configure(config)
        self.inference.model_label.set_known(m.name for m in policy.models)
        self.tracer.configure(
            with_flags(policy.tracing, self.setup.otlp_endpoint, self.setup.trace_sample_ratio)
        )
        self.policy_hash = policy.hash

    def _own_sink(self, spec: MirrorSpec) -> MirrorSpec:
        """A mirror sink's files have one writer: each worker writes its own subdirectory."""
        if spec.sink is None:
            return spec
        own = str(Path(spec.sink.directory) / f"worker-{self.setup.index}")
        return replace(spec, sink=replace(spec.sink, directory=own))

    def set_pods(self, pods: dict[str, PodLabels]) -> None:
        mount = Path(self.setup.cgroup_mount)
        for path in set(self._named) - set(pods):
            self.pods.forget(mount / path.lstrip("/"))
        for path, (namespace, name) in pods.items():
            self.pods.register(mount / path.lstrip("/"), namespace, name)
        self._named = dict(pods)

    def request_stop(self) -> None:
        self._stop.set()

    def control(self, msg: object) -> Report | None:
        """A message from the agent; returns a report to send now, if any."""
        if isinstance(msg, Wants):
            self.hub.set_wants(msg)
        elif isinstance(msg, PolicyInForce):
            try:
                self.apply(msg.policy)
            except Exception as exc:  # PolicyError, or a mirror sink it cannot open here
                log.warning(
                    "policy %s not taken, keeping %s: %s", msg.policy.hash, self.policy_hash, exc
                )
                return Report(policy_error=str(exc))
        elif isinstance(msg, PodNames):
            self.set_pods(msg.pods)
        elif isinstance(msg, Stop):
            self._stop.set()
        return None

    def snapshot(self) -> WorkerSnapshot:
        snap = self.pipeline.snapshot()
        decoder = self.pipeline.decoder
        return WorkerSnapshot(
            index=self.setup.index,
            pid=os.getpid(),
            records=snap.records,
            exchanges=snap.exchanges,
            flows_started=self.forward.flows_started,
            calls=self.forward.inspected,
            protocols=snap.protocols,
            uninspected=snap.uninspected,
            uninspected_counts=decoder.uninspected_counts(),
            decode_lost=decoder.losses.counts(),
            skipped=snap.skipped,
            drift=self.engine.drift_values(),
            bins=dict(self.engine.bin_values()),
            policy_hash=self.policy_hash,
        )

    def report(self, with_snapshot: bool) -> Report:
        fwd = self.forward
        calls, fwd.calls = fwd.calls, []
        ends, fwd.ends = fwd.ends, []
        services, fwd.services = fwd.services, set()
        # A call without findings tells the breaker only which services serve its model.
        calls = [CallSummary(m, s, ("", ""), (), None) for m, s in services] + calls
        return Report(
            events=self.hub.take(),
            calls=calls,
            ends=ends,
            snapshot=self.snapshot() if with_snapshot else None,
        )

    def run(self, reader: RingReader, conn: Connection) -> None:
        """Read, inspect and report until told to stop (or the agent goes away)."""
        setup = self.setup
        self.mirror.start()
        last_tick = last_snapshot = time.monotonic()
        conn.send(self.report(with_snapshot=True))  # the agent knows this worker is up
        try:
            while not self._stop.is_set():
                if reader.wait(setup.read_interval_s):
                    reader.drain(self.pipeline.handle)
                now = time.monotonic()
                if now - last_tick >= TICK_S:
                    self.pipeline.tick(time.monotonic_ns())
                    last_tick = now
                self.pipeline.flush()
                while conn.poll(0):
                    reply = self.control(conn.recv())
                    if reply is not None:
                        conn.send(reply)
                due = now - last_snapshot >= setup.report_interval_s
                report = self.report(with_snapshot=due)
                if due:
                    last_snapshot = now
                if report:
                    conn.send(report)
            reader.drain(self.pipeline.handle)  # what the kernel sent before the stop
            self.pipeline.flush()
            conn.send(self.report(with_snapshot=True))
        except (EOFError, BrokenPipeError, ConnectionResetError):
            log.info("the agent went away: worker %d stops", setup.index)
        finally:
            self.mirror.stop()
            self.tracer.stop()
            reader.close()


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the agent dies, whatever the way; gone already: exit now."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infertap-worker")
    parser.add_argument("--ring-fd", type=int, required=True)
    parser.add_argument("--conn-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the agent, which stops us
    conn = Connection(args.conn_fd)
    try:
        setup: WorkerSetup = conn.recv()
    except EOFError:
        return 1
    logging.basicConfig(
        level=setup.log_level,
        format=f"%(asctime)s worker {setup.index} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    worker = Worker(setup)
    signal.signal(signal.SIGTERM, lambda _s, _f: worker.request_stop())
    worker.run(RingReader(args.ring_fd, setup.ring_size), conn)
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
