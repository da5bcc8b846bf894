"""Turning geotagged image collections into delg-geo indexes: the writers of the index.

Takes a folder of photos and where their coordinates come from (``sources/``: CSV, EXIF, VPR
file names, Placing/YFCC), gives an index folder that :mod:`delg_geo.index` reads. Open
``build.py`` first; ``assemble.py`` writes the final files, ``ray_build.py`` spreads extraction.
"""
