"""LoRA fusion at `sdc build`: into the torch modules before export, so the parity gate's torch
reference includes the adapters. The arithmetic is fuse.py's, on the module's own fp32 weights.
"""

from __future__ import annotations

from .fuse import Applied, fuse_param
from .lora import COMPONENTS


def known_from_configs(configs: dict) -> dict[str, set[str]]:
    """Module paths with a .weight of the UNet and text encoder the configs describe, from modules
    built on the meta device (no memory, no weights read)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        te = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    return {c: {n.removesuffix(".weight") for n, _ in m.named_parameters() if n.endswith(".weight")}
            for c, m in zip(COMPONENTS, (unet, te))}


class TorchFusion:
    """Fuses once per component from its fp32 load and replays the result onto a later fp16 load
    (cast from the fused fp32 values: the fp16 graph gets the same adapters, rounded once more)."""

    def __init__(self, applied: Applied):
        self.applied = applied
        self.cache: dict[tuple[str, str], object] = {}
        self.max_delta: dict[str, float] = {}

    def apply(self, module, component: str) -> int:
        import torch

        params = dict(module.named_parameters())
        names = self.applied.params(component)
        for name in names:
            key = (component, name)
            p = params[name]
            if key not in self.cache:
                if p.dtype != torch.float32:
                    raise AssertionError("LoRAs are fused from the fp32 load first")
                fused, deltas = fuse_param(f"{component} {name}", p.detach().numpy(),
                                           self.applied.terms[key], "float32")
                self.cache[key] = torch.from_numpy(fused)
                for source, d in deltas.items():
                    self.max_delta[source] = max(self.max_delta.get(source, 0.0), d)
            with torch.no_grad():
                p.copy_(self.cache[key].to(p.dtype))
        return len(names)
