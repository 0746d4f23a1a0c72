"""Steering: weighted A/B routing of new connections at connect() time, loaded as one unit.

    with Steering() as steering:                  # compiles bpf/steer.c, loads, registers ids
        steering.attach(pod_cgroup)              # connect4, connect6 and getsockopt programs
        steering.set_routes([Route(Endpoint("10.0.0.200", 80),
                                   (Backend(Endpoint("10.0.0.2", 8000), 90),
                                    Backend(Endpoint("10.0.0.3", 8000), 10)))])
        steering.stats()                         # connections per service and backend
                                                 # leaving the block detaches everything

A connection is steered once, when it connects: its destination is rewritten before the first
packet, so established connections never move and a route change affects only new ones. The
application's original destination is answered by getsockopt(SO_ORIGINAL_DST).

Like the sensor, nothing is pinned and programs are attached with BPF_PROG_ATTACH: a killed agent
leaves them attached (still steering, with the routes it had) until the next agent's start-up
sweep (Sensor.sweep_stale covers the connect and getsockopt attach types) removes them.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import logging
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infertap.agent.defaults import DEFAULT_RUN_DIR
from infertap.agent.errors import InfertapError
from infertap.agent.flows.records import Endpoint
from infertap.agent.kernel import bpfsys, decode, structs
from infertap.agent.kernel.unit import KernelUnit, Program

log = logging.getLogger(__name__)

MAX_BACKENDS = structs.STEER_MAX_BACKENDS
MAX_TOTAL_WEIGHT = 1_000_000  # keeps the kernel's modulo draw unbiased to within 1e6 / 2^32

# (program name, BCC program type, attach type). bcc.BPFProgType values, written out so this
# module imports without bcc: CGROUP_SOCK_ADDR = 18, CGROUP_SOCKOPT = 25.
_PROGRAMS = (
    ("itap_connect4", 18, bpfsys.AttachType.CGROUP_INET4_CONNECT),
    ("itap_connect6", 18, bpfsys.AttachType.CGROUP_INET6_CONNECT),
    ("itap_getsockopt", 25, bpfsys.AttachType.CGROUP_GETSOCKOPT),
)


class SteeringError(InfertapError, RuntimeError):
    """Steering cannot start or a route set cannot be used; the message is one line."""


@dataclass(frozen=True, slots=True)
class Backend:
    endpoint: Endpoint
    weight: int  # relative: a backend gets weight / sum(weights) of new connections


@dataclass(frozen=True, slots=True)
class Route:
    service: Endpoint  # what applications connect to: a VIP or a pod's ip:port
    backends: tuple[Backend, ...]


def route_problems(route: Route) -> list[str]:
    """What is wrong with a route, one line each ([] when the kernel can take it)."""
    problems: list[str] = []
    svc_family = _family(route.service, problems)
    if not 1 <= route.service.port <= 65535:
        problems.append(f"service port {route.service.port} is out of range (1-65535)")
    if not 1 <= len(route.backends) <= MAX_BACKENDS:
        problems.append(f"a route needs 1 to {MAX_BACKENDS} backends, got {len(route.backends)}")
    seen: set[Endpoint] = set()
    for b in route.backends:
        if b.endpoint in seen:
            problems.append(f"backend {b.endpoint} is listed twice")
        seen.add(b.endpoint)
        if not 1 <= b.endpoint.port <= 65535:
            problems.append(f"backend {b.endpoint}: port out of range (1-65535)")
        # bool is an int: `weight: yes` is a mistake, not 1.
        if not isinstance(b.weight, int) or isinstance(b.weight, bool) or b.weight < 1:
            problems.append(f"backend {b.endpoint}: weight must be a positive integer")
        fam = _family(b.endpoint, problems)
        if svc_family is not None and fam is not None and fam != svc_family:
            # connect() can only be rewritten within the socket's address family.
            problems.append(f"backend {b.endpoint} is not in the service's address family")
    total = sum(b.weight for b in route.backends if isinstance(b.weight, int))
    if total > MAX_TOTAL_WEIGHT:
        problems.append(f"weights add up to {total}, more than {MAX_TOTAL_WEIGHT}")
    return problems


def _family(ep: Endpoint, problems: list[str]) -> int | None:
    try:
        ipaddress.ip_address(ep.ip)
    except ValueError:
        problems.append(f"{ep.ip!r} is not an IP address")
        return None
    return decode.ip_raw(ep.ip)[0]  # IPv4-mapped IPv6 counts as IPv4, as in the kernel


def _route_value(route: Route, slot: int) -> structs.SteerRoute:
    value = structs.SteerRoute()
    value.slot = slot
    value.n_backends = len(route.backends)
    end = 0
    for i, b in enumerate(route.backends):
        end += b.weight
        key = decode.service_key(b.endpoint)  # same address layout as the backend's
        value.backends[i].ip[:] = list(key.ip)
        value.backends[i].port = b.endpoint.port
        value.backends[i].weight_end = end
    value.total_weight = end
    return value


def _polyfill_key(cgroup_id: int, service: Endpoint) -> structs.PolyfillKey:
    key = structs.PolyfillKey()
    key.cgroup_id = cgroup_id
    key.svc = decode.service_key(service)
    return key


class Steering(KernelUnit):
    """The steering unit (bpf/steer.c): connect-time routes and polyfill steers per cgroup."""

    SOURCES = ("steer.c",)
    ERROR = SteeringError
    WHAT = "steering programs"
    ATTACH_LABEL = "steering"
    PRIVILEGES = "steering needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"

    def __init__(
        self,
        run_dir: Path = DEFAULT_RUN_DIR,
        max_routes: int = 256,
        cgroup_mount: Path | None = None,
    ) -> None:
        super().__init__(run_dir, cgroup_mount)
        self.max_routes = max_routes
        # Counter slots: twice the routes, so every route can move to a fresh slot (its
        # backends changed) while the old one is still in the map.
        self.max_slots = 2 * max_routes
        self._progs: list[Program] = []
        self._lock = threading.Lock()
        # Routes in the kernel, by service: the route and its counter slot.
        self._routes: dict[Endpoint, tuple[Route, int]] = {}
        # Polyfill steers in the kernel: (client cgroup id, service) -> rewriter port.
        self._polyfill: dict[tuple[int, Endpoint], int] = {}

    # ---- the unit's part of the lifecycle (agent/kernel/unit.py) ----------------------------

    def _check(self) -> None:
        if not 1 <= self.max_routes <= 65536:
            raise SteeringError(f"max_routes must be between 1 and 65536, got {self.max_routes}")

    def _cflags(self) -> list[str]:
        return [
            f"-DITAP_STEER_MAX_ROUTES={self.max_routes}",
            f"-DITAP_STEER_MAX_SLOTS={self.max_slots}",
        ]

    def _load(self, bpf: Any) -> list[Any]:
        self._progs = []
        for name, prog_type, attach_type in _PROGRAMS:
            fn = bpf.load_func(name.encode(), prog_type, attach_type=int(attach_type))
            self._progs.append((fn, attach_type))
        return [fn for fn, _ in self._progs]

    def _programs(self) -> list[Program]:
        return self._progs

    def _tear_down(self) -> None:
        self._routes = {}
        self._polyfill = {}

    def __enter__(self) -> Steering:
        self.start()
        return self

    # ---- routes ----------------------------------------------------------------------------

    def _table(self, name: str, key: type[Any] | None = None, leaf: type[Any] | None = None) -> Any:
        if self._bpf is None:
            raise SteeringError("steering is not started")
        return self._bpf.get_table(name.encode(), keytype=key, leaftype=leaf)

    def set_routes(self, routes: list[Route] | tuple[Route, ...]) -> None:
        """Make `routes` the route set. Raises SteeringError, changing nothing, when one is bad.

        Each route is replaced in one map update (the kernel swaps the hash element), so a
        connect sees a service's old route or its new one, never a mix; services no longer
        routed are deleted after the new set is in. A route whose backends are unchanged keeps
        its counters; one whose backends changed starts from zero.
        """
        problems: list[str] = []
        by_service: dict[Endpoint, Route] = {}
        for route in routes:
            problems += [f"route {route.service}: {p}" for p in route_problems(route)]
            key = decode.service_from_key(decode.service_key(route.service))  # fold v4-mapped
            if key in by_service:
                problems.append(f"route {route.service}: the service is routed twice")
            by_service[key] = route
        if len(by_service) > self.max_routes:
            problems.append(f"{len(by_service)} routes, more than the {self.max_routes} allowed")
        if problems:
            raise SteeringError("; ".join(problems))

        with self._lock:
            routes_map = self._table("itap_routes", structs.ServiceKey, structs.SteerRoute)
            counts = self._table("itap_steer_counts")
            used = {slot for _, slot in self._routes.values()}
            new_state: dict[Endpoint, tuple[Route, int]] = {}
            for service, route in by_service.items():
                old = self._routes.get(service)
                same_backends = old is not None and [b.endpoint for b in old[0].backends] == [
                    b.endpoint for b in route.backends
                ]
                if old is not None and same_backends:
                    slot = old[1]
                else:
                    slot = next(s for s in range(self.max_slots) if s not in used)
                    used.add(slot)
                    for i in range(MAX_BACKENDS):  # a reused slot starts from zero
                        del counts[ct.c_int(slot * MAX_BACKENDS + i)]
                routes_map[decode.service_key(service)] = _route_value(route, slot)
                new_state[service] = (route, slot)
            for service in self._routes.keys() - new_state.keys():
                del routes_map[decode.service_key(service)]
            self._routes = new_state
        log.info("steering: %d route(s) in force", len(new_state))

    # ---- request polyfill ------------------------------------------------------------------

    def set_polyfill(self, targets: Mapping[tuple[int, Endpoint], int]) -> None:
        """Make `targets` the polyfill steers: (client cgroup id, IPv4 service) -> the port of a
        rewriter listening on 127.0.0.1 in that client's network namespace. Checked before the
        routes. Entries are written `up`; an entry not in `targets` is deleted, so a client
        whose rewriter is gone connects to the service directly again."""
        problems: list[str] = []
        for (_cg, service), port in targets.items():
            if decode.ip_raw(service.ip)[0] != socket.AF_INET:
                problems.append(f"polyfill {service}: only IPv4 services can be polyfilled")
            if not 1 <= port <= 65535:
                problems.append(f"polyfill {service}: rewriter port {port} is out of range")
        if problems:
            raise SteeringError("; ".join(problems))
        with self._lock:
            table = self._table("itap_polyfill", structs.PolyfillKey, structs.PolyfillTarget)
            for (cg, svc), port in targets.items():
                if self._polyfill.get((cg, svc)) == port:
                    continue  # unchanged: keep its counter
                value = structs.PolyfillTarget()
                value.ip = int.from_bytes(socket.inet_aton("127.0.0.1"), "little")
                value.port = port
                value.up = 1
                table[_polyfill_key(cg, svc)] = value
            for cg, svc in self._polyfill.keys() - targets.keys():
                del table[_polyfill_key(cg, svc)]
            self._polyfill = dict(targets)

    def polyfill_counts(self) -> dict[tuple[int, Endpoint], int]:
        """Connects steered to a rewriter, by (client cgroup id, service), since its entry."""
        with self._lock:
            table = self._table("itap_polyfill", structs.PolyfillKey, structs.PolyfillTarget)
            out: dict[tuple[int, Endpoint], int] = {}
            for cg, svc in self._polyfill:
                try:
                    out[(cg, svc)] = int(table[_polyfill_key(cg, svc)].connects)
                except KeyError:
                    out[(cg, svc)] = 0
            return out

    def routes(self) -> list[Route]:
        return [route for route, _ in self._routes.values()]

    def stats(self) -> dict[Endpoint, dict[Endpoint, int]]:
        """Connections steered to each backend, by service, since its route got these backends."""
        with self._lock:
            counts = self._table("itap_steer_counts")
            out: dict[Endpoint, dict[Endpoint, int]] = {}
            for service, (route, slot) in self._routes.items():
                out[service] = {
                    b.endpoint: int(sum(counts[ct.c_int(slot * MAX_BACKENDS + i)]))
                    for i, b in enumerate(route.backends)
                }
            return out

    def counters(self) -> dict[str, int]:
        """The steering programs' own counters (STEER_STAT_NAMES)."""
        table = self._table("itap_steer_stats")
        return {
            name: int(sum(table[ct.c_int(i)])) for i, name in enumerate(structs.STEER_STAT_NAMES)
        }
