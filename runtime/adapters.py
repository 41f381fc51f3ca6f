"""Adapters per request: fused weight sets computed from the base, cached in an LRU bounded in bytes.

A request's adapter set (LoRA files with weights and block weights) is keyed by content: each
file's sha256 (memoised on its path, size, mtime and inode, so an unchanged file is not re-hashed
per request), its weight and its block weights. A miss reads the files against the build and fuses
every touched weight from the build's *base* bytes (fusion/artifact.py), never incrementally, so
A -> B -> A gives A's weights bit for bit. Which stages an adapter may change is the build's family
(its manifest's `family` block: the text and denoise stages, e.g. SDXL's text_encoder,
text_encoder_2 and unet), so everything here is keyed by stage, never by a fixed stage name. The
cache holds the fused arrays; an entry larger than the whole cache is used once and not kept.

How the fused weights reach a session (runtime/engine.py): weights that are adapter slots of the
graph (export/adapter_slots.py) are bound per run to the session that is already resident (no
session is created to switch adapters); any other weight (LoCon 3x3 convs, builds made before
slots) is handed to onnxruntime at session creation, so such an adapter costs a session.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SdcError


@dataclass
class FusedSet:
    """One adapter set's fused weights for a build."""

    key: tuple
    slots: dict[str, dict[str, np.ndarray]]  # stage -> {slot initializer: fused array}
    swaps: dict[str, dict[str, np.ndarray]]  # stage -> {other initializer: fused array}
    report: list[dict]  # per adapter (fusion.fuse.report), with "applied": "run"
    nbytes: int = 0

    def __post_init__(self):
        self.nbytes = sum(a.nbytes for d in (*self.slots.values(), *self.swaps.values())
                          for a in d.values())


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    fuse_seconds: float = 0.0


@dataclass
class AdapterCache:
    """LRU of FusedSets bounded in bytes (`--lora-cache`)."""

    limit: int
    entries: OrderedDict = field(default_factory=OrderedDict)
    stats: CacheStats = field(default_factory=CacheStats)
    _hashes: dict = field(default_factory=dict)  # (path, size, mtime_ns, ino) -> sha256

    @property
    def bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def file_hash(self, path: Path) -> str:
        from .store import sha256_file

        try:
            st = os.stat(path)
        except OSError:
            raise SdcError(f"--lora {path}: no such file; expected a LoRA .safetensors file") \
                from None
        ident = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        sha = self._hashes.get(ident)
        if sha is None:
            if len(self._hashes) > 4096:  # bounded: a server sees unboundedly many file versions
                self._hashes.clear()
            sha = self._hashes[ident] = sha256_file(Path(path))
        return sha

    def key(self, specs) -> tuple:
        return tuple((self.file_hash(s.path), float(s.weight), tuple(sorted(s.blocks.items())))
                     for s in specs)

    def get(self, key: tuple) -> FusedSet | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.stats.hits += 1
        return entry

    def put(self, entry: FusedSet) -> None:
        self.stats.misses += 1
        if entry.nbytes > self.limit:
            return  # used for this request only
        self.entries[entry.key] = entry
        while self.bytes > self.limit:
            self.entries.popitem(last=False)
            self.stats.evictions += 1

    def clear(self) -> None:
        self.entries.clear()


def parse_specs(loras) -> list:
    from ..fusion.fuse import LoraSpec, parse_lora_arg

    return [lo if isinstance(lo, LoraSpec) else parse_lora_arg(str(lo)) for lo in loras]


def fuse_set(folder: Path, manifest: dict, specs: list, key: tuple) -> FusedSet:
    """Read `specs` against the build and fuse, split into slot and session-creation weights."""
    from ..fusion.artifact import prepare

    fused, report = prepare(folder, manifest, specs)
    slots: dict[str, dict] = {}
    swaps: dict[str, dict] = {}
    for stage, arrays in fused.items():
        known = set(manifest["graphs"][stage]["weights"].get("slots", ()))
        for init, arr in arrays.items():
            (slots if init in known else swaps).setdefault(stage, {})[init] = arr
    return FusedSet(key, slots, swaps, [{**r, "applied": "run"} for r in report])
