"""The work folders of a writer inside an index folder, and the kill points the recovery tests use."""

from __future__ import annotations

import os
import signal

STAGING = ".staging"  # the next version of the index's files, before they are moved into place
BUILDING = ".building"  # checkpoints and state of a build in progress
REBUILD = ".rebuild"  # a whole new index built by `index build --overwrite`, swapped in when complete
#: Names inside an index folder that belong to writers, never to the index itself.
WORK_NAMES = frozenset({STAGING, BUILDING, REBUILD, ".writer.lock", ".writer.json", ".swap.lock"})


def _kill_point(name: str) -> None:
    """Tests only: ``DELG_GEO_TEST_KILL_AT=name`` kills this process (SIGKILL) at that point,
    as a power cut would (see tests/test_hostile.py, the recovery harness)."""
    if os.environ.get("DELG_GEO_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
