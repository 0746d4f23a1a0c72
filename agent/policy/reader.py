"""Reading a policy's YAML tree: typed values with every problem collected as one line each,
and the PolicyError that carries them. Shared by the policy loader (agent/policy/loader.py) and
the sections other packages read themselves (agent/mirror/policy.py)."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from typing import Final, TypeVar, cast

from infertap.agent.errors import InfertapError
from infertap.agent.policy.yamltree import YMap, YNode, YScalar, YSeq

T = TypeVar("T")

_DURATION: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class PolicyError(InfertapError, ValueError):
    """A policy that cannot be used. `messages` holds every problem, one line each; str() is
    the first, with a count of the others, for places that show one line (logs, on_error)."""

    def __init__(self, messages: list[str]) -> None:
        self.messages = list(messages)
        first = self.messages[0] if self.messages else "invalid policy"
        more = len(self.messages) - 1
        super().__init__(first + (f" (and {more} more problem{'s' * (more > 1)})" if more else ""))


class _Reader:
    """Reads typed values out of a located YAML tree, recording problems instead of raising so
    one pass reports them all. A reader method returns None when the value is unusable; the
    caller then falls back to a default just to keep going (the policy is refused anyway)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []

    def error(self, line: int, path: str, message: str) -> None:
        where = f"{path}: " if path else ""
        self.errors.append(f"{self.source}:{line}: {where}{message}")

    def mapping(self, node: YNode, path: str, known: tuple[str, ...]) -> YMap | None:
        if not isinstance(node, YMap):
            self.error(node.line, path, "must be a mapping")
            return None
        for key, line in node.key_lines.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.error(line, _join(path, key), f"unknown key{hint}; known: {', '.join(known)}")
        return node

    def sequence(self, node: YNode, path: str) -> tuple[YNode, ...]:
        if isinstance(node, YScalar) and node.value is None:
            return ()  # `models:` with nothing after it: an empty list
        if not isinstance(node, YSeq):
            self.error(node.line, path, "must be a list")
            return ()
        return node.items

    def string(self, node: YNode, path: str) -> str | None:
        if not isinstance(node, YScalar) or not isinstance(node.value, str) or not node.value:
            self.error(node.line, path, _quote_hint(node, "must be a non-empty string"))
            return None
        return node.value

    def boolean(self, node: YNode, path: str) -> bool | None:
        if not isinstance(node, YScalar) or not isinstance(node.value, bool):
            self.error(node.line, path, "must be true or false")
            return None
        return node.value

    def integer(self, node: YNode, path: str, lo: int, hi: int) -> int | None:
        value = node.value if isinstance(node, YScalar) else None
        # bool is an int in Python; `port: yes` is a mistake, not 1.
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            self.error(node.line, path, f"must be an integer from {lo} to {hi}")
            return None
        return value

    def number(self, node: YNode, path: str, lo: float, hi: float, what: str) -> float | None:
        value = node.value if isinstance(node, YScalar) else None
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or not lo <= value <= hi
        ):
            self.error(node.line, path, f"must be a number {what}")
            return None
        return float(value)

    def duration(self, node: YNode, path: str) -> float | None:
        """Seconds, written as a number or as 500ms, 30s, 10m, 1h. Must be positive."""
        value = node.value if isinstance(node, YScalar) else None
        seconds: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
            seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        if seconds is None or not math.isfinite(seconds) or not 0 < seconds <= 86400 * 7:
            self.error(
                node.line, path, "must be a duration up to 7 days: seconds, or 500ms, 30s, 10m, 1h"
            )
            return None
        return seconds

    def choice(self, node: YNode, path: str, options: tuple[str, ...]) -> str | None:
        if not isinstance(node, YScalar) or node.value not in options:
            self.error(node.line, path, f"must be one of: {', '.join(options)}")
            return None
        return cast(str, node.value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _quote_hint(node: YNode, message: str) -> str:
    # YAML 1.1 turns unquoted true/yes/on, numbers and dates into non-strings.
    if isinstance(node, YScalar) and node.value is not None and not isinstance(node.value, str):
        kind = type(node.value).__name__
        return f"{message} (write it in quotes: YAML read {node.value!r} as a {kind})"
    return message


def _field(
    r: _Reader,
    m: YMap | None,
    path: str,
    key: str,
    read: Callable[[YNode, str], T | None],
    default: T,
) -> T:
    """m[key] read with `read`, or `default` when the key is absent (or its value unusable)."""
    if m is None or key not in m.items:
        return default
    value = read(m.items[key], _join(path, key))
    return default if value is None else value


def _required(
    r: _Reader, m: YMap, path: str, key: str, read: Callable[[YNode, str], T | None]
) -> T | None:
    if key not in m.items:
        r.error(m.line, _join(path, key), "required")
        return None
    return read(m.items[key], _join(path, key))
