"""Progress bars for long loops: tqdm on the terminal, or a no-op where progress is off."""

from __future__ import annotations


class _NoBar:
    def update(self, k=1):
        pass

    def close(self):
        pass


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "q"):
    """A tqdm bar of ``total`` steps, or an object with the same ``update``/``close`` that draws
    nothing when ``enabled`` is false."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit)
