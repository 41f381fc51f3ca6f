"""Process memory as the OS counts it (Linux /proc), torch-free: for the planner's estimates, the
build's measured profiles and `sdc run`'s reported peak.

The budget's unit on the CPU provider is resident memory *above the baseline*: the interpreter
plus the libraries the runtime imports (numpy, onnxruntime, PIL, tokenizers), measured after the
imports and before anything is loaded. The baseline is reported on its own, since it is the same
for every plan and a budget cannot buy it back.

Peaks come from the kernel's high-water mark (VmHWM), reset with /proc/self/clear_refs (`5`), so
a short spike between samples is never missed. Where that file cannot be written (not Linux, a
locked-down container), `reset_peak` returns False and peaks are reported as unknown.
"""

from __future__ import annotations

import os
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def import_runtime_libraries() -> None:
    """Import what a run imports, so a baseline measured after this is the run's baseline."""
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    import tokenizers  # noqa: F401
    from PIL import Image, PngImagePlugin  # noqa: F401

    from . import png, schedulers, sessions, tokenizer, unet_chunks, vae_decode, vae_segmented  # noqa: F401


def rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int | None:
    """The process's resident high-water mark since the last reset_peak (or its start)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_size(text: str) -> int:
    """`4GiB`, `1500MB`, `512M`, `2G`, `3.5GiB`, or plain bytes -> bytes (K/M/G are binary
    unless written kB/MB/GB)."""
    units = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20,
             "mb": 10**6, "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40,
             "tb": 10**12}
    s = str(text).strip()
    num = s.rstrip("kKmMgGtTiIbB ")
    unit = s[len(num):].strip().lower()
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        from ..errors import SdcError

        raise SdcError(f"--vram-budget {text}: expected a positive size such as 4GiB, 1500MB or "
                       "2G (K/M/G binary, kB/MB/GB decimal)")
    return int(value * units[unit])


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"
