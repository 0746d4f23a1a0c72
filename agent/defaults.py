"""Defaults and address parsing shared by the agent and the CLI (kept light to import)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_API = "unix:/run/infertap/api.sock"
DEFAULT_METRICS = "127.0.0.1:9464"
DEFAULT_SAMPLE_BYTES = 4096  # bytes of each message copied to the ring (kernel cap: SAMPLE_MAX)
# Where bytes are sampled: "skb" (cgroup_skb/egress) or "sk_msg" (see bpf/intercept.c).
CAPTURE_CHOICES = ("skb", "sk_msg")
DEFAULT_CAPTURE = "skb"
DEFAULT_RUN_DIR = Path("/run/infertap")  # instance registry, API socket, kernel header tree
MAX_RINGS = 8  # inspection workers at most: one ring buffer each (ITAP_MAX_RINGS, structs.py)


def default_workers() -> int:
    """`run --workers` when not given: the CPUs this agent may run on (its cpuset), capped."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_RINGS))


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT; raises ValueError with a message for the user."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} must be HOST:PORT with a port from 0 to 65535, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)
