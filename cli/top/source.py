"""Where `infertap top` gets its data: the TopSource interface and the agent-API implementation.

The app only talks to a TopSource, so tests drive it from a recorded stream through the same
interface (tests/test_top.py) while the real one calls the control API.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any, Final, Protocol

import grpc

from infertap.agent.api import infertap_pb2 as pb
from infertap.agent.api.client import connect
from infertap.cli.top.state import Snapshot

CALL_TIMEOUT_S: Final = 2.0
# Events held between two refreshes. Past this the oldest are dropped (and counted): a view that
# falls behind must not grow without bound.
EVENT_BACKLOG: Final = 100_000


class TopSource(Protocol):
    def snapshot(self) -> Snapshot:
        """Poll status, flows, verdicts and models. Raises grpc.RpcError when the agent fails."""
        ...

    def events(self) -> list[pb.Event]:
        """Events received since the last call, oldest first. Never blocks."""
        ...

    def block(self, target: pb.Target) -> pb.VerdictReply: ...

    def unblock(self, target: pb.Target) -> pb.VerdictReply: ...

    def problem(self) -> str:
        """Why the event stream is not flowing right now, or ""."""
        ...

    def close(self) -> None: ...


class ApiSource:
    """TopSource over the agent's gRPC control API; events arrive on a background thread."""

    def __init__(
        self, address: str, tls_dir: Path | None = None, server_name: str | None = None
    ) -> None:
        # connect() raises AgentUnreachable (no socket, no permission, nobody answering): the
        # CLI turns that into one line and exit 1 before any screen is drawn.
        self._channel, self._stub = connect(address, tls_dir=tls_dir, server_name=server_name)
        self._queue: queue.Queue[pb.Event] = queue.Queue(maxsize=EVENT_BACKLOG)
        self._stop = threading.Event()
        self._call: Any = None
        self._problem = ""
        self.dropped = 0
        self._thread = threading.Thread(target=self._pump, name="top-events", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                self._call = self._stub.StreamEvents(pb.StreamEventsRequest())
                self._problem = ""
                for ev in self._call:
                    self._put(ev)
                self._problem = "event stream ended; reconnecting"
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                self._problem = f"event stream: {rpc_details(exc)}; reconnecting"
            # The agent restarted or went away: try again, not in a tight loop.
            self._stop.wait(1.0)

    def _put(self, ev: pb.Event) -> None:
        while True:
            try:
                self._queue.put_nowait(ev)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def snapshot(self) -> Snapshot:
        t = CALL_TIMEOUT_S
        return Snapshot(
            status=self._stub.GetStatus(pb.StatusRequest(), timeout=t),
            flows=self._stub.ListFlows(pb.ListFlowsRequest(), timeout=t),
            verdicts=self._stub.ListVerdicts(pb.ListVerdictsRequest(), timeout=t),
            models=self._stub.ListModels(pb.ListModelsRequest(), timeout=t),
        )

    def events(self) -> list[pb.Event]:
        out: list[pb.Event] = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def block(self, target: pb.Target) -> pb.VerdictReply:
        reply: pb.VerdictReply = self._stub.Block(target, timeout=CALL_TIMEOUT_S)
        return reply

    def unblock(self, target: pb.Target) -> pb.VerdictReply:
        reply: pb.VerdictReply = self._stub.Unblock(target, timeout=CALL_TIMEOUT_S)
        return reply

    def problem(self) -> str:
        return self._problem

    def close(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._channel.close()
        self._thread.join(timeout=2.0)


def rpc_details(exc: grpc.RpcError) -> str:
    """The server's message (a grpc.Call's details()), else the error itself."""
    details = getattr(exc, "details", None)
    text = details() if callable(details) else None
    return str(text or exc)
