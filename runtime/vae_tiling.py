"""Blended tiled VAE decode (the fallback; exact tiling is vae_segmented.py): latents -> pixels in
overlapping latent tiles of the whole decoder graph, blended without seams.

This module owns where the tiles go (`plan_tiles`) and how their pixels are combined
(`decode_tiled`). It does not own the decoder: `decode` is any callable mapping a latent tile
[batch, C, th, tw] to pixels [batch, C_out, th*factor, tw*factor] (in the runtime an onnxruntime
session of the VAE decoder; in the tests a diffusers AutoencoderKL). Pure numpy: it runs on edge
boxes where there is no torch.

Why tile at all
    A VAE decoder's activations scale with the *pixel* area. For SD's decoder
    (block_out_channels 128/256/512/512, f = 8) the largest maps are the 256-channel ones at
    full resolution: 256 ch x (8T)^2 px x 4 B = 64 MiB per map for a T = 32 latent tile
    (256 x 256 px), and a few are live at once (conv input and output, GroupNorm temporaries,
    the nearest-upsampled input). Measured (diffusers AutoencoderKL with SD1.5's decoder config,
    torch fp32 on CPU, peak RSS above the loaded model): ~0.3-0.4 GiB for a 32-latent tile,
    ~1 GiB for an untiled 64-latent (512 px) decode. It grows with T^2, so an untiled 128-latent
    (1024 px) decode extrapolates to ~4 GiB, which is what does not fit on small boxes (not
    measured with onnxruntime, whose arena differs in detail; fp16 activations are half the
    bytes). Tiling caps the decoder's peak at one tile whatever the image size; the only
    full-size buffers this module adds are the output and its fp64 accumulator
    (C_out x H*f x W*f x (8 + 4) B per image: 36 MiB at 1024 px, ~10% of one tile's peak).
    The accumulator is fp64 so that blending is exact where it should be: weights summing to 1
    in fp64 make w1*v + w2*v round back to the fp32 value v, so a constant or an exactly local
    decoder comes through bit-identical instead of off by an ulp.

Where the tiles go (`plan_tiles`)
    Per axis, the fewest tiles of size T whose spacing is at most T - overlap, spread *evenly*
    between 0 and the far edge (first tile flush with 0, last flush with the edge). Evenly spread
    rather than "fixed stride, last tile shifted back": every seam then gets the same, >= requested,
    overlap instead of one thin overlap and one huge one. A latent no larger than T along an
    axis gets one tile of the full extent there; if both axes fit, the decode is untiled (and
    bit-identical to calling `decode` once).

Why this blend (`decode_tiled`)
    The decoder is not local: GroupNorm takes its statistics over the whole tile and the mid
    block's self-attention mixes every latent position of the tile, so the same pixel decoded in
    two different tiles comes out different (not just by a per-tile gain/offset: fitting one per
    tile and channel to the untiled decode recovers < 1 dB), and pixels near a tile's border are
    further off because the convolutions see zero padding there instead of the neighbour.
    Two consequences:
      * A hard cut (paste tiles, or average with a box window) turns that per-tile difference
        into a step, which the eye sees as a seam. A smooth cross-fade turns it into a ramp spread
        over the overlap, which it does not: the wider the ramp, the gentler.
      * Errors from zero padding are largest next to a tile's own border and fade inward, so
        each overlap pixel should come mostly from the tile it is deeper inside, and pixels
        covered by one tile only must come from that tile alone (weight exactly 1).
    So each tile gets a separable window w(y) * w(x). Along an axis w is 1 except across the
    overlaps with its neighbours, where over the n overlapping pixels it is 0 for the outer
    quarter (next to this tile's border: the neighbour alone, which is deep inside there), a
    raised cosine 0.5 - 0.5 cos(pi (t + 0.5) / r) over the middle half (r = n/2 pixels), and 1
    over the inner quarter. A tile's rising ramp and its neighbour's falling ramp over the same
    pixels sum to exactly 1 (cos is antisymmetric about the midpoint), and the cosine has zero
    slope at both ends, so the blend adds no kink where the ramp begins or ends (a linear ramp
    does). Measured on a real (random-weight) AutoencoderKL decoder in tests/test_vae_tiling.py:
    the two needs pull opposite ways. With the decoder's non-local parts removed (GroupNorm
    frozen at whole-image statistics, no attention), so that only zero padding differs, a ramp
    over the whole overlap gives 36-48 dB vs untiled, the middle half 40-60 dB, a hard cut at
    the midline more still; with the full decoder, where per-tile GroupNorm/attention shifts
    dominate (20-24 dB at 32-latent tiles whatever the window), a wider ramp is better, but only
    by 0.1-0.4 dB from whole overlap to middle half. The middle half keeps most of the first
    gain and still spreads a per-tile shift over r = overlap/2 (64 px at 64 latents), where its
    slope is at most pi / (2 r) times the shift.
    Because the grid is a product of per-axis tilings, the sum of all tile weights at a pixel is
    the product of the per-axis sums; the per-axis windows are normalised to sum to 1 (this also
    covers three tiles overlapping on a short axis), so the blend is a true partition of unity
    with no full-size weight map: a constant decode comes back as that constant, and an exact,
    local decoder (nearest-neighbour upsampling) is reproduced exactly.

    What blending cannot fix: GroupNorm normalises with the tile's own statistics and the mid
    block's attention mixes the whole tile, so a tile decodes differently from the same region
    of the whole image, by an amount set by the decoder and the tile size, not the window.
    Closing that gap needs a different decoder graph: builds now carry the decoder cut at its
    GroupNorms, which vae_segmented.py runs exactly; this module remains the fallback for builds
    without those segments.

    What others do, and why the defaults here: diffusers' `AutoencoderKL.enable_tiling` only
    tiles above 64 latents (512 px) with 25% overlap and a linear blend, i.e. it never tiles
    SD1.5's native size and keeps the 64-latent peak. stable-diffusion.cpp and OnnxStream, which
    target small-memory devices, decode 32-latent tiles with 25-50% overlap. We follow the latter
    (T = 32, overlap >= 25%; the even spread makes it 50% at 64 latents) because capping memory
    is the point, and a smooth cosine window because with tiles that small the per-tile
    GroupNorm shift is larger than with diffusers' big tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["TilePlan", "plan_tiles", "decode_tiled"]

MIN_TILE = 8  # below this the decoder's receptive field is mostly zero padding


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles go, in latent units. Tile (i, j) covers rows ys[i] : ys[i] + min(tile, H)
    and cols xs[j] : xs[j] + min(tile, W) of an H x W latent."""

    tile: int  # tile size in latents
    overlap: int  # minimum overlap between neighbouring tiles, in latents
    ys: tuple[int, ...]  # tile start rows
    xs: tuple[int, ...]  # tile start cols


def _starts(size: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Fewest evenly spread starts of `tile`-long windows covering [0, size), with gaps of at
    most tile - overlap."""
    if size <= tile:
        return (0,)
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    last = size - tile
    # floor division spreads the remainder: consecutive gaps differ by at most 1 and never exceed
    # ceil(last / (n - 1)) <= stride, so every overlap is >= the requested one.
    return tuple((i * last) // (n - 1) for i in range(n))


def plan_tiles(height: int, width: int, tile: int = 32, overlap_ratio: float = 0.25) -> TilePlan:
    """Tiles covering a height x width latent (latent units): `tile` square, neighbours
    overlapping by at least ceil(tile * overlap_ratio), first and last tiles flush with the edges.
    One tile when the latent fits in one."""
    if int(tile) != tile or tile < MIN_TILE:
        raise ValueError(f"tile must be an integer >= {MIN_TILE} latents, got {tile!r}")
    if not 0.0 <= overlap_ratio <= 0.5:
        # above 0.5 a pixel lies in more than two tiles per axis on average: decodes for no gain
        raise ValueError(f"overlap_ratio must be in [0, 0.5], got {overlap_ratio!r}")
    if height < 1 or width < 1:
        raise ValueError(f"latent size must be positive, got {height}x{width}")
    tile = int(tile)
    overlap = math.ceil(tile * overlap_ratio)
    return TilePlan(tile=tile, overlap=overlap,
                    ys=_starts(int(height), tile, overlap), xs=_starts(int(width), tile, overlap))


# Only a hand-made plan with tiles a latent or two apart can leave a pixel inside every covering
# tile's zero margin; there every tile gets this weight (equal shares after normalising).
_FLOOR = 1e-12


def _rise(n: int) -> np.ndarray:
    """Rising weight across an n-pixel overlap: 0 over the outer quarter (next to this tile's
    border), a raised cosine over the middle half, 1 over the inner quarter. rise(n)[::-1] is
    the neighbour's falling weight over the same pixels and the two sum to 1 exactly."""
    q = n // 4
    r = n - 2 * q
    w = np.zeros(n, dtype=np.float64)
    w[q:q + r] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(r) + 0.5) / r)
    w[q + r:] = 1.0
    return w


def _axis_weights(starts: tuple[int, ...], extent: int, size: int, factor: int) -> list[np.ndarray]:
    """Per-tile 1-D pixel windows along one axis, normalised so they sum to 1 at every pixel.

    A tile's window is 1, times a rising ramp across its overlap with the previous tile and a
    falling one across its overlap with the next (image edges get no ramp).
    """
    n_px = extent * factor
    windows = []
    for i, s in enumerate(starts):
        w = np.ones(n_px, dtype=np.float64)
        if i > 0:  # rising across [s, end of previous tile)
            n = (starts[i - 1] + extent - s) * factor
            w[:n] *= _rise(n)
        if i + 1 < len(starts):  # falling across [start of next tile, end of this one)
            n = (s + extent - starts[i + 1]) * factor
            w[n_px - n:] *= _rise(n)[::-1]
        windows.append(w)
    total = np.zeros(size * factor, dtype=np.float64)
    for s, w in zip(starts, windows):
        total[s * factor:s * factor + n_px] += w
    if not total.all():
        windows = [np.maximum(w, _FLOOR) for w in windows]
        total[:] = 0
        for s, w in zip(starts, windows):
            total[s * factor:s * factor + n_px] += w
    # the normalisation is a no-op where two ramps meet (they already sum to 1) and matters
    # where three tiles overlap on a short axis
    return [w / total[s * factor:s * factor + n_px] for s, w in zip(starts, windows)]


def _check_plan(plan: TilePlan, height: int, width: int) -> None:
    for name, starts, size in (("ys", plan.ys, height), ("xs", plan.xs, width)):
        extent = min(plan.tile, size)
        if (not starts or starts[0] != 0 or starts[-1] + extent != size
                or any(b <= a or b > a + extent for a, b in zip(starts, starts[1:]))):
            raise ValueError(f"tile plan {name}={starts} (tile {plan.tile}) does not cover "
                             f"{size} latents edge to edge in increasing order without gaps")


def decode_tiled(decode: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, factor: int,
                 plan: TilePlan | None = None, tile: int = 32,
                 overlap_ratio: float = 0.25) -> np.ndarray:
    """Decode [batch, C, H, W] latents tile by tile and blend into [batch, C_out, H*f, W*f] float32.

    `plan` defaults to plan_tiles(H, W, tile, overlap_ratio). With a single tile this is exactly
    `decode(latents)`.
    """
    latents = np.asarray(latents)
    if latents.ndim != 4:
        raise ValueError(f"latents must be [batch, channels, h, w], got shape {latents.shape}")
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    factor = int(factor)
    batch, _, height, width = latents.shape
    if plan is None:
        plan = plan_tiles(height, width, tile, overlap_ratio)
    _check_plan(plan, height, width)
    th, tw = min(plan.tile, height), min(plan.tile, width)

    def run(z: np.ndarray) -> np.ndarray:
        out = np.asarray(decode(np.ascontiguousarray(z)))
        want = (batch, z.shape[2] * factor, z.shape[3] * factor)
        if out.ndim != 4 or (out.shape[0], out.shape[2], out.shape[3]) != want:
            raise ValueError(f"decode returned shape {out.shape} for a latent tile of shape "
                             f"{z.shape}; expected [{batch}, C, {want[1]}, {want[2]}] "
                             f"(factor {factor})")
        return out

    if len(plan.ys) == 1 and len(plan.xs) == 1:
        return run(latents).astype(np.float32, copy=False)

    wy = _axis_weights(plan.ys, th, height, factor)
    wx = _axis_weights(plan.xs, tw, width, factor)
    out = None
    for y, w_y in zip(plan.ys, wy):
        for x, w_x in zip(plan.xs, wx):
            pix = run(latents[:, :, y:y + th, x:x + tw]).astype(np.float32, copy=False)
            if out is None:  # channel count is the decoder's business: learn it from the first tile
                out = np.zeros((batch, pix.shape[1], height * factor, width * factor), np.float64)
            py, px = y * factor, x * factor
            window = w_y[:, None] * w_x[None, :]
            out[:, :, py:py + th * factor, px:px + tw * factor] += pix * window
    return out.astype(np.float32)
