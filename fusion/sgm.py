"""UNet module names in the original (LDM / SGM) layout, from diffusers' names (torch-free).

kohya's sd-scripts train SDXL on the SGM UNet, so SDXL kohya LoRAs name UNet modules
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` rather than diffusers'
`lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q` (both occur). The two
layouts hold the same modules; which SGM index a diffusers block gets follows from the UNet's
structure (layers per block, which blocks have attention, a down/upsampler, a mid attention), which
is read here off the model's own module paths, i.e. the config they were built from:

  conv_in                          input_blocks.0.0
  down_blocks.b.resnets.j          input_blocks.k.0      k counts 1, 2, ... over each level's
  down_blocks.b.attentions.j       input_blocks.k.1      layers, then its downsampler (if any)
  down_blocks.b.downsamplers.0     input_blocks.k.0      (its conv is `op`)
  mid_block.resnets.0 / attentions.0 / resnets.1   middle_block.0 / 1 / 2
  up_blocks.b.resnets.j            output_blocks.k.0     k counts 0, 1, ... over each level's
  up_blocks.b.attentions.j         output_blocks.k.1     layers; the upsampler sits in the level's
  up_blocks.b.upsamplers.0         output_blocks.k.1|2   last one, after its attention (if any)
  time_embedding.linear_1 / _2     time_embed.0 / .2
  add_embedding.linear_1 / _2      label_emb.0.0 / .0.2  (SDXL's text_time embedding)
  conv_norm_out / conv_out         out.0 / out.2

and inside a resnet norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut are in_layers.0,
in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection; attention blocks keep
their inner names. A module with no SGM counterpart here simply has no SGM name: LoRA keys are
matched against the names computed for the base model's modules, never parsed and guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                    r"\.(\d+)\.")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.")


@dataclass
class _Level:
    layers: int = 0  # resnets
    attention: bool = False
    sampler: bool = False  # a downsampler (down levels) or upsampler (up levels)


@dataclass
class UnetLayout:
    down: dict[int, _Level] = field(default_factory=dict)
    up: dict[int, _Level] = field(default_factory=dict)
    mid_attention: bool = False
    mid_resnets: int = 0

    @classmethod
    def of(cls, modules) -> "UnetLayout":
        """The structure of a diffusers UNet2DConditionModel from its module paths."""
        layout = cls()
        for path in modules:
            if m := _BLOCK.match(path + "."):
                side, b, kind, j = m[1], int(m[2]), m[3], int(m[4])
                levels = layout.down if side == "down_blocks" else layout.up
                level = levels.setdefault(b, _Level())
                if kind == "resnets":
                    level.layers = max(level.layers, j + 1)
                elif kind == "attentions":
                    level.attention = True
                else:
                    level.sampler = True
            elif m := _MID.match(path + "."):
                if m[1] == "attentions":
                    layout.mid_attention = True
                else:
                    layout.mid_resnets = max(layout.mid_resnets, int(m[2]) + 1)
        return layout

    def prefixes(self) -> dict[str, str]:
        """{diffusers block prefix: SGM block prefix}, e.g. down_blocks.1.attentions.0 ->
        input_blocks.4.1."""
        out = {}
        k = 1
        for b in sorted(self.down):
            level = self.down[b]
            for j in range(level.layers):
                out[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{k}.0"
                if level.attention:
                    out[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{k}.1"
                k += 1
            if level.sampler:
                out[f"down_blocks.{b}.downsamplers.0"] = f"input_blocks.{k}.0"
                k += 1
        mid = ["resnets.0", "attentions.0", "resnets.1"] if self.mid_attention else \
            [f"resnets.{j}" for j in range(self.mid_resnets)]
        for i, part in enumerate(mid):
            out[f"mid_block.{part}"] = f"middle_block.{i}"
        k = 0
        for b in sorted(self.up):
            level = self.up[b]
            for j in range(level.layers):
                out[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{k}.0"
                if level.attention:
                    out[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{k}.1"
                if level.sampler and j == level.layers - 1:
                    out[f"up_blocks.{b}.upsamplers.0"] = \
                        f"output_blocks.{k}.{2 if level.attention else 1}"
                k += 1
        return out


def sgm_names(modules) -> dict[str, str]:
    """{diffusers module path: its SGM path} for the UNet modules given (those that have one)."""
    modules = list(modules)
    prefixes = UnetLayout.of(modules).prefixes()
    out = {}
    for path in modules:
        if path in _TOP:
            out[path] = _TOP[path]
            continue
        m = _BLOCK.match(path + ".") or _MID.match(path + ".")
        if not m:
            continue
        block = m[0][:-1]
        rest = path[len(block) + 1:]
        sgm = prefixes.get(block)
        if sgm is None:
            continue
        if ".resnets." in block:
            inner = _RESNET.get(rest)
        elif ".downsamplers." in block:
            inner = "op" if rest == "conv" else None
        elif ".upsamplers." in block:
            inner = "conv" if rest == "conv" else None
        else:  # attentions: the transformer's own names
            inner = rest
        if inner is not None:
            out[path] = f"{sgm}.{inner}"
    return out
