"""`infertap certs`: TLS material for the control API over TCP (registered in cli/main.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

certs_app = typer.Typer(help="TLS certificates for the API over TCP.", no_args_is_help=True)
out = Console(soft_wrap=True)


@certs_app.command(
    "dev-ca",
    epilog="Example:\n\n"
    "  infertap certs dev-ca ./tls --server-name agent.example --server-name 10.0.0.5\n\n"
    "  infertap run --api 0.0.0.0:7443 --tls-dir ./tls\n\n"
    "  infertap status --api agent.example:7443 --tls-dir ./tls",
)
def dev_ca(
    directory: Annotated[Path, typer.Argument(help="Where to write them (made mode 0700).")],
    server_name: Annotated[
        list[str] | None,
        typer.Option(
            "--server-name",
            help="DNS name or IP the server certificate names (repeatable); "
            "localhost, 127.0.0.1 and ::1 are always in.",
        ),
    ] = None,
    client_name: Annotated[
        str, typer.Option(help="The client certificate's name (see run --api-allow).")
    ] = "infertap-client",
    days: Annotated[int, typer.Option(min=1, max=3650, help="Validity in days.")] = 365,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """A development CA with a server and a client certificate (keys mode 0600).

    The CA's key is not kept, so nobody can mint more certificates from it; run again with
    --force to reissue the whole set. For production, use your own CA.
    """
    from infertap.agent.api.tls import make_dev_ca

    written = make_dev_ca(
        directory, server_name or (), client_name=client_name, days=days, force=force
    )
    out.print(
        f"wrote {', '.join(p.name for p in written)} in {directory} (valid {days} days)",
        highlight=False,
    )
    out.print(
        "server: ca.pem, server.pem, server-key.pem; client: ca.pem, client.pem, client-key.pem",
        highlight=False,
    )
