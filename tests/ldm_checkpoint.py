"""Test helper: write a diffusers SD1 folder as an A1111/CompVis single-file checkpoint.

sdc reads single-file checkpoints through diffusers' LDM -> diffusers converters; tests need the
reverse direction to make such a file from a tiny model. The mapping below is the SD1 layout
(input_blocks/middle_block/output_blocks, first_stage_model encoder.down/decoder.up,
cond_stage_model.transformer.text_model). `test_single_file.py` checks it by loading the result
back with diffusers' own converter and comparing every tensor, so a mistake here cannot pass.

SD2.x and SDXL (`write_sd2_single_file`, `write_sdxl_single_file`): the same UNet/VAE mapping (SGM
keeps LDM's UNet names; SDXL adds label_emb.0.* for the text_time embedding), and text encoders in
the layouts real files have: SD2's OpenCLIP ViT-H under cond_stage_model.model.* (fused qkv
in_proj, one more resblock than diffusers keeps, text_projection, logit_scale); SDXL's CLIP-L under
conditioner.embedders.0.transformer.text_model.* and OpenCLIP bigG under conditioner.embedders.1.
model.* (text_projection stored [hidden, proj], i.e. transposed from transformers' Linear).
`test_family_fixtures.py` reads them back with diffusers' converters, tensor by tensor.
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
        elif m := re.match(r"add_embedding\.linear_(\d)\.(.*)", key):  # SDXL text_time (SGM)
            new = f"label_emb.0.{0 if m[1] == '1' else 2}.{m[2]}"
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


# ---------------------------------------------------------------------------------------------
# SD2.x / SDXL

OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
LOGIT_SCALE = 2.659260036932778  # OpenCLIP's init, log(1 / 0.07); real files carry the trained one


def open_clip_to_ldm(sd: dict, prefix: str, extra_layers: int = 0, text_projection=None,
                     seed: int = 0) -> dict:
    """A transformers CLIP text state dict (CLIPTextModel's flat keys, or CLIPTextModelWithProjection's
    text_model.* + text_projection.weight) in OpenCLIP's layout under `prefix`.

    q/k/v become one in_proj [3h, h]; text_projection is stored [hidden, proj] (OpenCLIP computes
    x @ P; transformers' Linear holds P.T), or taken from `text_projection` when the module has none
    (SD2's CLIPTextModel). `extra_layers` appends that many resblocks of seeded random weights after
    the last: real SD2 files hold 24 where diffusers keeps 23.
    """
    out, qkv = {}, {}
    for key, v in sd.items():
        k = key.removeprefix("text_model.")
        if k == "embeddings.position_ids":
            continue
        if k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.removeprefix("final_layer_norm.")] = v
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = v
        elif m := re.match(r"encoder\.layers\.(\d+)\.(self_attn\.out_proj|layer_norm[12]|mlp\.fc[12])\.(.*)",
                           k):
            out[f"transformer.resblocks.{m[1]}.{OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = v
        else:
            raise KeyError(f"unmapped text encoder key {key}")
    for (n, kind), parts in qkv.items():
        out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    if text_projection is not None:
        out["text_projection"] = text_projection
    n_layers = 1 + max(n for n, _ in qkv)
    g = torch.Generator().manual_seed(seed)
    layer0 = sorted(k for k in out if k.startswith("transformer.resblocks.0."))
    for extra in range(n_layers, n_layers + extra_layers):
        for k in layer0:
            shape = out[k].shape
            out[k.replace(".resblocks.0.", f".resblocks.{extra}.")] = torch.randn(shape, generator=g) * 0.02
    out["logit_scale"] = torch.tensor(LOGIT_SCALE)
    return {prefix + k: v for k, v in out.items()}


def _read_folder(folder: Path, parts: tuple[str, ...]) -> tuple[dict, dict]:
    cfg, weights = {}, {}
    for part in parts:
        cfg[part] = json.loads((folder / part / "config.json").read_text())
        name = ("model.safetensors" if part.startswith("text_encoder")
                else "diffusion_pytorch_model.safetensors")
        weights[part] = load_file(folder / part / name)
    return cfg, weights


def _save_checkpoint(sd: dict, out: Path) -> Path:
    sd = {k: v.contiguous() for k, v in sd.items()}
    out = Path(out)
    if out.suffix == ".safetensors":
        save_file(sd, out)
    else:
        torch.save({"state_dict": sd}, out)
    return out


def write_sd2_single_file(folder: Path, out: Path) -> Path:
    """A diffusers SD2.x folder as one LDM (Stability stablediffusion repo) checkpoint: UNet under
    model.diffusion_model.* (linear proj_in/proj_out stay 2-D, as in real SD2 files), VAE under
    first_stage_model.*, the text encoder as OpenCLIP under cond_stage_model.model.* with one extra
    random resblock, a random text_projection [hidden, projection_dim] and logit_scale."""
    folder = Path(folder)
    cfg, w = _read_folder(folder, ("unet", "vae", "text_encoder"))
    te = cfg["text_encoder"]
    g = torch.Generator().manual_seed(1)
    proj = torch.randn((te["hidden_size"], te["projection_dim"]), generator=g) * 0.02
    sd = {**unet_to_ldm(w["unet"], cfg["unet"]), **vae_to_ldm(w["vae"], cfg["vae"]),
          **open_clip_to_ldm(w["text_encoder"], "cond_stage_model.model.", extra_layers=1,
                             text_projection=proj)}
    return _save_checkpoint(sd, out)


def write_sdxl_single_file(folder: Path, out: Path) -> Path:
    """A diffusers SDXL folder as one SGM (generative-models / A1111) checkpoint: UNet under
    model.diffusion_model.* (label_emb.0.* for the text_time embedding), VAE under
    first_stage_model.*, CLIP-L under conditioner.embedders.0.transformer.text_model.*, OpenCLIP
    bigG under conditioner.embedders.1.model.* (text_projection [hidden, proj], logit_scale)."""
    folder = Path(folder)
    cfg, w = _read_folder(folder, ("unet", "vae", "text_encoder", "text_encoder_2"))
    te1 = {"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
           for k, v in w["text_encoder"].items()}
    sd = {**unet_to_ldm(w["unet"], cfg["unet"]), **vae_to_ldm(w["vae"], cfg["vae"]), **te1,
          **open_clip_to_ldm(w["text_encoder_2"], "conditioner.embedders.1.model.")}
    return _save_checkpoint(sd, out)
