"""What the ``delg-geo`` commands share: error lines, JSON output, option checks, common options."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from delg_geo.core.errors import DelgGeoError
from delg_geo.core.jsonio import dumps as json_dumps


def _throughput(threads: Optional[int] = None) -> None:
    from delg_geo.core.runtime import configure_for_throughput

    configure_for_throughput(threads)


def _latency(threads: Optional[int] = None) -> None:
    from delg_geo.core.runtime import configure_for_latency

    configure_for_latency(threads)


_THREADS = typer.Option(
    None, "--threads", min=1,
    help="CPUs to use (TensorFlow's thread pools, parallel images, BLAS). Default: the CPUs this process may "
         "run on (its affinity mask, capped by a cgroup CPU quota), or $DELG_GEO_THREADS. Set it when the "
         "machine is shared with other work.")


def _err(msg: str) -> None:
    typer.echo(f"delg-geo: error: {msg}", err=True)


_MODEL_HELP = (
    "Model name (default: efficientnet-lite0), or the folder of a DELG SavedModel. A SavedModel "
    "folder runs that model's TensorFlow graph: load trusted models only."
)


def _check_output(path: Optional[Path], option: str) -> None:
    """Refuse an output path that cannot be written, before any work is done or printed."""
    if path is None:
        return
    if path.is_dir():
        raise DelgGeoError(f"{option} {path}: is a folder; give a file name (for example {path / ('out' + (path.suffix or '.html' if option == '--map' else '.png'))})")
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise DelgGeoError(f"{option} {path}: {anc} is a file, not a folder; cannot write there")
    if not os.access(anc, os.W_OK):
        raise DelgGeoError(f"{option} {path}: the folder {anc} is not writable")
    path.parent.mkdir(parents=True, exist_ok=True)


def _emit_json(obj) -> None:
    """Print ``obj`` as one line of JSON (NaN and Infinity as null: see delg_geo.core.jsonio)."""
    typer.echo(json_dumps(obj))


_IDX = typer.Option(None, "--index", "-i", help="Index folder (default: $DELG_GEO_INDEX).")
_LOCAL_HELP = ("Local features for verification: aliked-n16, delg (the model's own) or xfeat "
               "(default: aliked-n16 with the default model, an official DELG model's own otherwise).")


def _ray_options(use_ray: bool, address: Optional[str], workers: Optional[int]):
    """RayOptions for ``--ray``/``--ray-address``/``--workers``, or None for a single process."""
    if not (use_ray or address):
        if workers is not None:
            raise DelgGeoError("--workers needs --ray")
        return None
    from index_builder.ray_build import RayOptions

    return RayOptions(address=address, workers=workers)


def _index_or_env(index: Optional[Path]) -> Path:
    from delg_geo.core.config import default_index

    index = index or default_index()
    if index is None:
        raise DelgGeoError("no index given: pass --index DIR or set DELG_GEO_INDEX")
    return index


def distinct_stems(paths) -> list[str]:
    """A file stem per input path, all different: the path's own stem when no two inputs share
    one, else the input's position first (``03-IMG_0001``), so outputs never overwrite each other."""
    stems = [Path(str(p)).stem or "image" for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    width = len(str(len(stems)))
    return [f"{i:0{width}d}-{s}" for i, s in enumerate(stems, start=1)]
