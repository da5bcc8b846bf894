"""The apps on top of the pipeline: the ``delg-geo`` command line, the web app (``serve``, its page
under ``static/``) and the match pictures (``explain``).

They take user input and call the stages below; nothing below imports them.
Open ``cli.py`` first.
"""
