"""`sdc build` with no MODEL: the shipped, trained sdc-tiny; labelled, cached, and it draws the prompt.

The semantic test is the whole chain (built-in model -> `sdc build` -> torch-free runtime -> PNG)
judged by the explainable detectors of training/shape_score.py, not by numbers: a chain that
garbles the text conditioning, the scheduler or the VAE makes pictures of the wrong colour.
"""

from __future__ import annotations

import json

import numpy as np
from conftest import read_manifest, run_sdc
from PIL import Image

from sdc.export.sources import SDC_TINY
from sdc.training.model_card import model_files
from sdc.training.shape_score import score
from sdc.training.shapes import COLOURS, SHAPES, prompt


def test_builtin_build_is_labelled_and_reused(builtin_build):
    m = read_manifest(builtin_build)
    base = m["base_model"]
    assert base["name"] == "sdc-tiny" and base["kind"] == "builtin" and base["builtin"] is True
    assert m["defaults"] == {"guidance": 3.0, "steps": 20}  # from sdc-tiny's sdc.json
    assert m["model"]["default_size"] == 64 and m["model"]["vae_scale_factor"] == 4
    again = run_sdc("build", "--precision", "fp32", cwd=builtin_build.parent.parent)
    assert "up to date" in again.stderr
    shown = run_sdc("inspect", builtin_build).stdout
    assert "[built-in]" in shown and "guidance 3.0" in shown


def test_shipped_model_is_small_and_carded():
    """The issue's budget: the whole model inside the package <= 15 MB, with its model card."""
    total = sum(p.stat().st_size for p in model_files(SDC_TINY))
    assert total <= 15e6, total
    card = (SDC_TINY / "README.md").read_text()
    assert "## Evaluation" in card and "Not evaluated yet" not in card
    training = json.loads((SDC_TINY / "training.json").read_text())
    assert training["config"]["seed"] == 0 and training["vocab_size"] == 590


# One pair per colour, every shape at least once, each on a different background and style.
PAIRS = [(SHAPES[i % len(SHAPES)], colour, list(COLOURS)[(i + 3) % len(COLOURS)],
          ("plain", "striped", "gradient")[i % 3], 2000 + i)
         for i, colour in enumerate(COLOURS)]


def test_builtin_model_draws_the_prompted_colour(builtin_build, tmp_path):
    """Through the real CLI with the model's own defaults (guidance 3, 20 steps). The bar is the
    issue's 80 % colour correctness on a handful of pairs (8 here: one miss allowed). The full
    48-pair evaluation (bench/tiny_eval.py) measured 100 % colour for the shipped model, so this
    can only fail if the chain breaks."""
    results = []
    for shape, colour, background, style, seed in PAIRS:
        if background == colour:
            background = "white" if colour != "white" else "black"
        text = prompt(shape, colour, background, style)
        out = tmp_path / f"{seed}.png"
        run_sdc("run", text, "-a", builtin_build, "--seed", seed, "--out", out, "-q",
                "--no-verify")
        img = Image.open(out)
        assert img.size == (64, 64)
        assert "Steps: 20" in img.info["parameters"] and "CFG scale: 3.0" in img.info["parameters"]
        results.append(score(img, {"shape": shape, "colour": colour, "background": background}))
    colour_ok = np.mean([r["colour"] for r in results])
    background_ok = np.mean([r["background"] for r in results])
    detail = [(p[:2], r["detected"]["colour"], r["detected"]["shape"]) for p, r in zip(PAIRS, results)]
    assert colour_ok >= 0.8, detail
    assert background_ok >= 0.8, detail
