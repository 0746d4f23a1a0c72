"""Fan-out of agent events to any number of subscribers (API streams, the TUI, tests).

Publishing never blocks the sample path: each subscriber has a bounded queue, and a subscriber
that falls behind loses its oldest events (counted) rather than slowing the agent.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AgentEvent:
    """One event. `kind` is "flow_start", "flow_end", "http", "verdict", "inference", "finding",
    "circuit" or "gap"; `data` holds plain values (no payload bytes, no raw PII)."""

    kind: str
    ts_ns: int
    data: dict[str, Any] = field(default_factory=dict)


class Subscription:
    def __init__(self, hub: EventHub, kinds: frozenset[str], maxlen: int) -> None:
        self._hub = hub
        self.kinds = kinds
        self._queue: collections.deque[AgentEvent] = collections.deque(maxlen=maxlen)
        self._cond = threading.Condition()
        self.dropped = 0
        self.closed = False

    def _offer(self, event: AgentEvent) -> None:
        if self.kinds and event.kind not in self.kinds:
            return
        with self._cond:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(event)
            self._cond.notify()

    def get(self, timeout: float) -> AgentEvent | None:
        """The next event, or None after `timeout` seconds or once closed."""
        with self._cond:
            if not self._queue and not self.closed:
                self._cond.wait(timeout)
            return self._queue.popleft() if self._queue else None

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self._hub._remove(self)


class EventHub:
    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self.published = 0
        # What the subscribers take, for wants(): read without the lock, replaced whole.
        self._wanted: frozenset[str] = frozenset()
        self._wants_all = False

    def subscribe(self, kinds: frozenset[str] = frozenset(), maxlen: int = 10000) -> Subscription:
        sub = Subscription(self, kinds, maxlen)
        with self._lock:
            self._subs.append(sub)
            self._update_wanted()
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
                self._update_wanted()

    def _update_wanted(self) -> None:
        self._wants_all = any(not s.kinds for s in self._subs)
        self._wanted = frozenset(k for s in self._subs for k in s.kinds)

    def wants(self, kind: str) -> bool:
        """Whether any subscriber takes events of `kind`: a publisher on the sample path can
        skip building an event nobody would receive."""
        return self._wants_all or kind in self._wanted

    def wanted(self) -> tuple[bool, frozenset[str]]:
        """(any subscriber takes every kind, the kinds subscribers name): what wants() answers
        from, for inspection workers that publish from another process."""
        return self._wants_all, self._wanted

    def publish(self, event: AgentEvent) -> None:
        self.published += 1
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            sub._offer(event)

    def close(self) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            sub.close()
