"""Peak resident memory as the OS counts it (Linux /proc), for build logs and the manifest.

`PeakRss` measures the peak RSS *above the level at entry* over a block: it resets the kernel's
high-water mark (writing 5 to /proc/self/clear_refs, allowed for one's own process) and reads
VmHWM afterwards. Where that is unavailable it falls back to getrusage's lifetime peak and says so.
"""

from __future__ import annotations

import resource
from pathlib import Path


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def process_peak_rss_bytes() -> int:
    """Lifetime peak RSS of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRss:
    def __enter__(self) -> "PeakRss":
        self.resettable = True
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False
        self.start_kib = _status_kib("VmRSS") or 0
        self.bytes = 0
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_kib("VmHWM") if self.resettable else None
        peak_kib = hwm if hwm is not None else process_peak_rss_bytes() // 1024
        self.bytes = max(0, peak_kib - self.start_kib) * 1024
