"""The sdc-tiny prompt-adherence detectors moved to `sdc.eval.adherence` (torch-free, so `sdc eval`
can score builds with them); this module keeps the old import path working for the training side,
bench/tiny_eval.py and the tests."""

from __future__ import annotations

from sdc.eval.adherence import (  # noqa: F401  (re-exported)
    ASPECTS as _ASPECTS,
    BACKGROUND_MIN_SHARE,
    BORDER,
    CIRCLE_MIN_FILL,
    CONVEX_MIN_SOLIDITY,
    CROSS_MIN_FILL,
    HOLE_MIN,
    MIN_AREA,
    MIN_CONTRAST,
    SQUARE_MIN_FILL,
    Detection,
    _as_rgb,
    classify_shape,
    detect,
    nearest_colour,
    score,
    shape_features,
    srgb_to_lab,
    summarise,
)
