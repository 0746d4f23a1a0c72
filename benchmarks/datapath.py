"""Data-path benchmark: what intercepting traffic costs, against no interception and a sidecar.

Six configurations, each on its own client/server pod pair from one Lab, measured in the same
run:

  none           no interception
  agent          the infertap Agent attached to both pods' cgroups, watching the two benchmark
                 ports, default capture (skb: cgroup_skb/egress) and default sampling (every
                 flow, the first 4 KiB of every skb into the ring buffer, read by the agent's
                 thread in this process); sockets stay out of the sockhash
  agent_sk_msg   the same with sk_msg capture: every socket in the sockhash, the first 4 KiB of
                 every message sampled by sk_msg
  agent_unsampled  skb capture with no flow sampled (sample_one_in 0): the programs run, look the
                 flow up and count, but nothing goes to the ring; against `agent` it shows what
                 the ring copy and the reader cost, against `none` what the per-skb work costs
  agent_verdict  skb capture, and the measured flows in the sockhash as a verdict puts them there
                 (a flow verdict on another connection keeps verdict lookups on): what a flow a
                 verdict targets, but does not block, pays
  accel          agent + same-node acceleration (sk_msg redirect to the peer socket)
  sidecar        the proxy way: iptables nat REDIRECT inside the pods' namespaces to HAProxy
                 (mode tcp); inbound in the server pod, and outbound in the client pod too as
                 Istio does (`--sidecar inbound` leaves the client side out)

Each pair is set up once (the agent is started once and stopped at the end), then the rounds
interleave the configurations, rotating their order, so slow drift on a small shared machine
(another engineer's tests, thermal, page cache) spreads over all of them instead of biasing
whichever ran last. A round is a sockperf TCP ping-pong (512-byte messages; p50/p99 round-trip;
both ends pinned to one CPU unless --latency-cpu -1, because on a 2-CPU machine the scheduler
otherwise flips between same-CPU and cross-CPU wakeups) and an iperf3 bulk transfer (one stream,
received bits per second, unpinned); the table shows the median of the rounds.

Run as root: .venv/bin/python -m benchmarks.datapath [--seconds N] [--rounds N] [--json]

--json prints {seconds, rounds, message_bytes, latency_cpu, cpus, kernel, configs: [{config,
label, median: {p50_us, p99_us, gbps}, ratio: {p50, p99, throughput}, rounds: [...]}],
agent_counters (the default agent's), agent_counters_by_config, agent_capture,
agent_reader_error, valid, sidecar_redirected, verdict_flows_joined, targets, accel_redirected}.
Config keys: none, agent (the default capture), agent_sk_msg, agent_unsampled, agent_verdict,
accel, sidecar. Keys are only ever added.
Exit status 1 when the run is not valid (the agent took no samples, or the sidecar's rules
redirected nothing); PASS/MISS against the targets does not change it.
Traffic stays between the Lab's namespaces (and loopback inside one); iptables rules are only
ever added inside the pods' namespaces, and are deleted explicitly before the Lab goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from infertap.agent.testbed.lab import Lab, Pod

SOCKPERF_PORT = 11111
IPERF_PORT = 5201
SERVICE_PORTS = (SOCKPERF_PORT, IPERF_PORT)
# HAProxy listeners, one per service port: REDIRECT to a fixed-backend proxy loses the original
# port, so each service gets its own (Istio uses one port and SO_ORIGINAL_DST; same data path).
INBOUND_PORTS = {SOCKPERF_PORT: 15011, IPERF_PORT: 15201}
OUTBOUND_PORTS = {SOCKPERF_PORT: 16011, IPERF_PORT: 16201}
# The client-side proxy runs as this user so its own upstream connections are exempt from the
# OUTPUT redirect (Istio does the same with uid 1337). Debian's haproxy package creates it.
PROXY_USER = "haproxy"

MESSAGE_BYTES = 512
TARGET_P50 = 1.05  # default agent p50 latency at most this times no-agent
TARGET_THROUGHPUT = 0.90  # default agent bulk throughput at least this times no-agent
TARGET_ACCEL_P50 = 0.95  # issue: with same-node acceleration, p50 at most 0.95x of plain
AGENT_COUNTERS = (
    "msgs",
    "samples",
    "samples_lost",
    "events_lost",
    "pull_failed",
    "retransmits",
    "sockhash_joined",
)


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    # Progress goes to stderr so `--json` leaves stdout to the result alone.
    print(msg, file=sys.stderr, flush=True)


# ---- one measurement --------------------------------------------------------------------------


@dataclass
class Measurement:
    p50_us: float
    p99_us: float
    gbps: float


def parse_sockperf(text: str) -> tuple[float, float]:
    """p50 and p99 (usec) from sockperf's percentile lines, e.g. `---> percentile 50.000 = 9.1`."""
    found: dict[str, float] = {}
    for m in re.finditer(r"percentile\s+(\d+\.\d+)\s*=\s*([\d.]+)", text):
        found[m.group(1)] = float(m.group(2))
    if "50.000" not in found or "99.000" not in found:
        raise BenchError(f"no p50/p99 in sockperf output:\n{text}")
    return found["50.000"], found["99.000"]


def parse_iperf3(text: str) -> float:
    """Received bits per second from `iperf3 -J` output."""
    try:
        result = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchError(f"iperf3 did not print JSON: {exc}\n{text[-2000:]}") from exc
    if "error" in result:
        raise BenchError(f"iperf3: {result['error']}")
    return float(result["end"]["sum_received"]["bits_per_second"])


def run_client(pod: Pod, argv: Sequence[str], seconds: float) -> str:
    try:
        done = pod.run(argv, timeout=seconds + 30, capture_output=True, text=True)
    except subprocess.TimeoutExpired as exc:  # pod.run killed it
        raise BenchError(f"{argv[0]} in pod {pod.name} did not finish in {exc.timeout}s") from exc
    if done.returncode != 0:
        raise BenchError(
            f"{argv[0]} exited with {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return str(done.stdout) + str(done.stderr)  # sockperf prints its results on stderr


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def measure(client: Pod, server_ip: str, seconds: int, cpu: int | None) -> Measurement:
    out = run_client(
        client,
        # --full-rtt: report the request/response round trip, not sockperf's default RTT/2
        pinned(
            f"sockperf pp --tcp --full-rtt -i {server_ip} -p {SOCKPERF_PORT} "
            f"-m {MESSAGE_BYTES} -t {seconds}".split(),
            cpu,
        ),
        seconds,
    )
    p50, p99 = parse_sockperf(out)
    out = run_client(
        client,
        ["iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
        seconds,
    )
    return Measurement(p50_us=p50, p99_us=p99, gbps=parse_iperf3(out) / 1e9)


# ---- pods, servers, proxies ---------------------------------------------------------------------


def wait_listening(pod: Pod, port: int, proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """Wait until something in the pod listens on `port`; fail early if `proc` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited with {proc.returncode} in pod {pod.name}")
        ss = pod.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
        if ss.stdout.strip():
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listening on port {port} in pod {pod.name} after {timeout}s")


def start_servers(server: Pod, cpu: int | None) -> None:
    # 0.0.0.0: the same servers answer direct traffic and the sidecar's on 127.0.0.1. Both stay
    # up for all rounds; Lab.close() kills them with the pod.
    sockperf = server.popen(
        pinned(["sockperf", "sr", "--tcp", "-i", "0.0.0.0", "-p", str(SOCKPERF_PORT)], cpu),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    iperf = server.popen(
        ["iperf3", "-s", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(server, SOCKPERF_PORT, sockperf)
    wait_listening(server, IPERF_PORT, iperf)


def haproxy_config(routes: dict[int, str]) -> str:
    """A mode-tcp HAProxy config: listen port -> backend address, defaults otherwise."""
    lines = [
        "global",
        f"    user {PROXY_USER}",
        f"    group {PROXY_USER}",
        "    maxconn 1024",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 10m",
        "    timeout server 10m",
    ]
    for port, backend in routes.items():
        lines += [f"listen p{port}", f"    bind :{port}", f"    server app {backend}"]
    return "\n".join(lines) + "\n"


class Sidecar:
    """iptables REDIRECT + HAProxy inside the pods' namespaces; `close()` deletes the rules."""

    def __init__(self, client: Pod, server: Pod, outbound: bool, workdir: Path) -> None:
        self.client = client
        self.server = server
        self.outbound = outbound
        self.workdir = workdir
        self.rules: list[tuple[Pod, str]] = []  # (pod, rule) as added, for -D

    @property
    def label(self) -> str:
        sides = "client + server" if self.outbound else "server only"
        return f"sidecar (iptables REDIRECT + HAProxy, {sides})"

    def start(self) -> None:
        self._proxy(
            self.server, "server", {INBOUND_PORTS[p]: f"127.0.0.1:{p}" for p in SERVICE_PORTS}
        )
        for port in SERVICE_PORTS:
            # -i eth0: only traffic arriving from the network; HAProxy's own connections to the
            # app over loopback must not be redirected back to it.
            self._rule(
                self.server,
                f"PREROUTING -i eth0 -p tcp --dport {port} "
                f"-j REDIRECT --to-ports {INBOUND_PORTS[port]}",
            )
        if not self.outbound:
            return
        self._proxy(
            self.client,
            "client",
            {OUTBOUND_PORTS[p]: f"{self.server.ip}:{p}" for p in SERVICE_PORTS},
        )
        for port in SERVICE_PORTS:
            self._rule(
                self.client,
                f"OUTPUT -p tcp -d {self.server.ip} --dport {port} -m owner ! --uid-owner "
                f"{PROXY_USER} -j REDIRECT --to-ports {OUTBOUND_PORTS[port]}",
            )

    def _proxy(self, pod: Pod, name: str, routes: dict[int, str]) -> None:
        cfg = self.workdir / f"haproxy-{name}.cfg"
        cfg.write_text(haproxy_config(routes))
        errlog = (self.workdir / f"haproxy-{name}.log").open("w")
        # -db: stay in the foreground, so the process we hold is the proxy and killing its
        # process group stops it.
        proc = pod.popen(["haproxy", "-db", "-f", str(cfg)], stdout=errlog, stderr=errlog)
        errlog.close()
        try:
            for port in routes:
                wait_listening(pod, port, proc)
        except BenchError as exc:
            text = (self.workdir / f"haproxy-{name}.log").read_text()
            raise BenchError(f"{exc}\nhaproxy said:\n{text}") from exc

    def _iptables(self, pod: Pod, *args: str) -> None:
        # `ip netns exec` (inside pod.run) puts iptables in the pod's namespace: the host's
        # tables are never touched.
        done = pod.run(["iptables", "-w", "-t", "nat", *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"iptables {' '.join(args)} in pod {pod.name}: {done.stderr.strip()}")

    def _rule(self, pod: Pod, rule: str) -> None:
        """Append `rule` ("CHAIN match... -j target") to the pod's nat table; close() deletes it."""
        self._iptables(pod, "-A", *rule.split())
        self.rules.append((pod, rule))

    def redirected(self) -> dict[str, int]:
        """Connections each side's REDIRECT rules caught (a nat rule sees only the first packet)."""
        counts: dict[str, int] = {}
        for side, pod in (("client", self.client), ("server", self.server)):
            if not any(p is pod for p, _ in self.rules):
                continue
            out = pod.run(
                ["iptables", "-w", "-t", "nat", "-L", "-v", "-n", "-x"],
                capture_output=True,
                text=True,
            )
            # rule lines start with the packet count: "  12  720 REDIRECT  6  --  eth0 ..."
            counts[side] = sum(
                int(f[0]) for f in map(str.split, out.stdout.splitlines()) if f[2:3] == ["REDIRECT"]
            )
        return counts

    def close(self) -> None:
        for pod, rule in reversed(self.rules):
            with contextlib.suppress(Exception):  # keep going: delete what we can
                self._iptables(pod, "-D", *rule.split())
        self.rules.clear()
        # the HAProxy processes belong to the pods; Lab.close() kills them


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class Config:
    key: str
    label: str
    client: Pod
    server: Pod
    measurements: list[Measurement] = field(default_factory=list)

    def median(self) -> Measurement:
        return Measurement(
            p50_us=statistics.median(s.p50_us for s in self.measurements),
            p99_us=statistics.median(s.p99_us for s in self.measurements),
            gbps=statistics.median(s.gbps for s in self.measurements),
        )


@contextlib.contextmanager
def started_agent(
    client: Pod,
    server: Pod,
    accelerate: bool = False,
    capture: str | None = None,
    sample_one_in: int | None = None,
    extra_ports: tuple[int, ...] = (),
) -> Iterator[Any]:
    from infertap.agent.runtime import Agent, AgentOptions

    agent = Agent(
        AgentOptions(
            cgroups=(str(client.cgroup), str(server.cgroup)),
            # The built-in policy watches only well-known model-serving ports (8000, 8001, ...);
            # name ours, as a deployment names its model ports. Sampling stays the default:
            # every flow, the first 4 KiB of every message.
            ports=SERVICE_PORTS + extra_ports,
            metrics_addr=None,
            api_addr=None,
            accelerate=accelerate,
            capture=capture,
            sample_one_in=sample_one_in,
        )
    )
    agent.start()  # stops itself if starting fails
    try:
        yield agent
    finally:
        agent.stop()


class VerdictJoiner:
    """Keeps a (skb capture) agent's benchmark flows in the sockhash the way a verdict does
    (Sensor.enforce_on, as VerdictStore does for a service verdict), polling for new flows
    every 10 ms; a flow verdict on a connection of its own keeps verdict lookups on in sk_msg.
    The first few milliseconds of each new connection run outside the sockhash."""

    def __init__(self, agent: Any, client: Pod, server: Pod) -> None:
        self.agent = agent
        self.server = server
        self.joined: set[int] = set()
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="verdict-joiner", daemon=True)
        self._holder: subprocess.Popen[Any] | None = None
        self._client = client

    def start(self) -> None:
        # One idle connection of its own carries the verdict that keeps lookups on (sockperf's
        # and iperf3's servers stop answering others while a client sits idle on them).
        listener = self.server.popen(
            ["python3", "-c", LISTENER_SCRIPT, str(HOLD_PORT)], stdout=subprocess.PIPE, text=True
        )
        assert listener.stdout is not None
        if listener.stdout.readline().strip() != "ready":
            raise BenchError("the verdict holder's listener did not start")
        self._holder = self._client.popen(
            ["python3", "-c", HOLDER_SCRIPT, self.server.ip, str(HOLD_PORT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._holder.stdout is not None
        if self._holder.stdout.readline().strip() != "connected":
            raise BenchError("the verdict holder connection did not open")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            held = [f for f in self.agent.flows() if f.remote.port == HOLD_PORT]
            if held:
                self.agent.verdicts.block_flow(held[0].cookie, "benchmark: verdicts active")
                self.joined.add(held[0].cookie)
                break
            time.sleep(0.01)
        else:
            raise BenchError("the verdict holder's flow never appeared")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for flow in self.agent.flows():
                if flow.cookie in self.joined:
                    continue
                self.joined.add(flow.cookie)
                if not self.agent.sensor.enforce_on(flow):
                    self.failed += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        # the holder belongs to the client pod; Lab.close() kills it


HOLD_PORT = 11112  # the verdict holder's connection (watched by the verdict row's agent only)
# Accepts connections and keeps them open, idle, until killed.
LISTENER_SCRIPT = (
    "import socket, sys, time\n"
    "s = socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', int(sys.argv[1])))\n"
    "s.listen(4)\n"
    "print('ready', flush=True)\n"
    "held = [s.accept() for _ in range(1)]\n"
    "time.sleep(1e9)\n"
)
# An idle TCP connection that stays open until killed (the verdict holder).
HOLDER_SCRIPT = (
    "import socket, sys, time\n"
    "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
    "print('connected', flush=True)\n"
    "time.sleep(1e9)\n"
)


def run(seconds: int, rounds: int, outbound: bool, cpu: int | None) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(Lab())
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="itap-bench-")))
        pods = {
            k: (lab.add_pod(f"{k}-c"), lab.add_pod(f"{k}-s"))
            for k in ("none", "agent", "skmsg", "unsmp", "verd", "accel", "sc")
        }

        log("starting the agents (each compiles the BPF programs) ...")
        agent = stack.enter_context(started_agent(*pods["agent"]))
        sk_msg_agent = stack.enter_context(started_agent(*pods["skmsg"], capture="sk_msg"))
        stack.enter_context(started_agent(*pods["unsmp"], capture="skb", sample_one_in=0))
        verdict_agent = stack.enter_context(
            started_agent(*pods["verd"], capture="skb", extra_ports=(HOLD_PORT,))
        )
        accel_agent = stack.enter_context(started_agent(*pods["accel"], accelerate=True))
        for _, server in pods.values():
            start_servers(server, cpu)
        joiner = VerdictJoiner(verdict_agent, *pods["verd"])
        stack.callback(joiner.close)
        joiner.start()
        sidecar = Sidecar(*pods["sc"], outbound=outbound, workdir=workdir)
        stack.callback(sidecar.close)
        sidecar.start()

        configs = [
            Config("none", "no agent", *pods["none"]),
            Config(
                "agent",
                f"agent, {agent.sensor.capture} capture (default), sample every message",
                *pods["agent"],
            ),
            Config("agent_sk_msg", "agent, sk_msg capture, sample every message", *pods["skmsg"]),
            Config("agent_unsampled", "agent, skb capture, nothing sampled", *pods["unsmp"]),
            Config(
                "agent_verdict",
                "agent, skb capture, flows in the sockhash for a verdict",
                *pods["verd"],
            ),
            Config("accel", "agent + same-node acceleration", *pods["accel"]),
            Config("sidecar", sidecar.label, *pods["sc"]),
        ]
        for r in range(rounds):
            shift = r % len(configs)
            for cfg in configs[shift:] + configs[:shift]:
                s = measure(cfg.client, cfg.server.ip, seconds, cpu)
                cfg.measurements.append(s)
                log(
                    f"round {r + 1}/{rounds} {cfg.key:13} p50 {s.p50_us:8.1f} us  "
                    f"p99 {s.p99_us:8.1f} us  {s.gbps:6.2f} Gbit/s"
                )

        counters = {}
        for key, a in (
            ("agent", agent),
            ("agent_sk_msg", sk_msg_agent),
            ("agent_verdict", verdict_agent),
        ):
            stats = a.sensor.stats()
            counters[key] = {k: stats.get(k, 0) for k in AGENT_COUNTERS}
        agent_counters = counters["agent"]
        reader_error = agent.reader_error
        accel_redirected = accel_agent.sensor.stats().get("redirected", 0)
        redirected = sidecar.redirected()
        verdict_joined = len(joiner.joined) - joiner.failed

    base = configs[0].median()
    rows: list[dict[str, Any]] = []
    for cfg in configs:
        m = cfg.median()
        rows.append(
            {
                "config": cfg.key,
                "label": cfg.label,
                "median": asdict(m),
                "ratio": {
                    "p50": m.p50_us / base.p50_us,
                    "p99": m.p99_us / base.p99_us,
                    "throughput": m.gbps / base.gbps,
                },
                "rounds": [asdict(s) for s in cfg.measurements],
            }
        )
    by_key = {row["config"]: row for row in rows}
    agent_ratio = by_key["agent"]["ratio"]
    accel_ratio = by_key["accel"]["ratio"]
    return {
        "seconds": seconds,
        "rounds": rounds,
        "message_bytes": MESSAGE_BYTES,
        "latency_cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "configs": rows,
        "agent_counters": agent_counters,
        "agent_counters_by_config": counters,
        "agent_capture": agent.sensor.capture,
        "agent_reader_error": reader_error,
        # Without samples an agent row measured an idle program, not interception; without
        # redirected connections the sidecar row measured the direct path.
        "valid": all(c["samples"] > 0 for c in counters.values())
        and all(n > 0 for n in redirected.values())
        and verdict_joined > 1,
        "sidecar_redirected": redirected,
        "verdict_flows_joined": verdict_joined,
        "targets": {
            "p50_ratio_max": TARGET_P50,
            "p50_pass": agent_ratio["p50"] <= TARGET_P50,
            "throughput_ratio_min": TARGET_THROUGHPUT,
            "throughput_pass": agent_ratio["throughput"] >= TARGET_THROUGHPUT,
            "accel_p50_ratio_max": TARGET_ACCEL_P50,
            "accel_p50_pass": accel_ratio["p50"] <= TARGET_ACCEL_P50,
        },
        "accel_redirected": accel_redirected,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"Data path, client pod -> server pod, median of {result['rounds']} interleaved rounds "
        f"of {result['seconds']} s each ({result['cpus']} CPUs, kernel {result['kernel']}).",
        f"Latency: sockperf TCP ping-pong, {result['message_bytes']}-byte messages, round trip, "
        + (
            f"client and server pinned to CPU {result['latency_cpu']}. "
            if result["latency_cpu"] is not None
            else "unpinned. "
        )
        + "Throughput: iperf3, one TCP stream, unpinned.",
        "",
        "| configuration | p50 (µs) | p99 (µs) | throughput (Gbit/s) "
        "| p50 ratio | p99 ratio | throughput ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["configs"]:
        m, r = row["median"], row["ratio"]
        lines.append(
            f"| {row['label']} | {m['p50_us']:.1f} | {m['p99_us']:.1f} | {m['gbps']:.2f} "
            f"| {r['p50']:.2f}x | {r['p99']:.2f}x | {r['throughput']:.2f}x |"
        )
    lines.append("")
    for key, c in result["agent_counters_by_config"].items():
        lines.append(
            f"Kernel counters, {key}: {c['msgs']:,} messages (skbs with skb capture), "
            f"{c['samples']:,} samples taken, {c['samples_lost']:,} samples lost (ring full), "
            f"{c['events_lost']:,} events lost, {c['pull_failed']:,} pulls failed, "
            f"{c['retransmits']:,} retransmits skipped, {c['sockhash_joined']:,} sockets put "
            "in the sockhash by sockops."
        )
    lines += [
        f"Verdict row: {result['verdict_flows_joined']} flows joined the sockhash for a verdict"
        + (
            f"; reader error: {result['agent_reader_error']}"
            if result["agent_reader_error"]
            else ""
        )
        + ".",
        "Sidecar: connections redirected by iptables into HAProxy: "
        + ", ".join(f"{n} {side} side" for side, n in result["sidecar_redirected"].items())
        + ".",
        "",
        "Per round (p50 µs / p99 µs / Gbit/s):",
        "",
    ]
    for row in result["configs"]:
        per = ", ".join(
            f"{s['p50_us']:.1f} / {s['p99_us']:.1f} / {s['gbps']:.2f}" for s in row["rounds"]
        )
        lines.append(f"- {row['config']}: {per}")
    t = result["targets"]
    by_key = {row["config"]: row for row in result["configs"]}
    agent = by_key["agent"]["ratio"]
    if not result["valid"]:
        lines += [
            "",
            "INVALID: an agent took no samples, the sidecar redirected nothing, or no flow "
            "joined the sockhash in the verdict row.",
        ]
    lines += [
        "",
        f"Target p50 latency <= {t['p50_ratio_max']:.2f}x no agent: {agent['p50']:.2f}x "
        f"{'PASS' if t['p50_pass'] else 'MISS'}",
        f"Target throughput >= {t['throughput_ratio_min']:.2f}x no agent: "
        f"{agent['throughput']:.2f}x {'PASS' if t['throughput_pass'] else 'MISS'}",
        f"Target with acceleration, p50 latency <= {t['accel_p50_ratio_max']:.2f}x no agent: "
        f"{by_key['accel']['ratio']['p50']:.2f}x "
        f"{'PASS' if t['accel_p50_pass'] else 'MISS'} "
        f"({result['accel_redirected']} messages redirected)",
    ]
    return "\n".join(lines)


MAIN_PID = os.getpid()


def _terminate(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != MAIN_PID:  # a forked helper (e.g. between fork and exec): just go
        os._exit(128 + signum)
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the ExitStack stops the agent, deletes the iptables
    # rules and closes the Lab (which kills every process started in the pods).
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.datapath",
        description="Latency and throughput: no agent vs the infertap agent (skb and sk_msg "
        "capture, verdict-bearing flows, acceleration) vs a sidecar proxy.",
    )
    parser.add_argument("--seconds", type=int, default=5, help="per test (default 5)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--sidecar",
        choices=("both", "inbound"),
        default="both",
        help="proxy both sides like Istio (default), or only the server's inbound",
    )
    parser.add_argument(
        "--latency-cpu",
        type=int,
        default=0,
        help="pin both sockperf ends to this CPU (default 0); -1: let the scheduler place them. "
        "Unpinned, the ping-pong flips between same-CPU (~18 us) and cross-CPU (~45 us) "
        "wakeups from round to round, which swamps the overhead being measured",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.rounds < 1:
        parser.error("--seconds and --rounds must be at least 1")
    if os.geteuid() != 0:
        parser.error("must run as root (BPF programs, network namespaces, cgroups)")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        result = run(
            args.seconds,
            args.rounds,
            outbound=args.sidecar == "both",
            cpu=None if args.latency_cpu < 0 else args.latency_cpu,
        )
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        return 130
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0 if result["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
