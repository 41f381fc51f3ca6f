"""grid.png of `sdc eval`: one row of pictures per build (reference first), one column per
prompt/seed pair, then one difference heat-map row per non-reference build against the reference.
Pillow + numpy only.

The heat map shows the per-pixel max over channels of |build - reference| on one fixed scale for
every row (HEAT_FULL levels = brightest), so rows compare with each other: black is identical,
red a few levels off, yellow-white a different picture.
"""

from __future__ import annotations

import numpy as np

HEAT_FULL = 64  # 8-bit levels of error drawn at full brightness (a quarter of the range)
MIN_CELL = 128  # px: small pictures (sdc-tiny's 64 px) are enlarged, nearest-neighbour, to this
LABEL_W = 170  # px: the build-name column
HEADER_H = 16  # px: the column captions (prompt number, seed)
GAP = 2  # px between cells


def heat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| of two uint8 RGB pictures as an RGB heat map: black -> red -> yellow -> white."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1)
    x = np.clip(d / HEAT_FULL, 0.0, 1.0)
    ramp = np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], -1)
    return (ramp * 255).round().astype(np.uint8)


def make_grid(names: list[str], images: dict, captions: list[str]):
    """names[0] is the reference; images[name] lists PIL images in column order."""
    from PIL import Image, ImageDraw

    ref = [np.asarray(im.convert("RGB")) for im in images[names[0]]]
    h, w = ref[0].shape[:2]
    scale = max(1, -(-MIN_CELL // max(h, w)))  # ceil: enlarge small pictures by a whole factor
    ch, cw = h * scale, w * scale
    rows = [(n, [np.asarray(im.convert("RGB")) for im in images[n]]) for n in names]
    rows += [(f"|{n} - ref|", [heat(np.asarray(im.convert("RGB")), r)
                               for im, r in zip(images[n], ref)]) for n in names[1:]]
    cols = len(ref)
    sheet = Image.new("RGB", (LABEL_W + cols * (cw + GAP), HEADER_H + len(rows) * (ch + GAP)),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, text in enumerate(captions):
        draw.text((LABEL_W + j * (cw + GAP) + 2, 2), text[: cw // 6], fill=(0, 0, 0))
    for i, (label, cells) in enumerate(rows):
        y = HEADER_H + i * (ch + GAP)
        draw.text((4, y + ch // 2 - 6), label[:LABEL_W // 6], fill=(0, 0, 0))
        for j, cell in enumerate(cells):
            tile = Image.fromarray(cell).resize((cw, ch), Image.NEAREST)
            sheet.paste(tile, (LABEL_W + j * (cw + GAP), y))
    return sheet
