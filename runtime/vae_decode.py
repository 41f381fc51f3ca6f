"""The pipeline's VAE decode stage: whole graph, exact segmented tiles, or blended tiles.

  tile 0                      the decoder graph on the whole latent (fastest, biggest peak)
  tile N, build has segments  exact tiled decode (vae_segmented.py): same pixels as untiled
  tile N, no segments         blended whole-graph tiles (vae_tiling.py), for builds made before
                              the segments existed, of decoders the cut does not know and of
                              w8a8 decoders (quant/static.py); its per-tile GroupNorm costs
                              fidelity, so it says so in a warning
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .sessions import free_memory, open_session


def decode_latents(folder: Path, stage: str, graph: dict, z: np.ndarray, factor: int, tile: int,
                   provider: str, log: Callable[[str], None],
                   progress: Callable[[str, int, int], None],
                   cuda_mem_limit: int | None = None,
                   opener: Callable | None = None) -> tuple[list, str, list[str]]:
    """Pixels [1, 3, H, W] per image of z (latents already divided by the scaling factor);
    returns (pixels, the provider it ran on, warnings). `opener(graph, onnx_file, arena)` gives
    the sessions and owns them (the Engine keeps them resident); without it they are opened
    here and released before return."""
    owned = opener is None
    if owned:
        def opener(g, onnx_file=None, arena=True):
            return open_session(folder, stage, g, provider, onnx_file=onnx_file,
                                arena=arena, cuda_mem_limit=cuda_mem_limit)
    if tile and graph.get("tiled"):
        return _decode_segmented(stage, graph["tiled"], z, tile, log, progress, opener, owned)
    from .vae_tiling import decode_tiled

    dec = opener(graph)
    log(f"[{stage}] holding {stage} on {dec.provider}"
        + (f" (blended {tile}-latent tiles)" if tile else ""))
    warnings = list(dec.warnings)
    if tile:
        fix = ("quantize its decoder to fp16 or int8 (--stage-precision "
               f"{stage}=fp16) for exact tiles" if graph.get("precision") == "w8a8"
               else "rebuild with this sdc for exact tiles")
        warnings.append(f"{stage}: this build has no exact tiled decoder, so tiles are "
                        f"blended and differ slightly from an untiled decode; {fix}")
    decode = lambda t: dec.run({"latent_sample": np.ascontiguousarray(t)})  # noqa: E731
    pixels = []
    for i in range(len(z)):
        pixels.append(decode_tiled(decode, z[i:i + 1], factor, tile=tile) if tile
                      else decode(z[i:i + 1]))
        progress(stage, i + 1, len(z))
    actual = dec.provider
    del dec
    if owned:
        free_memory()
    return pixels, actual, warnings


def _decode_segmented(stage: str, tiled: dict, z, tile, log, progress, opener, owned: bool):
    from .vae_segmented import decode_segmented

    segments = tiled["segments"]
    sessions = {s["name"]: opener(tiled, s["file"], False) for s in segments}
    actual = {s.provider for s in sessions.values()}
    first = next(iter(sessions.values()))
    log(f"[{stage}] holding {len(sessions)} decoder segments on {', '.join(sorted(actual))} "
        f"(exact {tile}-latent tiles)")
    warnings = list(first.warnings)
    run = lambda name, feeds: sessions[name].session.run(None, feeds)[0]  # noqa: E731
    pixels = []
    for i in range(len(z)):
        pixels.append(decode_segmented(run, segments, z[i:i + 1], tile))
        progress(stage, i + 1, len(z))
    del sessions, first, run
    if owned:
        free_memory()
    return pixels, ", ".join(sorted(actual)), warnings
