"""The one fusion formula, shared by build, re-fuse and run-time swap (torch-free):

    W' = W + sum_i weight_i * block_i(layer) * (alpha_i / rank_i) * up_i @ down_i

computed in float32 from the *base* weight every time (never incrementally: apply/unapply drifts,
FACTS.md; float32 like diffusers' own fuse_lora, which the tests hold it to within 1e-6), then
cast to the graph's dtype after checking that the result is finite and, for fp16 graphs, within
fp16's range (|W'| <= 65504), else failing with the layer's name.

Block weights (LoRA Block Weight): `down`, `mid`, `up` scale every UNet layer of those blocks,
`down.1` / `up.2` one block by index, `base` the UNet layers outside blocks (conv_in, time
embedding, conv_out; SDXL's add_embedding too), `te` the text encoder (SDXL: both text encoders,
text_encoder and text_encoder_2); unnamed parts keep weight 1. Block indices are diffusers' (an
SGM-named kohya key is fused into, and so weighted as, the diffusers module it names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SdcError
from .lora import LoraFile, LoraLayer

FP16_MAX = 65504.0
_BLOCK_KEYS = re.compile(r"^(down|mid|up|base|te)(?:\.(\d+))?$")


@dataclass
class LoraSpec:
    """One `--lora PATH[:WEIGHT[:BLOCKS]]` argument."""

    path: Path
    weight: float = 1.0
    blocks: dict[str, float] = field(default_factory=dict)

    def as_arg(self) -> str:
        blocks = ",".join(f"{k}={v:g}" for k, v in self.blocks.items())
        return f"{self.path}:{self.weight:g}" + (f":{blocks}" if blocks else "")


def parse_lora_arg(text: str) -> LoraSpec:
    """PATH, PATH:0.8 or PATH:0.8:down=0,mid=1,up.2=0.5,te=0. A colon inside PATH is kept when
    what follows it is not a weight."""
    parts = text.split(":")
    blocks: dict[str, float] = {}
    if len(parts) >= 3 and "=" in parts[-1]:
        blocks = _parse_blocks(parts[-1], text)
        parts = parts[:-1]
    weight = 1.0
    if len(parts) >= 2:
        try:
            weight = float(parts[-1])
            parts = parts[:-1]
        except ValueError:
            if blocks:
                raise SdcError(f"--lora {text}: expected PATH:WEIGHT:BLOCKS with a number as "
                               f"WEIGHT, found {parts[-1]!r}") from None
    if not np.isfinite(weight):
        raise SdcError(f"--lora {text}: weight must be a finite number")
    return LoraSpec(Path(":".join(parts)), weight, blocks)


def _parse_blocks(text: str, whole: str) -> dict[str, float]:
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if not _BLOCK_KEYS.match(key):
            raise SdcError(f"--lora {whole}: unknown block {key!r}; expected down, mid, up, base, "
                           "te or down.N / up.N")
        try:
            out[key] = float(value)
        except ValueError:
            raise SdcError(f"--lora {whole}: block {key} needs a number, found {value!r}") from None
    return out


def block_multiplier(component: str, module: str, blocks: dict[str, float]) -> float:
    if component != "unet":  # text_encoder, SDXL's text_encoder_2
        return blocks.get("te", 1.0)
    m = re.match(r"(down|up)_blocks\.(\d+)\.", module)
    if m:
        return blocks.get(f"{m[1]}.{m[2]}", blocks.get(m[1], 1.0))
    if module.startswith("mid_block."):
        return blocks.get("mid", 1.0)
    return blocks.get("base", 1.0)


def layer_delta(layer: LoraLayer, shape: tuple[int, ...]) -> np.ndarray:
    """(alpha / rank) * up @ down in float32, shaped like the base weight."""
    up = layer.up.astype(np.float32).reshape(layer.up.shape[0], layer.rank)
    down = layer.down.astype(np.float32).reshape(layer.rank, -1)
    delta = np.float32(layer.alpha / layer.rank) * (up @ down)
    if delta.size != int(np.prod(shape)):
        raise SdcError(f"LoRA layer {layer.component} {layer.module}: update of shape "
                       f"{[layer.up.shape[0], *layer.down.shape[1:]]} does not fit the base weight "
                       f"{list(shape)}; the LoRA was made for another model")
    return delta.reshape(shape)


@dataclass
class Applied:
    """What a set of adapters changes: {(component, param name): [(scale, layer)]}."""

    terms: dict[tuple[str, str], list[tuple[float, LoraLayer]]]

    def params(self, component: str) -> list[str]:
        return sorted(p for c, p in self.terms if c == component)


def plan(adapters: list[tuple[LoraFile, LoraSpec]]) -> Applied:
    terms: dict = {}
    for lora, spec in adapters:
        for layer in lora.layers:
            scale = spec.weight * block_multiplier(layer.component, layer.module, spec.blocks)
            if scale == 0.0:
                continue
            terms.setdefault((layer.component, f"{layer.module}.weight"), []).append((scale, layer))
    return Applied(terms)


def fuse_param(name: str, base: np.ndarray, terms: list[tuple[float, LoraLayer]],
               dtype) -> tuple[np.ndarray, dict[str, float]]:
    """The fused weight cast to `dtype`, and each adapter file's max |delta| here (the report)."""
    w = np.array(base, dtype=np.float32)
    per_source: dict[str, float] = {}
    for scale, layer in terms:
        delta = np.float32(scale) * layer_delta(layer, w.shape)
        per_source[layer.source] = max(per_source.get(layer.source, 0.0),
                                       float(np.abs(delta).max()))
        w += delta
    check_fused(name, w, dtype)
    return w.astype(dtype), per_source


def check_fused(name: str, w: np.ndarray, dtype) -> None:
    """Refuse a fused weight that `dtype` cannot hold: NaN/Inf always, |W'| > 65504 for fp16 (the
    cast would turn it into inf and the graph would give NaN images). Every apply path calls this
    with the dtype the weight ends up in, so an overflowing LoRA fails the same way on each."""
    if not np.isfinite(w).all():
        raise SdcError(f"fusing LoRA into {name} gives NaN/Inf; lower the LoRA weight")
    if np.dtype(dtype) == np.float16 and np.abs(w).max() > FP16_MAX:
        raise SdcError(f"fusing LoRA into {name} gives |W| = {np.abs(w).max():.4g} > 65504, out of "
                       "fp16 range; lower the LoRA weight or build --precision fp32")


def report(adapters: list[tuple[LoraFile, LoraSpec]], max_delta: dict[str, float]) -> list[dict]:
    """Per adapter, for the manifest and `sdc inspect`."""
    out = []
    for lora, spec in adapters:
        comps = sorted({layer.component for layer in lora.layers})
        out.append({
            "name": lora.name, "file": str(lora.path), "sha256": lora.sha256,
            "format": lora.format, "weight": spec.weight, "blocks": spec.blocks,
            "rank": lora.ranks(), "alpha": lora.alphas(), "alpha_source": lora.alpha_source,
            "layers": len(lora.layers), "matched_keys": lora.total_keys,
            "total_keys": lora.total_keys, "components": comps,
            "max_abs_delta": max_delta.get(str(lora.path), 0.0),
            "triggers": lora.triggers,
        })
    return out
