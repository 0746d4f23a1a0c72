"""TLS plaintext capture: bpf/tls.c loaded as its own unit, and the uprobes it needs.

    with TlsUnit(sensor) as tls:   # after sensor.start(): its programs are in the sensor's object
        ...                        # a thread scans the watched cgroups' processes for TLS
                                   # libraries and hooks each library file once
                                   # leaving the block closes every uprobe and tracepoint

Discovery: every `scan_interval_s`, the processes in the sensor's attached cgroups (and their
child cgroups) are read from `cgroup.procs`, their mappings from `/proc/<pid>/maps`. A mapped
OpenSSL 3 (`libssl.so.3`) gets uprobes on SSL_write, SSL_write_ex, SSL_read and SSL_read_ex and
uretprobes on all four, attached to the library *file* (through `/proc/<pid>/root`, so a
container's own copy is the one hooked), for every process that maps it: a process started after
the file was hooked is covered from its first call. Records come only for sockets in the flow
table, so a process outside the watched cgroups that shares the file pays the uprobe's trap
(a few microseconds per call) and produces nothing.

grpcio links BoringSSL statically into its cygrpc extension, and the wheels strip its symbols:
such a library is counted (`libraries_stripped`) and its traffic stays encrypted to us.

The programs are compiled into the sensor's object (intercept.c includes bpf/tls.c) and
verified when this unit starts; this unit owns only the attachments. Uprobes are perf events held
by this process's file descriptors: closing them (on close, or when
the process dies) removes them from the kernel. BCC's own uprobe detach also writes to tracefs's
uprobe_events, which is not mounted here, so the descriptors are closed directly.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from infertap.agent.errors import InfertapError
from infertap.agent.kernel import btf, cgroups, structs

log = logging.getLogger(__name__)

# (symbol, entry program); every one also gets the shared return program.
OPENSSL_PROBES = (
    ("SSL_write", "itap_tls_write_enter"),
    ("SSL_write_ex", "itap_tls_write_ex_enter"),
    ("SSL_read", "itap_tls_read_enter"),
    ("SSL_read_ex", "itap_tls_read_ex_enter"),
)
RETURN_PROGRAM = "itap_tls_return"
TRACEPOINTS = (
    ("sock_send_length", "itap_tls_sock_send"),
    ("sock_recv_length", "itap_tls_sock_recv"),
)
OPENSSL_FILE = re.compile(r"/libssl\.so\.3$")
GRPC_BORINGSSL_FILE = re.compile(r"/cygrpc\.cpython-[^/]*\.so$")


class TlsError(InfertapError, RuntimeError):
    """The TLS unit cannot start; the message is one line for the user."""


def tls_cflags() -> list[str]:
    """Compiler flags for bpf/tls.c (part of intercept.c's object): where struct sock_common
    keeps the family and the IPv6 addresses in the running kernel, from its BTF."""
    flags = []
    for member, macro in (
        ("skc_family", "ITAP_SKC_FAMILY_OFF"),
        ("skc_v6_daddr", "ITAP_SKC_V6_DADDR_OFF"),
        ("skc_v6_rcv_saddr", "ITAP_SKC_V6_RCV_SADDR_OFF"),
    ):
        try:
            flags.append(f"-D{macro}={btf.member_offset('sock_common', member)}")
        except btf.BtfError as exc:
            log.warning("TLS capture: %s not found in the kernel's BTF: %s", member, exc)
    return flags


@dataclass(frozen=True, slots=True)
class TlsLibrary:
    """A TLS library file as hooked: its path inside the process that showed it, and where we
    opened it from."""

    kind: str  # "openssl" or "boringssl-grpc"
    path: str  # as /proc/<pid>/maps names it
    host_path: str  # /proc/<pid>/root/<path>
    device: int
    inode: int
    hooked: bool  # False: no usable symbols (stripped)


def mapped_tls_files(pid: int, proc: Path = Path("/proc")) -> list[tuple[str, str]]:
    """(kind, path) of the TLS libraries a process maps, once each."""
    try:
        text = (proc / str(pid) / "maps").read_text()
    except OSError:
        return []
    seen: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        path = parts[5].removesuffix(" (deleted)")
        if OPENSSL_FILE.search(path):
            seen.setdefault(path, "openssl")
        elif GRPC_BORINGSSL_FILE.search(path):
            seen.setdefault(path, "boringssl-grpc")
    return [(kind, path) for path, kind in seen.items()]


class TlsUnit:
    def __init__(
        self, sensor: Any, scan_interval_s: float = 0.1, proc: Path = Path("/proc")
    ) -> None:
        self.sensor = sensor
        self.scan_interval_s = scan_interval_s
        self.proc = proc
        self.libraries: dict[tuple[int, int], TlsLibrary] = {}
        self.counters: Counter[str] = Counter()
        self._bpf: Any = None
        self._tracepoints: list[str] = []
        self._uprobes: list[bytes] = []  # BCC event names of this unit's uprobes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # attach from the scanner vs close

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        b = self.sensor.bpf
        if b is None:
            raise TlsError("the TLS unit needs a started sensor (its programs are in its object)")
        from bcc import BPF

        try:
            # Verified now, so a program the kernel refuses is one clear error at start, not
            # a library that looks stripped later.
            for _sym, entry in OPENSSL_PROBES:
                b.load_func(entry.encode(), BPF.KPROBE)
            b.load_func(RETURN_PROGRAM.encode(), BPF.KPROBE)
            for tp, fn in TRACEPOINTS:
                b.attach_raw_tracepoint(tp=tp.encode(), fn_name=fn.encode())
                self._tracepoints.append(tp)
        except Exception as exc:
            self.close()
            raise TlsError(f"could not load the TLS programs: {exc}") from exc
        self._bpf = b
        self.scan()
        self._thread = threading.Thread(target=self._scan_loop, name="tls-scan", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Remove this unit's uprobes and tracepoints (the programs stay with the sensor's
        object, which releases them). Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            b = self.sensor.bpf
            self._bpf = None
            if b is None:
                return
            from bcc import lib

            for ev_name in self._uprobes:
                fd = b.uprobe_fds.pop(ev_name, None)
                if fd is not None:
                    lib.bpf_close_perf_event_fd(fd)
            self._uprobes.clear()
            for tp in self._tracepoints:
                try:
                    b.detach_raw_tracepoint(tp=tp.encode())
                except Exception as exc:
                    log.debug("raw tracepoint %s detach: %s", tp, exc)
            self._tracepoints.clear()

    def __enter__(self) -> TlsUnit:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- discovery -------------------------------------------------------------------------------

    def _scan_loop(self) -> None:
        while not self._stop.wait(self.scan_interval_s):
            try:
                self.scan()
            except Exception:  # a bug: keep scanning, the data path does not depend on it
                log.exception("TLS library scan failed")

    def _pids(self) -> list[int]:
        pids: list[int] = []
        for root in self.sensor.attached:
            for folder in cgroups.walk(root):
                try:
                    pids += [int(p) for p in (folder / "cgroup.procs").read_text().split()]
                except OSError:
                    continue
        return pids

    def scan(self) -> int:
        """Hook the TLS libraries of the watched processes not hooked yet. Returns how many
        library files were new."""
        new = 0
        for pid in self._pids():
            for kind, path in mapped_tls_files(pid, self.proc):
                host_path = f"{self.proc}/{pid}/root{path}"
                try:
                    st = os.stat(host_path)
                except OSError:
                    continue  # the process is gone
                key = (st.st_dev, st.st_ino)
                if key in self.libraries:
                    continue
                new += 1
                self.libraries[key] = self._hook(kind, path, host_path, key)
        return new

    def _hook(self, kind: str, path: str, host_path: str, key: tuple[int, int]) -> TlsLibrary:
        hooked = 0
        with self._lock:
            b = self._bpf
            if b is None:
                return TlsLibrary(kind, path, host_path, key[0], key[1], False)
            for sym, entry in OPENSSL_PROBES:
                try:
                    name, symbol = host_path.encode(), sym.encode()
                    before = set(b.uprobe_fds)
                    try:
                        b.attach_uprobe(name=name, sym=symbol, fn_name=entry.encode())
                        b.attach_uretprobe(name=name, sym=symbol, fn_name=RETURN_PROGRAM.encode())
                    finally:  # this unit owns what it attached, even half a pair
                        self._uprobes += [ev for ev in b.uprobe_fds if ev not in before]
                    hooked += 1
                except Exception as exc:  # the symbol is not there (stripped, or not OpenSSL 3)
                    log.debug("no uprobe on %s in %s: %s", sym, path, exc)
        if hooked:
            self.counters[f"libraries_{kind}"] += 1
            log.info("TLS plaintext: hooked %s (%s, %d functions)", path, kind, hooked)
        else:
            self.counters["libraries_stripped"] += 1
            log.warning(
                "TLS library %s (%s) has no SSL_read/SSL_write symbols (stripped): its traffic"
                " stays encrypted to infertap",
                path,
                kind,
            )
        return TlsLibrary(kind, path, host_path, key[0], key[1], hooked > 0)

    # ---- views -----------------------------------------------------------------------------------

    @property
    def uprobe_count(self) -> int:
        return len(self._uprobes)

    def stats(self) -> dict[str, int]:
        """Kernel counters (calls, bytes, samples, ...) and the library counts."""
        import ctypes as ct

        out = dict(self.counters)
        b = self._bpf
        if b is not None:
            table = b.get_table(b"itap_tls_stats")
            for i, name in enumerate(structs.TLS_STAT_NAMES):
                out[name] = int(sum(table[ct.c_int(i)]))
        return out
