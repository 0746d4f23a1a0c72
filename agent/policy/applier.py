"""Putting a policy in force: inspection settings, mirroring, routes, sampling and watched ports,
polyfill rules, and whoever listens for the new policy (the findings' actions, model labels).

A policy that cannot be applied raises PolicyError before anything changes, so a reload never
replaces a good policy with a bad one. Each part of the agent it configures is given as a narrow
port, never the agent itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from infertap.agent.export.event_hub import AgentEvent
from infertap.agent.inspect.baseline import Baseline, BaselineError
from infertap.agent.inspect.engine import InspectionConfig, ModelInspection
from infertap.agent.kernel.steering import Route, SteeringError
from infertap.agent.mirror.spec import MirrorSpec
from infertap.agent.policy.loader import PolicyError
from infertap.agent.policy.schema import Policy, SamplingSpec
from infertap.agent.policy.watcher import PolicyWatcher
from infertap.agent.polyfill.unit import ClientPod, PolyfillRule

log = logging.getLogger(__name__)


class InspectionPort(Protocol):
    def configure(self, config: InspectionConfig) -> None: ...


class MirrorPort(Protocol):
    def configure(self, spec: MirrorSpec) -> None:
        """Raises PolicyError, changing nothing, when the spec cannot be used."""


class SensorPort(Protocol):
    """The interception unit's settings (agent/kernel/sensor.py)."""

    @property
    def started(self) -> bool: ...

    def set_ports(self, ports: list[int]) -> None: ...

    def set_sampling(self, sample_bytes: int, one_in: int) -> None: ...

    def set_accelerate(self, on: bool) -> None: ...

    @property
    def capture(self) -> str:
        """Where bytes are sampled ("skb" or "sk_msg"): fixed when the sensor starts."""
        ...


class RoutesPort(Protocol):
    """The steering unit (agent/kernel/steering.py), when loaded."""

    @property
    def started(self) -> bool: ...

    def set_routes(self, routes: list[Route] | tuple[Route, ...]) -> None: ...


class PolyfillPort(Protocol):
    def set_rules(self, rules: list[PolyfillRule]) -> None: ...


class ClientPort(Protocol):
    """Finds a polyfill rule's client pod (agent/polyfill/clients.py)."""

    def resolve(self, client: str) -> ClientPod | None: ...


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


class PolicyApplier:
    def __init__(
        self,
        policy: Policy,
        *,
        engine: InspectionPort,
        mirror: MirrorPort,
        sensor: SensorPort,
        publish: Callable[[AgentEvent], None],
        ports_from_policy: bool,
        accelerate: bool,
        capture_from_policy: bool = True,
        sampling: Callable[[SamplingSpec], tuple[int, int]] = lambda s: (
            s.sample_bytes,
            s.sample_one_in,
        ),
        steering: RoutesPort | None = None,
        polyfill: PolyfillPort | None = None,
        clients: ClientPort | None = None,
        listeners: Sequence[Callable[[Policy], None]] = (),
    ) -> None:
        """`ports_from_policy`: watch the policy's service ports (false when ports were given on
        the command line, which win, or without a policy file: then every TCP flow is watched,
        as `run` documents). `accelerate`: on from the command line whatever the policy says.
        `capture_from_policy`: the sensor's capture came from the policy (no `--capture`), so
        a reload asking for another one is worth a warning: it takes a restart.
        `sampling`: (sample_bytes, sample_one_in) to put in force for the policy's sampling
        section (flags given on the command line win).
        `listeners` are told each policy put in force, after everything else took it."""
        self.policy = policy
        self._engine = engine
        self._mirror = mirror
        self._sensor = sensor
        self._publish_event = publish
        self._ports_from_policy = ports_from_policy
        self._accelerate = accelerate
        self._capture_from_policy = capture_from_policy
        self._sampling = sampling
        self._steering = steering
        self._polyfill = polyfill
        self._clients = clients
        self._listeners = list(listeners)
        self._watcher: PolicyWatcher | None = None

    def apply(self, policy: Policy) -> None:
        """Put a policy in force. Raises PolicyError, leaving the current one, if it cannot."""
        config = inspection_config(policy)  # may raise: before anything changes
        self._mirror.configure(policy.mirror)  # may raise (sink directory), changing nothing
        self._apply_routes(policy)  # may raise too, changing nothing
        self._engine.configure(config)
        sensor = self._sensor
        if sensor.started:  # the maps exist
            if self._ports_from_policy:
                sensor.set_ports(sorted({s.port for s in policy.services}))
            sensor.set_sampling(*self._sampling(policy.sampling))
            sensor.set_accelerate(self._accelerate or policy.acceleration.enabled)
            if self._capture_from_policy and policy.sampling.capture != sensor.capture:
                log.warning(
                    "policy %s asks for %s capture; the agent keeps %s capture until restarted",
                    policy.hash,
                    policy.sampling.capture,
                    sensor.capture,
                )
            self._apply_polyfill(policy)  # rules whose client is not found yet are skipped
        for listener in self._listeners:
            listener(policy)
        self.policy = policy
        log.info("policy %s in force (%s)", policy.hash, policy.source)

    def _apply_polyfill(self, policy: Policy) -> None:
        unit = self._polyfill
        if unit is None or self._clients is None:
            if policy.polyfill:
                log.warning(
                    "policy %s has polyfill rules, but polyfill is not loaded (it loads"
                    " only when the starting policy has some): restart to apply them",
                    policy.hash,
                )
            return
        rules = []
        for spec in policy.polyfill:
            client = self._clients.resolve(spec.client)
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

    def _apply_routes(self, policy: Policy) -> None:
        steering = self._steering
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

    def _publish(self, kind: str, data: dict[str, object]) -> None:
        self._publish_event(AgentEvent(kind, time.monotonic_ns(), dict(data)))

    # ---- reloads ----

    def watch(self, path: Path) -> None:
        """Reload the policy file when it changes; a bad one is reported and the good one kept."""

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

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
