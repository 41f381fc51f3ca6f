"""Tiny SD1-architecture models with *random* weights, for tests (and the SD1.5 configs' home).

They exercise every stage of the real architecture (CLIP text encoder, cross-attention UNet, KL
VAE with SD's 8x factor) in seconds; their images are noise. Weights come from a fixed seed, so the
folder (and so the build key) is the same on every machine. The built-in model `sdc build` uses
with no MODEL is the *trained* sdc-tiny (export/data/sdc-tiny, training/train_tiny.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

SD15_CONFIGS = Path(__file__).parent / "data" / "sd15"


def tiny_configs(cross_attention_dim: int = 32) -> dict:
    """Component configs: the real SD1.x classes, shrunk. Latent factor 8 like SD1.x."""
    unet = {
        "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8, "norm_num_groups": 8,
    }
    vae = {
        "sample_size": 64, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "scaling_factor": 0.18215,
    }
    text = {
        "hidden_size": cross_attention_dim, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 77, "vocab_size": 49408,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407, "hidden_act": "quick_gelu",
        "projection_dim": cross_attention_dim,
    }
    return {"unet": unet, "vae": vae, "text_encoder": text}


def write_tiny_model(out: Path, seed: int = 0, configs: dict | None = None) -> Path:
    """Write a diffusers-format SD1 folder with random tiny weights at `out` and return it."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = configs or tiny_configs()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    UNet2DConditionModel(**configs["unet"]).save_pretrained(out / "unet")
    AutoencoderKL(**configs["vae"]).save_pretrained(out / "vae")
    CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).save_pretrained(out / "text_encoder")
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(SD15_CONFIGS / part, out / part, dirs_exist_ok=True)
    shutil.copy(SD15_CONFIGS / "model_index.json", out / "model_index.json")
    return out
