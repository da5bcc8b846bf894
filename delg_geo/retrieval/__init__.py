"""Stage 3, retrieval: search the index, verify the candidates with local matches and
pydegensac, decide the location, and attach a calibrated confidence.

Takes query features and a GeoIndex, gives a :class:`~delg_geo.retrieval.locate.Prediction`.
Open ``locate.py`` first (the ``Geolocator``), then ``search.py``, ``verify.py``, ``decision.py``.
"""
