"""Tiny SD1 models for tests: the real diffusers/transformers classes at tiny size.

Random weights (seed 1): fast and deterministic; tests that need meaningful images use the trained
built-in sdc-tiny instead (test_builtin_default.py).
"""

from __future__ import annotations

from pathlib import Path

from sdc.export.quiet import quiet_torch_stack
from sdc.export.tiny_model import write_tiny_model


def make_tiny_folder(out: Path, seed: int = 1) -> Path:
    with quiet_torch_stack():
        return write_tiny_model(out, seed=seed)


def load_components(folder: Path) -> dict:
    """The diffusers/transformers modules of a tiny folder, fp32, eval: the tests' oracle."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    with quiet_torch_stack():
        return {
            "unet": UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
            "vae": AutoencoderKL.from_pretrained(folder / "vae").eval(),
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        }
