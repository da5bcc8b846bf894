"""Stage 1, features: a photo in, a :class:`~delg_geo.features.base.Features` out (a global
descriptor from a multi-scale pyramid, and local features with keypoints).

Takes images (files, bytes, EXIF), gives descriptors; the networks and their weights are in
``models/``. Open ``extract.py`` first (batched extraction), then ``models/__init__.py``.
"""
