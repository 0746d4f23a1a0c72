"""Connect to a running agent's control API, with one clear error when nobody is there.

A unix socket needs no TLS (its mode is its authentication); HOST:PORT is always mutual TLS.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from infertap.agent.api import infertap_pb2_grpc as pb_grpc
from infertap.agent.api.tls import CA_CERT, ClientTls, client_tls_for
from infertap.agent.errors import InfertapError


class AgentUnreachable(InfertapError, ConnectionError):
    pass


def connect(
    address: str,
    timeout_s: float = 3.0,
    tls_dir: Path | None = None,
    server_name: str | None = None,
) -> tuple[grpc.Channel, pb_grpc.ControlStub]:
    """tls_dir (ca.pem, client.pem, client-key.pem) is required for HOST:PORT, unused for a unix
    socket; server_name is checked against the server certificate instead of the host."""
    tls: ClientTls | None = client_tls_for(address, tls_dir, server_name)
    if address.startswith("unix:"):
        path = Path(address.removeprefix("unix:"))
        if not path.exists():
            raise AgentUnreachable(
                f"no agent is running: {path} does not exist (start one with 'infertap run')"
            )
        if not os_access(path):
            raise AgentUnreachable(f"permission denied on {path}: the API socket is root-only")
    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, tls.credentials(), options=tls.channel_options())
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        channel.close()
        hint = ""
        if tls is not None:
            # A failed TLS handshake looks the same as nobody there; name the usual causes.
            hint = (
                " (over TLS: is the server certificate from the CA in "
                f"{tls.tls_dir / CA_CERT}, and does it name this host? see --tls-server-name)"
            )
        raise AgentUnreachable(
            f"no agent answered on {address} within {timeout_s:g}s{hint}"
        ) from None
    return channel, pb_grpc.ControlStub(channel)


def os_access(path: Path) -> bool:
    import os

    return os.access(path, os.R_OK | os.W_OK)
