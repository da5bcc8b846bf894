"""``delg-geo bench`` and ``delg-geo classifier train``: thin wrappers over :mod:`delg_geo.evaluation.bench`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from delg_geo.apps.cli_common import _THREADS
from delg_geo.core.jsonio import dumps as json_dumps


def _radii(values: Optional[List[float]]) -> Optional[List[float]]:
    """``--radii-km``: each a positive, finite number of km (a usage error otherwise, before any query runs)."""
    import math

    for v in values or []:
        if not (math.isfinite(v) and v > 0):
            raise typer.BadParameter(f"{v:g} is not a positive distance in km")
    return values


def register(app: typer.Typer) -> None:
    clf_app = typer.Typer(no_args_is_help=True, help="The PlaNet-style S2-cell classifier baseline.")
    app.add_typer(clf_app, name="classifier")

    @app.command()
    def bench(
        index: Optional[Path] = typer.Option(None, "--index", "-i", help="Index folder (default: $DELG_GEO_INDEX)."),
        queries: Path = typer.Option(..., "--queries", "-q", help="CSV (image,lat,lon), Im2GPS CSV, or Placing 2016 list."),
        images: Optional[Path] = typer.Option(None, "--images", help="Folder of the query images (default: beside the CSV)."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for predictions.csv, summary.json/md, error_cdf.png."),
        methods: Optional[List[str]] = typer.Option(None, "--methods", help="Repeat or comma-separate; default: all."),
        radii_km: Optional[List[float]] = typer.Option(None, "--radii-km", callback=_radii,
                                                       help="Accuracy radii in km, positive (repeat)."),
        top_k: int = typer.Option(100, "--top-k", "-k", min=1, help="Candidates per query (at least 1)."),
        local_top_k: Optional[int] = typer.Option(None, "--local-top-k", min=0, help="Candidates the index's ASMK inverted file adds for verified (default: as many as --top-k; 0: none)."),
        fmt: str = typer.Option("auto", "--format", help="auto, csv, placing or im2gps."),
        yfcc: Optional[Path] = typer.Option(None, "--yfcc", help="YFCC100M metadata for a Placing 2016 list."),
        map_out: bool = typer.Option(False, "--map", help="Also write bench_map.html: truth vs prediction per query."),
        use_ray: bool = typer.Option(False, "--ray", help="Extract, search and verify on Ray workers (resumable shards)."),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Connect to this Ray cluster; implies --ray."),
        workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (default: one per GPU, else per CPU)."),
        threads: Optional[int] = _THREADS,
        json_out: bool = typer.Option(False, "--json", help="Print summary.json."),
    ):
        """Benchmark every method on a query set and write the report."""
        from delg_geo.evaluation.bench import ALL_METHODS, BenchConfig, run_bench
        from delg_geo.apps.cli_common import _index_or_env, _ray_options, _throughput
        from delg_geo.evaluation.metrics import DEFAULT_RADII_KM

        _throughput(threads)
        ms = tuple(m.strip() for arg in (methods or [",".join(ALL_METHODS)]) for m in arg.split(",") if m.strip())
        cfg = BenchConfig(methods=ms, radii_km=tuple(radii_km) if radii_km else DEFAULT_RADII_KM, top_k=top_k,
                          local_top_k=local_top_k, sift_top_k=top_k, map=map_out, progress=not json_out)
        res = run_bench(_index_or_env(index), queries, images, out, cfg, fmt=fmt, yfcc_metadata=yfcc,
                        log=lambda m: typer.echo(m, err=True), ray=_ray_options(use_ray, ray_address, workers))
        if json_out:
            typer.echo((res.out_dir / "summary.json").read_text())
        else:
            typer.echo((res.out_dir / "summary.md").read_text())
            typer.echo(f"written to {res.out_dir}")

    @clf_app.command("train")
    def classifier_train(
        index: Optional[Path] = typer.Option(None, "--index", "-i", help="Index folder (default: $DELG_GEO_INDEX)."),
        t1: Optional[int] = typer.Option(None, "--t1", min=1, help="Split a cell holding more than t1 images."),
        t2: Optional[int] = typer.Option(None, "--t2", min=1, help="Drop cells holding fewer than t2 images."),
        epochs: int = typer.Option(30, "--epochs", min=1, help="Training epochs (at least 1)."),
        smoothing_km: Optional[float] = typer.Option(None, "--label-smoothing-km", help="PIGEON haversine smoothing tau."),
        json_out: bool = typer.Option(False, "--json", help="Print the classifier's summary as JSON."),
    ):
        """Train the S2-cell classifier on an index and save it in INDEX/classifier."""
        from delg_geo.evaluation.bench import train_index_classifier
        from delg_geo.apps.cli_common import _index_or_env

        clf = train_index_classifier(_index_or_env(index), t1, t2, epochs=epochs, label_smoothing_km=smoothing_km)
        info = {k: v for k, v in clf.info.items() if isinstance(v, (int, float, str, dict, list, type(None)))}
        info.update(t1=clf.partition.t1, t2=clf.partition.t2, cells=len(clf.partition.cells))
        if json_out:
            typer.echo(json_dumps(info, default=str))
        else:
            typer.echo(", ".join(f"{k}={v}" for k, v in info.items()))
