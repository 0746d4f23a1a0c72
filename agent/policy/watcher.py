"""Reload the policy file when it changes; a bad file never replaces a good running policy.

The file is polled (mtime, size, then content hash): inotify misses Kubernetes ConfigMap updates,
which swap a symlink two levels up, and polling a few KiB once a second costs nothing. A change is
reported once: an unchanged bad file does not repeat its error on every poll, and writing the
running policy back (same content) is not a change.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from infertap.agent.policy.loader import PolicyError, load_policy_text, read_policy_file
from infertap.agent.policy.schema import Policy

log = logging.getLogger(__name__)

_Stamp = tuple[int, int]  # (mtime_ns, size)
T = TypeVar("T")
RECENT_NS = 2_000_000_000
_UNREADABLE = "<unreadable>"


class PolicyWatcher:
    """Watches one policy file. `on_change(policy)` runs after each reload that changes the
    policy, `on_error(message)` with a one-line message when the file is unreadable
    or invalid; the previous policy stays current. Callbacks run on the polling thread (or the
    caller's, for check_now) and must not raise: an exception is logged and otherwise ignored."""

    def __init__(
        self,
        path: Path | str,
        on_change: Callable[[Policy], None],
        on_error: Callable[[str], None],
        interval_s: float = 1.0,
        initial: Policy | None = None,
    ) -> None:
        """Without `initial`, the file is loaded here and must be valid (PolicyError otherwise:
        an agent should not start blind). With it (e.g. the built-in policy), a bad file at
        start is reported through on_error and `initial` stays current; a good one replaces it
        through on_change."""
        self.path = Path(path)
        self._on_change = on_change
        self._on_error = on_error
        self._interval_s = interval_s
        self._lock = threading.Lock()  # one check at a time: thread and check_now() callers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stamp: _Stamp | None = None
        self._digest: str | None = None  # sha256 of the last content read, good or bad
        self._current: Policy
        if initial is not None:
            self._current = initial
            self.check_now()
        else:
            text = read_policy_file(self.path)
            self._current = self._parse(text)
            self._stamp = self._stat()
            self._digest = hashlib.sha256(text.encode()).hexdigest()

    @property
    def current(self) -> Policy:
        return self._current

    def _stat(self) -> _Stamp | None:
        try:
            st = os.stat(self.path)  # follows symlinks: a ConfigMap swap changes the target
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _parse(self, text: str) -> Policy:
        return load_policy_text(text, str(self.path), self.path.parent)

    def check_now(self) -> bool:
        """Poll once; True when a new policy was loaded."""
        with self._lock:
            outcome = self._check()
        # Callbacks run outside the lock, so one may read `current` or even call check_now.
        if isinstance(outcome, Policy):
            self._call(self._on_change, outcome)
            return True
        if outcome is not None:
            self._call(self._on_error, outcome + "; keeping the running policy")
        return False

    def _check(self) -> Policy | str | None:
        """A new policy, an error message, or None for no change."""
        stamp = self._stat()
        # A file rewritten within the filesystem's timestamp granularity can keep its mtime (and
        # size): while the mtime is recent, the content is read and hashed regardless.
        settled = stamp is not None and time.time_ns() - stamp[0] > RECENT_NS
        if stamp is not None and stamp == self._stamp and settled:
            return None
        self._stamp = stamp
        try:
            text = read_policy_file(self.path)
        except PolicyError as e:
            if self._digest == _UNREADABLE:
                return None  # deleted or unreadable: reported once, until it changes again
            self._digest = _UNREADABLE
            return str(e)
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self._digest:
            return None  # touched, or rewritten with the same bytes
        self._digest = digest
        try:
            policy = self._parse(text)
        except PolicyError as e:
            return str(e)
        if policy == self._current:
            return None  # only comments or formatting changed
        self._current = policy
        return policy

    def _call(self, callback: Callable[[T], None], arg: T) -> None:
        try:
            callback(arg)
        except Exception:
            log.exception("policy watcher callback failed")

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="policy-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.check_now()
            except Exception:  # a bug here must not end reloads for the agent's lifetime
                log.exception("policy check failed")
