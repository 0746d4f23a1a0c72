"""The agent: owns the sensor, the reader thread (or the inspection workers), the metrics
server and the API server.

With `workers` > 1 the sensor has one ring buffer per worker, and each worker process
(agent/workers) runs a reader, a pipeline and its sinks for its ring; the agent keeps the kernel,
the API, discovery, the policy watcher, verdicts, the circuit breaker and the event hub, and reads
inspection state through an InspectionState (agent/workers/results.py) either way.

Start order matters for the "ready" line: programs loaded and attached, metrics serving, API
listening, then ready. Stop order is the reverse, and the sensor is always closed (detaching
everything) even when a later step failed.
"""

from __future__ import annotations

import functools
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, gc_collector, platform_collector, process_collector
from prometheus_client.multiprocess import MultiProcessCollector

from infertap.agent.api.port import AgentStatus, FlowRow, ModelsView
from infertap.agent.defaults import (
    DEFAULT_API,
    DEFAULT_METRICS,
    DEFAULT_RUN_DIR,
    parse_host_port,
)
from infertap.agent.discovery.open_sockets import (
    OpenConnection,
    UninspectedConnections,
    find_open_connections,
)
from infertap.agent.enforce.actions import FindingActions
from infertap.agent.enforce.verdicts import AnnouncedVerdicts, VerdictStore
from infertap.agent.errors import InfertapError
from infertap.agent.export.event_hub import AgentEvent, EventHub, Subscription
from infertap.agent.export.events import EventSink
from infertap.agent.export.metrics import (
    FlowAccounting,
    InferenceMetrics,
    KernelCollector,
    MetricsServer,
    ModelStateCollector,
    TrafficMetrics,
    VisibilityCollector,
    WorkerCollector,
)
from infertap.agent.export.pipeline_metrics import PipelineMetrics
from infertap.agent.export.tracing import CallTracer
from infertap.agent.export.tracing_spec import TracingSpec, with_flags
from infertap.agent.flows.records import Endpoint, FlowInfo
from infertap.agent.inspect.engine import InspectionEngine
from infertap.agent.kernel.ringbuf import RingReader
from infertap.agent.kernel.sensor import Sensor, SensorOptions
from infertap.agent.kernel.shedding import ShedController, ShedWatch
from infertap.agent.kernel.steering import Steering
from infertap.agent.kernel.tls import TlsUnit
from infertap.agent.mirror.mirror import Mirror
from infertap.agent.pipeline import Pipeline
from infertap.agent.pod_labels import PodDirectory
from infertap.agent.policy.applier import PolicyApplier
from infertap.agent.policy.loader import default_policy, load_policy
from infertap.agent.policy.schema import Policy, SamplingSpec, observe_only
from infertap.agent.polyfill.clients import ClientPods
from infertap.agent.polyfill.unit import Polyfill
from infertap.agent.workers.messages import Wants, WorkerSetup
from infertap.agent.workers.pool import WorkerPool, clean_metrics_dirs
from infertap.agent.workers.results import (
    InspectionState,
    LocalState,
    MergedState,
    ReportRouter,
)

log = logging.getLogger(__name__)


# Model calls inspected as one batch at most; a drain's calls are flushed when it ends anyway.
INSPECT_BATCH = 512
DRAIN_LIMIT = 2048  # records per drain, then the shed controller sees the fill again
READ_INTERVAL_S = 0.02  # samples reach the pipeline within this, unless the ring fills first
WORKER_REPORT_S = 0.5  # inspection workers send their state (API views, drift) this often
WORKER_START_S = 30.0  # workers that have not all reported by then: the start fails


class WorkerError(InfertapError):
    """The inspection workers cannot run; the message is one line for the user."""


@dataclass
class AgentOptions:
    cgroups: tuple[str, ...] = ()  # empty: node mode, the cgroup v2 root
    ports: tuple[int, ...] = ()
    metrics_addr: str | None = DEFAULT_METRICS  # None: no metrics server
    api_addr: str | None = DEFAULT_API  # None: no API server
    api_tls_dir: Path | None = None  # ca.pem, server.pem, server-key.pem: required for TCP
    api_allow: tuple[str, ...] = ()  # client identities that may change verdicts; () = any
    # None: not given, so the policy's sampling section decides (its own default when it has
    # none). A value given here (the `run` flag) wins over the policy, reloads included.
    sample_bytes: int | None = None
    sample_one_in: int | None = None
    run_dir: Path = DEFAULT_RUN_DIR
    policy: Path | None = None  # None: the built-in defaults, observing only (never blocking)
    kubernetes: bool = False  # attach to this node's inspected pods as discovery finds them
    node_name: str = ""  # with kubernetes: this node (the DaemonSet sets NODE_NAME)
    kube_api: Any = None  # with kubernetes: a KubeApi (tests); None = the in-cluster client
    ring_pages: int = 4096
    accelerate: bool = False  # same-node acceleration (off by default; on by flag or policy)
    tls_plaintext: bool = False  # uprobes on TLS libraries: decode HTTPS/gRPC-over-TLS too
    otlp_endpoint: str | None = None  # tracing: OTLP/gRPC host:port; given, it wins over policy
    trace_sample_ratio: float | None = None  # tracing: share of new traces; None = policy's
    capture: str | None = None  # "skb" or "sk_msg"; None: the policy's sampling.capture
    # Inspection processes, one ring buffer each (1: in this process, the reader thread).
    workers: int = 1
    extra: dict[str, str] = field(default_factory=dict)

    def sampling(self, policy: SamplingSpec) -> tuple[int, int]:
        """(sample_bytes, sample_one_in) in force: flag given > policy > default."""
        return (
            policy.sample_bytes if self.sample_bytes is None else self.sample_bytes,
            policy.sample_one_in if self.sample_one_in is None else self.sample_one_in,
        )

    def tracing(self, policy: TracingSpec) -> TracingSpec:
        """The policy's tracing section with the command line's flags over it."""
        return with_flags(policy, self.otlp_endpoint, self.trace_sample_ratio)

    @property
    def mode(self) -> str:
        if self.kubernetes:
            return "kubernetes"
        return "pods" if self.cgroups else "node"


class Agent:
    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        policy = load_policy(options.policy) if options.policy else observe_only(default_policy())
        sample_bytes, sample_one_in = options.sampling(policy.sampling)
        self.sensor = Sensor(
            SensorOptions(
                sample_bytes=sample_bytes,
                sample_one_in=sample_one_in,
                ports=options.ports,
                ring_pages=options.ring_pages,
                run_dir=options.run_dir,
                accelerate=options.accelerate,
                # The flag wins over the policy; fixed for the agent's life (see Governor).
                capture=options.capture or policy.sampling.capture,
                n_rings=options.workers,
            )
        )
        self.events = EventHub()
        self.registry = CollectorRegistry()
        for collector in (
            process_collector.ProcessCollector,
            platform_collector.PlatformCollector,
            gc_collector.GCCollector,
        ):
            collector(registry=self.registry)
        self.accounting = FlowAccounting()
        # With workers, theirs are served (merged from their multiprocess files): the agent's
        # own inspection metrics are never updated, so they are kept off the page.
        inspected = self.registry if options.workers == 1 else CollectorRegistry()
        self.traffic = TrafficMetrics(inspected)
        self.inference = InferenceMetrics(inspected)
        self.engine = InspectionEngine()
        self.policy_hash = ""
        self.pods = PodDirectory(self.sensor.mount)
        # Connections open before a cgroup was attached: listed at attach, never inspected.
        self.uninspected = UninspectedConnections()
        self.store = VerdictStore(self.sensor)
        # Every verdict change, whoever makes it (breaker, policy action, API), is an event.
        self.verdicts = AnnouncedVerdicts(self.store, self.events.publish)
        self.mirror = Mirror(self.events, inspected)  # configured by the policy applier
        self.actions = FindingActions(policy, self.verdicts, self.events.publish)
        self.pipeline = Pipeline(
            self.pods,
            (
                PipelineMetrics(self.traffic, self.accounting, self.inference, self.pods),
                EventSink(self.events, self.engine),
                self.actions,
                self.mirror,
            ),
            engine=self.engine,
            batch_size=INSPECT_BATCH,
        )
        # Configured by the policy applier.
        self.tracer = CallTracer(self.pods.labels, is_tls=self.pipeline.tls.is_tls)
        self.pipeline.add_sink(self.tracer)
        # Loaded only when the starting policy routes something: its getsockopt program runs
        # on every getsockopt in the pods. Routes added by a later reload need a restart.
        self.steering: Steering | None = None
        self.polyfill: Polyfill | None = None
        if policy.routes or policy.polyfill:
            self.steering = Steering(options.run_dir, cgroup_mount=self.sensor.mount)
        if self.steering is not None and policy.polyfill:
            self.polyfill = Polyfill(self.steering)
        self.clients = ClientPods(self.sensor.mount, self.pods.cgroup_of)
        self.policy = PolicyApplier(
            policy,
            engine=self.engine,
            mirror=self.mirror,
            sensor=self.sensor,
            publish=self.events.publish,
            # Ports given on the command line win over the policy's; and without a policy file
            # (the built-in, observe-only one) every TCP flow is watched, as `run` documents.
            ports_from_policy=not options.ports and options.policy is not None,
            accelerate=options.accelerate,
            capture_from_policy=options.capture is None,
            sampling=options.sampling,  # flags win over the policy
            steering=self.steering,
            polyfill=self.polyfill,
            clients=self.clients,
            listeners=(
                lambda p: self.inference.model_label.set_known(m.name for m in p.models),
                lambda p: self.tracer.configure(options.tracing(p.tracing)),
                self.actions.reconfigure,
                self._to_workers,
                self._policy_in_force,
            ),
        )
        self.tls: TlsUnit | None = None  # start_tls(): TLS plaintext capture (agent/kernel/tls.py)
        self.ready = False
        self.started_at = time.time()
        self._stop = threading.Event()
        self._stopped = False
        self._reader_thread: threading.Thread | None = None
        self._reader: RingReader | None = None
        # Overload shedding, one controller per ring: fed the ring's fill after each drain (one
        # worker: the read loop) or by a watch thread over every ring (workers).
        self.shed_controllers = [
            ShedController(functools.partial(self.sensor.set_shed_level, ring))
            for ring in range(options.workers)
        ]
        self.shedding = self.shed_controllers[0]  # ring 0's
        self._shed_watch: ShedWatch | None = None
        self.metrics: MetricsServer | None = None
        self.api: object | None = None
        self.reader_error: str = ""
        self._watcher: Any = None
        self._watch_thread: threading.Thread | None = None
        self.pool: WorkerPool | None = None  # with workers > 1, from start()
        self._metrics_dir: Path | None = None
        self.state: InspectionState = LocalState(self.pipeline, self.engine)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        if self.options.metrics_addr:
            # Bound first: a taken port (any local user can take one) fails before anything is
            # loaded or attached, with one line naming who holds it.
            host, port = parse_host_port(self.options.metrics_addr, "--metrics-addr")
            self.metrics = MetricsServer(
                self.registry, host, port, lambda: self.ready, self.healthy
            )
        self.sensor.start()
        if self.options.tls_plaintext:
            self.start_tls()
        if self.steering is not None:
            self.steering.start()  # before the policy is applied: it sets the routes
        self.policy.apply(self.policy.policy)
        if self.options.workers == 1:
            self.mirror.start()  # with workers, each mirrors its own calls
        self.actions.start()
        if self.options.policy is not None:
            self.policy.watch(self.options.policy)
        if self.sensor.swept:
            log.warning("removed %d program(s) a previous agent left attached", self.sensor.swept)
        if self.options.kubernetes:
            self._start_discovery()
        else:
            for cg in self.options.cgroups or ("/",):
                path = self.sensor.attach(cg)
                if self.steering is not None:
                    self.steering.attach(cg)
                self._find_uninspected(path)
        if self.options.workers > 1:
            self._start_workers()
        else:
            self._reader = RingReader(self.sensor.ring_fd, self.sensor.ring_size)
            self._reader_thread = threading.Thread(
                target=self._read_loop, name="ring-reader", daemon=True
            )
            self._reader_thread.start()
        self.registry.register(WorkerCollector(self.worker_restarts))
        self.registry.register(
            KernelCollector(self.sensor.flows, self.sensor.stats, self.pods.labels, self.accounting)
        )
        self.registry.register(VisibilityCollector(self.state.decode_lost, self.uninspected_counts))
        self.registry.register(
            ModelStateCollector(
                self.state.drift_values,
                self.actions.states,
                lambda: self.policy_hash,
                self.state.bin_values,
                model_label=self.inference.model_label.peek,
            )
        )
        if self.metrics is not None:
            self.metrics.start()
        if self.options.api_addr:
            from infertap.agent.api.server import ApiServer

            api = ApiServer(
                self, self.options.api_addr, self.options.api_tls_dir, self.options.api_allow
            )
            api.start()
            self.api = api
        self.ready = True

    def _start_workers(self) -> None:
        """One process per ring (agent/workers): they take over everything after the ring."""
        path = clean_metrics_dirs(self.options.run_dir)
        self._metrics_dir = path
        self.registry.register(MultiProcessCollector(None, path=str(path)))  # type: ignore[no-untyped-call]
        route = ReportRouter(
            self.events, self.actions, self.accounting, self.pods, self.inference.model_label
        )
        pool = WorkerPool(
            self.sensor.ring_fds,
            path,
            self._worker_setup,
            route,
            lambda: Wants(*self.events.wanted()),
            self.pods.named,
        )
        self.pool = pool
        self.state = MergedState(pool.snapshots)
        pool.start()
        self._shed_watch = ShedWatch(
            self.shed_controllers, self.sensor.ring_fds, self.sensor.ring_size, READ_INTERVAL_S
        )
        self._shed_watch.start()
        if not pool.wait_ready(WORKER_START_S):
            raise WorkerError(
                f"the inspection workers did not all start within {WORKER_START_S:.0f} s"
                " (see the log above)"
            )

    def _worker_setup(self, index: int) -> WorkerSetup:
        """Worker `index`'s first message, made when it (re)starts: the policy in force now."""
        return WorkerSetup(
            index=index,
            ring_size=self.sensor.ring_size,
            cgroup_mount=str(self.sensor.mount),
            policy=self.policy.policy,
            pods=self.pods.named(),
            wants=Wants(*self.events.wanted()),
            batch_size=INSPECT_BATCH,
            read_interval_s=READ_INTERVAL_S,
            report_interval_s=WORKER_REPORT_S,
            otlp_endpoint=self.options.otlp_endpoint,
            trace_sample_ratio=self.options.trace_sample_ratio,
            log_level=logging.getLogger().getEffectiveLevel(),
        )

    def _to_workers(self, policy: Policy) -> None:
        """A policy put in force here (so known good) goes to every worker."""
        if self.pool is not None:
            self.pool.policy_in_force(policy)

    def worker_restarts(self) -> int:
        return self.pool.restarts if self.pool is not None else 0

    def start_tls(self) -> TlsUnit:
        """Load the TLS plaintext unit (after the sensor: it shares its maps). Idempotent."""
        if self.tls is None:
            unit = TlsUnit(self.sensor)
            unit.start()
            self.tls = unit
        return self.tls

    def stop_tls(self) -> None:
        if self.tls is not None:
            self.tls.close()
            self.tls = None

    def _start_discovery(self) -> None:
        from infertap.agent.discovery.pod_watch import PodWatcher

        if not self.options.node_name:
            raise ValueError("--kubernetes needs the node name (NODE_NAME)")
        self._watcher = PodWatcher(
            self.options.node_name,
            self.sensor.mount,
            self._pod_event,
            api=self.options.kube_api,
            namespace_selector=self.policy.policy.discovery.namespace_selector,
        )
        self._watch_thread = threading.Thread(
            target=self._watcher.run, args=(self._stop,), name="pod-watch", daemon=True
        )
        self._watch_thread.start()

    def _pod_event(self, event: Any) -> None:
        """PodAdded / PodRemoved from discovery: attach or detach, and name the cgroup."""
        from infertap.agent.discovery.pod_watch import PodAdded

        if isinstance(event, PodAdded):
            path = self.sensor.attach(event.cgroup_path)
            self.pods.register(path, event.namespace, event.name)
            self._find_uninspected(path)
            action = "attached"
        else:
            self.sensor.detach(event.cgroup_path)
            self.pods.forget(event.cgroup_path)
            self.uninspected.forget_cgroup(Path(event.cgroup_path))
            action = "detached"
        self.events.publish(
            AgentEvent(
                "pod",
                time.monotonic_ns(),
                {"action": action, "namespace": event.namespace, "pod": event.name},
            )
        )

    def healthy(self) -> bool:
        if self.pool is not None:
            return self.pool.alive()
        return self._reader_thread is not None and self._reader_thread.is_alive()

    def stop(self) -> None:
        """Detach everything and stop serving. Safe to call more than once: later calls do
        nothing (the units are closed; polyfill would write to closed maps)."""
        if self._stopped:
            return
        self._stopped = True
        self.ready = False
        self._stop.set()
        api = self.api
        if api is not None:
            api.stop()  # type: ignore[attr-defined]
            self.api = None
        self.policy.stop()
        self.actions.stop()
        self.mirror.stop()  # before the hub closes: workers may still publish results
        self.tracer.stop()  # flushes the spans still queued
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=5)  # it detaches every pod as it ends
            self._watch_thread = None
        self.events.close()
        if self._shed_watch is not None:
            self._shed_watch.stop()  # before the rings and the level map go
            self._shed_watch = None
        if self.pool is not None:
            self.pool.stop()  # each drains its ring and sends its last report first
        if self._reader_thread is not None:
            self._reader_thread.join(timeout=5)
            self._reader_thread = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)  # the workers' metric files
            self._metrics_dir = None
        if self.polyfill is not None:
            self.polyfill.stop()  # its rewriters and map entries, before the maps go
        self.clients.release()
        if self.steering is not None:
            self.steering.close()
        self.stop_tls()  # before the sensor: its programs use the sensor's maps
        self.sensor.close()

    def wait(self) -> None:
        self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()

    # ---- the reader thread ---------------------------------------------------------------------

    def _read_loop(self) -> None:
        reader = self._reader
        assert reader is not None
        last_tick = time.monotonic()
        try:
            while not self._stop.is_set():
                # The kernel never wakes us (bpf/intercept.c ITAP_SUBMIT_FLAGS): this timeout
                # is how often samples are read.
                if reader.wait(READ_INTERVAL_S):
                    fill = reader.pending_bytes / reader.size  # the backlog this drain found
                    # Bounded drains: the shed controller hears of a filling ring in time.
                    reader.drain(self.pipeline.handle, DRAIN_LIMIT)
                    self.shedding.feed(fill)
                now = time.monotonic()
                if now - last_tick >= 1.0:
                    self.pipeline.tick(time.monotonic_ns())
                    last_tick = now
                self.pipeline.flush()  # the calls of this drain, inspected as one batch
            reader.drain(self.pipeline.handle)  # what the kernel sent before we stopped
            self.pipeline.flush()
        except Exception as exc:  # the reader must never take the agent down silently
            self.reader_error = str(exc)
            log.exception("ring buffer reader stopped")

    def _policy_in_force(self, policy: Policy) -> None:
        self.policy_hash = policy.hash

    # ---- views for the API (agent/api/port.py ControlPort): any thread ---------------------------

    def flows(self) -> list[FlowInfo]:
        return self.sensor.flows()

    def uninspected_counts(self) -> dict[str, int]:
        """Connections in the watched pods whose traffic is not inspected, by reason."""
        counts = self.uninspected.counts()
        for reason, n in self.state.uninspected_counts().items():
            counts[reason] = counts.get(reason, 0) + n
        return counts

    def _find_uninspected(self, cgroup: Path) -> None:
        """Right after attaching: the connections the pod already had, which sockops will never
        see. Reported as flows marked uninspected, a gauge, one event each and one log line."""
        ports = self.options.ports or (
            tuple(sorted({s.port for s in self.policy.policy.services}))
            if self.options.policy is not None
            else ()
        )
        known = {(f.local, f.remote) for f in self.sensor.flows()}

        def intercepted(local: Endpoint, remote: Endpoint) -> bool:
            return (local, remote) in known

        try:
            found = find_open_connections(cgroup, ports, intercepted)
        except OSError as exc:  # /proc raced with a pod going away: not worth failing start
            log.warning("could not list the open connections of %s: %s", cgroup, exc)
            return
        self.uninspected.add(found)
        if found:
            log.warning(
                "%d connection(s) in %s were open before infertap attached and are not"
                " inspected (see `infertap flows`)",
                len(found),
                cgroup,
            )
        for conn in found:
            self.events.publish(
                AgentEvent("uninspected", time.monotonic_ns(), self._uninspected_dict(conn))
            )

    def _uninspected_dict(self, conn: OpenConnection) -> dict[str, Any]:
        return {
            "reason": conn.reason,
            "id": conn.cookie,
            "role": conn.role.name.lower(),
            "local": str(conn.local),
            "remote": str(conn.remote),
            "cgroup": self._cgroup_text(conn.cgroup),
            "description": f"{conn.local} -> {conn.remote} not inspected: {conn.reason}",
        }

    def _cgroup_text(self, cgroup: Path) -> str:
        try:
            return "/" + str(cgroup.relative_to(self.sensor.mount))
        except ValueError:
            return str(cgroup)

    def status(self) -> AgentStatus:
        sample_bytes, sample_one_in = self.sensor.sampling() if self.sensor.headers else (0, 0)
        return AgentStatus(
            ready=self.ready,
            mode=self.options.mode,
            cgroups=[str(p) for p in self.sensor.attached],
            ports=list(self.options.ports),
            kernel_stats=self.sensor.stats(),
            flows_active=len(self.flows()),
            headers=self.sensor.headers.origin if self.sensor.headers else "",
            sample_bytes=sample_bytes,
            sample_one_in=sample_one_in,
            decode_lost={f"{p}/{r}": n for (p, r), n in sorted(self.state.decode_lost().items())},
            connections_uninspected=self.uninspected_counts(),
            workers=self.options.workers,
            worker_restarts=self.worker_restarts(),
            inspection_skipped={
                f"{model or 'unknown'}/{reason}": n
                for (model, reason), n in sorted(self.state.skipped().items())
            },
            shed_levels=self.sensor.shed_levels(self.options.workers)
            if self.sensor.headers
            else [],
        )

    def flow_rows(self) -> list[FlowRow]:
        protocols, uninspected = self.state.flow_states()
        rows = [
            FlowRow(
                f,
                self.pods.path_of(f.cgroup_id),
                protocols.get(f.cookie, ""),
                uninspected=uninspected.get(f.cookie, ""),
            )
            for f in self.flows()
        ]
        now = time.monotonic_ns()
        for c in self.uninspected.current():  # no kernel counters: the kernel never saw them
            flow = FlowInfo(c.cookie, c.role, c.local, c.remote, 0, now, sampled=False)
            rows.append(FlowRow(flow, self._cgroup_text(c.cgroup), "", uninspected=c.reason))
        return rows

    def models(self) -> ModelsView:
        return ModelsView(self.actions.states(), self.state.drift_values(), self.policy_hash)

    def subscribe(self, kinds: frozenset[str]) -> Subscription:
        return self.events.subscribe(kinds)
