"""Downloading, adding and checking DELG SavedModels in the model cache.

A model ``NAME`` lives in ``models_dir()/NAME`` (a folder holding ``saved_model.pb``). Everything
is first written under a hidden temporary name in the same folder, checked (the archive unpacks,
holds exactly one SavedModel, and that SavedModel has the official DELG signature) and only then
renamed into place, so an interrupted download or unpack never leaves a half-written model at
``model_path(NAME)``.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import BinaryIO

from delg_geo.core.config import models_dir
from delg_geo.core.errors import ModelError
from delg_geo.features.models import registry
from delg_geo.features.models.signature import (  # noqa: F401 (public here too)
    OPTIONAL_INPUTS, REQUIRED_INPUTS, REQUIRED_OUTPUTS, SignatureInfo, check_signature, load_checked,
)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_CHUNK = 1 << 20
_STALE_SECONDS = 24 * 3600


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ModelError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' "
            "(for example delg-r50-gldv2)"
        )
    return name


def model_path(name: str) -> Path:
    """Where model ``name`` is (or would be) installed: ``models_dir()/name``."""
    return models_dir() / _check_name(name)


def is_installed(name: str) -> bool:
    try:
        return (model_path(name) / "saved_model.pb").is_file()
    except ModelError:
        return False


def not_installed_error(name: str) -> ModelError:
    """The error for a model that is not in the cache, saying exactly what to run."""
    where = models_dir() / name
    how = (
        f"run `delg-geo model fetch {name}` to download it"
        if name in registry.MODELS
        else f"run `delg-geo model fetch {name} --url URL` to download it"
    )
    return ModelError(
        f"model {name!r} is not installed (no saved_model.pb in {where}): {how}, "
        f"or, with the archive or SavedModel folder already on this machine, "
        f"`delg-geo model add {name} PATH`"
    )


def require_installed(name: str) -> Path:
    """``model_path(name)``, or the helpful :class:`ModelError` if it is not installed."""
    if not is_installed(name):
        raise not_installed_error(name)
    return model_path(name)


# --------------------------------------------------------------------------------------------
# Signature


def fetch_model(name: str, url: str | None = None, progress: bool = True) -> Path:
    """Download the ``.tar.gz`` of model ``name``, check it and install it at ``model_path(name)``.

    ``url`` defaults to the official link of a registry model. A previous install is replaced
    only once the new one has been downloaded, unpacked and checked.
    """
    _check_name(name)
    if url is None:
        if name not in registry.MODELS:
            known = ", ".join(registry.MODELS)
            raise ModelError(
                f"unknown model {name!r}: known models are {known}; "
                f"for another model give its archive URL (`delg-geo model fetch {name} --url URL`)"
            )
        url = registry.MODELS[name].url
    root = _prepare_root(name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".download", dir=root)
    archive = Path(tmp_name)
    unpack_dir: Path | None = None
    try:
        with os.fdopen(fd, "wb") as fh:
            _download(url, fh, name, progress)
            fh.flush()
            os.fsync(fh.fileno())
        unpack_dir = _unpack(archive, root, name, label=url)
        src = _find_savedmodel(unpack_dir, label=url)
        check_signature(src)
        return _install(src, name)
    finally:
        archive.unlink(missing_ok=True)
        if unpack_dir is not None:
            shutil.rmtree(unpack_dir, ignore_errors=True)


def add_model(name: str, path: str | Path) -> Path:
    """Install an already-downloaded SavedModel folder or ``.tar.gz`` archive as model ``name``."""
    _check_name(name)
    src_path = Path(path).expanduser()
    if not src_path.exists():
        raise ModelError(f"{src_path}: no such file or folder")
    target = model_path(name)
    if src_path.is_dir():
        found = _find_savedmodel(src_path, label=str(src_path))
        check_signature(found)
        if target.exists() and found.resolve() == target.resolve():
            return target  # already in place
        root = _prepare_root(name)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".copy", dir=root))
        try:
            dst = staging / "model"
            try:
                shutil.copytree(found, dst, symlinks=False)
            except (OSError, shutil.Error) as e:
                raise ModelError(f"cannot copy {found} into {root}: {e}") from None
            return _install(dst, name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if src_path.is_file():
        if not _is_tar(src_path):
            raise ModelError(
                f"{src_path}: neither a SavedModel folder nor a .tar.gz archive of one"
            )
        root = _prepare_root(name)
        unpack_dir = _unpack(src_path, root, name, label=str(src_path))
        try:
            found = _find_savedmodel(unpack_dir, label=str(src_path))
            check_signature(found)
            return _install(found, name)
        finally:
            shutil.rmtree(unpack_dir, ignore_errors=True)
    raise ModelError(f"{src_path}: neither a SavedModel folder nor a .tar.gz archive of one")


def remove_stale_temporaries(name: str | None = None, older_than: float = _STALE_SECONDS) -> int:
    """Delete leftovers of killed downloads (hidden ``.NAME.*`` entries older than a day)."""
    root = models_dir()
    if not root.is_dir():
        return 0
    now = time.time()
    removed = 0
    prefix = f".{name}." if name else "."
    for p in root.iterdir():
        if not p.name.startswith(prefix) or not p.name.endswith(
            (".download", ".unpack", ".copy", ".old")
        ):
            continue
        try:
            if now - p.lstat().st_mtime < older_than:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
        except OSError:
            pass
    return removed


# --------------------------------------------------------------------------------------------
# Helpers


def _prepare_root(name: str) -> Path:
    root = models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create the model folder {root}: {e}") from None
    remove_stale_temporaries(name)
    return root


def _offline_message(name: str, url: str, reason: object) -> str:
    host = urllib.parse.urlsplit(url).netloc or url
    return (
        f"cannot reach {host} to download {name} ({reason}). This machine may be offline or "
        f"behind a firewall: download {url} on another machine, copy it here and run "
        f"`delg-geo model add {name} PATH`"
    )


def _download(url: str, fh: BinaryIO, name: str, progress: bool, timeout: float = 60.0) -> int:
    from tqdm import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "delg-geo"})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s)/file by design
    except urllib.error.HTTPError as e:
        raise ModelError(
            f"cannot download {name} from {url}: HTTP {e.code} {e.reason}; nothing was installed"
        ) from None
    except urllib.error.URLError as e:
        raise ModelError(_offline_message(name, url, e.reason)) from None
    except (OSError, http.client.HTTPException) as e:
        raise ModelError(_offline_message(name, url, e)) from None
    except ValueError as e:
        raise ModelError(f"bad download URL {url!r}: {e}") from None
    got = 0
    with resp:
        length = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
        try:
            total = int(length) if length is not None else None
        except ValueError:
            total = None
        bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"{name}",
            disable=not progress,
            file=sys.stderr,
            leave=False,
        )
        try:
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                fh.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:
            raise ModelError(
                f"download of {url} was interrupted after {got} bytes ({e or type(e).__name__}); "
                "nothing was installed: run the command again"
            ) from None
        finally:
            bar.close()
    if total is not None and got != total:
        raise ModelError(
            f"download of {url} was interrupted: got {got} of {total} bytes; "
            "nothing was installed: run the command again"
        )
    if got == 0:
        raise ModelError(f"download of {url} was empty; nothing was installed")
    return got


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _unpack(archive: Path, root: Path, name: str, label: str) -> Path:
    dest = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".unpack", dir=root))
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                for m in tar.getmembers():
                    parts = Path(m.name).parts
                    if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                        raise tarfile.TarError(f"unsafe member {m.name!r}")
                tar.extractall(dest)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise ModelError(
            f"{label}: corrupt or truncated archive ({str(e) or type(e).__name__}); "
            "nothing was installed"
        ) from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _find_savedmodel(folder: Path, label: str) -> Path:
    hits = sorted({p.parent for p in folder.rglob("saved_model.pb") if p.is_file()})
    if not hits:
        raise ModelError(f"{label}: holds no SavedModel (no saved_model.pb found)")
    if len(hits) > 1:
        rel = ", ".join(str(h.relative_to(folder)) or "." for h in hits[:5])
        raise ModelError(f"{label}: holds several SavedModels ({rel}); give the folder of one")
    return hits[0]


def _fsync_tree(folder: Path) -> None:
    """Flush the unpacked files to disk before the rename that makes them visible."""
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                _fsync_path(p)
        _fsync_path(dirpath)


def _fsync_path(path: str | Path) -> None:
    """fsync one file or folder; best effort (some file systems refuse it)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _install(src: Path, name: str) -> Path:
    """Rename ``src`` (a checked SavedModel folder inside the model cache) to ``model_path(name)``.

    A previous install is first renamed aside and deleted only after the new one is in place;
    if the final rename fails the previous install is put back.
    """
    target = model_path(name)
    root = target.parent
    _fsync_tree(src)
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = root / f".{name}.{uuid.uuid4().hex[:8]}.old"
        try:
            os.replace(target, old)
        except OSError as e:
            raise ModelError(f"cannot replace the previous install at {target}: {e}") from None
    try:
        os.replace(src, target)
    except OSError as e:
        if old is not None:
            try:
                os.replace(old, target)
            except OSError:
                pass
        raise ModelError(f"cannot install the model at {target}: {e}") from None
    _fsync_path(root)
    if old is not None:
        if old.is_symlink() or not old.is_dir():
            old.unlink(missing_ok=True)
        else:
            shutil.rmtree(old, ignore_errors=True)
    return target
