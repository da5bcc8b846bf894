"""``delg-geo serve``: registered on the main CLI by :func:`register` (see delg_geo/apps/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from delg_geo.apps.cli_common import _THREADS


def _upload_mb(value: float) -> float:
    """``--max-upload-mb``: a positive, finite number of megabytes (a usage error otherwise)."""
    from delg_geo.apps.serve import upload_limit_problem

    why = upload_limit_problem(value)
    if why:
        raise typer.BadParameter(why)
    return value


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        index: Optional[Path] = typer.Option(None, "--index", "-i", help="Index folder (default: $DELG_GEO_INDEX)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 exposes it to the network)."),
        port: int = typer.Option(8000, "--port", "-p", min=1, max=65535, help="TCP port (1 to 65535)."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Must match the index's model. A SavedModel folder runs that model's TensorFlow graph: load trusted models only."),
        max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", callback=_upload_mb,
                                            help="Largest accepted upload, in MB (a positive number)."),
        max_concurrent: int = typer.Option(2, "--max-concurrent", min=1, help="Photos located at the same time."),
        max_queue: int = typer.Option(8, "--max-queue", min=0, help="Photos waiting for a turn; more are answered 503 with Retry-After."),
        device: str = typer.Option("auto", "--device", help="FAISS device: auto or cpu."),
        threads: Optional[int] = _THREADS,
    ):
        """Serve a web page and an HTTP API: drop a photo in, see where it was taken on a map."""
        from delg_geo.apps.cli_common import _err, _index_or_env, _latency

        _latency(threads)
        from delg_geo.core.errors import DelgGeoError
        from delg_geo.apps.serve import run_server

        try:
            idx = _index_or_env(index)
            typer.echo(f"delg-geo: loading {idx} ...", err=True)
            run_server(idx, host, port, model=model, max_upload_mb=max_upload_mb, max_concurrent=max_concurrent,
                       device=device, max_queue=max_queue)
        except DelgGeoError as e:
            _err(str(e))
            raise typer.Exit(1)
