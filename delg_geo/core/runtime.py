"""Process-wide threads: how many CPUs this process may use, and TensorFlow's pools sized to them.

* :func:`available_cpus`: the CPUs the process may really use: its affinity mask, capped by a
  cgroup CPU quota (a container's ``--cpus``), or what was set (``--threads``, a Ray actor's
  ``num_cpus``, ``DELG_GEO_THREADS``).
* :func:`prepare_process`: at process start, before NumPy's BLAS or TensorFlow load: OpenMP and
  OpenBLAS sized to that and told not to spin while idle.
* :func:`configure_for_throughput` (batch extraction) and :func:`configure_for_latency` (one
  photo at a time): TensorFlow's intra- and inter-op pools, with thread spinning off.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_THREADS: int | None = None  # set by set_threads (--threads, a Ray actor's CPUs)


def set_threads(n: int | None) -> None:
    """Use ``n`` CPUs from now on (None: what :func:`available_cpus` finds)."""
    global _THREADS
    if n is not None and int(n) < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    _THREADS = None if n is None else int(n)


def _cgroup_cpu_quota() -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), or None."""
    rel = "/"
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers in ("", "cpu", "cpu,cpuacct", "cpuacct,cpu"):
                rel = path or "/"
    except (OSError, ValueError):
        pass
    for base in {Path("/sys/fs/cgroup") / rel.lstrip("/"), Path("/sys/fs/cgroup")}:
        try:
            quota, period = (base / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        except (OSError, ValueError):
            pass
    for base in (Path("/sys/fs/cgroup/cpu") / rel.lstrip("/"), Path("/sys/fs/cgroup/cpu")):
        try:
            quota = int((base / "cpu.cfs_quota_us").read_text())
            period = int((base / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
        except (OSError, ValueError):
            pass
    return None


def available_cpus() -> int:
    """The CPUs this process should size its pools for.

    :func:`set_threads`'s value, else ``DELG_GEO_THREADS``, else the affinity mask
    (``taskset``, a Ray worker's or a batch scheduler's CPU set) capped by the cgroup quota,
    rounded up.
    """
    if _THREADS is not None:
        return _THREADS
    env = os.environ.get("DELG_GEO_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def threads_in_argv(argv) -> int | None:
    """The value of a ``--threads N`` (or ``--threads=N``) option in a command line, if any."""
    argv = list(argv or [])
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--threads" and i + 1 < len(argv) else arg[10:] if arg.startswith("--threads=") else None
        if value is not None and value.isdigit() and int(value) > 0:
            return int(value)
    return None


def prepare_process(threads: int | None = None, argv=None) -> int:
    """At process start, before NumPy or TensorFlow is imported: size OpenMP and OpenBLAS to the
    CPUs the process may use and make their idle threads sleep instead of spin (passive wait).
    ``threads`` (or a ``--threads N`` in ``argv``) sets the count. Variables already set are
    kept. Returns the CPU count used.
    """
    threads = threads if threads is not None else threads_in_argv(argv)
    if threads is not None:
        set_threads(threads)
    n = str(available_cpus())
    for key, value in (("OMP_NUM_THREADS", n), ("OPENBLAS_NUM_THREADS", n), ("MKL_NUM_THREADS", n),
                       ("OMP_WAIT_POLICY", "PASSIVE"), ("KMP_BLOCKTIME", "0"), ("OPENBLAS_THREAD_TIMEOUT", "4")):
        os.environ.setdefault(key, value)
    return int(n)


def _set_tensorflow_threads(intra: int, inter: int) -> bool:
    """Both pools, with Eigen's thread spinning off; False when TensorFlow's runtime is already up."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # the runtime is already up
        return False
    try:  # idle pool threads sleep at once instead of spinning (ConfigProto.experimental)
        from tensorflow.core.protobuf import config_pb2
        from tensorflow.python.eager import context

        ctx = context.context()
        cfg = config_pb2.ConfigProto()
        if ctx._config is not None:  # noqa: SLF001 - TensorFlow offers no public setter for this field
            cfg.CopyFrom(ctx._config)  # noqa: SLF001
        cfg.experimental.disable_thread_spinning = os.environ.get("DELG_GEO_THREAD_SPINNING", "0") != "1"
        ctx._config = cfg  # noqa: SLF001
    except (ImportError, AttributeError):  # pragma: no cover - a TensorFlow without the field
        pass
    return True


_NICED = False


def yield_to_interactive() -> int:
    """Lower this process's CPU priority by ``DELG_GEO_NICE`` (default 10; 0 keeps it), every
    thread it has and every thread it starts after: batch work then takes only the CPU time an
    interactive process (a ``serve`` answering, a shell) leaves, and all of it on an idle machine.
    Once per process; returns the increment applied."""
    global _NICED
    inc = os.environ.get("DELG_GEO_NICE", "10").strip()
    inc = int(inc) if inc.lstrip("-").isdigit() else 10
    if _NICED or inc <= 0 or not hasattr(os, "setpriority"):
        return 0
    _NICED = True
    try:
        target = min(19, os.getpriority(os.PRIO_PROCESS, 0) + inc)
        tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
        for tid in tids:  # on Linux a priority is per thread; new threads inherit their creator's
            try:
                os.setpriority(os.PRIO_PROCESS, tid, target)
            except OSError:
                pass
    except OSError:
        return 0
    return inc


def configure_for_throughput(threads: int | None = None) -> bool:
    """One TensorFlow thread per op, several images in flight (see ``iter_extract``): the
    inter-op pool has one thread per available CPU (:func:`available_cpus`, or ``threads``),
    and the process yields the CPU to interactive ones (:func:`yield_to_interactive`).

    Only possible before TensorFlow starts its runtime; returns whether it took effect.
    ``DELG_GEO_INTRA_OP_THREADS`` overrides the one thread per op.
    """
    yield_to_interactive()
    if threads is not None:
        set_threads(threads)
    intra = int(os.environ.get("DELG_GEO_INTRA_OP_THREADS", "1"))
    return _set_tensorflow_threads(intra, max(1, available_cpus()))


def configure_for_latency(threads: int | None = None) -> bool:
    """One photo at a time (``query``, ``serve``): each op may use every available CPU."""
    if threads is not None:
        set_threads(threads)
    n = available_cpus()
    return _set_tensorflow_threads(n, n)


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
