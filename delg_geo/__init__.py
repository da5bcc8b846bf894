"""delg-geo: tell where a photo was taken, by DELG retrieval over geotagged images."""

from __future__ import annotations

__version__ = "0.1.0"


def quiet_tensorflow_logs() -> None:
    """Silence TensorFlow's C++ start-up lines (``I0000 ... cudart_stub``, oneDNN notices); see
    :mod:`delg_geo.core._quiet`. Runs on import of the package, before TensorFlow is imported."""
    from delg_geo.core._quiet import install

    install()


quiet_tensorflow_logs()

__all__ = ["__version__", "Features", "Geolocator", "Prediction", "get_extractor"]


def __getattr__(name: str):  # lazy, so `import delg_geo` does not import TensorFlow
    if name == "Features":
        from delg_geo.features.base import Features

        return Features
    if name in ("Geolocator", "Prediction"):
        from delg_geo.retrieval import locate

        return getattr(locate, name)
    if name == "get_extractor":
        from delg_geo.features.models import get_extractor

        return get_extractor
    raise AttributeError(name)
