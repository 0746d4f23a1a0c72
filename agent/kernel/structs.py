"""ctypes mirrors of the structs in bpf/infertap.h: the one Python copy.

tests/test_structs.py compiles the C header with the host compiler and checks every size and
field offset here against it, so a change on one side without the other fails the tests.
"""

from __future__ import annotations

import ctypes as ct
from pathlib import Path

from infertap.agent import defaults

BPF_DIR = Path(__file__).resolve().parent.parent.parent / "bpf"
HEADER = BPF_DIR / "infertap.h"

SAMPLE_SMALL = 512
SAMPLE_MEDIUM = 4096
SAMPLE_MAX = 16384

MAX_RINGS = defaults.MAX_RINGS  # ring buffers (inspection workers) at most: ITAP_MAX_RINGS

ROLE_CLIENT = 1
ROLE_SERVER = 2

CAPTURE_SKB = 1
CAPTURE_SK_MSG = 2
CAPTURE_MODES = {"skb": CAPTURE_SKB, "sk_msg": CAPTURE_SK_MSG}  # defaults.CAPTURE_CHOICES

SOCKHASH_NONE = 0
SOCKHASH_ALWAYS = 1
SOCKHASH_VERDICT = 2

H2_UNKNOWN = 0
H2_WALK = 1
H2_NO = 2

ACCEL_UNDECIDED = 0
ACCEL_YES = 1
ACCEL_NO = 2

REC_SAMPLE = 1
REC_FLOW_START = 2
REC_FLOW_END = 3
REC_FLOW_CGROUP = 4
REC_SHED = 5

# Overload shedding (ITAP_SHED_* in the header).
SHED_FULL = 100
SHED_UNDECIDED = 0
SHED_H1_SAMPLED = 1
SHED_H1_SHED = 2
SHED_KEEP = 3
SHED_DROP = 4
SHED_CONNECTION = 1
MAX_RINGS = 8

SAMPLE_TRUNCATED = 1
SAMPLE_PULL_FAILED = 2
SAMPLE_TLS = 4
SAMPLE_TLS_RECEIVED = 8

VERDICT_BLOCK = 1

# Index -> name of the per-CPU stats array (ITAP_STAT_* in the header, in order).
STAT_NAMES = (
    "msgs",
    "bytes",
    "samples",
    "samples_lost",
    "pull_failed",
    "verdict_drops",
    "flows_opened",
    "flows_closed",
    "flow_table_full",
    "events_lost",
    "untracked_msgs",
    "sockhash_failed",
    "bytes_unseen",
    "redirected",
    "redirect_missed",
    "retransmits",
    "sockhash_joined",
    "h2_frames",
    "h2_pieces",
    "h2_walk_lost",
    "requests_shed",
    "connections_shed",
)

# Index -> name of the TLS per-CPU stats array (ITAP_TLS_STAT_* in the header, in order).
TLS_STAT_NAMES = ("calls", "bytes", "samples", "samples_lost", "no_socket", "untracked")


class FlowKey(ct.Structure):
    _fields_ = (
        ("family", ct.c_uint16),
        ("pad", ct.c_uint16),
        ("local_port", ct.c_uint16),
        ("remote_port", ct.c_uint16),
        ("local_ip", ct.c_uint32 * 4),
        ("remote_ip", ct.c_uint32 * 4),
    )


class ServiceKey(ct.Structure):
    _fields_ = (
        ("family", ct.c_uint16),
        ("port", ct.c_uint16),
        ("ip", ct.c_uint32 * 4),
    )


class Flow(ct.Structure):
    _fields_ = (
        ("cookie", ct.c_uint64),
        ("cgroup_id", ct.c_uint64),
        ("start_ns", ct.c_uint64),
        ("msgs", ct.c_uint64),
        ("bytes", ct.c_uint64),
        ("drops", ct.c_uint64),
        ("samples", ct.c_uint64),
        ("samples_lost", ct.c_uint64),
        ("unseen_bytes", ct.c_uint64),
        ("next_offset", ct.c_uint64),
        ("seq_pos", ct.c_uint64),
        ("key", FlowKey),
        ("seq_last", ct.c_uint32),
        ("role", ct.c_uint8),
        ("sampled", ct.c_uint8),
        ("announced", ct.c_uint8),
        ("seq_ok", ct.c_uint8),
        ("accel", ct.c_uint8),
        ("capture", ct.c_uint8),
        ("sockhash", ct.c_uint8),
        ("h2", ct.c_uint8),
        ("h2_head_len", ct.c_uint8),
        ("ring", ct.c_uint8),
        ("shed", ct.c_uint8),
        ("pad2", ct.c_uint8),
        ("h2_next", ct.c_uint64),
        ("h2_keep", ct.c_uint64),
        ("h2_head", ct.c_uint32),
        ("requests_shed", ct.c_uint32),
    )


class Config(ct.Structure):
    _fields_ = (
        ("sample_bytes", ct.c_uint32),
        ("sample_one_in", ct.c_uint32),
        ("port_filter", ct.c_uint32),
        ("verdicts_active", ct.c_uint32),
        ("accelerate", ct.c_uint32),
        ("capture", ct.c_uint32),
        ("h2_walk", ct.c_uint32),
        ("n_rings", ct.c_uint32),
    )


# Steering (bpf/steer.c).
STEER_MAX_BACKENDS = 8

# Index -> name of the steering per-CPU stats array (ITAP_STEER_STAT_* in the header, in order).
STEER_STAT_NAMES = ("connects", "rewritten", "no_storage", "bad_route", "orig_dst", "polyfilled")


class SteerBackend(ct.Structure):
    _fields_ = (
        ("ip", ct.c_uint32 * 4),
        ("port", ct.c_uint16),
        ("pad", ct.c_uint16),
        ("weight_end", ct.c_uint32),
    )


class SteerRoute(ct.Structure):
    _fields_ = (
        ("slot", ct.c_uint32),
        ("n_backends", ct.c_uint32),
        ("total_weight", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("backends", SteerBackend * STEER_MAX_BACKENDS),
    )


class PolyfillKey(ct.Structure):
    _fields_ = (
        ("cgroup_id", ct.c_uint64),
        ("svc", ServiceKey),
        ("pad", ct.c_uint32),
    )


class PolyfillTarget(ct.Structure):
    _fields_ = (
        ("ip", ct.c_uint32),
        ("port", ct.c_uint16),
        ("up", ct.c_uint16),
        ("connects", ct.c_uint64),
    )


class Record(ct.Structure):
    _fields_ = (
        ("kind", ct.c_uint32),
        ("cap_len", ct.c_uint32),
        ("ts_ns", ct.c_uint64),
        ("cookie", ct.c_uint64),
        ("offset", ct.c_uint64),
        ("msg_len", ct.c_uint32),
        ("role", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("pad", ct.c_uint16),
    )


# Every mirrored struct under its C name, for the layout test.
MIRRORS: dict[str, type[ct.Structure]] = {
    "itap_flow_key": FlowKey,
    "itap_service_key": ServiceKey,
    "itap_flow": Flow,
    "itap_config": Config,
    "itap_record": Record,
    "itap_steer_backend": SteerBackend,
    "itap_steer_route": SteerRoute,
    "itap_polyfill_key": PolyfillKey,
    "itap_polyfill_target": PolyfillTarget,
}
