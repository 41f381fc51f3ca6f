"""Running a UNet built with `--unet-chunks N` (export/unet_chunks.py): chunk by chunk.

`run_chunks` is the data flow (also used by the build's parity gate): every chunk reads graph
inputs and tensors carried from earlier chunks, and a carried tensor is dropped as soon as no later
chunk reads it. `ChunkedUNet` is the runtime's session for it: chunks listed in `resident` stay
loaded for the whole denoising loop; every other chunk is created, run and released (`del` +
malloc_trim) on each pass, so at most one streamed chunk's weights are resident at a time. The
weights are mapped from the page cache, so re-creating a chunk's session costs its graph setup
(about 0.4 s per SD1.5 chunk on 2 cores with pre-packing off), not a disk read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .sessions import StageSession, check_feeds, free_memory, open_session


def run_chunks(run: Callable[[dict, dict], list], parts: list[dict], feeds: dict) -> np.ndarray:
    """The last chunk's (single) output; `run(part, feeds)` returns the part's outputs in order."""
    env = dict(feeds)
    last = {}
    for k, part in enumerate(parts):
        for name in part["inputs"]:
            last[name] = k
    for k, part in enumerate(parts):
        outs = run(part, {name: env[name] for name in part["inputs"]})
        env.update(zip(part["outputs"], outs))
        for name in part["inputs"]:
            if last[name] == k and name not in feeds:
                del env[name]
    return env[parts[-1]["outputs"][0]]


class ChunkedUNet:
    """Quacks like StageSession for the denoising loop (`run`, `provider`, `warnings`)."""

    def __init__(self, folder: Path, stage: str, graph: dict, provider: str,
                 resident: tuple[int, ...] = (), initializers: dict | None = None,
                 cuda_mem_limit: int | None = None, threads: int | None = None):
        self.folder, self.stage, self.graph, self.provider_choice = folder, stage, graph, provider
        self.parts = graph["chunks"]["parts"]
        self.initializers = initializers or {}
        self.cuda_mem_limit = cuda_mem_limit
        self.threads = threads
        self.sessions: dict[int, StageSession] = {k: self._open(k) for k in resident}
        # the provider is what a created session reports: with nothing resident, chunk 1 is
        # created now and used (then released) by the first pass rather than created twice
        self._pending = {} if resident else {0: self._open(0)}
        first = self.sessions[resident[0]] if resident else self._pending[0]
        self.provider, self.warnings = first.provider, list(first.warnings)

    def _open(self, k: int) -> StageSession:
        part = self.parts[k]
        mine = None
        if self.initializers:  # swapped (LoRA) weights: hand each chunk only its own
            names = set(part["initializers"])
            mine = {n: a for n, a in self.initializers.items() if n in names} or None
        return open_session(self.folder, self.stage, self.graph, self.provider_choice,
                            onnx_file=f"{self.stage}/{part['file']}", initializers=mine,
                            prepack=False, cuda_mem_limit=self.cuda_mem_limit,
                            threads=self.threads)

    def _run_part(self, part: dict, feeds: dict) -> list:
        k = self.parts.index(part)
        if k in self.sessions:
            return self.sessions[k].session.run(part["outputs"], feeds)
        s = self._pending.pop(k, None) or self._open(k)
        try:
            return s.session.run(part["outputs"], feeds)
        finally:
            del s
            free_memory()

    def run(self, feeds: dict[str, np.ndarray], latent_multiple: int = 1) -> np.ndarray:
        check_feeds(self.stage, self.graph, feeds, latent_multiple)
        return run_chunks(self._run_part, self.parts, feeds)
