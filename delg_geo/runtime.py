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
