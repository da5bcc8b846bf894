"""``delg-geo index adapt``: a thin wrapper over :func:`index_builder.adapt.adapt_index`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def run_adapt(index: Path, *, epochs: int = 3, sample: Optional[int] = None, kind: Optional[str] = None,
              min_places: Optional[int] = None, ray=None, json_out: bool = False) -> dict:
    """Adapt ``index`` and print the outcome (one JSON object with ``json_out``); returns the report."""
    from delg_geo.apps.cli_common import _emit_json
    from delg_geo.core.errors import DelgGeoError
    from index_builder.adapt import AdaptOptions, adapt_index

    if epochs < 0:
        raise DelgGeoError(f"--epochs must be 0 or more, got {epochs}")
    if sample is not None and sample < 2:
        raise DelgGeoError(f"--sample must be at least 2 photos, got {sample}")
    if kind not in (None, "finetune", "projection"):
        raise DelgGeoError(f"--kind {kind!r}: choose finetune or projection")
    opts = AdaptOptions(epochs=epochs, sample=sample, kind=kind, progress=not json_out)
    if min_places is not None:
        opts.min_places = int(min_places)
    rep = adapt_index(index, opts, ray=ray, log=lambda m: typer.echo(m, err=True)).to_dict()
    if json_out:
        _emit_json(rep)
        return rep
    s = rep["selfquery"]
    mined = rep["mined"]
    typer.echo(f"adapted {index} ({rep['kind']}): {mined['places']} places, {mined['positive_pairs']} verified pairs, "
               f"{mined['hard_negatives']} hard negatives from {mined['mined_photos']} photos")
    for e in rep["epochs"]:
        loss = "-" if e["loss"] is None else f"{e['loss']:.4f}"
        typer.echo(f"  epoch {e['epoch']}: loss {loss}, held-out global top 1 {e['heldout']['top1']:.1%}")
    typer.echo(f"held-out self-queries ({s['queries']}): global top 1 {s['before']['top1']:.1%} -> {s['after']['top1']:.1%}, "
               f"top 10 {s['before']['top10']:.1%} -> {s['after']['top10']:.1%}; "
               + ("installed" if rep["installed"] else "not installed (no better): the index is unchanged")
               + f"; {rep['seconds'].get('total', 0) / 60:.1f} min")
    return rep


def register(index_app: typer.Typer) -> None:
    @index_app.command("adapt")
    def index_adapt(
        index: Optional[Path] = typer.Option(None, "--index", "-i", help="Index folder (default: $DELG_GEO_INDEX)."),
        epochs: int = typer.Option(3, "--epochs", min=0, help="Training epochs (the best on held-out self-queries is kept)."),
        sample: Optional[int] = typer.Option(None, "--sample", min=2, help="Photos mined (default: all, up to 50,000)."),
        kind: Optional[str] = typer.Option(None, "--kind", help="finetune (the default model's later blocks) or "
                                           "projection (any model). Default: finetune for the default model."),
        min_places: Optional[int] = typer.Option(None, "--min-places", min=1, help="Fewest mined places to train on (20)."),
        use_ray: bool = typer.Option(False, "--ray", help="Mine and re-extract on Ray workers."),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Connect to this Ray cluster; implies --ray."),
        workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (default: one per CPU)."),
        json_out: bool = typer.Option(False, "--json", help="One JSON object: mined counts, loss per epoch, recall before/after."),
    ):
        """Learn a global descriptor from the index's own photos and geotags, then rebuild what depends on it."""
        from delg_geo.apps.cli_common import _index_or_env, _ray_options, _throughput

        _throughput()
        run_adapt(_index_or_env(index), epochs=epochs, sample=sample, kind=kind, min_places=min_places,
                  ray=_ray_options(use_ray, ray_address, workers), json_out=json_out)
