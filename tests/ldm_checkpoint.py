"""Test helper: write a diffusers SD1 folder as an A1111/CompVis single-file checkpoint.

sdc reads single-file checkpoints through diffusers' LDM -> diffusers converters; tests need the
reverse direction to make such a file from a tiny model. The mapping below is the SD1 layout
(input_blocks/middle_block/output_blocks, first_stage_model encoder.down/decoder.up,
cond_stage_model.transformer.text_model). `test_single_file.py` checks it by loading the result
back with diffusers' own converter and comparing every tensor, so a mistake here cannot pass.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET[head]}.{tail}"


def unet_to_ldm(sd: dict, config: dict) -> dict:
    L = config["layers_per_block"]
    n_levels = len(config["block_out_channels"])
    out = {}
    for key, v in sd.items():
        new = None
        if m := re.match(r"time_embedding\.linear_(\d)\.(.*)", key):
            new = f"time_embed.{0 if m[1] == '1' else 2}.{m[2]}"
        elif key.startswith("conv_in."):
            new = "input_blocks.0.0." + key.removeprefix("conv_in.")
        elif key.startswith("conv_norm_out."):
            new = "out.0." + key.removeprefix("conv_norm_out.")
        elif key.startswith("conv_out."):
            new = "out.2." + key.removeprefix("conv_out.")
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", key):
            new = f"middle_block.{0 if m[1] == '0' else 2}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            i = int(m[1])
            has_attn = "CrossAttn" in config["up_block_types"][i]
            new = f"output_blocks.{i * (L + 1) + L}.{2 if has_attn else 1}.conv.{m[2]}"
        if new is None:
            raise KeyError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + new] = v
    assert n_levels >= 1
    return out


VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(sd: dict, config: dict) -> dict:
    n = len(config["block_out_channels"])
    out = {}
    for key, v in sd.items():
        new = key
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", key):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and v.ndim == 2:
                v = v[:, :, None, None]  # LDM's attention projections are 1x1 convs
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            new = f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
        new = new.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + new] = v
    return out


def text_encoder_to_ldm(sd: dict) -> dict:
    # transformers >= 5 saves CLIPTextModel without the `text_model.` prefix; LDM files have it.
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
            for k, v in sd.items()}


def write_single_file(folder: Path, out: Path) -> Path:
    """Convert a diffusers SD1 folder into one LDM-format .safetensors (or .ckpt) file."""
    folder = Path(folder)
    cfg = {p: json.loads((folder / p / "config.json").read_text()) for p in ("unet", "vae")}
    sd = {}
    sd.update(unet_to_ldm(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), cfg["unet"]))
    sd.update(vae_to_ldm(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"), cfg["vae"]))
    sd.update(text_encoder_to_ldm(load_file(folder / "text_encoder" / "model.safetensors")))
    sd = {k: v.contiguous() for k, v in sd.items()}
    out = Path(out)
    if out.suffix == ".safetensors":
        save_file(sd, out)
    else:
        torch.save({"state_dict": sd}, out)
    return out
