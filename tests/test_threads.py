"""The CPU count a process uses follows the setting: TensorFlow's own thread configuration is read
back in a fresh process (the pools can only be sized before TensorFlow's runtime starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

PROBE = """
import json, os, sys
{before}
nice0 = os.getpriority(os.PRIO_PROCESS, 0)
from delg_geo.core import runtime
mode, threads = sys.argv[1], (int(sys.argv[2]) if sys.argv[2] != "-" else None)
ok = (runtime.configure_for_throughput if mode == "throughput" else runtime.configure_for_latency)(threads)
import tensorflow as tf
tf.constant(1.0) + 1.0  # starts the runtime with those pools
print(json.dumps(dict(ok=ok, intra=tf.config.threading.get_intra_op_parallelism_threads(),
                      inter=tf.config.threading.get_inter_op_parallelism_threads(),
                      available=runtime.available_cpus(), omp=os.environ.get("OMP_NUM_THREADS"),
                      wait=os.environ.get("OMP_WAIT_POLICY"), nice0=nice0, nice=os.getpriority(os.PRIO_PROCESS, 0))))
"""


def _probe(mode: str, threads: int | None = None, env: dict | None = None, before: str = "") -> dict:
    full_env = {k: v for k, v in os.environ.items() if k not in ("DELG_GEO_THREADS", "DELG_GEO_INTRA_OP_THREADS",
                                                                  "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    full_env.update(env or {})
    r = subprocess.run([sys.executable, "-c", PROBE.format(before=before), mode, "-" if threads is None else str(threads)],
                       cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_threads_option_sizes_tensorflows_pools():
    out = _probe("throughput", 3)
    assert out["ok"] and out["available"] == 3
    assert (out["intra"], out["inter"]) == (1, 3)  # one thread an op, one image in flight a CPU
    out = _probe("latency", 3)
    assert (out["intra"], out["inter"]) == (3, 3)


def test_batch_work_yields_the_cpu_and_interactive_work_does_not():
    out = _probe("throughput", 2)
    assert out["nice"] == min(19, out["nice0"] + 10)
    out = _probe("throughput", 2, env={"DELG_GEO_NICE": "0"})
    assert out["nice"] == out["nice0"]
    out = _probe("latency", 2)
    assert out["nice"] == out["nice0"]


def test_environment_variable_sets_the_count():
    out = _probe("latency", env={"DELG_GEO_THREADS": "2"})
    assert (out["available"], out["intra"], out["inter"]) == (2, 2, 2)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_default_follows_the_affinity_mask():
    """Started on one CPU (as ``taskset -c 0`` or a scheduler would), the process sizes its pools for one."""
    before = "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})"
    out = _probe("latency", before=before)
    assert (out["available"], out["intra"], out["inter"]) == (1, 1, 1)


def test_prepare_process_reads_threads_and_sets_passive_waiting():
    code = ("import os, json; from delg_geo.core.runtime import prepare_process; "
            "n = prepare_process(argv=['delg-geo', 'index', 'build', '--threads', '3']); "
            "print(json.dumps([n, os.environ['OMP_NUM_THREADS'], os.environ['OMP_WAIT_POLICY']]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_") and k != "DELG_GEO_THREADS"}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [3, "3", "PASSIVE"]


def test_threads_in_argv():
    from delg_geo.core.runtime import threads_in_argv

    assert threads_in_argv(["x", "--threads", "4"]) == 4
    assert threads_in_argv(["x", "--threads=2", "y"]) == 2
    assert threads_in_argv(["x", "--threads"]) is None and threads_in_argv(["x", "--threads", "0"]) is None
