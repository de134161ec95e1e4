"""`batchsight ui`: the search and review page over the live catalogue."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli.common import CatalogOpt, EndpointOpt, console, fail
from flows.ui import check_bind
from flows.ui import serve as serve_ui
from models.errors import UserError

app = typer.Typer()


@app.command()
def ui(
    catalog: CatalogOpt,
    host: Annotated[str, typer.Option(help="Address to listen on; beyond 127.0.0.1 a --token is required.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8765,
    token: Annotated[str | None, typer.Option(envvar="BATCHSIGHT_UI_TOKEN", help="Secret every request must carry "
                                              "when --host is not loopback; label writes always need it when set "
                                              "(also BATCHSIGHT_UI_TOKEN).")] = None,
    max_upload_mb: Annotated[float, typer.Option(min=0.1, max=1024, help="Largest query image accepted.")] = 20,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Server processes, each with its own copy of the "
                                         "catalogue's index in memory: one uses one core at most.")] = 1,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Serve the search and review page, and its JSON API under /api/, over the live catalogue."""
    try:
        check_bind(host, token)
        shown = "localhost" if host in ("127.0.0.1", "::1") else host
        console.print(f"batchsight page on http://{shown}:{port}/ (API docs: /docs); Ctrl-C stops it",
                      highlight=False)
        serve_ui(catalog, host=host, port=port, token=token, endpoint_url=endpoint_url,
                 max_upload_bytes=int(max_upload_mb * 1024 * 1024), workers=workers)
    except UserError as exc:
        raise fail(exc) from None
