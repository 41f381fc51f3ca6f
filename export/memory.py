"""Peak resident memory as the OS counts it (Linux /proc), for build logs and the manifest.

`PeakRss` measures the peak RSS *above the level at entry* over a block by sampling;
`process_peak_rss_bytes` is the kernel's lifetime high-water mark of the whole process.
"""

from __future__ import annotations

import resource
import threading

from ..runtime.memory import rss_bytes


def process_peak_rss_bytes() -> int:
    """Lifetime peak RSS of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRss:
    """Peak RSS above the level at entry, sampled from /proc/self/statm on a background thread.

    Sampling (every 2 ms) rather than resetting the kernel's high-water mark: a reset
    (/proc/self/clear_refs) would also reset getrusage's ru_maxrss, and with it the build's own
    whole-process peak that the manifest and the OS report.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.bytes = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def __enter__(self) -> "PeakRss":
        self.start = self._peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.bytes = max(0, self._peak - self.start)
