"""Read PyTorch ``.pth`` state dicts without PyTorch: the legacy format and the zip format.

The legacy format (PyTorch < 1.6) is a sequence of pickles: a magic number, a protocol version,
a system-info dict, the state dict itself (whose tensors are persistent references to storages),
the list of storage keys, and then each storage's raw bytes preceded by its element count
(int64, LE).

The zip format (PyTorch >= 1.6, what ``torch.save`` writes today) is a zip archive with one
top-level folder holding ``data.pkl`` (the state dict, tensors again as persistent references
to storages), ``data/<key>`` (each storage's raw little-endian bytes), and optionally
``byteorder`` and ``version``.

Every pickle of both formats (for the legacy one, the header's three as well as the state dict
and the key list) goes through the same restricted unpickler: only the handful of classes a
state dict needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the typed
storages) are resolved; anything else is refused, so a crafted file cannot execute code.
"""

from __future__ import annotations

import collections
import pickle
import io
import struct
import zipfile
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _TensorRef:
    """A tensor waiting for its storage's bytes."""

    def __init__(self, storage_key: str, offset: int, size: tuple, stride: tuple):
        self.storage_key = storage_key
        self.offset = offset
        self.size = tuple(size)
        self.stride = tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused):
    key, _stype = storage
    return _TensorRef(key, storage_offset, size, stride)


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self.storages: dict[str, _StorageType] = {}

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not isinstance(pid, tuple) or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        key, stype = str(pid[2]), pid[1]
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {stype!r}")
        self.storages.setdefault(key, stype)
        return (key, stype)


def _load_plain(f, what: str, path: Path):
    """One header pickle (an int, a dict or a list of keys) through the restricted unpickler."""
    try:
        return _SafeUnpickler(f).load()
    except pickle.UnpicklingError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or not a pickle at all
        raise ValueError(f"{path}: not a legacy-format PyTorch file (cannot read its {what}: {e})") from None


def load_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Return ``{name: ndarray}`` for a legacy-format PyTorch state dict."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = _load_plain(f, "magic number", path)
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a legacy-format PyTorch file (bad magic number)")
        protocol = _load_plain(f, "protocol version", path)
        if protocol != 1001:
            raise ValueError(f"{path}: unsupported legacy protocol {protocol}")
        sys_info = _load_plain(f, "system info", path)
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian files are not supported")
        unpickler = _SafeUnpickler(f)
        state = unpickler.load()
        storages = unpickler.storages
        keys = _load_plain(f, "storage keys", path)
        if not isinstance(keys, (list, tuple)):
            raise ValueError(f"{path}: the storage key list is a {type(keys).__name__}, not a list")
        raw: dict[str, np.ndarray] = {}
        for key in keys:
            head = f.read(8)
            if len(head) != 8 or str(key) not in storages:
                raise ValueError(f"{path}: truncated or inconsistent (storage {key})")
            (numel,) = struct.unpack("<q", head)
            stype = storages[str(key)]
            nbytes = numel * stype.dtype.itemsize
            if numel < 0:
                raise ValueError(f"{path}: negative storage size (storage {key})")
            buf = f.read(nbytes)
            if len(buf) != nbytes:
                raise ValueError(f"{path}: truncated (storage {key})")
            raw[str(key)] = np.frombuffer(buf, dtype=stype.dtype)

    return _materialise(state, raw)


def _materialise(state, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Turn the unpickled state dict's tensor references into contiguous arrays."""
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"expected a state dict, found {type(state).__name__}")
    out: dict[str, np.ndarray] = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            continue
        flat = raw[ref.storage_key]
        itemsize = flat.dtype.itemsize
        if ref.size == ():
            out[name] = flat[ref.offset : ref.offset + 1].reshape(()).copy()
            continue
        if ref.size and min(ref.size) == 0:
            out[name] = np.zeros(ref.size, flat.dtype)
            continue
        last = ref.offset + sum((n - 1) * st for n, st in zip(ref.size, ref.stride))
        if ref.offset < 0 or last >= flat.size or min(ref.stride) < 0:
            raise ValueError(f"tensor {name!r} reaches outside its storage")
        arr = np.lib.stride_tricks.as_strided(
            flat[ref.offset :],
            shape=ref.size,
            strides=tuple(s * itemsize for s in ref.stride),
            writeable=False,
        )
        out[name] = np.array(arr, order="C")  # contiguous copy
    return out


def is_zip_checkpoint(path: str | Path) -> bool:
    return zipfile.is_zipfile(path)


def load_zip_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Return ``{name: ndarray}`` for a zip-format PyTorch state dict (``torch.save`` >= 1.6)."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not a zip-format PyTorch file ({e})") from None
    with zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ValueError(f"{path}: expected one <folder>/data.pkl in the archive, found {len(pkls)}")
        root = pkls[0][: -len("data.pkl")]
        if root + "byteorder" in names:
            order = zf.read(root + "byteorder").decode("ascii", "replace").strip()
            if order != "little":
                raise ValueError(f"{path}: {order!r}-endian files are not supported")
        unpickler = _SafeUnpickler(io.BytesIO(zf.read(pkls[0])))
        state = unpickler.load()
        raw: dict[str, np.ndarray] = {}
        for key, stype in unpickler.storages.items():
            member = f"{root}data/{key}"
            if member not in names:
                raise ValueError(f"{path}: storage {key} is missing from the archive")
            buf = zf.read(member)
            if len(buf) % stype.dtype.itemsize:
                raise ValueError(f"{path}: storage {key} is truncated")
            raw[key] = np.frombuffer(buf, dtype=stype.dtype.newbyteorder("<"))
    return _materialise(state, raw)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict in either format (zip or legacy), without PyTorch."""
    return load_zip_state_dict(path) if is_zip_checkpoint(path) else load_legacy_state_dict(path)
