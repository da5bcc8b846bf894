"""The official DELG serving signature: what a SavedModel must take and give to be used, checked
before it is installed or loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from delg_geo.core.errors import ModelError

#: Inputs of the official DELG serving signature (export_local_and_global_model.py), with the
#: dtype kind and rank each must have.
REQUIRED_INPUTS: dict[str, tuple[str, int]] = {
    "input_image": ("uint8", 3),  # [H, W, 3]
    "input_scales": ("float", 1),  # [S]
    "input_max_feature_num": ("int", 0),
    "input_abs_thres": ("float", 0),
}
#: Optional input of the same signature: indices of the scales used for the global descriptor.
OPTIONAL_INPUTS: dict[str, tuple[str, int]] = {"input_global_scales_ind": ("int", 1)}
REQUIRED_OUTPUTS: tuple[str, ...] = ("boxes", "features", "scales", "scores", "global_descriptors")


@dataclass
class SignatureInfo:
    """What :func:`check_signature` found in a SavedModel's ``serving_default`` signature."""

    path: Path
    inputs: dict[str, Any] = field(default_factory=dict)  # name -> tf.TensorSpec
    outputs: dict[str, Any] = field(default_factory=dict)  # name -> tf.TensorSpec (or None)

    @property
    def has_global_scales_ind(self) -> bool:
        return "input_global_scales_ind" in self.inputs


# --------------------------------------------------------------------------------------------
# Paths


def _kind(dtype) -> str:
    if dtype.is_floating:
        return "float"
    if dtype.is_integer and dtype.name == "uint8":
        return "uint8"
    if dtype.is_integer:
        return "int"
    return dtype.name


def _describe(spec) -> str:
    shape = getattr(spec, "shape", None)
    dims = "?" if shape is None or shape.rank is None else ", ".join(
        "None" if d is None else str(d) for d in shape.as_list()
    )
    return f"{spec.dtype.name} [{dims}]"


def load_checked(path: str | Path):
    """Load a SavedModel and check its signature: ``(loaded, serving_fn, SignatureInfo)``.

    Raises :class:`ModelError` naming what is missing or wrong.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(f"{path}: no such SavedModel folder")
    if not (path / "saved_model.pb").is_file():
        raise ModelError(f"{path}: not a SavedModel folder (no saved_model.pb)")
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:  # noqa: BLE001 - TF raises many types for broken models
        msg = str(e).strip().splitlines()
        raise ModelError(
            f"{path}: cannot load the SavedModel ({(msg[0] if msg else type(e).__name__)[:300]})"
        ) from None
    signatures = getattr(loaded, "signatures", None) or {}
    if "serving_default" not in signatures:
        have = ", ".join(sorted(signatures)) or "none"
        raise ModelError(
            f"{path}: not a DELG SavedModel: it has no 'serving_default' signature "
            f"(signatures: {have})"
        )
    fn = signatures["serving_default"]
    info = _inspect(path, fn)
    _validate(info)
    return loaded, fn, info


def _inspect(path: Path, fn) -> SignatureInfo:
    try:
        args, kwargs = fn.structured_input_signature
    except Exception:  # noqa: BLE001
        args, kwargs = (), {}
    inputs = dict(kwargs or {})
    for spec in args or ():
        if getattr(spec, "name", None):
            inputs[spec.name] = spec
    outputs = fn.structured_outputs
    if not isinstance(outputs, dict):
        outputs = {}
    return SignatureInfo(path=path, inputs=inputs, outputs=dict(outputs))


def _validate(info: SignatureInfo) -> None:
    problems: list[str] = []
    missing_in = [k for k in REQUIRED_INPUTS if k not in info.inputs]
    missing_out = [k for k in REQUIRED_OUTPUTS if k not in info.outputs]
    if missing_in:
        problems.append("missing inputs " + ", ".join(missing_in))
    if missing_out:
        problems.append("missing outputs " + ", ".join(missing_out))
    wanted = {**REQUIRED_INPUTS, **OPTIONAL_INPUTS}
    for key, spec in info.inputs.items():
        if key not in wanted:
            problems.append(f"unexpected input {key} ({_describe(spec)})")
            continue
        kind, rank = wanted[key]
        shape = spec.shape
        ok = _kind(spec.dtype) == kind and (shape.rank is None or shape.rank == rank)
        if key == "input_image" and ok and shape.rank == 3:
            ok = shape[-1] is None or shape[-1] == 3
        if not ok:
            want = {
                "input_image": "uint8 [H, W, 3]",
                "input_scales": "float [None]",
                "input_max_feature_num": "int32 scalar",
                "input_abs_thres": "float scalar",
                "input_global_scales_ind": "int32 [None]",
            }[key]
            problems.append(f"input {key} must be {want} (got {_describe(spec)})")
    if problems:
        raise ModelError(
            f"{info.path}: not the official DELG serving signature: " + "; ".join(problems)
        )


def check_signature(path: str | Path) -> SignatureInfo:
    """Check that ``path`` is a SavedModel with the official DELG ``serving_default`` signature.

    Inputs ``input_image`` (uint8 [H, W, 3]), ``input_scales`` (float [S]),
    ``input_max_feature_num`` (int32 scalar), ``input_abs_thres`` (float scalar) and optionally
    ``input_global_scales_ind`` (int32 [K]); outputs ``boxes``, ``features``, ``scales``,
    ``scores``, ``global_descriptors``. Raises :class:`ModelError` saying what is missing.
    """
    return load_checked(path)[2]


# --------------------------------------------------------------------------------------------
# Download / add
