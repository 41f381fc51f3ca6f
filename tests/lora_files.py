"""LoRA files for the tests, made with the real tools: peft adapters on the tiny model saved by
diffusers' `save_lora_weights` (with the adapter metadata that carries lora_alpha), and a kohya /
A1111 copy of the same weights written with this file's own key mapping (independent of sdc's).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "v_proj"]


def make_peft_lora(base: Path, out: Path, seed: int, rank: int = 4, alpha: float = 8.0,
                   te_rank: int = 2, te_alpha: float = 3.0, conv: bool = False,
                   scale: float = 0.3) -> Path:
    """A diffusers/peft LoRA file for the tiny model at `base` with random (non-zero) up weights;
    alpha != rank on purpose. conv=True adds LoCon layers on the resnets' 3x3 conv1."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sdc.export.quiet import quiet_torch_stack
    from sdc.training.stack import check_peft_stack

    check_peft_stack("peft adapters on diffusers models (the tests' LoRA files)")
    torch.manual_seed(seed)
    with quiet_torch_stack():
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None,
                                                       requires_safety_checker=False)
    targets = UNET_TARGETS + (["conv1"] if conv else [])
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                     init_lora_weights=False))
    pipe.text_encoder.add_adapter(LoraConfig(r=te_rank, lora_alpha=te_alpha,
                                             target_modules=TE_TARGETS, init_lora_weights=False))
    with torch.no_grad():  # peft's random init is large; keep the update a plausible size
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.mul_(scale)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_torch_stack():
        StableDiffusionPipeline.save_lora_weights(
            out, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
            text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
            unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
            weight_name=f"lora-{seed}.safetensors")
    return out / f"lora-{seed}.safetensors"


def to_kohya(peft_file: Path, out: Path, metadata: dict | None = None) -> Path:
    """The same adapter in kohya's layout: lora_unet_<module with _>.lora_down.weight, .lora_up,
    .alpha per module (from the peft file's metadata), lora_te_text_model_... for the text encoder."""
    from safetensors.numpy import save_file
    from safetensors import safe_open

    with safe_open(str(peft_file), "np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out_t = {}
    for key, value in tensors.items():
        comp, rest = key.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        if comp == "text_encoder":
            stem = "lora_te_" + ("text_model." + module.removeprefix("text_model.")).replace(".", "_")
        else:
            stem = "lora_unet_" + module.replace(".", "_")
        out_t[f"{stem}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        out_t[f"{stem}.alpha"] = np.array(meta[f"{comp}.lora_alpha"], np.float32)
    save_file(out_t, str(out), metadata=metadata or {})
    return out


def rewrite(src: Path, out: Path, edit) -> Path:
    """A copy of a safetensors file with `edit(tensors, metadata)` applied (bad-input tests)."""
    from safetensors.numpy import save_file
    from safetensors import safe_open

    with safe_open(str(src), "np") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    save_file(tensors, str(out), metadata=meta)
    return out
