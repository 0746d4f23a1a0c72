"""The interception sensor: BPF programs and maps loaded, attached and removed as one unit.

    with Sensor(options) as sensor:      # compiles bpf/intercept.c, loads, sweeps stale programs
        sensor.attach(cgroup_path)       # sockops (and, with skb capture, cgroup_skb/egress) on a
        ...                              # pod cgroup (or the cgroup2 root: node mode); sk_msg is
                                         # attached to the sockhash at start
                                         # leaving the block detaches everything

Capture (options.capture, fixed for the sensor's life): "skb" samples at cgroup_skb/egress and
keeps sockets out of the sockhash unless a verdict or acceleration needs sk_msg on them
(`enforce_on` / `release`); "sk_msg" puts every socket in the sockhash and samples there.

Nothing is pinned, so a clean exit leaves nothing behind. A killed agent leaves its sockops
programs attached (they keep adding sockets to a sockhash whose sk_msg program the kernel has
already dropped, so traffic flows untouched); the next agent's start removes them.
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infertap.agent.defaults import DEFAULT_CAPTURE, DEFAULT_RUN_DIR, DEFAULT_SAMPLE_BYTES
from infertap.agent.errors import InfertapError
from infertap.agent.flows.records import FlowInfo
from infertap.agent.kernel import bpfsys, btf, cgroups, decode, structs, tls
from infertap.agent.kernel.instances import RegistryUnreadable
from infertap.agent.kernel.ringbuf import PAGE_SIZE
from infertap.agent.kernel.unit import KernelUnit, Program

log = logging.getLogger(__name__)

PROGRAM_PREFIX = "itap_"  # every infertap program's name starts with this (stale sweep key)
SWEPT_ATTACH_TYPES = (
    bpfsys.AttachType.CGROUP_SOCK_OPS,
    bpfsys.AttachType.CGROUP_INET_EGRESS,
    bpfsys.AttachType.CGROUP_INET4_CONNECT,
    bpfsys.AttachType.CGROUP_INET6_CONNECT,
    bpfsys.AttachType.CGROUP_GETSOCKOPT,
)


class SensorError(InfertapError, RuntimeError):
    """The sensor cannot start; the message is one line for the user."""


@dataclass(frozen=True)
class SensorOptions:
    sample_bytes: int = DEFAULT_SAMPLE_BYTES
    sample_one_in: int = 1  # 1 = every flow, N = one flow in N, 0 = none
    ports: tuple[int, ...] = ()  # watched model-service ports; empty = all TCP
    ring_pages: int = 4096  # 16 MiB per ring buffer
    n_rings: int = 1  # ring buffers, one per inspection worker (1..structs.MAX_RINGS)
    max_flows: int = 65536
    run_dir: Path = DEFAULT_RUN_DIR
    accelerate: bool = False  # same-node acceleration: redirect to intercepted peer sockets
    capture: str = DEFAULT_CAPTURE  # "skb" (cgroup_skb/egress) or "sk_msg": where bytes are sampled
    http2_frames: bool = True  # skb capture keeps HTTP/2 header blocks whole (frame walk)
    extra_cflags: tuple[str, ...] = field(default_factory=tuple)


class Sensor(KernelUnit):
    """The interception unit (bpf/intercept.c): sockops adds sockets to the sockhash, sk_msg or
    cgroup_skb samples their bytes into the ring buffer, verdicts block them."""

    # One object for interception and TLS plaintext (bpf/tls.c uses intercept.c's maps).
    SOURCES = ("intercept.c", "tls.c")
    ERROR = SensorError
    WHAT = "BPF programs"
    ATTACH_LABEL = "sockops"
    PRIVILEGES = (
        "infertap needs root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN) to load "
        "BPF programs; run it as root"
    )

    def __init__(self, options: SensorOptions, cgroup_mount: Path | None = None) -> None:
        super().__init__(options.run_dir, cgroup_mount)
        self.options = options
        self._sockops: Any = None
        self._msg: Any = None
        self._skb: Any = None
        self._sockhash_fd = -1
        self._extra_rings: list[int] = []  # rings 1..n_rings-1 (ring 0 is BCC's itap_events)
        self._tables: dict[tuple[str, Any, Any], Any] = {}
        self._lock = threading.Lock()  # map writes from API threads and the policy engine
        self.swept = 0
        self.write_seq_tracking = False

    # ---- the unit's part of the lifecycle (agent/kernel/unit.py) ----------------------------

    def _check(self) -> None:
        for opt, lo, hi in (
            ("sample_bytes", 0, structs.SAMPLE_MAX),
            ("sample_one_in", 0, 1 << 30),
        ):
            val = getattr(self.options, opt)
            if not lo <= val <= hi:
                raise SensorError(f"{opt} must be between {lo} and {hi}, got {val}")
        if not 1 <= self.options.n_rings <= structs.MAX_RINGS:
            raise SensorError(
                f"ring buffers (workers) must be between 1 and {structs.MAX_RINGS}, "
                f"got {self.options.n_rings}"
            )
        if self.options.capture not in structs.CAPTURE_MODES:
            raise SensorError(
                f"capture must be one of {', '.join(structs.CAPTURE_MODES)}, "
                f"got {self.options.capture!r}"
            )
        for port in self.options.ports:
            if not 1 <= port <= 65535:
                raise SensorError(f"port {port} is out of range (1-65535)")

    def _cflags(self) -> list[str]:
        return [
            *self._write_seq_cflags(),
            *tls.tls_cflags(),
            f"-DITAP_RING_PAGES={self.options.ring_pages}",
            f"-DITAP_MAX_FLOWS={self.options.max_flows}",
            *self.options.extra_cflags,
        ]

    def _load(self, bpf: Any) -> list[Any]:
        from bcc import BPF

        self._sockops = bpf.load_func(b"itap_sockops", BPF.SOCK_OPS)
        self._msg = bpf.load_func(b"itap_msg", BPF.SK_MSG)
        self._skb = bpf.load_func(b"itap_skb_egress", BPF.CGROUP_SKB)
        return [self._sockops, self._msg, self._skb]

    def _set_up(self) -> None:
        self.swept = self.sweep_stale()
        self._set_up_rings()
        self._configure()
        from bcc import BPF, BPFAttachType

        self._sockhash_fd = self._table_fd("itap_socks")
        BPF.attach_func(self._msg, self._sockhash_fd, BPFAttachType.SK_MSG_VERDICT)

    def _tear_down(self) -> None:
        if self._msg is not None and self._sockhash_fd >= 0:
            from bcc import BPF, BPFAttachType

            try:
                BPF.detach_func(self._msg, self._sockhash_fd, BPFAttachType.SK_MSG_VERDICT)
            except Exception as exc:
                log.debug("sk_msg detach: %s", exc)
        self._sockhash_fd = -1
        for fd in self._extra_rings:
            os.close(fd)  # itap_rings holds its own references until the object is released
        self._extra_rings = []
        self._tables.clear()

    def _set_up_rings(self) -> None:
        """Ring 0 is itap_events; the others are made here, of the same size (the map of maps
        takes only rings like its template), and all go into itap_rings before anything is
        attached, so no flow ever names an empty slot."""
        rings = self._table_fd("itap_rings")
        bpfsys.map_set_fd(rings, 0, self._table_fd("itap_events"))
        for i in range(1, self.options.n_rings):
            fd = bpfsys.ringbuf_create(f"itap_ring{i}", self.ring_size)
            self._extra_rings.append(fd)
            bpfsys.map_set_fd(rings, i, fd)

    def _write_seq_cflags(self) -> list[str]:
        """Enable true stream offsets when the kernel's BTF tells us where write_seq lives."""
        try:
            off = btf.member_offset("tcp_sock", "write_seq")
        except btf.BtfError as exc:
            log.warning("stream offsets will count only bytes sk_msg sees: %s", exc)
            self.write_seq_tracking = False
            return []
        self.write_seq_tracking = True
        return [f"-DITAP_WRITE_SEQ_OFF={off}"]

    def _configure(self) -> None:
        self.set_ports(self.options.ports)
        self.set_sampling(self.options.sample_bytes, self.options.sample_one_in)
        self.set_accelerate(self.options.accelerate)
        with self._lock:
            self._update_config(
                capture=structs.CAPTURE_MODES[self.options.capture],
                h2_walk=1 if self.options.http2_frames else 0,
                n_rings=self.options.n_rings,
            )

    def __enter__(self) -> Sensor:
        self.start()
        return self

    # ---- attach / detach -------------------------------------------------------------------

    @property
    def capture(self) -> str:
        return self.options.capture

    def _programs(self) -> list[Program]:
        programs: list[Program] = [(self._sockops, bpfsys.AttachType.CGROUP_SOCK_OPS)]
        if self.options.capture == "skb":
            programs.append((self._skb, bpfsys.AttachType.CGROUP_INET_EGRESS))
        return programs

    def sweep_stale(self) -> int:
        """Detach infertap programs that no live agent owns, from every cgroup. Returns count."""
        try:
            live = self._registry.live_prog_ids() | set(self._registry.own_prog_ids())
        except RegistryUnreadable as exc:
            log.warning("not sweeping stale programs: %s", exc)
            return 0
        removed = 0
        for cg in cgroups.walk(self.mount):
            for attach_type in SWEPT_ATTACH_TYPES:
                try:
                    ids = bpfsys.query_cgroup(str(cg), attach_type)
                except OSError:
                    continue
                for prog_id in ids:
                    info = bpfsys.prog_info_by_id(prog_id)
                    if info is None or not info.name.startswith(PROGRAM_PREFIX):
                        continue
                    if prog_id in live:
                        continue
                    if bpfsys.detach_by_id(str(cg), attach_type, prog_id):
                        removed += 1
                        log.warning(
                            "removed %s (id %d) left attached to %s by a dead agent",
                            info.name,
                            prog_id,
                            cg,
                        )
        self._registry.remove_dead()
        return removed

    # ---- maps ------------------------------------------------------------------------------

    def _table_fd(self, name: str) -> int:
        from bcc import libbcc

        fd = int(libbcc.lib.bpf_table_fd(self._bpf.module, name.encode()))
        if fd < 0:
            raise SensorError(f"map {name} not found")
        return fd

    def table(self, name: str, key: type[Any] | None = None, leaf: type[Any] | None = None) -> Any:
        """A BCC view of a map, made once per (name, key, leaf) and reused."""
        cache_key = (name, key, leaf)
        table = self._tables.get(cache_key)
        if table is None:
            table = self._bpf.get_table(name.encode(), keytype=key, leaftype=leaf)
            self._tables[cache_key] = table
        return table

    @property
    def bpf(self) -> Any:
        """The BCC object (None before start and after close): the TLS unit attaches its
        programs, which intercept.c includes, from it."""
        return self._bpf

    @property
    def ring_fd(self) -> int:
        """Ring 0: with one ring (one worker), every record."""
        return self._table_fd("itap_events")

    @property
    def ring_fds(self) -> list[int]:
        """Every ring, by index (flow.ring): one per inspection worker."""
        return [self.ring_fd, *self._extra_rings]

    @property
    def ring_size(self) -> int:
        return self.options.ring_pages * PAGE_SIZE  # the reader maps it with the same size

    def set_ports(self, ports: tuple[int, ...] | list[int]) -> None:
        with self._lock:
            table = self.table("itap_watch_ports", ct.c_uint16, ct.c_uint8)
            table.clear()
            for port in ports:
                table[ct.c_uint16(port)] = ct.c_uint8(1)
            self._update_config(port_filter=1 if ports else 0)

    def set_sampling(self, sample_bytes: int, one_in: int) -> None:
        with self._lock:
            self._update_config(
                sample_bytes=min(sample_bytes, structs.SAMPLE_MAX), sample_one_in=one_in
            )

    def sampling(self) -> tuple[int, int]:
        """(sample_bytes, sample_one_in) as the kernel's config map holds them now."""
        with self._lock:
            cfg = self.table("itap_config", ct.c_uint32, structs.Config)[ct.c_uint32(0)]
            return int(cfg.sample_bytes), int(cfg.sample_one_in)

    def _update_config(self, **fields: int) -> None:
        table = self.table("itap_config", ct.c_uint32, structs.Config)
        cfg = table[ct.c_uint32(0)]
        for name, value in fields.items():
            setattr(cfg, name, value)
        table[ct.c_uint32(0)] = cfg

    def set_accelerate(self, on: bool) -> None:
        """Same-node acceleration for flows whose first send comes after this (see intercept.c)."""
        with self._lock:
            self._update_config(accelerate=1 if on else 0)

    def set_http2_frames(self, on: bool) -> None:
        """Walk HTTP/2 frames in skb capture (header blocks kept whole) for flows detected from
        now on; off, HTTP/2 flows are sampled like any other (the benchmark's control row)."""
        with self._lock:
            self._update_config(h2_walk=1 if on else 0)

    def set_shed_level(self, ring: int, level: int) -> None:
        """Overload shedding for a ring's flows: the percent of new requests (or connections)
        the kernel leaves unsampled, at message boundaries (agent/kernel/shedding.py)."""
        if not 0 <= ring < structs.MAX_RINGS or not 0 <= level <= structs.SHED_FULL:
            raise ValueError(f"shed level {level} for ring {ring} is out of range")
        with self._lock:
            table = self.table("itap_shed_level", ct.c_uint32, ct.c_uint32)
            table[ct.c_uint32(ring)] = ct.c_uint32(level)

    def shed_levels(self, rings: int = 1) -> list[int]:
        """The shed level of the first `rings` rings, as the kernel's map holds them now."""
        with self._lock:
            table = self.table("itap_shed_level", ct.c_uint32, ct.c_uint32)
            return [int(table[ct.c_uint32(i)].value) for i in range(rings)]

    def set_verdicts_active(self, count: int) -> None:
        with self._lock:
            self._update_config(verdicts_active=count)

    def _socket_fd(self, flow: FlowInfo, cgroup_hint: Path | None) -> int | None:
        from infertap.agent.kernel import sockets

        hints = [cgroup_hint] if cgroup_hint is not None else self._cgroups.paths
        return sockets.find_socket(flow.cookie, hints)

    def refresh_socket(self, flow: FlowInfo, cgroup_hint: Path | None = None) -> bool:
        """Give a flow's socket a fresh psock, clearing a verdict the kernel cached on it.

        See agent/kernel/sockets.py for why. Returns False when the socket cannot be found (it
        closed, or its process is gone); the flow then stays as the kernel left it.
        """
        fd = self._socket_fd(flow, cgroup_hint)
        if fd is None:
            return False
        try:
            key = decode.flow_key(flow)
            map_fd = self._table_fd("itap_socks")
            with self._lock:
                # Deleting drops the socket's only psock (and its cached verdict) at once;
                # inserting makes a new one with no verdict, so sk_msg runs on the next send.
                bpfsys.map_delete(map_fd, key)
                bpfsys.sockhash_insert(map_fd, key, fd)
            return True
        finally:
            os.close(fd)

    def enforce_on(self, flow: FlowInfo, cgroup_hint: Path | None = None) -> bool:
        """Make sure sk_msg runs on a flow's sends, so a verdict on it takes effect on its next
        send. A socket outside the sockhash (skb capture) joins it through a descriptor of ours.
        Returns False when the socket cannot be found (it closed, or its process is gone)."""
        if flow.sockhash_always:
            return True
        fd = self._socket_fd(flow, cgroup_hint)
        if fd is None:
            return False
        try:
            with self._lock:
                # BPF_ANY: already in (sockops put it there, or an earlier verdict) is fine.
                bpfsys.sockhash_insert(self._table_fd("itap_socks"), decode.flow_key(flow), fd)
            return True
        except bpfsys.BpfError as exc:
            log.warning("flow %d: cannot put its socket in the sockhash: %s", flow.cookie, exc)
            return False
        finally:
            os.close(fd)

    def release(self, flow: FlowInfo) -> bool:
        """No verdict applies to the flow any more: clear a drop the kernel cached on its socket.
        A socket that joined the sockhash only for a verdict leaves it (and runs at native
        speed again); one that lives there gets a fresh psock. Returns False when a socket
        that needed a descriptor could not be found."""
        if flow.sockhash_always:
            return not flow.drops or self.refresh_socket(flow)
        with self._lock:
            # Leaving takes the psock, and any verdict cached on it, with it.
            bpfsys.map_delete(self._table_fd("itap_socks"), decode.flow_key(flow))
        return True

    def in_sockhash(self, flow: FlowInfo) -> bool:
        """Whether the flow's socket is in the sockhash now (sk_msg runs on its sends)."""
        key = bytes(decode.flow_key(flow))
        with self._lock:
            return key in bpfsys.map_keys(self._table_fd("itap_socks"), structs.FlowKey)

    def flows(self) -> list[FlowInfo]:
        table = self.table("itap_flows", structs.FlowKey, structs.Flow)
        out = []
        for _key, value in table.items():
            out.append(decode.decode_flow(bytes(value)))
        return out

    def stats(self) -> dict[str, int]:
        table = self.table("itap_stats")
        return {name: int(sum(table[ct.c_int(i)])) for i, name in enumerate(structs.STAT_NAMES)}
