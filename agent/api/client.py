"""Connect to a running agent's control API, with one clear error when nobody is there."""

from __future__ import annotations

from pathlib import Path

import grpc

from infertap.agent.api import infertap_pb2_grpc as pb_grpc


class AgentUnreachable(ConnectionError):
    pass


def connect(address: str, timeout_s: float = 3.0) -> tuple[grpc.Channel, pb_grpc.ControlStub]:
    if address.startswith("unix:"):
        path = Path(address.removeprefix("unix:"))
        if not path.exists():
            raise AgentUnreachable(
                f"no agent is running: {path} does not exist (start one with 'infertap run')"
            )
        if not os_access(path):
            raise AgentUnreachable(f"permission denied on {path}: the API socket is root-only")
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        channel.close()
        raise AgentUnreachable(f"no agent answered on {address} within {timeout_s:g}s") from None
    return channel, pb_grpc.ControlStub(channel)


def os_access(path: Path) -> bool:
    import os

    return os.access(path, os.R_OK | os.W_OK)
