"""Stage 2, the index on disk: the manifest, the FAISS global index, the compact local store, the
metadata table, the whitening and the ASMK inverted file, with their integrity checks.

Takes what ``index_builder`` wrote, gives a read-only :class:`~delg_geo.index.geo_index.GeoIndex`.
Open ``geo_index.py`` first; ``check.py`` is ``delg-geo index verify``.
"""
