"""Hand-edited manifests, file names leading outside the index, NaN in JSON, and indexes without
checksums (issue 20): every case asserts the exit code, the one-line message naming the field or
the file, and that nothing was lost (the index's files are unchanged, and restoring the manifest
restores a verified index).

Uses the tiny 3-photo Lund index of ``test_hostile.py``, and a second one of three other photos
whose files are swapped in.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from test_hostile import _edit_manifest, _manifest, build, copy_index, lund, run_cli, small_extractor, tiny  # noqa: F401

MANIFEST = "manifest.json"


def _strict(text: str):
    """JSON as a strict reader (a browser's JSON.parse) reads it: NaN and Infinity refused."""
    def no_constant(c):
        raise ValueError(f"{c} is not JSON")

    return json.loads(text, parse_constant=no_constant)


def _files(index: Path) -> dict:
    """Every file of the index but the lock files (which a writer rewrites), with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(index.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("delg-geo: error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- 1. hand-edited manifests ---------------------------------------------------------------------

def _set(key, value):
    return lambda d: d.update({key: value})


def _size_as_string(d):
    d["files"]["global.npy"] = str(d["files"]["global.npy"])


FIELD_CASES = {
    "files_list": (lambda d: d.update(files=list(d["files"])), "field files is a list"),
    "checksums_list": (lambda d: d.update(checksums=list(d["checksums"].values())), "field checksums is a list"),
    "format_version_string": (_set("format_version", "2"), 'field format_version is the string "2", not a whole number'),
    "format_version_null": (_set("format_version", None), "field format_version is null"),
    "radius_word": (_set("confidence_radius_km", "far"), 'field confidence_radius_km is the string "far"'),
    "radius_negative": (_set("confidence_radius_km", -5), "field confidence_radius_km is the number -5"),
    "radius_nan": (_set("confidence_radius_km", float("nan")), "field confidence_radius_km is NaN"),
    "radius_infinity": (_set("confidence_radius_km", float("inf")), "field confidence_radius_km is Infinity"),
    "model_config_unknown_key": (lambda d: d["model_config"].update(zzz=1), "field model_config has unknown key(s) 'zzz'"),
    "model_config_bad_scales": (lambda d: d["model_config"].update(scales="big"), 'field model_config.scales is the string "big"'),
    "skipped_number": (_set("skipped", 5), "field skipped is the number 5, not a list"),
    "skipped_entry": (_set("skipped", ["x.jpg"]), 'field skipped[0] is the string "x.jpg"'),
    "size_as_string": (_size_as_string, 'field files["global.npy"] is the string "'),
    "dimension_as_string": (_set("search_dim", "1280"), 'field search_dim is the string "1280", not a whole number'),
    "missing_field": (lambda d: d.pop("model_id"), "field model_id is missing"),
    "file_unlisted": (lambda d: (d["files"].pop("global.npy"), d["checksums"].pop("global.npy"), d["stamps"].pop("global.npy")),
                      "field files lacks global.npy"),
    "checksum_not_a_digest": (lambda d: d["checksums"].update({"global.npy": "abc"}), 'field checksums["global.npy"] is the string "abc"'),
    "checksum_unknown_algorithm": (lambda d: d["checksums"].update({"global.npy": "rot13:00"}), "unknown algorithm 'rot13'"),
    "local_features_unknown": (_set("local_features", "zzz"), 'field local_features is the string "zzz"'),
    "index_type_unknown": (_set("index_type", "zzz"), 'field index_type is the string "zzz"'),
    "asmk_alpha_word": (lambda d: d["asmk"].update(alpha="x"), 'field asmk.alpha is the string "x"'),
}

WHOLE_CASES = {
    "list": ("[1, 2, 3]", "it is a list (3 items), not an object of fields"),
    "string": ('"an index"', 'it is the string "an index"'),
    "null": ("null", "it is null"),
    "not_json": ("{files: 1", "corrupt manifest"),
}


def _refused_everywhere(capsys, index: Path, expected: str) -> None:
    """``index verify`` exits 1, ``index info`` (plain and --json) and ``query`` exit 2, each with
    one error line naming the manifest and ``expected``; nothing is printed on stdout but the
    verify report."""
    code, out, err = run_cli(capsys, "index", "verify", "--index", index)
    line = _error_line(err)
    assert code == 1 and expected in line and MANIFEST in line and "damaged" in line, err
    for args in (("index", "info"), ("index", "info", "--json"), ("query", lund(1)[0])):
        code, out, err = run_cli(capsys, *args, "--index", index)
        line = _error_line(err)
        assert code == 2 and out == "" and expected in line and MANIFEST in line, (args, err)


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_hand_edited_manifest_is_refused_naming_the_field(tiny, tmp_path, capsys, case):
    index = copy_index(tiny, tmp_path)
    original = (index / MANIFEST).read_text()
    edit, expected = FIELD_CASES[case]
    _edit_manifest(index, edit)
    before = _files(index)
    _refused_everywhere(capsys, index, expected)
    assert _files(index) == before  # nothing written, nothing removed
    (index / MANIFEST).write_text(original)
    code, out, err = run_cli(capsys, "index", "verify", "--index", index)
    assert code == 0 and out.strip().endswith("ok"), err


@pytest.mark.parametrize("case", sorted(WHOLE_CASES))
def test_manifest_that_is_not_an_object_is_refused(tiny, tmp_path, capsys, case):
    index = copy_index(tiny, tmp_path)
    text, expected = WHOLE_CASES[case]
    (index / MANIFEST).write_text(text)
    before = _files(index)
    _refused_everywhere(capsys, index, expected)
    assert _files(index) == before


def test_manifest_that_is_a_folder_is_refused(tiny, tmp_path, capsys):
    index = copy_index(tiny, tmp_path)
    (index / MANIFEST).unlink()
    (index / MANIFEST).mkdir()
    code, out, err = run_cli(capsys, "index", "verify", "--index", index)
    assert code == 1 and "manifest.json is a folder, not a file" in _error_line(err)
    for args in (("index", "info"), ("index", "info", "--json"), ("query", lund(1)[0])):
        code, out, err = run_cli(capsys, *args, "--index", index)
        assert code == 2 and out == "" and "manifest.json is a folder, not a file" in _error_line(err), args
    assert (index / MANIFEST).is_dir() and not any((index / MANIFEST).iterdir())


@pytest.mark.parametrize("config, expected", [
    ({"top_k": 1024, "zzz": 1}, "field local_config has unknown key(s) 'zzz' (aliked-n16 knows top_k, max_side, upscale)"),
    ({"top_k": "5"}, 'field local_config.top_k is the string "5", not a whole number'),
    ({"upscale": 1}, "field local_config.upscale is the number 1, not true or false"),
])
def test_learned_local_settings_are_checked(tiny, config, expected):
    """The settings a query passes to a learned local extractor (aliked-n16 here)."""
    from delg_geo.core.errors import IndexFormatError
    from delg_geo.index.manifest_schema import check_manifest

    d = dict(_manifest(tiny["index"]), local_features="aliked-n16", local_config=config)
    with pytest.raises(IndexFormatError, match="^damaged manifest x/manifest.json: ") as e:
        check_manifest(d, "x/manifest.json")
    assert expected in str(e.value)
    check_manifest(dict(d, local_config={"top_k": 1024, "max_side": 1024}), "x/manifest.json")


# -- 2. names that lead outside the index folder ------------------------------------------------------

def _add_name(key, name, value):
    def edit(d):
        d.setdefault(key, {})[name] = value
        if key != "files":
            d["files"][name] = 1
    return edit


OUTSIDE_CASES = {
    "files_parent": (_add_name("files", "../../../../etc/passwd", 1), 'field files names "../../../../etc/passwd" leads outside'),
    "files_absolute": (_add_name("files", "/etc/hostname", 1), 'field files names "/etc/hostname" is an absolute path'),
    "files_inner_parent": (_add_name("files", "sub/../../x.npy", 1), 'field files names "sub/../../x.npy" leads outside'),
    "checksums_absolute": (_add_name("checksums", "/etc/hostname", "xxh3_128:00"), 'names "/etc/hostname" is an absolute path'),
    "stamps_parent": (_add_name("stamps", "../x", "xxh3_128s:00"), 'names "../x" leads outside'),
    "calibration_file": (_set("calibration", {"file": "../../../etc/passwd", "size": 10}),
                         'field calibration.file "../../../etc/passwd" leads outside'),
    "adapt_file": (_set("adapt", {"file": "/etc/hostname"}), 'field adapt.file "/etc/hostname" is an absolute path'),
}


@pytest.mark.parametrize("case", sorted(OUTSIDE_CASES))
def test_names_outside_the_index_folder_are_refused(tiny, tmp_path, capsys, case):
    index = copy_index(tiny, tmp_path)
    edit, expected = OUTSIDE_CASES[case]
    _edit_manifest(index, edit)
    before = _files(index)
    code, out, err = run_cli(capsys, "index", "verify", "--index", index)
    assert code == 1 and expected in _error_line(err)
    assert "/etc/" not in out.replace(str(index), "") or "DAMAGED" in out  # never "ok" for an outside file
    assert not any(line.startswith(("/etc/", "../")) and line.endswith(": ok") for line in out.splitlines())
    _refused_everywhere(capsys, index, expected)
    assert _files(index) == before


def test_a_file_that_is_a_link_outside_the_folder_is_refused(tiny, tmp_path, capsys):
    index = copy_index(tiny, tmp_path)
    outside = tmp_path / "outside.csv"
    shutil.copy(index / "skipped.csv", outside)  # same bytes: size and checksum would pass
    (index / "skipped.csv").unlink()
    (index / "skipped.csv").symlink_to(outside)
    code, out, err = run_cli(capsys, "index", "verify", "--index", index)
    assert code == 1 and "skipped.csv: DAMAGED: is a link leading outside the index folder" in out
    assert "skipped.csv" in _error_line(err)
    code, out, err = run_cli(capsys, "query", lund(1)[0], "--index", index)
    line = _error_line(err)
    assert code == 2 and out == "" and "skipped.csv" in line and "outside the index folder" in line
    assert outside.read_bytes() == (tiny["index"] / "skipped.csv").read_bytes()


# -- 3. no NaN or Infinity in JSON --------------------------------------------------------------------

def test_json_output_never_holds_nan_or_infinity():
    from delg_geo.core.jsonio import dumps

    text = dumps({"a": float("nan"), "b": [np.float32("inf"), -math.inf, 1.5, np.int64(3)], "c": np.array([1.0, np.nan]),
                  "d": (np.float64("nan"),), "p": Path("/x")})
    assert _strict(text) == {"a": None, "b": [None, None, 1.5, 3], "c": [1.0, None], "d": [None], "p": "/x"}


def test_info_verify_and_query_json_are_strict_json(tiny, capsys):
    for args in (("index", "info", "--json"), ("index", "verify", "--json"),
                 ("query", lund(1)[0], "--json", "--top-k", "3")):
        code, out, err = run_cli(capsys, *args, "--index", tiny["index"])
        assert code == 0, err
        for line in out.strip().splitlines() if args[0] == "query" else [out]:
            assert isinstance(_strict(line), dict)


def test_a_non_finite_radius_never_reaches_json(tiny, tmp_path, capsys):
    """The hostile round's `index info --json` printed a bare NaN: the manifest is refused instead."""
    index = copy_index(tiny, tmp_path)
    _edit_manifest(index, _set("confidence_radius_km", float("nan")))
    code, out, err = run_cli(capsys, "index", "info", "--json", "--index", index)
    assert code == 2 and out == "" and "NaN" not in out


# -- 4. indexes without checksums, and files swapped in from another index --------------------------------

@pytest.fixture(scope="module")
def other(tmp_path_factory, small_extractor):  # noqa: F811
    """A second 3-photo index, of three other Lund photos."""
    import pandas as pd

    from delg_geo.features.exif import read_exif_gps

    root = tmp_path_factory.mktemp("other")
    images = root / "images"
    images.mkdir()
    rows = []
    for p in lund(6)[3:]:
        shutil.copy(p, images / p.name)
        lat, lon = read_exif_gps(p)
        rows.append(dict(image=p.name, lat=lat, lon=lon))
    pd.DataFrame(rows).to_csv(root / "ref.csv", index=False)
    rep, _ = build(images, root / "index", root / "ref.csv", small_extractor)
    assert rep.num_images == 3
    return root / "index"


def _unchecked(d):
    """As an index built before delg-geo recorded checksums (and stamps)."""
    d.pop("checksums")
    d.pop("stamps", None)


def _swap_in(index: Path, other: Path, name: str) -> None:
    """Replace ``index/name`` with the other index's file, at this one's size (arrays cut or
    repeated to this index's shape), as a user copying files between indexes would."""
    mine, theirs = index / name, other / name
    if name.endswith(".npy"):
        a, b = np.load(mine), np.load(theirs)
        if b.shape != a.shape:
            flat = np.resize(b.reshape(len(b), -1) if b.ndim > 1 else b, (len(a),) + a.shape[1:])
            b = flat.astype(a.dtype).reshape(a.shape)
        assert not np.array_equal(a, b)
        np.save(mine, b)
    else:
        shutil.copy(theirs, mine)
    assert mine.stat().st_size == _manifest(index)["files"][name]


def test_index_without_checksums_fails_verify_until_rehashed(tiny, tmp_path, capsys):
    index = copy_index(tiny, tmp_path)
    want = _manifest(index)
    _edit_manifest(index, _unchecked)
    edited = _manifest(index)
    before = _files(index)
    code, out, err = run_cli(capsys, "index", "verify", "--index", index)
    line = _error_line(err)
    assert code == 1 and "not verified" in line and "no recorded checksum" in line
    assert "--rehash" in line and "--allow-unchecked" in line and "global.npy: ok (size only" in out
    code, out, err = run_cli(capsys, "index", "verify", "--index", index, "--json")
    rep = _strict(out)
    assert code == 1 and not rep["ok"] and not rep["damaged"] and set(rep["unchecked"]) == set(want["files"])
    code, out, err = run_cli(capsys, "index", "verify", "--index", index, "--allow-unchecked")
    assert code == 0 and out.strip().endswith("ok") and "no recorded checksum" in out, err
    assert _files(index) == before  # checking wrote nothing
    # a query still answers, and says how to record the checksums
    code, out, err = run_cli(capsys, "query", lund(1)[0], "--index", index, "--top-k", "3")
    assert code == 0 and "01.jpg" in out and "no recorded checksum" in err and "--rehash" in err
    code, out, err = run_cli(capsys, "index", "verify", "--index", index, "--rehash")
    assert code == 0 and "global.npy: ok, checksum recorded now" in out and out.strip().endswith("ok"), err
    now = _manifest(index)
    assert now["checksums"] == want["checksums"] and now["stamps"] == want["stamps"]
    assert {k: v for k, v in now.items() if k not in ("checksums", "stamps")} == edited  # the rest kept as it was
    assert {k: v for k, v in _files(index).items() if k != MANIFEST} == {k: v for k, v in before.items() if k != MANIFEST}
    code, out, err = run_cli(capsys, "index", "verify", "--index", index)
    assert code == 0 and "checksums" in out, err


SWAPS = {
    "local_codes.npy": "local_codes.npy",
    "local_codec.npz": "local_codec.npz",
    "asmk_sigs.npy": "asmk_sigs.npy",
    "asmk_ids.npy": "asmk_ids.npy",
    "asmk_counts.npy": "asmk_counts.npy",
}


@pytest.mark.parametrize("name", sorted(SWAPS))
def test_file_swapped_from_another_index_without_checksums_is_caught(tiny, other, tmp_path, capsys, name):
    index = copy_index(tiny, tmp_path)
    _edit_manifest(index, _unchecked)
    _swap_in(index, other, name)
    before = _files(index)
    code, out, err = run_cli(capsys, "query", lund(1)[0], "--index", index)
    line = _error_line(err)
    assert code == 2 and out == "" and "damaged index" in line and SWAPS[name] in line, err
    code, out, err = run_cli(capsys, "index", "verify", "--index", index, "--allow-unchecked")
    assert code == 1 and SWAPS[name] in _error_line(err) and "is damaged" in err
    # --rehash records nothing over a damaged index
    code, out, err = run_cli(capsys, "index", "verify", "--index", index, "--rehash")
    assert code == 1 and SWAPS[name] in _error_line(err)
    assert "checksums" not in _manifest(index) and _files(index) == before
    # restoring the file restores the index
    shutil.copy(tiny["index"] / name, index / name)
    code, out, err = run_cli(capsys, "index", "verify", "--index", index, "--allow-unchecked")
    assert code == 0, err


@pytest.mark.parametrize("name", ["global.npy", "local_keypoints.npy", "local_codes.npy"])
def test_stamps_catch_a_swapped_file_too_large_to_checksum_on_open(tiny, other, tmp_path, capsys, monkeypatch, name):
    """An index whose large files are not checksummed when a query opens it (here: a 0-byte
    budget) still refuses a same-size file from another build: its stamp differs."""
    import delg_geo.index.integrity as integrity
    from delg_geo.core.errors import IndexFormatError
    from delg_geo.index.geo_index import GeoIndex

    index = copy_index(tiny, tmp_path)
    monkeypatch.setattr(integrity, "CHEAP_CHECK_BYTES", 0)
    GeoIndex(index, device="cpu")  # the index's own files pass
    _swap_in(index, other, name)
    with pytest.raises(IndexFormatError, match=f"{name} content does not match its stamp"):
        GeoIndex(index, device="cpu")
    code, out, err = run_cli(capsys, "index", "verify", "--index", index)
    assert code == 1 and f"{name}: DAMAGED: content does not match its checksum" in out


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_compressed_faiss_index_is_checked_against_the_stored_vectors(kind):
    from delg_geo.index.crosscheck import global_problem
    from delg_geo.index.geo_index import build_faiss, faiss_params

    rng = np.random.default_rng(0)

    def unit(n, d=64):
        x = rng.normal(size=(n, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    own, theirs = unit(2000), unit(2000)
    index = build_faiss(own, kind, faiss_params(len(own), own.shape[1], kind))
    assert global_problem(index, own.astype(np.float16)) is None
    why = global_problem(index, theirs.astype(np.float16))
    assert why and "does not match global.faiss" in why


# -- 5. messages that say what the types are ----------------------------------------------------------

def test_size_of_another_type_is_named_not_compared(tiny):
    from delg_geo.index.integrity import file_problem

    size = (tiny["index"] / "global.npy").stat().st_size
    why = file_problem(tiny["index"], "global.npy", str(size), None)
    assert why == f'has {size} bytes, and the manifest records the string "{size}", not a number of bytes'
    assert file_problem(tiny["index"], "global.npy", size + 1, None) == f"has {size} bytes, the manifest says {size + 1}"
    assert file_problem(tiny["index"], "global.npy", size, None) is None
