"""Process-wide TensorFlow threading, chosen for the job at hand."""

from __future__ import annotations

import os


def configure_for_throughput() -> bool:
    """One TensorFlow thread per op, several images in flight (see ``iter_extract``).

    On a 2-core machine this measured 5.8 images/s against 4.3 with TensorFlow's default
    threading and images one after another. Only possible before TensorFlow starts its runtime;
    returns whether it took effect. ``DELG_GEO_INTRA_OP_THREADS`` overrides the choice.
    """
    import tensorflow as tf

    intra = int(os.environ.get("DELG_GEO_INTRA_OP_THREADS", "1"))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, os.cpu_count() or 2))
        return True
    except RuntimeError:  # the runtime is already up
        return False


def single_threaded_blas():
    """A context in which NumPy's BLAS uses one thread.

    Verification already runs one candidate per thread; BLAS threads on top of that
    oversubscribe the cores. Locating 6 photos against the Venice index (100 candidates each)
    took 0.3 s per photo this way and 1.6-2.2 s with OpenBLAS's default 2 threads, on the
    2-core machine while other jobs were running.
    """
    global _CONTROLLER
    if _CONTROLLER is None:  # finding the loaded BLAS libraries takes milliseconds: once per process
        import numpy  # noqa: F401 - loads the BLAS library the controller must find
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


_CONTROLLER = None
