"""The agent's one Mirror: shadow mirroring and the mirror sink, fed by the pipeline.

    Pipeline -> Mirror.on_inference(inspected)   (a PipelineSink; reader thread: queue only)
        -> ShadowMirror.offer   (share, skip accounting, bounded queue -> shadow workers)
        -> MirrorSink.offer     (bounded queue -> JSONL writer)

The policy applier calls `configure()` with each policy it puts in force; the runtime calls
`start()` and `stop()`. `configure()` raises PolicyError, changing nothing, when the sink's
directory cannot be used, so a reload keeps the good policy.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry

from infertap.agent.export.event_hub import EventHub
from infertap.agent.mirror.shadow import ShadowMirror
from infertap.agent.mirror.shadow_metrics import ShadowMetrics
from infertap.agent.mirror.sink import MirrorSink
from infertap.agent.mirror.spec import MirrorSpec
from infertap.agent.models.inference_event import InferenceEvent
from infertap.agent.pipeline import Inspected, PipelineSink
from infertap.agent.policy.loader import PolicyError
from infertap.agent.protocols.messages import HttpExchange

log = logging.getLogger(__name__)


class Mirror(PipelineSink):
    def __init__(
        self,
        events: EventHub | None = None,
        registry: CollectorRegistry | None = None,
        seed: int | None = None,
    ) -> None:
        metrics = ShadowMetrics(registry) if registry is not None else None
        self.shadows = ShadowMirror(events, metrics, seed=seed)
        self.sink: MirrorSink | None = None
        self.spec = MirrorSpec()
        self._lock = threading.Lock()
        self._running = False

    def configure(self, spec: MirrorSpec) -> None:
        with self._lock:
            sink = self.sink
            if spec.sink != (sink.spec if sink is not None else None):
                new = None
                if spec.sink is not None:
                    try:
                        new = MirrorSink(spec.sink)
                    except OSError as exc:
                        raise PolicyError(
                            [f"mirror.sink.directory: cannot use {spec.sink.directory}: {exc}"]
                        ) from exc
                    if self._running:
                        new.start()
                if sink is not None:
                    sink.stop()
                self.sink = new
            self.spec = spec
        self.shadows.configure(spec)

    def start(self) -> None:
        with self._lock:
            self._running = True
            if self.sink is not None:
                self.sink.start()
        self.shadows.start()

    def stop(self) -> None:
        self.shadows.stop()
        with self._lock:
            self._running = False
            if self.sink is not None:
                self.sink.stop()

    def on_inference(self, inspected: Inspected) -> None:
        """Every decoded call, from the pipeline. Never blocks, never raises."""
        if inspected.event.stream_index:  # mirroring replays an exchange once: its first call
            return
        self.tap(inspected.exchange, inspected.event, inspected.pod)

    def tap(self, exchange: HttpExchange, event: InferenceEvent, pod: tuple[str, str]) -> None:
        """One exchange to mirror, with its decoded call and pod. Never blocks, never raises."""
        try:
            self.shadows.offer(exchange, event)
            sink = self.sink
            if sink is not None:
                sink.offer(event, "/".join(p for p in pod if p))
        except Exception:  # a bug here must not cost the reader thread a record
            log.exception("mirror tap failed")
