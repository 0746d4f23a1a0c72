"""The policy in force, and what it does: inspection settings, sampling and watched ports, the
actions taken on findings (log, alert, block the flow, trip the model's circuit breaker), and
reloads that never replace a good policy with a bad one."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from infertap.agent.enforce.breaker import CircuitBreaker, CircuitEvent
from infertap.agent.export.event_hub import AgentEvent
from infertap.agent.export.tracing_spec import TracingSpec
from infertap.agent.flows.records import Endpoint
from infertap.agent.inspect.baseline import Baseline, BaselineError
from infertap.agent.inspect.engine import InspectionConfig, ModelInspection
from infertap.agent.inspect.findings import Finding
from infertap.agent.kernel import cgroups
from infertap.agent.kernel.steering import SteeringError
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.policy.loader import PolicyError
from infertap.agent.policy.schema import Policy
from infertap.agent.policy.watcher import PolicyWatcher
from infertap.agent.polyfill.unit import ClientPod, PolyfillRule

if TYPE_CHECKING:
    from infertap.agent.runtime import Agent

log = logging.getLogger(__name__)


class _KernelPort:
    """The breaker's view of the verdict maps."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def block_service(self, service: Endpoint, reason: str) -> None:
        v = self._agent.verdicts.block_service(service, reason)
        if v is not None:
            self._agent.publish_verdict(v.describe(), {"action": "block"})

    def unblock_service(self, service: Endpoint) -> None:
        v = self._agent.verdicts.unblock_service(service)
        if v is not None:
            self._agent.publish_verdict(f"unblocked service {service}", {"action": "unblock"})


def inspection_config(policy: Policy) -> InspectionConfig:
    """The engine's settings from a policy; loads baselines (raises PolicyError on a bad one)."""
    models: dict[str, ModelInspection] = {}
    for spec in policy.models:
        if spec.baseline is None:
            continue
        try:
            baseline = Baseline.load(Path(spec.baseline))
        except (BaselineError, OSError) as exc:
            raise PolicyError([f"{policy.source}: models {spec.name}: baseline: {exc}"]) from exc
        models[spec.name] = ModelInspection(
            baseline, spec.drift.to_config(), spec.schema.to_config(), spec.features
        )
    return InspectionConfig(
        pii_enabled=policy.pii.enabled,
        pii_types=policy.pii.types,
        pii_custom=policy.pii.custom_patterns(),
        models=models,
    )


def _pids(cgroup: Path) -> list[int]:
    """Processes in a cgroup and its children."""
    pids: list[int] = []
    for folder in cgroups.walk(cgroup):
        try:
            pids += [int(p) for p in (folder / "cgroup.procs").read_text().split()]
        except OSError:
            continue
    return pids


class Governor:
    def __init__(self, agent: Agent, policy: Policy) -> None:
        self.agent = agent
        self.policy = policy
        self.breaker = CircuitBreaker.from_policy(policy, _KernelPort(agent))
        self._watcher: PolicyWatcher | None = None
        self._stop = threading.Event()
        self._netns_names: set[str] = set()
        self._ticker: threading.Thread | None = None

    # ---- policy ----

    def apply(self, policy: Policy) -> None:
        """Put a policy in force. Raises PolicyError, leaving the current one, if it cannot."""
        config = inspection_config(policy)  # may raise: before anything changes
        self.agent.mirror.configure(policy.mirror)  # may raise (sink directory), changing nothing
        self._apply_routes(policy)  # may raise too, changing nothing
        a = self.agent
        a.engine.configure(config)
        a.inference.model_label.set_known(m.name for m in policy.models)
        if a.sensor.headers is not None:  # started: the maps exist
            # Ports given on the command line win over the policy's; and without a policy file
            # (the built-in, observe-only one) every TCP flow is watched, as `run` documents.
            if not a.options.ports and a.options.policy is not None:
                a.sensor.set_ports(sorted({s.port for s in policy.services}))
            a.sensor.set_sampling(*a.options.sampling(policy.sampling))  # flags win
            a.sensor.set_accelerate(a.options.accelerate or policy.acceleration.enabled)
            self._apply_polyfill(policy)  # rules whose client is not found yet are skipped
        a.tracer.configure(self.tracing_spec(policy))
        self.breaker.reconfigure(policy)
        self.policy = policy
        a.policy_hash = policy.hash
        log.info("policy %s in force (%s)", policy.hash, policy.source)

    def tracing_spec(self, policy: Policy) -> TracingSpec:
        """The policy's tracing section with the command line's flags over it."""
        opts = self.agent.options
        spec = policy.tracing
        if opts.otlp_endpoint is not None:
            spec = replace(spec, endpoint=opts.otlp_endpoint)
        if opts.trace_sample_ratio is not None:
            spec = replace(spec, sample_ratio=opts.trace_sample_ratio)
        return spec

    def _apply_polyfill(self, policy: Policy) -> None:
        unit = self.agent.polyfill
        if unit is None:
            if policy.polyfill:
                log.warning(
                    "policy %s has polyfill rules, but polyfill is not loaded (it loads"
                    " only when the starting policy has some): restart to apply them",
                    policy.hash,
                )
            return
        rules = []
        for spec in policy.polyfill:
            client = self._client_pod(spec.client)
            if client is None:
                log.warning(
                    "polyfill: client %s has no cgroup or no process yet; rule skipped", spec.client
                )
                continue
            rules.append(
                PolyfillRule(
                    client, spec.service, spec.model, spec.version, dict(spec.set_parameters)
                )
            )
        unit.set_rules(rules)

    def _client_pod(self, client: str) -> ClientPod | None:
        """A rule's client as the rewriter needs it: its cgroup, and a name for its network
        namespace (attached from a process in the pod, as a pod's pause process would be)."""
        mount = self.agent.sensor.mount
        if client.startswith("/"):
            try:
                cgroup: Path | None = cgroups.resolve(client, mount)
            except cgroups.CgroupError:
                return None
        else:
            namespace, name = client.split("/", 1)
            cgroup = self.agent.pods.cgroup_of(namespace, name)
        if cgroup is None:
            return None
        pid = next(iter(_pids(cgroup)), None)
        if pid is None:
            return None
        netns = f"infertap-pf-{cgroups.cgroup_id(cgroup)}"
        if not (Path("/run/netns") / netns).exists():
            done = subprocess.run(
                ["ip", "netns", "attach", netns, str(pid)], capture_output=True, text=True
            )
            if done.returncode != 0:
                log.warning(
                    "polyfill: cannot name the netns of %s: %s", client, done.stderr.strip()
                )
                return None
            self._netns_names.add(netns)
        return ClientPod(cgroup, netns)

    def release_netns(self) -> None:
        """Remove the names we gave pods' network namespaces (the namespaces stay with the pods)."""
        for name in sorted(self._netns_names):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        self._netns_names.clear()

    def _apply_routes(self, policy: Policy) -> None:
        steering = self.agent.steering
        if steering is None or not steering.started:
            if policy.routes:
                log.warning(
                    "policy %s has routes, but steering is not loaded (it loads only when the"
                    " policy the agent starts with has routes): restart the agent to route",
                    policy.hash,
                )
            return
        try:
            steering.set_routes(policy.routes)
        except SteeringError as exc:
            raise PolicyError([f"{policy.source}: routes: {exc}"]) from exc

    def watch(self, path: Path) -> None:
        def on_change(policy: Policy) -> None:
            try:
                self.apply(policy)
                self._publish("policy", {"hash": policy.hash, "source": str(path)})
            except PolicyError as exc:
                on_error(str(exc))

        def on_error(message: str) -> None:
            log.warning("policy not reloaded, keeping %s: %s", self.policy.hash, message)
            self._publish("policy_error", {"description": message, "kept": self.policy.hash})

        self._watcher = PolicyWatcher(path, on_change, on_error, initial=self.policy)
        self._watcher.start()

    # ---- findings ----

    def on_inspected(
        self, event: InferenceEvent, findings: list[Finding], client_flow: int | None
    ) -> None:
        """Every inference event, with its findings (often none). Runs on the reader thread."""
        self.breaker.note_service(event.model, event.service)
        for f in findings:
            # Every finding goes to the breaker: it trips only on those whose action is
            # circuit_break, but needs the others too (a drift level falling back to "info" is
            # what lets an open circuit close).
            self._circuit(self.breaker.record(f, event.service))
            action = self.policy.action_for(f.kind, f.severity)
            if action == "block_flow" and client_flow is not None:
                v = self.agent.verdicts.block_flow(client_flow, f"{f.kind} {f.type}")
                if v is not None:
                    self.agent.publish_verdict(v.describe(), {"action": "block"})
            elif action == "alert":
                log.warning(
                    "%s %s finding on model %s at %s", f.severity, f.type, f.model, f.location
                )

    def states(self) -> dict[str, int]:
        return {m: int(s) for m, s in self.breaker.states().items()}

    def _circuit(self, events: list[CircuitEvent]) -> None:
        for ev in events:
            data = ev.to_data()
            log.warning(
                "circuit %s: %s -> %s (%s)",
                ev.model,
                data["from_state"],
                data["to_state"],
                ev.reason,
            )
            self._publish("circuit", data)

    def _publish(self, kind: str, data: dict[str, object]) -> None:
        self.agent.events.publish(AgentEvent(kind, time.monotonic_ns(), dict(data)))

    # ---- lifecycle ----

    def start(self) -> None:
        def tick() -> None:
            while not self._stop.wait(0.25):
                try:
                    self._circuit(self.breaker.tick())
                except Exception:
                    log.exception("circuit breaker tick failed")

        self._ticker = threading.Thread(target=tick, name="breaker", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.stop()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
