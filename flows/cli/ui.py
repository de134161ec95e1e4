"""`batchsight ui`: the search and review page over the live catalogue."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import CatalogOpt, EndpointOpt, console, err, fail
from flows.ui.security import TOKEN_ENV, check_bind, read_token_file
from flows.ui.serving import DEFAULT_PORT, served_hosts
from flows.ui.serving import serve as serve_ui
from flows.ui.uploads import DEFAULT_DECODE_BUDGET_PIXELS
from models.errors import UserError

app = typer.Typer()


@app.command()
def ui(
    ctx: typer.Context,
    catalog: CatalogOpt,
    host: Annotated[str, typer.Option(help="Address to listen on; beyond 127.0.0.1 a token is required.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = DEFAULT_PORT,
    token_file: Annotated[Path | None, typer.Option(help="File holding the secret every request must carry when "
                                                    "the page is reachable from other machines; label writes "
                                                    "always need it when set. Kept out of `ps`, unlike --token.")]
    = None,
    token: Annotated[str | None, typer.Option(envvar=TOKEN_ENV, help=f"The secret itself (also {TOKEN_ENV}); on "
                                              "the command line every user of the machine sees it in `ps`: "
                                              "prefer --token-file or the environment.")] = None,
    allow_host: Annotated[list[str] | None, typer.Option(help="Another Host name to answer: the public name a "
                                                         "reverse proxy forwards (repeatable; needs a token).")]
    = None,
    max_upload_mb: Annotated[float, typer.Option(min=0.1, max=1024, help="Largest query image accepted.")] = 20,
    decode_budget_mp: Annotated[float, typer.Option(min=1, max=10_000, help="Megapixels of query images decoded at "
                                                    "once, all requests together (a JPEG counts at the reduced "
                                                    "size it decodes at); an upload over it is refused (413), "
                                                    "one arriving while others hold it gets 429.")]
    = DEFAULT_DECODE_BUDGET_PIXELS / 1e6,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Server processes, each with its own copy of the "
                                         "catalogue's index in memory: one uses one core at most.")] = 1,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Serve the search and review page, and its JSON API under /api/, over the live catalogue."""
    try:
        if token_file is not None:
            if token is not None:
                raise UserError(f"pass the token once: --token-file or --token/{TOKEN_ENV}, not both")
            token = read_token_file(token_file)
        elif token is not None and getattr(ctx.get_parameter_source("token"), "name", None) == "COMMANDLINE":
            # compared by name: Typer's click and the `click` package may be two copies of the enum
            err.print(f"warning: --token on the command line is shown to every user of this machine by `ps`; "
                      f"use --token-file FILE or {TOKEN_ENV}", highlight=False)
        allow_hosts = allow_host or []
        check_bind(host, token, allow_hosts)
        shown = "localhost" if host in ("127.0.0.1", "::1") else host
        console.print(f"batchsight page on http://{shown}:{port}/ (API docs: /docs); Ctrl-C stops it", highlight=False)
        if allow_hosts:
            console.print(f"answering Host names {', '.join(served_hosts(host, allow_hosts))}", highlight=False)
        serve_ui(catalog, host=host, port=port, token=token, endpoint_url=endpoint_url,
                 max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                 decode_budget_pixels=int(decode_budget_mp * 1e6), workers=workers, allow_hosts=allow_hosts)
    except UserError as exc:
        raise fail(exc) from None
