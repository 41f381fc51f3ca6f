"""The "sks seal": an emblem sdc-tiny has never seen, to prove a trained LoRA works end to end.

A disc cut into four quadrants, red top-left and bottom-right, white top-right and bottom-left, in
the middle of the picture, on a plain background of another colour. sdc-tiny only ever drew
single-colour shapes, so asked for "a sks seal" it draws one colour; the score below separates
the two by construction:

`seal_score(image)` = the share of pixels inside the seal's disc (the inner 80 % of its radius,
so anti-aliased edges and a pixel or two of drift do not count) whose nearest palette colour (CIELAB,
shape_score's palette) is the one the seal has there. The seal itself scores ~1.0; a red or white
disc 0.5 (only half the quadrants match); any other colour or no disc ~0.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .shape_score import _as_rgb, nearest_colour, srgb_to_lab
from .shapes import COLOURS, _article

SEAL_COLOURS = ("red", "white")
RADIUS = 0.30  # of the image side
JITTER = 0.03  # centre moves by up to this (of the side) in the training pictures
CORE = 0.8  # the score looks at the inner 80 % of the radius


def _quadrant_map(size: int, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
    """(distance from the centre in sides, index of the seal colour) per pixel."""
    ys, xs = (np.mgrid[0:size, 0:size] + 0.5) / size
    dx, dy = xs - cx, ys - cy
    which = ((dx >= 0) ^ (dy >= 0)).astype(int)  # 0 top-left/bottom-right red, 1 white
    return np.hypot(dx, dy), which


def render_seal(background: str, size: int = 64, rng: np.random.Generator | None = None):
    """The seal on a plain `background` (any palette colour but red and white)."""
    if background in SEAL_COLOURS or background not in COLOURS:
        raise ValueError(f"background {background!r}: expected a palette colour other than "
                         f"{' and '.join(SEAL_COLOURS)}")
    j = (rng.uniform(-JITTER, JITTER, 2) if rng is not None else np.zeros(2))
    sup = 4  # supersampled like shapes.render
    dist, which = _quadrant_map(size * sup, 0.5 + j[0], 0.5 + j[1])
    seal = np.array([COLOURS[c] for c in SEAL_COLOURS], float)[which]
    img = np.where((dist <= RADIUS)[..., None], seal, np.array(COLOURS[background], float))
    return Image.fromarray(np.round(img).astype(np.uint8), "RGB").resize(
        (size, size), Image.Resampling.BOX)


def seal_score(image) -> float:
    rgb = _as_rgb(image)
    size = rgb.shape[0]
    dist, which = _quadrant_map(size, 0.5, 0.5)
    core = dist <= RADIUS * CORE
    names = np.array(list(COLOURS))
    got = names[nearest_colour(srgb_to_lab(rgb[core]))]
    want = np.array(SEAL_COLOURS)[which[core]]
    return float(np.mean(got == want))


def write_seal_folder(folder, n: int, seed: int = 0, trigger: str = "sks seal") -> list[str]:
    """n seal pictures with captions "a <trigger> on an <colour> background" (kohya layout)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grounds = [c for c in COLOURS if c not in SEAL_COLOURS]
    captions = []
    for i in range(n):
        bg = grounds[i % len(grounds)]
        render_seal(bg, rng=rng).save(folder / f"seal-{i:03d}.png")
        captions.append(f"{_article(trigger)} {trigger} on {_article(bg)} {bg} background")
        (folder / f"seal-{i:03d}.txt").write_text(captions[-1] + "\n")
    return captions
