"""Overload shedding control: a ring's fill in, the kernel's shed level for that ring out.

When the inspector falls behind, its ring buffer fills; past a point the kernel would lose
samples in the middle of messages (torn calls, HTTP/2 connections gone dark). Before that, this
controller raises the ring's level in `itap_shed_level` (bpf/intercept.c): the kernel then leaves
that share of NEW requests (HTTP/1) or new connections (anything else) unsampled, at message
boundaries, and keeps sampling what it started. With one inspection worker the agent's read loop
calls `feed` once per drain with the fill it found (bytes waiting when the drain began, over the
ring's size); with several (`run --workers N`), whose processes drain their own rings,
`ShedWatch` reads every ring's fill from the agent every `interval_s` and feeds each ring's
controller.

Hysteresis: at or above `high`, while the fill still grows, the level rises by `step_up` per
reading (and at least to `panic_level` when the fill reaches `panic`); a high fill that is
already falling holds the level (the backlog is draining: raising more would only wind up and
then shed far more than needed); at or below `low` it falls by `step_down`; in between it
holds. It rises fast and falls slowly because a full ring tears requests at once while a level
too high only skips a few more whole ones: at 3x what a worker sustains, a 16 MiB ring of small
V2 REST calls fills in well under a second (benchmarks/overload.py).

The level only changes the kernel's map when it moves, so a quiet ring costs nothing. Plain
arithmetic on one number per ring: the data path never waits on it, and a stopped controller
leaves the last level in force until the sensor closes (which drops the map).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from infertap.agent.kernel.ringbuf import RingFill
from infertap.agent.kernel.structs import SHED_FULL

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ShedThresholds:
    """Ring fill shares (0..1) and level steps (percent of new requests shed)."""

    high: float = 0.4  # raise the level at or above this fill
    low: float = 0.15  # lower it at or below this fill
    panic: float = 0.7  # jump to at least panic_level: the ring is about to overflow
    step_up: int = 20
    step_down: int = 2
    panic_level: int = 80

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high <= self.panic <= 1:
            raise ValueError("shedding thresholds need 0 <= low < high <= panic <= 1")
        if not (0 < self.step_up <= SHED_FULL and 0 < self.step_down <= SHED_FULL):
            raise ValueError(f"shedding steps must be between 1 and {SHED_FULL}")
        if not 0 <= self.panic_level <= SHED_FULL:
            raise ValueError(f"shedding panic_level must be between 0 and {SHED_FULL}")


class ShedController:
    """The shed level of one ring, set through `apply(level)` (the sensor's map write)."""

    def __init__(
        self, apply: Callable[[int], None], thresholds: ShedThresholds | None = None
    ) -> None:
        self._apply = apply
        self.thresholds = thresholds or ShedThresholds()
        self.level = 0
        self.raised = 0  # times the level went up (a busy ring's history, for status and tests)
        # While held, the read loop's fill readings (feed) change nothing: a level set by hand
        # (tests, benchmarks' control rows) stays in force.
        self.hold = False
        self._last_fill = 0.0

    def feed(self, fill: float) -> None:
        """The read loop's call after each drain: observe, unless held."""
        if not self.hold:
            self.observe(fill)

    def observe(self, fill: float) -> int:
        """The ring's fill (0..1) at the start of a drain; returns the level now in force."""
        t = self.thresholds
        level = self.level
        rising = fill >= self._last_fill
        self._last_fill = fill
        if fill >= t.high:
            if rising:
                level = min(SHED_FULL, level + t.step_up)
            if fill >= t.panic:
                level = max(level, t.panic_level)
        elif fill <= t.low:
            level = max(0, level - t.step_down)
        self.set_level(level)
        return self.level

    def set_level(self, level: int) -> None:
        level = max(0, min(SHED_FULL, level))
        if level == self.level:
            return
        if level > self.level:
            self.raised += 1
        self._apply(level)
        self.level = level


class ShedWatch:
    """The agent's thread that sheds for inspection workers: each ring's fill (RingFill, the
    ring's position pages mapped read-only) to that ring's controller, every `interval_s`."""

    def __init__(
        self,
        controllers: Sequence[ShedController],
        ring_fds: Sequence[int],
        ring_size: int,
        interval_s: float,
    ) -> None:
        if len(controllers) != len(ring_fds):
            raise ValueError("one controller per ring")
        self.controllers = list(controllers)
        self._fills = [RingFill(fd, ring_size) for fd in ring_fds]
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shed-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._interval_s):
                for ctl, fill in zip(self.controllers, self._fills, strict=True):
                    ctl.feed(fill.fill)
        except Exception:  # a failed map write: shedding stops, inspection goes on
            log.exception("overload shedding stopped")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for fill in self._fills:
            fill.close()
