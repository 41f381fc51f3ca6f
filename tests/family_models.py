"""Tiny SD2.x and SDXL models for tests: the real diffusers/transformers classes at tiny size.

Random weights from a fixed seed (deterministic: the same folder bytes on every machine), written
in diffusers format next to the shipped full-size configs they shrink (export/data/sd21, sd21-v,
sdxl): each tiny folder copies its tokenizer(s), scheduler and model_index.json from there, so the
tiny models and the shipped configs cannot drift apart.

What makes them SD2 / SDXL rather than SD1 with other numbers:

* SD2: linear proj_in/proj_out (`use_linear_projection`), per-level head counts, an OpenCLIP-shaped
  text encoder (hidden_act "gelu", width 48 != SD1 tiny's 32), a tokenizer that pads with "!" (id 0),
  v-prediction variant with DDIM + `upcast_attention` like SD 2.1 768-v.
* SDXL: first level without attention, `transformer_layers_per_block`, `text_time` added
  conditioning (pooled text embeds + 6 micro-conditioning numbers), two text encoders whose
  penultimate hidden states are concatenated (cross_attention_dim 32 + 48 = 80), a VAE with
  scaling_factor 0.13025 / force_upcast, Euler "leading".

The text encoders keep the published configs' legacy special-token ids (bos 0, eos 2, pad 1), so
transformers' pooled output takes its legacy `argmax(input_ids)` path exactly as for the real
SD2/SDXL encoders.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sdc.export.clip_tokenizer import shipped_tokenizer, write_clip_tokenizer  # noqa: F401
from sdc.export.quiet import quiet_torch_stack

DATA = Path(__file__).resolve().parent.parent / "export" / "data"
SD15_TOKENIZER = DATA / "sd15" / "tokenizer"
SD21, SD21_V, SDXL = DATA / "sd21", DATA / "sd21-v", DATA / "sdxl"

PREDICTIONS = ("epsilon", "v_prediction")
# the published SD2/SDXL text encoder configs keep transformers' old defaults for these ids
LEGACY_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


# ---------------------------------------------------------------------------------------------
# Tokenizers


# ---------------------------------------------------------------------------------------------
# Configs


def _tiny_vae(scaling_factor: float, force_upcast: bool) -> dict:
    """SD1 tiny's KL VAE (four levels: the real 8x latent factor)."""
    return {
        "sample_size": 64, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "scaling_factor": scaling_factor, "force_upcast": force_upcast,
    }


def _tiny_clip(hidden: int, layers: int, act: str, projection_dim: int) -> dict:
    return {
        "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": 4, "max_position_embeddings": 77, "vocab_size": 49408,
        "hidden_act": act, "projection_dim": projection_dim, **LEGACY_TOKEN_IDS,
    }


def sd2_tiny_configs(prediction: str = "epsilon", text_layers: int = 3) -> dict:
    """SD2.x's structure shrunk. `text_layers=23` makes the text encoder as deep as SD2's, so a
    single file written from it has resblocks.23, the one diffusers' converter drops by name."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, not {prediction!r}")
    v = prediction == "v_prediction"
    unet = {
        "sample_size": 12 if v else 8,  # 96 / 64 px, as 2.1 768-v / 2.1 base (96 / 64 latents)
        "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 48, "attention_head_dim": [2, 4],  # head counts; mid block: 4
        "use_linear_projection": True, "upcast_attention": v, "norm_num_groups": 8,
    }
    return {"unet": unet, "vae": _tiny_vae(0.18215, True),
            "text_encoder": _tiny_clip(48, text_layers, "gelu", 32)}


def sdxl_tiny_configs() -> dict:
    """SDXL base's structure shrunk: levels (DownBlock2D, CrossAttnDownBlock2D) with
    transformer_layers_per_block [1, 2] (the mid block takes the last, 2), text_time conditioning
    (6 x 8 time features + 40 pooled = 88), context 32 (CLIP-L-like) + 48 (bigG-like) = 80.
    text_encoder_2 has 10 layers so the file has resblocks.9, the key diffusers'
    infer_diffusers_model_type looks for to call a checkpoint "xl_base"."""
    te1 = _tiny_clip(32, 2, "quick_gelu", 32)
    te2 = _tiny_clip(48, 10, "gelu", 40)
    time_dim = 8
    unet = {
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2], "attention_head_dim": [2, 4],
        "cross_attention_dim": te1["hidden_size"] + te2["hidden_size"],
        "use_linear_projection": True, "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": 6 * time_dim + te2["projection_dim"],
        "norm_num_groups": 8,
    }
    return {"unet": unet, "vae": _tiny_vae(0.13025, True), "text_encoder": te1, "text_encoder_2": te2}


# ---------------------------------------------------------------------------------------------
# Folders


def _write_modules(out: Path, configs: dict, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    UNet2DConditionModel(**configs["unet"]).save_pretrained(out / "unet")
    AutoencoderKL(**configs["vae"]).save_pretrained(out / "vae")
    CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).save_pretrained(out / "text_encoder")
    if "text_encoder_2" in configs:
        CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])).save_pretrained(
            out / "text_encoder_2")


def _copy_shipped(shipped: Path, out: Path, parts: tuple[str, ...]) -> None:
    for part in parts:
        if part.startswith("tokenizer"):  # shipped as a pad token over sd15's CLIP files
            shipped_tokenizer(shipped / part, out / part)
        else:
            shutil.copytree(shipped / part, out / part, dirs_exist_ok=True)
    shutil.copy(shipped / "model_index.json", out / "model_index.json")


def make_sd2_folder(out: Path, prediction: str = "epsilon", seed: int = 3, *, text_layers: int = 3) -> Path:
    """A tiny SD2.x diffusers folder: epsilon = 2.1 base's PNDM, v_prediction = 2.1 768-v's DDIM
    (scheduler and model_index copied from export/data/sd21 or sd21-v; tokenizer pads with "!")."""
    configs = sd2_tiny_configs(prediction, text_layers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_torch_stack():
        _write_modules(out, configs, seed)
    _copy_shipped(SD21_V if prediction == "v_prediction" else SD21, out, ("tokenizer", "scheduler"))
    return out


def make_sdxl_folder(out: Path, seed: int = 4) -> Path:
    """A tiny SDXL base diffusers folder (Euler "leading", force_zeros_for_empty_prompt; tokenizer
    pads with <|endoftext|>, tokenizer_2 with "!"; all copied from export/data/sdxl)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_torch_stack():
        _write_modules(out, sdxl_tiny_configs(), seed)
    _copy_shipped(SDXL, out, ("tokenizer", "tokenizer_2", "scheduler"))
    return out


def load_sd2_pipeline(folder: Path):
    """diffusers' StableDiffusionPipeline for a (tiny) SD2 folder: fp32, CPU, eval, no bars."""
    import torch
    from diffusers import StableDiffusionPipeline

    with quiet_torch_stack():
        pipe = StableDiffusionPipeline.from_pretrained(
            str(folder), safety_checker=None, requires_safety_checker=False,
            torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def load_sdxl_pipeline(folder: Path):
    """diffusers' StableDiffusionXLPipeline for a (tiny) SDXL folder: fp32, CPU, no watermark."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    with quiet_torch_stack():
        pipe = StableDiffusionXLPipeline.from_pretrained(
            str(folder), torch_dtype=torch.float32, add_watermarker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")
