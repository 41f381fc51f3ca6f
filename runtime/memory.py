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
import re
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


MAX_BUDGET = 2**50  # 1 PiB: far above any machine; a larger figure is a typo, not a budget
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")
_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20,
          "mb": 10**6, "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40,
          "tb": 10**12}
SIZE_FORM = ("a positive size such as 4GiB, 1500MB or 2G (K/M/G/T binary, kB/MB/GB/TB "
             "decimal), from 1 byte to 1024TiB")


def parse_size(text: str) -> int:
    """`4GiB`, `1500MB`, `512M`, `2G`, `3.5GiB`, or plain bytes -> bytes (K/M/G are binary
    unless written kB/MB/GB).

    Plain decimal digits only: float() would also take `inf`, `nan`, `1e30`, `-4` and `1_0`,
    which are typos or overflows here, never budgets."""
    from ..errors import SdcError

    m = _SIZE.fullmatch(str(text))
    unit = m.group(2).lower() if m else None
    if unit not in _UNITS:
        raise SdcError(f"--vram-budget {text}: expected {SIZE_FORM}")
    # Decimal arithmetic on the digits: exact for any length, no float overflow to inf
    from decimal import Decimal

    value = int(Decimal(m.group(1)) * _UNITS[unit])
    check_budget(value, text)
    return value


def check_budget(value, text=None) -> int:
    """A budget in bytes (the Python API also takes ints): 1 byte to MAX_BUDGET."""
    from ..errors import SdcError

    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BUDGET:
        raise SdcError(f"--vram-budget {text if text is not None else value}: expected "
                       f"{SIZE_FORM}")
    return value


def memory_limit_bytes() -> int | None:
    """The memory this process can ever hold: physical RAM, or the cgroup's limit when lower
    (containers). None where neither can be read. A plan above it cannot run on this machine,
    whatever the budget says."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * _PAGE)
    except (AttributeError, OSError, ValueError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means no limit; v1 writes a huge number instead
            limits.append(int(text))
    limits = [n for n in limits if n > 0]
    return min(limits) if limits else None


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"
