"""Exceptions with messages a user can act on."""

from __future__ import annotations


class DelgGeoError(Exception):
    """Base class: every error delg-geo raises on bad input derives from this."""


class ImageLoadError(DelgGeoError):
    """An image file is missing, truncated, not an image, or too large."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ModelError(DelgGeoError):
    """A model is missing, corrupt, or has the wrong signature."""


class IndexFormatError(DelgGeoError):
    """An index is missing, incomplete, corrupt, or was built with another model."""


class MetadataError(DelgGeoError):
    """A metadata file cannot be read at all (row-level problems are reported, not raised)."""


class InvalidArgumentError(DelgGeoError, ValueError):
    """An argument of the Python API or an option of the command line has a value that cannot be
    used (a ValueError too, so callers that catch ValueError keep working)."""
