"""Exact tiled VAE decode: run the decoder's segments layer-wise, tile by tile (torch-free).

The build cuts the VAE decoder at its GroupNorms (export/vae_segments.py says why and where).
This module runs those segments: each segment's whole-image output is kept here in numpy; the
next GroupNorm's statistics are computed from it over the whole image; then the next segment runs
on tiles of it, each tile cropped with a halo wide enough that its convolutions see exactly the
pixels the untiled decode sees. Tiles do not overlap beyond the halo and are written back without
any blending: the result is the untiled decode up to float rounding, at every tile size.

What it costs
    Compute: the halo (2 pixels at most) on top of the untiled decode. Memory: the decoder graph
    never sees more than one tile (its activations are what blow up at large sizes: several maps
    of up to 256 channels at full pixel resolution live at once); here the whole-image maps the
    segments hand each other are held once each, and freed as soon as no later segment reads them.

`segments` are the manifest's entries (name, inputs, output, res, upsample, halo, groups);
`run(name, feeds)` runs one segment's graph (an onnxruntime session in the runtime, anything in
tests).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["decode_segmented", "group_stats"]


def group_stats(x: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per (batch, group) mean and biased variance of x [B, C, H, W], accumulated in float64.

    Two passes per group (mean, then mean squared deviation) rather than E[x^2] - E[x]^2, which
    cancels catastrophically when a group's mean is large against its spread. The deviations are
    squared in float32 (relative error 6e-8 each) and summed in float64, one group at a time, so
    the only temporary is 1/groups of the map.
    """
    b, c = x.shape[:2]
    if c % groups:
        raise ValueError(f"{c} channels do not split into {groups} groups")
    xg = x.reshape(b, groups, -1)
    mean = np.empty((b, groups), np.float64)
    var = np.empty((b, groups), np.float64)
    for i in range(b):
        for g in range(groups):
            v = xg[i, g]
            m = v.mean(dtype=np.float64)
            d = v - np.float32(m)
            np.square(d, out=d)
            # var about the float32-rounded mean, corrected to the exact mean
            mean[i, g] = m
            var[i, g] = d.mean(dtype=np.float64) - (m - float(np.float32(m))) ** 2
    return mean.astype(np.float32), var.astype(np.float32)


def _last_reads(segments: list[dict]) -> dict[str, int]:
    last = {}
    for k, seg in enumerate(segments):
        for name in seg["inputs"]:
            last[name] = k
    return last


def decode_segmented(run: Callable[[str, dict], np.ndarray], segments: list[dict],
                     latents: np.ndarray, tile: int) -> np.ndarray:
    """Decode [batch, C, h, w] latents (already divided by the scaling factor) to pixels.

    `tile` is in latents (a segment at r pixels per latent runs tiles of tile*r pixels); 0 runs
    every segment on the whole image in one call.
    """
    latents = np.ascontiguousarray(latents, dtype=np.float32)
    if latents.ndim != 4:
        raise ValueError(f"latents must be [batch, channels, h, w], got shape {latents.shape}")
    if int(tile) != tile or tile < 0:
        raise ValueError(f"tile must be a non-negative integer number of latents, got {tile!r}")
    maps = {"latent_sample": latents}
    last = _last_reads(segments)
    for k, seg in enumerate(segments):
        ins = [maps[name] for name in seg["inputs"]]
        feeds = dict(zip(seg["inputs"], ins))
        if seg["groups"]:
            feeds["mean"], feeds["var"] = group_stats(ins[0], seg["groups"])
        if not seg["halo"] or not tile:
            out = np.asarray(run(seg["name"], feeds), dtype=np.float32)
        else:
            out = _run_tiled(run, seg, feeds, ins, int(tile) * seg["res"])
        for name in seg["inputs"]:
            if last[name] == k and name != "latent_sample":
                del maps[name]  # free a whole-image map as soon as nothing reads it
        del ins, feeds
        maps[seg["output"]] = out
    return maps[segments[-1]["output"]]


def _run_tiled(run, seg: dict, feeds: dict, ins: list[np.ndarray], tile_px: int) -> np.ndarray:
    b, _, h, w = ins[0].shape
    up, halo = seg["upsample"], seg["halo"]
    out = None
    for y0 in range(0, h, tile_px):
        y1 = min(y0 + tile_px, h)
        cy0, cy1 = max(0, y0 - halo), min(h, y1 + halo)
        for x0 in range(0, w, tile_px):
            x1 = min(x0 + tile_px, w)
            cx0, cx1 = max(0, x0 - halo), min(w, x1 + halo)
            tile_feeds = dict(feeds)
            for name, arr in zip(seg["inputs"], ins):
                tile_feeds[name] = np.ascontiguousarray(arr[:, :, cy0:cy1, cx0:cx1])
            res = np.asarray(run(seg["name"], tile_feeds), dtype=np.float32)
            want = (b, (cy1 - cy0) * up, (cx1 - cx0) * up)
            if res.ndim != 4 or (res.shape[0], res.shape[2], res.shape[3]) != want:
                raise ValueError(f"segment {seg['name']} returned {res.shape} for a tile of "
                                 f"{cy1 - cy0}x{cx1 - cx0} (upsample {up})")
            if out is None:
                out = np.empty((b, res.shape[1], h * up, w * up), np.float32)
            oy, ox = (y0 - cy0) * up, (x0 - cx0) * up
            out[:, :, y0 * up:y1 * up, x0 * up:x1 * up] = \
                res[:, :, oy:oy + (y1 - y0) * up, ox:ox + (x1 - x0) * up]
    return out
