"""Procedural training data for sdc-tiny: one coloured shape on a coloured background, with its caption.

sdc-tiny is a Stable Diffusion v1 model small enough to train offline; it learns from these scenes so
that its pictures can be checked against the prompt by simple detectors (`shape_score.py`). This file
owns the vocabulary (shapes, colours, background styles), the scene sampler, the renderer and the
caption grammar. numpy + Pillow only: the data must be generatable where torch is not installed.

Everything is deterministic from a seed: `sample_scene` draws every free parameter from the
`numpy.random.Generator` it is given, and `render` uses no randomness of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")

# sRGB values chosen far apart in CIELAB: every pair is >= 43 ΔE76 apart (red/orange closest; blue and
# purple were at 29 until purple leaned to magenta and blue to azure). tests/test_shapes.py asserts
# the spacing, so a new colour cannot slip in next to an existing one.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (40, 160, 60),
    "blue": (20, 100, 230),
    "purple": (150, 40, 150),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}

BACKGROUND_STYLES = ("plain", "striped", "gradient")

# Stripes and gradients run from the named colour to this fraction of the way towards white (dark
# colours) or black (light colours). 0.25 keeps every shade nearest to its own name in Lab (its
# ΔE to the own colour is <= 27, to any other >= 40), so "blue stripes" are still unambiguously blue.
SHADE_FRACTION = 0.25
_LIGHT = ("yellow", "white")  # shaded towards black: towards white they would wash out

STAR_INNER = 0.45  # inner/outer radius; thicker than a regular pentagram (0.38) so points survive 64 px
CROSS_HALF_WIDTH = 1 / 3  # arm half-width / arm half-length: the arms stay several pixels wide
RING_INNER = 0.55  # hole radius / outer radius: a hole of >= 6 px across at the smallest size

# Shape size is the diameter of its circumscribed circle as a fraction of the image side. From 45 %
# up, a star's points and a cross's arms stay >= 2-3 latent pixels wide at sdc-tiny's 16 x 16
# latents (at 35 % they were ~1, and the first trained models drew them as blobs: star and cross
# 12.5 % correct); 75 % still leaves room to move the shape around.
SIZE_RANGE = (0.45, 0.75)
MARGIN = 0.04  # kept clear between the shape and the image edge, so the border shows only background
# Shapes stand upright, turned by at most this many degrees either way. Free rotation made every
# shape word mean a spread of orientations whose average is a blob, and a model this small drew the
# blob: triangles and stars came out rounded (shape 48 %, ONNX path, first CPU-trained model).
ROTATION_JITTER = 10.0
STRIPE_PERIOD_RANGE = (0.12, 0.25)  # one light + one dark stripe, as a fraction of the image side
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: exact area anti-aliasing


@dataclass(frozen=True)
class Scene:
    """One training picture. Positions and sizes are fractions of the image side, so the same scene
    renders at any resolution; angles are in degrees."""

    shape: str
    colour: str
    background: str  # a COLOURS name, never `colour`
    background_style: str  # one of BACKGROUND_STYLES
    cx: float
    cy: float
    size: float  # circumscribed diameter
    rotation: float
    pattern_angle: float = 0.0  # stripe / gradient direction; unused for plain backgrounds
    stripe_period: float = 0.0  # only for striped backgrounds

    def __post_init__(self):
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                                     (self.background, COLOURS, "background"),
                                     (self.background_style, BACKGROUND_STYLES, "background style")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {tuple(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} shape on a {self.background} background is invisible; "
                             "pick another background colour")
        if self.background_style == "striped" and self.stripe_period <= 0:
            raise ValueError(f"striped backgrounds need stripe_period > 0, got {self.stripe_period}")


def shade(name: str) -> tuple[int, int, int]:
    """The second colour of a striped or gradient background named `name`."""
    rgb = np.array(COLOURS[name], float)
    target = 0.0 if name in _LIGHT else 255.0
    return tuple(int(round(v)) for v in rgb + SHADE_FRACTION * (target - rgb))


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene uniformly over the vocabulary; the shape always lies fully inside the image."""
    names = list(COLOURS)
    colour = names[rng.integers(len(names))]
    others = [n for n in names if n != colour]
    background = others[rng.integers(len(others))]
    style = BACKGROUND_STYLES[rng.integers(len(BACKGROUND_STYLES))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = float(rng.uniform(*SIZE_RANGE))
    lo, hi = size / 2 + MARGIN, 1 - size / 2 - MARGIN
    return Scene(
        shape=shape, colour=colour, background=background, background_style=style,
        cx=float(rng.uniform(lo, hi)), cy=float(rng.uniform(lo, hi)), size=size,
        rotation=float(rng.uniform(-ROTATION_JITTER, ROTATION_JITTER)),
        pattern_angle=float(rng.uniform(0, 180)),
        stripe_period=float(rng.uniform(*STRIPE_PERIOD_RANGE)) if style == "striped" else 0.0,
    )


def _outline(scene: Scene, side: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of a polygonal shape, circumradius scene.size * side / 2."""
    r = scene.size * side / 2
    if scene.shape == "square":
        local = [(r, a) for a in (45, 135, 225, 315)]
    elif scene.shape == "triangle":
        local = [(r, a) for a in (-90, 30, 150)]
    elif scene.shape == "star":
        local = [(r if k % 2 == 0 else r * STAR_INNER, -90 + 36 * k) for k in range(10)]
    elif scene.shape == "cross":
        # arm half-length L and half-width w with L^2 + w^2 = r^2: the tip corners touch the circle
        length = r / math.hypot(1, CROSS_HALF_WIDTH)
        w = length * CROSS_HALF_WIDTH
        pts = [(w, length), (-w, length), (-w, w), (-length, w), (-length, -w), (-w, -w),
               (-w, -length), (w, -length), (w, -w), (length, -w), (length, w), (w, w)]
        local = [(math.hypot(x, y), math.degrees(math.atan2(y, x))) for x, y in pts]
    else:
        raise ValueError(f"no polygon for shape {scene.shape!r}; expected one of {SHAPES}")
    cx, cy = scene.cx * side, scene.cy * side
    return [(cx + d * math.cos(math.radians(a + scene.rotation)),
             cy + d * math.sin(math.radians(a + scene.rotation))) for d, a in local]


def _shape_mask(scene: Scene, side: int) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if scene.shape in ("circle", "ring"):
        cx, cy, r = scene.cx * side, scene.cy * side, scene.size * side / 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if scene.shape == "ring":
            h = r * RING_INNER
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=0)
    else:
        draw.polygon(_outline(scene, side), fill=255)
    return mask


def _background(scene: Scene, side: int) -> np.ndarray:
    base = np.array(COLOURS[scene.background], float)
    if scene.background_style == "plain":
        return np.broadcast_to(base, (side, side, 3)).copy()
    other = np.array(shade(scene.background), float)
    # distance along the pattern direction, in image sides, from the image centre
    ys, xs = (np.mgrid[0:side, 0:side] + 0.5) / side - 0.5
    a = math.radians(scene.pattern_angle)
    along = xs * math.cos(a) + ys * math.sin(a)
    if scene.background_style == "striped":
        t = (np.floor(along / (scene.stripe_period / 2)) % 2)[..., None]
    else:  # gradient: the named colour on one side, its shade on the other
        span = (abs(math.cos(a)) + abs(math.sin(a))) / 2  # |along| reaches this at the corners
        t = ((along / span + 1) / 2)[..., None]
    return base + t * (other - base)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of size x size pixels, anti-aliased by 4x supersampling."""
    side = size * SUPERSAMPLE
    alpha = np.asarray(_shape_mask(scene, side), float)[..., None] / 255
    fg = np.array(COLOURS[scene.colour], float)
    big = _background(scene, side) * (1 - alpha) + fg * alpha
    img = Image.fromarray(np.round(big).astype(np.uint8), "RGB")
    return img.resize((size, size), Image.Resampling.BOX)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def prompt(shape: str, colour: str, background: str, style: str = "plain") -> str:
    """The caption grammar, for training captions and evaluation prompts alike:
    plain "a red circle on a blue background", striped "... on blue stripes",
    gradient "... on an orange gradient"."""
    for value, allowed, what in ((shape, SHAPES, "shape"), (colour, COLOURS, "colour"),
                                 (background, COLOURS, "background"),
                                 (style, BACKGROUND_STYLES, "background style")):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; expected one of {tuple(allowed)}")
    ground = {"plain": f"{_article(background)} {background} background",
              "striped": f"{background} stripes",
              "gradient": f"{_article(background)} {background} gradient"}[style]
    return f"{_article(colour)} {colour} {shape} on {ground}"


def caption(scene: Scene) -> str:
    """What the scene shows, in the words the model is trained on."""
    return prompt(scene.shape, scene.colour, scene.background, scene.background_style)


@dataclass
class ShapesDataset:
    images: np.ndarray  # (n, size, size, 3) uint8
    captions: list[str]
    scenes: list[Scene]  # ground truth for each image, for scoring


def make_dataset(n: int, seed: int, size: int = 64) -> ShapesDataset:
    """n scenes from `seed`, rendered at size x size. The same (n, seed, size) gives the same bytes,
    and the first k scenes of a larger n are the same k scenes."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = np.stack([np.asarray(render(s, size)) for s in scenes]) if scenes else \
        np.zeros((0, size, size, 3), np.uint8)
    return ShapesDataset(images=images, captions=[caption(s) for s in scenes], scenes=scenes)


def all_prompts(style: str = "plain", every_background: bool = False) -> list[tuple[str, dict]]:
    """Evaluation prompts covering every shape in every colour, with the expected answer for
    `shape_score.score`. The background rotates through the other colours (one per prompt,
    6 x 8 = 48 prompts); every_background=True crosses them all (6 x 8 x 7 = 336)."""
    out = []
    names = list(COLOURS)
    for i, shape in enumerate(SHAPES):
        for j, colour in enumerate(names):
            others = [n for n in names if n != colour]
            grounds = others if every_background else [others[(i + j) % len(others)]]
            for background in grounds:
                expected = {"shape": shape, "colour": colour, "background": background}
                out.append((prompt(shape, colour, background, style), expected))
    return out
