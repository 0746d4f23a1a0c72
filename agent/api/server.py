"""The control API (agent/api/infertap.proto) over gRPC.

By default on a unix socket that only root can open (mode 0600, in a 0700 folder): a caller who
can reach it can block traffic. The socket is created under umask 077 so it is never, even for an
instant, open to others. Over TCP only with mutual TLS, and verdict changes only from a caller
with a certificate identity (agent/api/tls.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from pathlib import Path

import grpc

from infertap import __version__
from infertap.agent.api import infertap_pb2 as pb
from infertap.agent.api import infertap_pb2_grpc as pb_grpc
from infertap.agent.api.port import ControlPort
from infertap.agent.api.tls import VerdictGuard, is_unix, server_tls_for
from infertap.agent.enforce.verdicts import Verdict, unblocked
from infertap.agent.export.event_hub import AgentEvent
from infertap.agent.flows.records import Endpoint, FlowInfo

log = logging.getLogger(__name__)


def endpoint_pb(e: Endpoint) -> pb.Endpoint:
    return pb.Endpoint(ip=e.ip, port=e.port)


def flow_pb(f: FlowInfo, cgroup: str, protocol: str, now_ns: int, uninspected: str = "") -> pb.Flow:
    return pb.Flow(
        id=f.cookie,
        local=endpoint_pb(f.local),
        remote=endpoint_pb(f.remote),
        role=f.role.name.lower(),
        cgroup_id=f.cgroup_id,
        cgroup=cgroup,
        messages=f.messages,
        bytes=f.bytes,
        drops=f.drops,
        samples=f.samples,
        samples_lost=f.samples_lost,
        sampled=f.sampled,
        age_seconds=max(0.0, (now_ns - f.start_ns) / 1e9),
        protocol=protocol,
        uninspected=uninspected,
    )


def verdict_pb(v: Verdict) -> pb.Verdict:
    target = (
        pb.Target(flow_id=v.flow_id)
        if v.kind == "flow"
        else pb.Target(service=endpoint_pb(v.service or Endpoint("", 0)))
    )
    return pb.Verdict(target=target, action=v.action, reason=v.reason)


def event_pb(e: AgentEvent) -> pb.Event:
    out = pb.Event(
        ts_ns=e.ts_ns,
        kind=e.kind,
        message=str(e.data.get("description", "")),
        data_json=json.dumps(e.data, default=str),
    )
    if e.kind in ("flow_start", "flow_end"):
        d = e.data
        out.flow.CopyFrom(
            pb.Flow(
                id=d["id"],
                role=d["role"],
                cgroup_id=d["cgroup_id"],
                messages=d["messages"],
                bytes=d["bytes"],
                drops=d["drops"],
            )
        )
        local_ip, _, local_port = str(d["local"]).rpartition(":")
        remote_ip, _, remote_port = str(d["remote"]).rpartition(":")
        out.flow.local.CopyFrom(pb.Endpoint(ip=local_ip.strip("[]"), port=int(local_port)))
        out.flow.remote.CopyFrom(pb.Endpoint(ip=remote_ip.strip("[]"), port=int(remote_port)))
    elif e.kind == "http":
        req = e.data["request"]
        resp = e.data.get("response") or {}
        svc_ip, _, svc_port = str(req["service"]).rpartition(":")
        out.http.CopyFrom(
            pb.HttpMessage(
                direction="request",
                protocol=req["protocol"],
                method=req["method"],
                path=req["path"],
                status=int(resp.get("status", 0) or 0),
                content_length=int(req["content_length"]),
                stream_id=int(req["stream_id"]),
                service=pb.Endpoint(ip=svc_ip.strip("[]"), port=int(svc_port)),
            )
        )
    return out


class ControlServicer(pb_grpc.ControlServicer):
    def __init__(self, agent: ControlPort) -> None:
        self.agent = agent

    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.Status:
        st = self.agent.status()
        return pb.Status(
            version=__version__,
            ready=st.ready,
            mode=st.mode,
            cgroups=st.cgroups,
            ports=st.ports,
            kernel_stats=st.kernel_stats,
            flows_active=st.flows_active,
            headers=st.headers,
            sample_bytes=st.sample_bytes,
            sample_one_in=st.sample_one_in,
            decode_lost=st.decode_lost,
            connections_uninspected=st.connections_uninspected,
            workers=st.workers,
            worker_restarts=st.worker_restarts,
            inspection_skipped=st.inspection_skipped,
            shed_levels=st.shed_levels,
        )

    def ListFlows(
        self, request: pb.ListFlowsRequest, context: grpc.ServicerContext
    ) -> pb.ListFlowsResponse:
        now = time.monotonic_ns()  # the kernel's bpf_ktime_get_ns is CLOCK_MONOTONIC
        rows = sorted(self.agent.flow_rows(), key=lambda r: r.flow.cookie)
        return pb.ListFlowsResponse(
            flows=[flow_pb(r.flow, r.cgroup, r.protocol, now, r.uninspected) for r in rows]
        )

    def _target(
        self, target: pb.Target, context: grpc.ServicerContext
    ) -> tuple[str, int, Endpoint]:
        which = target.WhichOneof("target")
        if which == "flow_id":
            return "flow", target.flow_id, Endpoint("", 0)
        if which == "service":
            svc = target.service
            if not svc.ip or not 1 <= svc.port <= 65535:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "service needs an ip and a port 1-65535"
                )
            try:
                from infertap.agent.kernel.decode import ip_raw

                ip_raw(svc.ip)
            except OSError:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not an IP address: {svc.ip!r}")
            return "service", 0, Endpoint(svc.ip, svc.port)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give a flow id or a service")
        raise AssertionError("unreachable")

    def Block(self, request: pb.Target, context: grpc.ServicerContext) -> pb.VerdictReply:
        kind, flow_id, svc = self._target(request, context)
        store = self.agent.verdicts
        if kind == "flow":
            rows = self.agent.flow_rows()
            # A pre-existing connection is not in the sockhash: the kernel cannot block it.
            if flow_id not in {r.flow.cookie for r in rows if r.uninspected != "pre_existing"}:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no intercepted flow with id {flow_id}")
            v = store.block_flow(flow_id, reason="api")
        else:
            v = store.block_service(svc, reason="api")
        if v is None:
            return pb.VerdictReply(changed=False, description="already blocked")
        return pb.VerdictReply(changed=True, description=v.describe())

    def Unblock(self, request: pb.Target, context: grpc.ServicerContext) -> pb.VerdictReply:
        kind, flow_id, svc = self._target(request, context)
        store = self.agent.verdicts
        v = store.unblock_flow(flow_id) if kind == "flow" else store.unblock_service(svc)
        if v is None:
            return pb.VerdictReply(changed=False, description="was not blocked")
        return pb.VerdictReply(changed=True, description=unblocked(v))

    def ListVerdicts(
        self, request: pb.ListVerdictsRequest, context: grpc.ServicerContext
    ) -> pb.ListVerdictsResponse:
        return pb.ListVerdictsResponse(verdicts=[verdict_pb(v) for v in self.agent.verdicts.list()])

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        view = self.agent.models()
        models: dict[str, pb.ModelState] = {}
        for name, state in view.circuit_states.items():
            models[name] = pb.ModelState(name=name, circuit_state=state)
        for (model, feature, stat), value in sorted(view.drift.items()):
            m = models.setdefault(model, pb.ModelState(name=model))
            m.drift.append(pb.DriftValue(feature=feature, stat=stat, value=value))
        return pb.ListModelsResponse(
            models=[models[k] for k in sorted(models)], policy_hash=view.policy_hash
        )

    def StreamEvents(
        self, request: pb.StreamEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Event]:
        sub = self.agent.subscribe(frozenset(request.kinds))
        try:
            while context.is_active() and not sub.closed:
                event = sub.get(timeout=0.5)
                if event is not None:
                    yield event_pb(event)
        finally:
            sub.close()


class ApiServer:
    def __init__(
        self,
        agent: ControlPort,
        address: str,
        tls_dir: Path | None = None,
        allowed_identities: Iterable[str] = (),
    ) -> None:
        self.address = address
        # TCP without TLS material is refused here (TlsError), before anything listens.
        self._tls = server_tls_for(address, tls_dir, allowed_identities)
        guard = VerdictGuard(
            local=is_unix(address), allowed=self._tls.allowed if self._tls else frozenset()
        )
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="api"),
            interceptors=[guard],
        )
        pb_grpc.add_ControlServicer_to_server(ControlServicer(agent), self._server)
        self._socket: Path | None = None
        self.port: int | None = None  # the TCP port bound (useful with port 0)

    def start(self) -> None:
        if self.address.startswith("unix:"):
            path = Path(self.address.removeprefix("unix:"))
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if path.exists() or path.is_symlink():
                path.unlink()  # a stale socket from a killed agent
            old = os.umask(0o077)
            try:
                self._server.add_insecure_port(f"unix:{path}")
                self._server.start()
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            self._socket = path
        else:
            assert self._tls is not None  # server_tls_for never gives None for TCP
            try:
                port = self._server.add_secure_port(self.address, self._tls.credentials())
            except RuntimeError:  # grpc raises on a port it cannot bind
                port = 0
            if port == 0:
                raise OSError(f"cannot listen on {self.address}")
            self.port = port
            log.info("API on TCP %s (port %d) with mutual TLS", self.address, port)
            self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=1).wait(2)
        if self._socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self._socket.unlink()
