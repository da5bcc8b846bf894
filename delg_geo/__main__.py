"""``python -m delg_geo``: the ``delg-geo`` command line."""

from delg_geo.apps.cli import main

main()
