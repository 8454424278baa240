"""Peak resident memory of this process above the level at entry, polled every 5 ms.

Imports only the standard library and psutil, so both our benchmarks and ``original_runner.py`` (run by
the original package's virtual environment) use it.
"""

from __future__ import annotations

import threading
import time


class PeakRSS:
    """``with PeakRSS() as rss: ...`` then ``rss.delta_mb``; ``rss.peak`` can be read while it runs."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    def mb(self, peak: int) -> float:
        """A peak (bytes, e.g. ``rss.peak`` read earlier) as MiB above the level at entry."""
        return (peak - self.base) / 2**20

    @property
    def delta_mb(self) -> float:
        return self.mb(self.peak)
