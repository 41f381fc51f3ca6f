"""What this CPU can do, as onnxruntime's kernels care: its flags (Linux /proc/cpuinfo), whether
its uint8 x int8 kernels saturate. Torch-free, read once per process."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@lru_cache(maxsize=1)
def _cpuinfo() -> str | None:
    try:
        return CPUINFO.read_text()
    except OSError:
        return None


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's feature flags (from `cpuinfo`, default this machine's), None where unreadable."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    if not text:
        return None
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines()
                 if line.startswith("flags")), None)


# CPU flags (Linux /proc/cpuinfo names) of an int8 dot product that accumulates in 32 bits
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def u8s8_saturates(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether onnxruntime's uint8 x int8 kernels can saturate on this CPU: an x86 CPU without
    VNNI multiplies with VPMADDUBSW, whose int16 pair sums saturate (the full-size w8a8 UNet fell
    to 28.9 dB against fp32 on an AVX2-only EPYC). onnxruntime's own test
    (MlasPlatformU8S8Overflow) is true on every x86 CPU with AVX2, VNNI or not, so the precision
    mode cannot be left on everywhere: on a VNNI CPU it halves the integer kernels' rate
    (measured on an AVX-512 VNNI EPYC: the 512² CFG w8a8 UNet call 10.0 s with it, 5.4 s
    without). Read from /proc/cpuinfo's flags; an x86 CPU whose flags cannot be read is taken to
    saturate (the exact, slower kernels); other architectures never do (the mode does not exist
    there)."""
    if (machine or platform.machine()).lower() not in _X86:
        return False
    flags = cpu_flags(cpuinfo)
    return flags is None or not VNNI_FLAGS & flags
