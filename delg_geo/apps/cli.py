"""The ``delg-geo`` command line. Thin: every command calls the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

from delg_geo import quiet_tensorflow_logs

quiet_tensorflow_logs()

from delg_geo.core.memory import keep_freed_memory  # noqa: E402
from delg_geo.core.runtime import prepare_process, set_threads  # noqa: E402

prepare_process(argv=sys.argv)  # before NumPy and TensorFlow load: pools sized to the CPUs (--threads), no spinning
keep_freed_memory()  # before TensorFlow allocates: freed feature maps are reused, not faulted in again

import typer  # noqa: E402

from delg_geo.core.errors import DelgGeoError  # noqa: E402
from delg_geo.apps.cli_common import (  # noqa: E402
    distinct_stems, _IDX, _LOCAL_HELP, _MODEL_HELP, _THREADS, _check_output, _emit_json, _err, _index_or_env, _ray_options, _throughput,
    _latency,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tell where a photo was taken, by DELG retrieval.")
index_app = typer.Typer(no_args_is_help=True, help="Build, extend and inspect indexes of geotagged images.")
app.add_typer(index_app, name="index")

# the official-model, bench and serve commands live in their own modules; an import error there
# surfaces (a command never vanishes silently)
from delg_geo.apps.cli_model import app as model_app  # noqa: E402

app.add_typer(model_app, name="model", help="Fetch or register official DELG SavedModels.")


def _version(value: bool) -> None:
    if value:
        from delg_geo import __version__

        typer.echo(f"delg-geo {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version of delg-geo and exit."),
):
    """Tell where a photo was taken, by DELG retrieval."""


def _loading(what: str, quiet: bool) -> None:
    """One line on stderr before a model is loaded (seconds, longer on the first run), unless ``quiet``."""
    if not quiet:
        typer.echo(f"delg-geo: loading {what} (a few seconds, longer the first time) ...", err=True)


@app.command()
def extract(
    images: List[Path] = typer.Argument(..., help="Image files."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per image."),
    save_dir: Optional[Path] = typer.Option(None, "--save", help="Also write IMAGE_STEM.npz feature files here."),
):
    """Extract DELG global and local features of images."""
    from delg_geo.features.extract import iter_extract
    from delg_geo.features.models import get_extractor

    if len(images) > 1:
        _throughput()
    _loading(f"the model {model or 'efficientnet-lite0'}", json_out)
    ext = get_extractor(model)
    failures = 0
    stems = distinct_stems(images)
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
    for res in iter_extract(images, ext, progress=not json_out and len(images) > 20):
        if not res.ok:
            failures += 1
            _err(res.error)
            if json_out:
                _emit_json({"image": res.path, "error": res.error})
            continue
        f = res.features
        saved = None
        if save_dir:
            saved = save_dir / (stems[res.index] + ".npz")
            f.save(saved)
            if not json_out:
                typer.echo(f"features of {res.path}: {saved}", err=True)
        rec = {
            "image": res.path,
            "model": f.model_id,
            "global_dim": f.global_dim,
            "num_local": f.num_local,
            "local_dim": f.local_dim,
            "image_size": list(f.image_size),
            "seconds": round(res.seconds, 4),
        }
        if saved is not None:
            rec["saved"] = str(saved)
        if json_out:
            _emit_json(rec)
        else:
            typer.echo(
                f"{res.path}: {f.model_id} global {f.global_dim}-D, {f.num_local} local x {f.local_dim}-D, "
                f"{f.image_size[0]}x{f.image_size[1]}, {res.seconds:.2f} s"
            )
    if failures:
        _err(f"{failures} of {len(images)} images failed")
        raise typer.Exit(1)


def _build(images_dir, metadata, index, model, from_exif, fmt, resume, overwrite, allow_outside, index_type, batch_size, json_out, add, yfcc=None, ray=None, keep_raw=False,
           confidence_radius_km=None, calibrate=None, local=None, compact=None):
    from index_builder.assemble import CompactOptions
    from index_builder.build import BuildOptions, build_index

    if yfcc is not None:  # a Placing 2016 list plus the YFCC100M metadata holding its coordinates
        if metadata is None:
            raise DelgGeoError("--yfcc needs --metadata PLACING_FILE (the photo-id list)")
        metadata = (metadata, yfcc)

    _throughput()
    log = (lambda m: typer.echo(m, err=True))
    rep = build_index(
        images_dir, index, metadata, from_exif=from_exif, fmt=fmt, model=model, local=local, resume=resume, add=add,
        overwrite=overwrite, allow_outside=allow_outside,
        options=BuildOptions(index_type=index_type, batch_size=batch_size, progress=not json_out,
                             compact=CompactOptions(keep_raw=keep_raw, **(compact or {})),
                             confidence_radius_km=confidence_radius_km,
                             calibrate=calibrate), ray=ray, log=log,
    )
    d = rep.to_dict()
    if json_out:
        _emit_json(d)
    else:
        typer.echo(
            f"index {rep.index_dir}: {rep.num_images} images ({rep.added} extracted now, {rep.resumed} resumed), "
            f"{len(rep.skipped)} skipped, {rep.images_per_s:.2f} images/s, {rep.seconds:.1f} s in all"
        )
        if rep.ray:
            r = rep.ray
            typer.echo(f"ray ({r['address']}): {r.get('workers', 0)} workers on {', '.join(r.get('hosts', [])) or '-'}, "
                       f"{r['shards']} shards ({r['failed_shards']} failed), workers ready in {r.get('startup_s', 0):.1f} s")


_METADATA_HELP = ("CSV (image,lat,lon), or a Placing/YFCC file. An alternative to --from-exif: give one of "
                  "the two (or neither, for VPR-style file names that hold the positions).")
_FROM_EXIF_HELP = ("Read positions from EXIF GPS instead of a --metadata file (every file without GPS is "
                   "listed as skipped).")
_FORMAT_HELP = "How to read the positions: auto, csv, exif, vpr or yfcc."
_BATCH_HELP = "Images per forward pass of the network (at least 1)."


@index_app.command("build")
def index_build(
    images_dir: Path = typer.Argument(..., help="Folder the metadata's image paths are relative to."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help=_METADATA_HELP),
    index: Path = typer.Option(..., "--index", "-i", help="Index folder to create."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    local: Optional[str] = typer.Option(None, "--local", help=_LOCAL_HELP),
    from_exif: bool = typer.Option(False, "--from-exif", help=_FROM_EXIF_HELP),
    fmt: str = typer.Option("auto", "--format", help=_FORMAT_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted build."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing index."),
    allow_outside: bool = typer.Option(False, "--allow-outside", help="Accept paths (and symlinks) leading outside IMAGES_DIR."),
    index_type: str = typer.Option("auto", "--index-type", help="auto, flat, ivfpq or hnsw."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help=_BATCH_HELP),
    yfcc: Optional[Path] = typer.Option(None, "--yfcc", help="YFCC100M metadata file, with a Placing 2016 list as --metadata."),
    use_ray: bool = typer.Option(False, "--ray", help="Extract on Ray workers (a local cluster unless --ray-address)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Connect to this Ray cluster (HOST:PORT or auto); implies --ray."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (default: one per GPU, else per CPU)."),
    keep_raw: bool = typer.Option(False, "--keep-raw", help="Also store the model's float32 global descriptors (5 KB an image)."),
    local_codec: str = typer.Option("pca-int8", "--local-codec", help="Local descriptor storage: pca-int8, pq, pca-binary or float16 (docs/index-format.md: the choices)."),
    local_dim: int = typer.Option(48, "--local-dim", min=0, help="PCA dimension of the local descriptors (0: the model's own)."),
    max_local: int = typer.Option(500, "--max-local", min=1, help="Local features kept per image (the highest-attention ones)."),
    asmk: bool = typer.Option(True, "--asmk/--no-asmk", help="An inverted file over the local features, which adds its own candidates (about 4.5 KB an image)."),
    confidence_radius_km: Optional[float] = typer.Option(
        None, "--confidence-radius-km", help="Confidence = probability of being within this radius (default 0.1)."),
    calibrate: Optional[bool] = typer.Option(
        None, "--calibrate/--no-calibrate",
        help="Fit the confidence on the collection after building (default: from 200 images up)."),
    adapt: bool = typer.Option(False, "--adapt", help="Then adapt the global descriptor to the collection (`index adapt`)."),
    threads: Optional[int] = _THREADS,
    json_out: bool = typer.Option(False, "--json", help="Print the build report as JSON (no progress bar)."),
):
    """Index a geotagged image collection (compact: about 31 KB an image)."""
    set_threads(threads)
    if confidence_radius_km is not None and not confidence_radius_km > 0:
        raise DelgGeoError(f"--confidence-radius-km must be positive, got {confidence_radius_km}")
    from delg_geo.index.store import LOCAL_CODECS

    if local_codec not in LOCAL_CODECS:
        raise typer.BadParameter(f"{local_codec!r} is not one of {', '.join(LOCAL_CODECS)}", param_hint="--local-codec")
    ray = _ray_options(use_ray, ray_address, workers)
    _build(images_dir, metadata, index, model, from_exif, fmt, resume, overwrite, allow_outside, index_type, batch_size, json_out,
           add=False, yfcc=yfcc, ray=ray, keep_raw=keep_raw, confidence_radius_km=confidence_radius_km, calibrate=calibrate,
           local=local, compact=dict(local_codec=local_codec, local_dim=local_dim or None, max_local=max_local, asmk=asmk))
    if adapt:  # a second JSON line with --json: the adapt report
        from delg_geo.apps.cli_adapt import run_adapt

        run_adapt(index, ray=ray, json_out=json_out)


@index_app.command("add")
def index_add(
    images_dir: Path = typer.Argument(..., help="Folder the metadata's image paths are relative to."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help=_METADATA_HELP),
    index: Optional[Path] = _IDX,
    from_exif: bool = typer.Option(False, "--from-exif", help=_FROM_EXIF_HELP),
    fmt: str = typer.Option("auto", "--format", help=_FORMAT_HELP),
    allow_outside: bool = typer.Option(False, "--allow-outside", help="Accept paths (and symlinks) leading outside IMAGES_DIR."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help=_BATCH_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON (no progress bar)."),
):
    """Add images to an existing index (its whitening and local codec encode them; the global index is rebuilt)."""
    from delg_geo.index.geo_index import read_manifest

    index = _index_or_env(index)
    m = read_manifest(index) if (index / "manifest.json").exists() else None
    model = (m.model_path if m.model_path and Path(m.model_path).is_dir() else m.model_id) if m else None
    local = m.local_features if m else None
    if m is None:  # an interrupted add whose manifest was being replaced: the model it was using
        try:
            state = json.loads((index / ".building" / "state.json").read_text())
            model, local = state.get("model_id"), state.get("local_features")
        except (OSError, ValueError, AttributeError):
            model = None
    index_type = (m.search.get("requested", "auto") if m.format_version >= 2 else "auto") if m else "auto"
    keep_raw = bool(m and m.format_version >= 2 and "global_raw.npy" in m.files)
    _build(images_dir, metadata, index, model, from_exif, fmt, True, False, allow_outside, index_type, batch_size, json_out,
           add=True, keep_raw=keep_raw, local=local)


@index_app.command("compact")
def index_compact(
    index: Optional[Path] = _IDX,
    out: Path = typer.Option(..., "--out", help="New folder for the compact index."),
    json_out: bool = typer.Option(False, "--json", help="Print the new index's summary as JSON."),
):
    """Convert a format-1 index (delg-geo before the compact store) to the compact format, or give a compact index what it lacks (the ASMK inverted file), without re-extracting."""
    from index_builder.assemble import compact_index

    m = compact_index(_index_or_env(index), out, log=lambda s: typer.echo(s, err=True))
    size = sum(m.files.values())
    d = dict(index=str(out), num_images=m.num_images, bytes=size, bytes_per_image=round(size / m.num_images),
             search=m.search, local=m.local)
    if json_out:
        _emit_json(d)
    else:
        typer.echo(f"compact index {out}: {m.num_images} images, {size / m.num_images / 1024:.1f} KB an image")


@index_app.command("calibrate")
def index_calibrate(
    index: Optional[Path] = _IDX,
    sample: int = typer.Option(1000, "--sample", min=1, help="How many of the index's own photos to locate against the rest (at least 1)."),
    radius_km: Optional[float] = typer.Option(None, "--confidence-radius-km",
                                              help="Radius the confidence is about (default: the manifest's, 0.1)."),
    top_k: int = typer.Option(100, "--top-k", "-k", min=1, help="Candidates verified per photo, as a query does (at least 1)."),
    local_top_k: Optional[int] = typer.Option(None, "--local-top-k", min=0, help="Candidates the ASMK inverted file adds, as a query does (default: as many as --top-k)."),
    no_tune: bool = typer.Option(False, "--no-tune", help="Keep the default decision rule; fit only the confidence."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the random sample (0 or more)."),
    json_out: bool = typer.Option(False, "--json", help="Print the calibration as JSON."),
):
    """Fit the confidence (and the decision rule) on the index's own photos."""
    from delg_geo.retrieval.calibrate import calibrate_index

    index = _index_or_env(index)
    cal = calibrate_index(index, sample=sample, radius_km=radius_km, top_k=top_k, local_top_k=local_top_k, tune=not no_tune, seed=seed,
                          progress=not json_out, log=None if json_out else (lambda m: typer.echo(m, err=True)))
    if json_out:
        _emit_json(cal.to_dict())
        return
    s = cal.stats
    r = cal.rule
    typer.echo(
        f"calibration of {index}: {s['sample']} self-queries, {s['accuracy']:.1%} within {cal.radius_km * 1000:g} m; "
        f"rule min_inliers={r.min_inliers} base_inliers={r.base_inliers} vote_radius_km={r.vote_radius_km:g}; "
        f"cross-validated ECE {s['cv_ece']:.3f}, confidence >= 0.5: {s['cv_coverage_at_0_5']:.1%} of photos, "
        f"{s['cv_precision_at_0_5']:.1%} right"
    )


@index_app.command("info")
def index_info(index: Optional[Path] = _IDX, json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON.")):
    """Print an index's manifest."""
    from delg_geo.index.geo_index import read_manifest

    m = read_manifest(_index_or_env(index))
    from dataclasses import asdict

    d = asdict(m)
    if json_out:
        _emit_json(d)
        return
    for k, v in d.items():
        if k == "skipped":
            typer.echo(f"skipped: {len(v)}")
            for s in v[:20]:
                typer.echo(f"  row {s.get('row')}: {s.get('image')}: {s.get('reason')}")
            if len(v) > 20:
                typer.echo(f"  ... {len(v) - 20} more (see skipped.csv)")
        elif isinstance(v, dict):
            typer.echo(f"{k}: " + ", ".join(f"{a}={b}" for a, b in v.items()))
        else:
            typer.echo(f"{k}: {v}")


@index_app.command("verify")
def index_verify(
    index: Optional[Path] = _IDX,
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    allow_unchecked: bool = typer.Option(
        False, "--allow-unchecked", help="Pass an index whose files have no recorded checksum (built before delg-geo "
        "recorded them) when everything else checks out; without it such an index fails."),
    rehash: bool = typer.Option(
        False, "--rehash", help="Record the missing checksums in the manifest once everything else checks out (after "
        "your own check that the files are the index's own)."),
):
    """Check every file of an index against its manifest's sizes and checksums, then its contents
    (metadata ranges, the FAISS vectors, every image's local features, the inverted file, and that
    the files belong together). Exit 1 if anything is damaged, or unchecked without --allow-unchecked."""
    from delg_geo.index.check import verify_index

    idx = _index_or_env(index)
    rep = verify_index(idx, allow_unchecked=allow_unchecked, rehash=rehash)
    if json_out:
        _emit_json(rep)
    else:
        for f in rep["files"]:
            state = "DAMAGED: " + f["problem"] if not f["ok"] else (
                "ok, checksum recorded now" if f["name"] in rep.get("rehashed", ()) else
                "ok (size only: no checksum recorded)" if f.get("unchecked") else "ok")
            typer.echo(f"{f['name']}: {state}")
        if rep.get("note"):
            typer.echo(f"note: {rep['note']}")
        typer.echo(f"checked: {', '.join(rep['checked'])}")
    if not rep["ok"]:
        _err(f"index {idx} is {'damaged' if rep['damaged'] else 'not verified'}: " + "; ".join(rep["problems"]))
        raise typer.Exit(1)
    if not json_out:
        typer.echo(f"index {idx}: ok")


@app.command()
def query(
    images: List[Path] = typer.Argument(..., help="Photos to locate."),
    index: Optional[Path] = _IDX,
    top_k: int = typer.Option(100, "--top-k", "-k", min=1, help="Candidates to verify (at least 1)."),
    local_top_k: Optional[int] = typer.Option(None, "--local-top-k", min=0, help="Candidates the index's ASMK inverted file adds (default: as many as --top-k; 0: none)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Global retrieval only."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Must match the index's model. " + _MODEL_HELP),
    local: Optional[str] = typer.Option(None, "--local", help="Must match the index's local features (default: the index's)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per image."),
    map_out: Optional[Path] = typer.Option(None, "--map", help="Write a self-contained HTML map of the answers."),
    explain: Optional[Path] = typer.Option(None, "--explain", help="Draw query vs verified neighbour with inlier matches (PNG)."),
    threads: Optional[int] = _THREADS,
):
    """Locate photos against an index."""
    from delg_geo.retrieval.locate import Geolocator

    _latency(threads)

    _check_output(map_out, "--map")
    _check_output(explain, "--explain")

    _loading("the index and the model", json_out)
    geo = Geolocator.from_index(_index_or_env(index), model=model, local=local, top_k=top_k, local_top_k=local_top_k,
                                verify=not no_verify)
    if geo.index.unchecked:  # an index built before delg-geo recorded checksums
        typer.echo(f"note: {geo.index.path} has no recorded checksum for {len(geo.index.unchecked)} file(s); check it "
                   f"and record them with `delg-geo index verify --index {geo.index.path} --rehash`", err=True)
    failures = 0
    rows = []
    preds = []
    stems = distinct_stems(images)
    answers = geo.locate_many_with_features(images, progress=not json_out and len(images) > 5)
    for position, (pred, feats) in enumerate(answers):
        target = None
        if not isinstance(pred, Exception):
            preds.append(pred)
            if explain is not None:
                from delg_geo.apps.explain import explain_prediction

                target = explain if len(images) == 1 else explain.with_name(
                    f"{explain.stem}-{stems[position]}{explain.suffix or '.png'}")
                explain_prediction(geo, pred.image, pred, target, features=feats)  # the answer's own verification
                typer.echo(f"match picture of {pred.image}: {target}", err=True)
        if isinstance(pred, Exception):
            failures += 1
            _err(str(pred))
            if json_out:
                _emit_json({"image": getattr(pred, "path", ""), "error": str(pred)})
            continue
        if json_out:
            _emit_json(dict(pred.to_dict(), **({"explain": str(target)} if target is not None else {})))
        else:
            rows.append(pred)
    if rows:
        typer.echo(_table(rows))
    if map_out is not None and preds:
        from delg_geo.evaluation.mapview import write_prediction_map

        write_prediction_map(preds, geo.index, map_out)
        if not json_out:
            typer.echo(f"map: {map_out}", err=True)
    if failures:
        _err(f"{failures} of {len(images)} images failed")
        raise typer.Exit(1)


def _table(preds) -> str:
    head = ["image", "lat", "lon", "place", "method", "confidence", "inliers", "neighbour", "extract/search/verify ms"]
    lines = []
    for p in preds:
        t = p.timings_ms
        place = ", ".join(str(p.place[k]) for k in ("name", "admin1", "country_code") if (p.place or {}).get(k)) or "-"
        lines.append([
            Path(p.image).name, f"{p.lat:.6f}", f"{p.lon:.6f}", place, p.method,
            p.confidence_text if p.calibrated else f"{p.confidence:.2f} (uncalibrated)", str(p.inliers),
            Path(p.neighbour.image).name, f"{t['extract']:.0f}/{t['search']:.1f}/{t['verify']:.0f}",
        ])
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in lines]
    if any(not p.calibrated for p in preds):
        out.append("note: the index has no calibration, so confidence is a score, not a probability; "
                   "fit one with `delg-geo index calibrate`")
    for p in preds:
        if p.note:
            out.append(f"note: {Path(p.image).name}: {p.note}")
    return "\n".join(out)


# the bench, classifier and serve commands, from their own modules
from delg_geo.apps import cli_adapt, cli_bench, cli_serve  # noqa: E402

cli_adapt.register(index_app)
cli_bench.register(app)
cli_serve.register(app)


def main() -> None:
    try:
        app()
    except DelgGeoError as e:
        _err(str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
