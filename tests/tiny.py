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


def medium_configs() -> dict:
    """SD1's full structure (four UNet levels, two layers per block, 8 heads, four VAE levels, a
    4-layer CLIP) at a fifth of its width: ~140 MB of fp32 weights, so budgets of tens of MB
    separate the plans clearly where the tiny model's few MB drown in heap noise."""
    from sdc.export.tiny_model import tiny_configs

    configs = tiny_configs(cross_attention_dim=192)
    configs["unet"].update({
        "block_out_channels": [64, 128, 256, 256], "layers_per_block": 2, "attention_head_dim": 8,
        "norm_num_groups": 32, "sample_size": 32,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    })
    configs["vae"].update({"block_out_channels": [32, 64, 128, 128], "layers_per_block": 2,
                           "norm_num_groups": 32, "sample_size": 256})
    configs["text_encoder"].update({"intermediate_size": 768, "num_hidden_layers": 4,
                                    "num_attention_heads": 4})
    return configs


def make_medium_folder(out: Path, seed: int = 2) -> Path:
    with quiet_torch_stack():
        return write_tiny_model(out, seed=seed, configs=medium_configs())
