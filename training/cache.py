"""On-disk cache of VAE latents and text-encoder states, so the UNet trains with neither model loaded.

Layout: `<cache_dir>/<base model sha256[:16]>/latents/<item key>.npy` (the scaled posterior mean,
[C, h, w] float32) and `.../text/<sha256(caption)[:24]>.npy` ([tokens, width] float32). Keys are
content hashes (the image file's sha256 and its crop/flip/resolution; the caption text), so a
second run over the same data encodes nothing, and an edited image or another base model misses
instead of reusing a stale latent. Files are written to a temporary name and renamed, so a killed
run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np


class FeatureCache:
    def __init__(self, root: Path, model_hash: str):
        self.root = Path(root) / model_hash[:16]
        self.encoded = {"latents": 0, "text": 0}
        self.reused = {"latents": 0, "text": 0}

    def _get(self, kind: str, keys: list[str], encode: Callable[[list[int]], np.ndarray],
             batch: int) -> list[np.ndarray]:
        folder = self.root / kind
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{k}.npy" for k in keys]
        out: list[np.ndarray | None] = [None] * len(keys)
        todo = []
        for i, p in enumerate(paths):
            if p.is_file():
                out[i] = np.load(p)
                self.reused[kind] += 1
            else:
                todo.append(i)
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            values = encode(chunk)
            for i, v in zip(chunk, values):
                tmp = paths[i].with_name(f".{paths[i].name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, np.ascontiguousarray(v, dtype=np.float32))
                tmp.replace(paths[i])
                out[i] = np.asarray(v, dtype=np.float32)
                self.encoded[kind] += 1
        return out  # type: ignore[return-value]

    def latents(self, keys: list[str], encode: Callable[[list[int]], np.ndarray],
                batch: int = 8) -> np.ndarray:
        """Latents for the item keys; `encode(indices)` is called only for the missing ones."""
        return np.stack(self._get("latents", keys, encode, batch))

    def text(self, captions: list[str], encode: Callable[[list[int]], np.ndarray],
             batch: int = 32) -> np.ndarray:
        keys = [hashlib.sha256(c.encode()).hexdigest()[:24] for c in captions]
        return np.stack(self._get("text", keys, encode, batch))
