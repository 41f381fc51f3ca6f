"""On-disk cache of VAE latents and text-encoder states, so the UNet trains with neither model loaded.

Layout: `<cache_dir>/<base model sha256[:16]>/latents/<item key>.npy` (the scaled posterior mean,
[C, h, w] float32) and `.../text/<sha256(caption)[:24]>.npy` ([tokens, width] float32). Keys are
content hashes (the image file's sha256 and its crop/flip/resolution; the caption text), so a
second run over the same data encodes nothing, and an edited image or another base model misses
instead of reusing a stale latent. Files are written to a temporary name and renamed, so a killed
run never leaves a half-written entry.

DeepFloyd IF (pixel space: no latents) caches only its T5 states, compactly in fp16 (T5Cache).
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


class T5Cache:
    """DeepFloyd IF's T5 states per caption, compact and exact to fp16.

    IF's pipelines hand the UNet all 77 states (the tokens, `</s>`, then the padding), encoded
    with the attention mask. The padding's states are not constant: each pad position attends to
    the caption (the mask hides only pad *keys*), so they differ from caption to caption and are
    not rebuilt from the caption's own states; storing only the unpadded tokens would change
    what the UNet sees. They do repeat within a caption, though: a pad query sees nothing but
    its relative-position buckets to the caption tokens, and far from the caption those buckets
    stop changing, so many pad rows are equal. The cache stores each distinct fp16 row once plus
    a per-position index, which rebuilds the fp16 [77, width] tensor bit for bit.

    Layout: `<cache_dir>/<T5 sha256[:16]>/t5/<sha256(max_length, caption)[:24]>.npz` holding
    `rows` (float16 [distinct, width]), `index` (uint8 [77]: row per position) and `length`
    (the attention mask's token count). Keyed by the T5 and tokenizer files only, so stage I
    and stage II runs over the same captions share it. Written to a temporary name and renamed.
    """

    KIND = "t5"

    def __init__(self, root: Path, t5_hash: str, max_length: int = 77):
        self.root = Path(root) / t5_hash[:16] / self.KIND
        self.max_length = max_length
        self.encoded = 0
        self.reused = 0
        self.bytes: list[int] = []  # file size per caption asked for

    def path(self, caption: str) -> Path:
        key = hashlib.sha256(f"{self.max_length}\0{caption}".encode()).hexdigest()[:24]
        return self.root / f"{key}.npz"

    @staticmethod
    def pack(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[tokens, width] -> (distinct fp16 rows in order of first use, row index per token)."""
        half = np.ascontiguousarray(np.asarray(states, dtype=np.float16))
        raw = half.view(np.dtype((np.void, half.shape[1] * half.itemsize))).ravel()
        _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
        order = np.argsort(first)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        dtype = np.uint8 if len(order) <= 256 else np.uint16
        return half[first[order]], rank[inverse.ravel()].astype(dtype)

    @staticmethod
    def unpack(rows: np.ndarray, index: np.ndarray) -> np.ndarray:
        return rows[index.astype(np.int64)]

    def states(self, captions: list[str], encode: Callable[[list[int]], tuple],
               batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [N, 77, width] rebuilt from the fp16 cache, mask lengths [N]);
        `encode(indices) -> (states [n, 77, width], lengths [n])` runs only for the missing."""
        self.root.mkdir(parents=True, exist_ok=True)
        out: list = [None] * len(captions)
        lengths = np.zeros(len(captions), np.int64)
        todo = []
        for i, c in enumerate(captions):
            p = self.path(c)
            if p.is_file():
                with np.load(p) as f:
                    out[i] = self.unpack(f["rows"], f["index"])
                    lengths[i] = int(f["length"])
                self.reused += 1
                self.bytes.append(p.stat().st_size)
            else:
                todo.append(i)
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            states, lens = encode(chunk)
            for i, s, n in zip(chunk, states, lens):
                rows, index = self.pack(s)
                p = self.path(captions[i])
                tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.savez(f, rows=rows, index=index, length=np.int64(n))
                tmp.replace(p)
                out[i] = self.unpack(rows, index)
                lengths[i] = int(n)
                self.encoded += 1
                self.bytes.append(p.stat().st_size)
        return np.stack(out).astype(np.float32), lengths

    def bytes_per_caption(self) -> int:
        return round(float(np.mean(self.bytes))) if self.bytes else 0
