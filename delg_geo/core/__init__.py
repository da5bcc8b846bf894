"""What every stage shares: errors, coordinates and distances, place names, JSON, threads and
memory of the process, progress bars, and the Ray plumbing.

Takes in nothing and gives out building blocks; it imports no other delg_geo package.
Open ``errors.py`` first, then ``geo.py``.
"""
