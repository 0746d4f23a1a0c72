"""The `infertap` command.

Errors a user can cause (a bad flag, a missing cgroup, no agent running, no privileges) print one
line and exit non-zero; only bugs print a traceback.
"""

from __future__ import annotations

import os

# The agent and the demo start pod processes while gRPC threads run; grpc's fork handlers would
# only print warnings about it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from infertap import __version__
from infertap.agent.defaults import (
    CAPTURE_CHOICES,
    DEFAULT_API,
    DEFAULT_METRICS,
    DEFAULT_SAMPLE_BYTES,
    MAX_RINGS,
    default_workers,
    parse_host_port,
)
from infertap.agent.errors import InfertapError
from infertap.cli.certs import certs_app

app = typer.Typer(
    name="infertap",
    help="See and govern model-serving traffic from the kernel.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
out = Console(soft_wrap=True)  # never break a line: scripts read our output
err = Console(stderr=True, soft_wrap=True)

ApiOpt = Annotated[
    str, typer.Option("--api", help="Agent API: unix:PATH or HOST:PORT.", envvar="INFERTAP_API")
]
# HOST:PORT is mutual TLS only; one directory holds the material (see agent/api/tls.py).
TlsOpt = Annotated[
    Path | None,
    typer.Option(
        "--tls-dir",
        envvar="INFERTAP_TLS_DIR",
        help="For a HOST:PORT API: ca.pem plus client.pem, client-key.pem "
        "(run: server.pem, server-key.pem). 'infertap certs dev-ca' makes them.",
    ),
]
TlsNameOpt = Annotated[
    str | None,
    typer.Option(
        "--tls-server-name",
        envvar="INFERTAP_TLS_SERVER_NAME",
        help="Name to check the server certificate for, instead of the --api host.",
    ),
]


class UserError(InfertapError):
    """Something the user can fix; printed as one line."""


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=False)],
    )


@app.command(
    epilog="Examples:\n\n"
    "  infertap run                                    # node mode: every pod on this node\n\n"
    "  infertap run --cgroup /kubepods.slice/... --port 8000 --port 8001\n\n"
    "  infertap run --metrics-addr 0.0.0.0:9464 --api unix:/run/infertap/api.sock"
)
def run(
    cgroup: Annotated[
        list[str] | None,
        typer.Option("--cgroup", help="cgroup v2 path to watch (repeatable); none = node mode."),
    ] = None,
    port: Annotated[
        list[int] | None,
        typer.Option(
            "--port", min=1, max=65535, help="Model-service port (repeatable); none = all TCP."
        ),
    ] = None,
    metrics_addr: Annotated[
        str, typer.Option("--metrics-addr", help="Prometheus endpoint HOST:PORT ('' = off).")
    ] = DEFAULT_METRICS,
    api: ApiOpt = DEFAULT_API,
    sample_bytes: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=16384,
            show_default=False,
            help="Bytes sampled from each message. Given: wins over the policy's "
            "sampling.sample_bytes, reloads included; not given: the policy's "
            f"(default {DEFAULT_SAMPLE_BYTES}).",
        ),
    ] = None,
    sample_one_in: Annotated[
        int | None,
        typer.Option(
            min=0,
            show_default=False,
            help="Sample 1 flow in N (1 = all, 0 = none). Given: wins over the policy's "
            "sampling.sample_one_in; not given: the policy's (default 1).",
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(help="Policy file (YAML), reloaded on change; none = observe only."),
    ] = None,
    accelerate: Annotated[
        bool,
        typer.Option("--accelerate", help="Same-node acceleration (sk_msg redirect to the peer)."),
    ] = False,
    tls_plaintext: Annotated[
        bool,
        typer.Option(
            "--tls-plaintext",
            help="Uprobes on the watched pods' OpenSSL (libssl.so.3): decode and inspect their "
            "TLS traffic too. This agent then holds decrypted traffic: see the README.",
        ),
    ] = False,
    capture: Annotated[
        str | None,
        typer.Option(
            "--capture",
            help="Where bytes are sampled: skb (cgroup_skb egress, the default) or sk_msg "
            "(every socket in the sockhash). Overrides the policy's sampling.capture.",
        ),
    ] = None,
    otlp_endpoint: Annotated[
        str | None,
        typer.Option(
            "--otlp-endpoint",
            show_default=False,
            help="Export a span per model call to this OTLP/gRPC receiver HOST:PORT (plaintext "
            "gRPC). Given: wins over the policy's tracing.endpoint; '' turns tracing off.",
        ),
    ] = None,
    trace_sample_ratio: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            show_default=False,
            help="Share of new traces exported (calls arriving with a traceparent follow its "
            "sampled flag). Given: wins over the policy's tracing.sample_ratio (default 1).",
        ),
    ] = None,
    kubernetes: Annotated[
        bool,
        typer.Option(
            "--kubernetes",
            envvar="INFERTAP_KUBERNETES",
            help="Attach to this node's inspected pods as they come and go (needs NODE_NAME).",
        ),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            max=MAX_RINGS,
            show_default=False,
            help="Inspection processes, each with its own ring buffer, flows shared out by "
            f"connection; 1 = inspect in the agent's process. Default: the CPUs in the agent's "
            f"cpuset, at most {MAX_RINGS}.",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    tls_dir: TlsOpt = None,
    api_allow: Annotated[
        list[str] | None,
        typer.Option(
            "--api-allow",
            help="Client certificate name (CN or SAN) allowed to change verdicts over TLS "
            "(repeatable); none = any client the CA signed.",
        ),
    ] = None,
) -> None:
    """Run the agent in the foreground until SIGINT or SIGTERM, then detach everything."""
    from infertap.agent.api.tls import server_tls_for
    from infertap.agent.runtime import Agent, AgentOptions

    _setup_logging(log_level)
    if capture is not None and capture not in CAPTURE_CHOICES:
        raise UserError(f"--capture must be one of {', '.join(CAPTURE_CHOICES)}, got {capture!r}")
    if api:
        server_tls_for(api, tls_dir)  # TCP without TLS material: one line, before any attach
    if metrics_addr:
        try:
            parse_host_port(metrics_addr, "--metrics-addr")
        except ValueError as exc:
            raise UserError(str(exc)) from None
    options = AgentOptions(
        cgroups=tuple(cgroup or ()),
        ports=tuple(port or ()),
        metrics_addr=metrics_addr or None,
        api_addr=api or None,
        api_tls_dir=tls_dir,
        api_allow=tuple(api_allow or ()),
        sample_bytes=sample_bytes,
        sample_one_in=sample_one_in,
        policy=policy,
        kubernetes=kubernetes,
        node_name=os.environ.get("NODE_NAME", ""),
        accelerate=accelerate,
        tls_plaintext=tls_plaintext,
        otlp_endpoint=otlp_endpoint,
        trace_sample_ratio=trace_sample_ratio,
        capture=capture,
        workers=workers if workers is not None else default_workers(),
    )
    if otlp_endpoint:
        host, sep, otlp_port = otlp_endpoint.rpartition(":")
        if not sep or not host or not otlp_port.isdigit() or not 1 <= int(otlp_port) <= 65535:
            raise UserError(f"--otlp-endpoint must be HOST:PORT, got {otlp_endpoint!r}")
    if kubernetes and cgroup:
        raise UserError("--kubernetes finds the pods' cgroups itself: give no --cgroup")
    if kubernetes and not options.node_name:
        raise UserError("--kubernetes needs NODE_NAME set to this node's name")
    agent = Agent(options)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        agent.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
        where = ", ".join(str(p) for p in agent.sensor.attached)
        metrics = "off"
        if agent.metrics is not None:
            host = parse_host_port(metrics_addr, "--metrics-addr")[0]
            metrics = f"http://{host}:{agent.metrics.port}/metrics"
        out.print(
            f"infertap ready: sockops on {where} ({options.mode} mode), "
            f"ports {list(options.ports) or 'all'}, metrics {metrics}, api {api or 'off'}",
            highlight=False,
            soft_wrap=True,
        )
        agent.wait()
    finally:
        agent.stop()
    out.print("infertap stopped: programs detached", highlight=False)


def _client(api: str, tls_dir: Path | None, tls_name: str | None) -> Any:
    from infertap.agent.api.client import connect

    return connect(api, tls_dir=tls_dir, server_name=tls_name)[1]


def _endpoint(text: str) -> tuple[str, int]:
    from infertap.agent.kernel.decode import ip_raw

    try:
        host, port = parse_host_port(text, "--service")
        ip_raw(host)
    except (ValueError, OSError):
        raise UserError(f"--service must be IP:PORT with a port 1-65535, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise UserError(f"--service port must be 1-65535, got {port}")
    return host, port


def _target(service: str | None, flow: int | None) -> Any:
    from infertap.agent.api import infertap_pb2 as pb

    if (service is None) == (flow is None):
        raise UserError("give exactly one of --service IP:PORT or --flow ID")
    if flow is not None:
        return pb.Target(flow_id=flow)
    assert service is not None
    host, port = _endpoint(service)
    return pb.Target(service=pb.Endpoint(ip=host, port=port))


@app.command()
def flows(
    api: ApiOpt = DEFAULT_API,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    tls_dir: TlsOpt = None,
    tls_name: TlsNameOpt = None,
) -> None:
    """List intercepted flows with their kernel counters."""
    from google.protobuf.json_format import MessageToDict

    from infertap.agent.api import infertap_pb2 as pb

    resp = _client(api, tls_dir, tls_name).ListFlows(pb.ListFlowsRequest())
    if as_json:
        docs = [
            MessageToDict(
                f, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            for f in resp.flows
        ]
        out.print_json(json.dumps({"flows": docs}))
        return
    table = Table(title=f"{len(resp.flows)} flow(s)")
    for col in (
        "id",
        "role",
        "local",
        "remote",
        "cgroup",
        "proto",
        "msgs",
        "bytes",
        "drops",
        "age",
    ):
        table.add_column(
            col, justify="right" if col in ("msgs", "bytes", "drops", "age") else "left"
        )
    for f in resp.flows:
        table.add_row(
            str(f.id),
            f.role,
            f"{f.local.ip}:{f.local.port}",
            f"{f.remote.ip}:{f.remote.port}",
            f.cgroup,
            f"not inspected: {f.uninspected}" if f.uninspected else (f.protocol or "-"),
            str(f.messages),
            str(f.bytes),
            str(f.drops),
            f"{f.age_seconds:.0f}s",
        )
    out.print(table)


@app.command()
def block(
    service: Annotated[str | None, typer.Option(help="Block a service IP:PORT.")] = None,
    flow: Annotated[int | None, typer.Option(help="Block one flow by id (see 'flows').")] = None,
    api: ApiOpt = DEFAULT_API,
    tls_dir: TlsOpt = None,
    tls_name: TlsNameOpt = None,
) -> None:
    """Drop sends to a service or on a flow in the kernel: the sender gets EACCES."""
    target = _target(service, flow)
    reply = _client(api, tls_dir, tls_name).Block(target)
    out.print(reply.description, highlight=False)


@app.command()
def unblock(
    service: Annotated[str | None, typer.Option(help="Unblock a service IP:PORT.")] = None,
    flow: Annotated[int | None, typer.Option(help="Unblock one flow by id.")] = None,
    api: ApiOpt = DEFAULT_API,
    tls_dir: TlsOpt = None,
    tls_name: TlsNameOpt = None,
) -> None:
    """Remove a block; open connections can send again."""
    target = _target(service, flow)
    reply = _client(api, tls_dir, tls_name).Unblock(target)
    out.print(reply.description, highlight=False)


@app.command()
def status(
    api: ApiOpt = DEFAULT_API,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    ready: Annotated[
        bool, typer.Option("--ready", help="Exit 0 only if the agent is ready.")
    ] = False,
    tls_dir: TlsOpt = None,
    tls_name: TlsNameOpt = None,
) -> None:
    """Agent readiness, attachment and kernel counters."""
    from google.protobuf.json_format import MessageToDict

    from infertap.agent.api import infertap_pb2 as pb

    st = _client(api, tls_dir, tls_name).GetStatus(pb.StatusRequest())
    if ready and not st.ready:
        raise UserError("agent is not ready")
    if as_json:
        out.print_json(json.dumps(MessageToDict(st, preserving_proto_field_name=True)))
        return
    out.print(
        f"infertap {st.version}: {'ready' if st.ready else 'starting'}, {st.mode} mode, "
        f"{st.flows_active} flow(s), headers {st.headers}",
        highlight=False,
    )
    out.print(
        f"  sampling: {st.sample_bytes} bytes of each message, 1 flow in {st.sample_one_in}",
        highlight=False,
    )
    out.print(
        f"  inspection: {st.workers or 1} worker(s), {st.worker_restarts} restarted",
        highlight=False,
    )
    for k, v in sorted(st.kernel_stats.items()):
        out.print(f"  {k:18} {v}", highlight=False)
    # What was not decoded or not seen: zero lines here means nothing was lost.
    lost = sum(st.decode_lost.values())
    out.print(f"decode lost: {lost}" + (" (protocol/reason)" if lost else ""), highlight=False)
    for k, v in sorted(st.decode_lost.items()):
        out.print(f"  {k:28} {v}", highlight=False)
    unseen = sum(st.connections_uninspected.values())
    out.print(f"connections not inspected: {unseen}", highlight=False)
    for k, v in sorted(st.connections_uninspected.items()):
        out.print(f"  {k:28} {v}", highlight=False)
    # Skipped on purpose under overload (whole requests or connections, never torn bytes).
    skipped = sum(st.inspection_skipped.values())
    levels = ", ".join(f"{n}%" for n in st.shed_levels) or "0%"
    out.print(
        f"inspection skipped: {skipped}"
        + (" (model/reason)" if skipped else "")
        + f", shedding now {levels}",
        highlight=False,
    )
    for k, v in sorted(st.inspection_skipped.items()):
        out.print(f"  {k:28} {v}", highlight=False)


@app.command()
def events(
    api: ApiOpt = DEFAULT_API,
    kind: Annotated[list[str] | None, typer.Option(help="Only these kinds (repeatable).")] = None,
    tls_dir: TlsOpt = None,
    tls_name: TlsNameOpt = None,
) -> None:
    """Stream live events (flows, HTTP requests, verdicts) as JSON lines."""
    from google.protobuf.json_format import MessageToJson

    from infertap.agent.api import infertap_pb2 as pb

    stub = _client(api, tls_dir, tls_name)
    for ev in stub.StreamEvents(pb.StreamEventsRequest(kinds=kind or [])):
        print(MessageToJson(ev, indent=None, preserving_proto_field_name=True), flush=True)


@app.command(epilog="Examples:\n\n  infertap demo\n\n  infertap demo --no-tui --duration 30")
def demo(
    no_tui: Annotated[
        bool, typer.Option("--no-tui", help="Print a summary instead of top.")
    ] = False,
    duration: Annotated[
        float, typer.Option(min=5, help="Seconds of client traffic (all three phases).")
    ] = 60.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "warning",
    prometheus: Annotated[
        bool,
        typer.Option(help="Run a real Prometheus on loopback scraping the agent (Debian's)."),
    ] = True,
    linger: Annotated[
        float,
        typer.Option(min=0, help="Seconds to keep the agent and Prometheus up after the summary."),
    ] = 0.0,
) -> None:
    """Two local pods, a real V2 model server, a feature-store client; watch it from the kernel."""
    from infertap.agent.demo import run_demo

    _setup_logging(log_level)
    # Without a terminal (CI, a pipe) the live view cannot run: print the summary instead.
    tui = not no_tui and sys.stdout.isatty()
    code = run_demo(duration, tui=tui, console=out, prometheus=prometheus, linger=linger)
    raise typer.Exit(code)


@app.command()
def top(
    api: ApiOpt = DEFAULT_API,
    refresh: Annotated[float, typer.Option(min=0.1, max=60.0, help="Seconds between polls.")] = 1.0,
    tls_dir: TlsOpt = None,
    tls_name: TlsNameOpt = None,
) -> None:
    """Live view: models (rate, latency, errors, circuit), drift, PII, flows, verdicts."""
    from infertap.cli.top.main import run_top

    run_top(api, refresh, tls_dir, tls_name)


policy_app = typer.Typer(help="Check and show policy files.", no_args_is_help=True)
baseline_app = typer.Typer(
    help="Build and show training baselines for drift.", no_args_is_help=True
)
app.add_typer(policy_app, name="policy")
app.add_typer(baseline_app, name="baseline")
app.add_typer(certs_app, name="certs")


@policy_app.command("validate")
def policy_validate(file: Path) -> None:
    """Check a policy file: every problem with its line and field, exit 1 if any."""
    from infertap.agent.policy.loader import load_policy, validate_file

    problems = validate_file(file)
    if problems:
        for p in problems:
            err.print(p, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    out.print(f"{file}: ok, policy {load_policy(file).hash}", highlight=False)


@policy_app.command("show")
def policy_show(
    file: Annotated[
        Path | None, typer.Argument(help="A policy file; none = the built-in one.")
    ] = None,
) -> None:
    """Print a policy in normalized form (defaults written out), with its hash."""
    from infertap.agent.policy.loader import default_policy, load_policy, render_policy

    policy = load_policy(file) if file else default_policy()
    out.print(f"# policy {policy.hash} from {policy.source}", highlight=False)
    out.print(render_policy(policy), highlight=False, markup=False)


@baseline_app.command(
    "build", epilog="Example:\n\n  infertap baseline build train.parquet --model fraud"
)
def baseline_build(
    file: Annotated[Path, typer.Argument(help="Training data: .csv, .npy or .parquet.")],
    model: Annotated[str, typer.Option(help="The model this baseline describes.")],
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Default: MODEL.baseline.json")
    ] = None,
    features: Annotated[str | None, typer.Option(help="Comma-separated columns to keep.")] = None,
) -> None:
    """Build a versioned baseline (histograms, quantiles, category frequencies) for drift."""
    from rich.progress import Progress

    from infertap.agent.inspect.baseline import (
        BaselineError,
        build_baseline,
        small_sample_warning,
    )

    if not file.is_file():
        raise UserError(f"no such file: {file}")
    target = out_file or Path(f"{model}.baseline.json")
    names = [f.strip() for f in features.split(",")] if features else None
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task(f"reading {file.name}", total=None)

        def step(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total or None)

        try:
            b = build_baseline(file, model, target, features=names, progress=step)
        except (BaselineError, ValueError, OSError) as exc:
            raise UserError(str(exc)) from None
    out.print(
        f"wrote {target}: model {model}, {b.rows} rows, {len(b.feature_names)} features",
        highlight=False,
    )
    warning = small_sample_warning(b)
    if warning is not None:
        err.print(f"infertap: warning: {warning}", highlight=False, soft_wrap=True)


@baseline_app.command("show")
def baseline_show(file: Path, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Summarize a baseline file."""
    from infertap.agent.inspect.baseline import Baseline, BaselineError

    try:
        b = Baseline.load(file)
    except (BaselineError, OSError) as exc:
        raise UserError(str(exc)) from None
    if as_json:
        out.print_json(file.read_text())
        return
    out.print(f"{file}: model {b.model}, features: {', '.join(b.feature_names)}", highlight=False)


@app.command()
def version() -> None:
    """Print the version."""
    out.print(f"infertap {__version__}", highlight=False)


def main() -> None:
    """Entry point: maps user-caused errors to one line and exit code 1."""
    import grpc

    try:
        app()
    except InfertapError as exc:  # every user-caused error (agent/errors.py): one line
        err.print(f"infertap: error: {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except grpc.RpcError as exc:
        details = exc.details() if hasattr(exc, "details") else str(exc)
        err.print(f"infertap: error: {details}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except OSError as exc:  # e.g. the metrics port is taken
        err.print(
            f"infertap: error: {exc.strerror or exc}"
            + (f": {exc.filename}" if exc.filename else ""),
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
