"""Keep TensorFlow's C++ start-up lines off the terminal.

TensorFlow 2.21 writes ``I0000 ... port.cc`` (oneDNN), ``cudart_stub`` and ``cuInit`` lines to
the process's stderr before its logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` alone does
not silence them. :func:`install` sets the logging variables and adds an import hook that runs
``import tensorflow`` (and its device discovery) with file descriptor 2 pointed at a temporary
file; what was written there is shown only if the import fails. ``DELG_GEO_TF_LOGS=1`` keeps
everything.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import tempfile


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        with _stderr_muted():
            self.inner.exec_module(module)
            try:  # device discovery prints the cuda lines; it does not start the runtime
                module.config.list_physical_devices()
            except Exception:  # noqa: BLE001 - best effort
                pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


class _stderr_muted:
    """fd 2 to a temporary file for the duration; its text is replayed if an exception escapes."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
            self.tmp = tempfile.TemporaryFile()
            os.dup2(self.tmp.fileno(), 2)
        except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters, ...)
            self.saved = None
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.saved is None:
            return False
        os.dup2(self.saved, 2)
        os.close(self.saved)
        if exc_type is not None:
            self.tmp.seek(0)
            sys.stderr.write(self.tmp.read().decode("utf-8", "replace"))
        self.tmp.close()
        return False


def install() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ logging after start-up
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if os.environ.get("DELG_GEO_TF_LOGS") == "1" or "tensorflow" in sys.modules:
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
