"""Entry point of `infertap top` (registered in cli/main.py)."""

from __future__ import annotations

from pathlib import Path

from infertap.cli.top.app import TopApp
from infertap.cli.top.source import ApiSource


def run_top(
    api: str, refresh_s: float, tls_dir: Path | None = None, server_name: str | None = None
) -> None:
    # Connect before drawing anything: no agent or no permission is one line and exit 1
    # (AgentUnreachable, mapped by cli/main.py's main()), never a half-drawn screen.
    source = ApiSource(api, tls_dir, server_name)
    try:
        TopApp(source, refresh_s=refresh_s).run()
    finally:
        source.close()
