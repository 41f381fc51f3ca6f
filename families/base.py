"""Family: everything sdc knows about one kind of model, as data (torch-free).

A family names its stages in pipeline order with one GraphSpec each, how a prompt becomes the
UNet's conditioning (one or two tokenizers and text encoders, which output is used, whether a
pooled vector and SDXL's size/crop ids are added), the diffusers classes its components load with,
where those components sit inside a single-file checkpoint, its LoRA key prefixes, and its shipped
full-size configs. Export, fusion, the planner, the memory profiler and the runtime iterate this
description; no other module names a stage.

The manifest records `Family.describe()` (the `family` block); the runtime reads that block and
never the family modules' code paths, so the manifest stays the only build <-> run contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .graph_spec import ROLES, GraphSpec, ModelDims

DATA = Path(__file__).resolve().parent.parent / "export" / "data"


@dataclass(frozen=True)
class TextEncoder:
    """One tokenizer + text-encoder pair of a family's prompt encoding."""

    stage: str  # its graph
    tokenizer: str  # the tokenizer folder, in the model folder and in the build
    states: str  # the output holding per-token states (concatenated on the last axis)
    pooled: str | None = None  # the output holding a pooled vector (SDXL's text_embeds)
    kind: str = "clip"  # the tokenizer's kind: "clip" (BOS ... EOS, padded) or "t5" (... </s>)
    mask: str | None = None  # the graph input taking the attention mask (T5), if any


@dataclass(frozen=True)
class Family:
    name: str  # recorded as base_model.family and family.name
    title: str  # for messages: "SD1.x"
    specs: tuple[GraphSpec, ...]  # every stage, in pipeline order (the image encoder last)
    text_encoders: tuple[TextEncoder, ...]
    # diffusers component -> (library, class): what `sdc build` loads each one with
    components: dict
    # how the component configs give the symbolic shapes' constants
    dims: Callable[[dict], ModelDims]
    # the diffusers pipeline classes a model_index.json of this family names
    pipeline_classes: tuple[str, ...]
    # where each component's weights sit in an A1111/SGM single-file checkpoint
    ldm_prefixes: dict
    # LoRA key prefixes: kohya's (lora_unet_, lora_te_, ...) and diffusers'/peft's (unet., ...)
    kohya_prefixes: dict
    diffusers_prefixes: dict
    # shipped full-size configs (no weights) that single-file checkpoints are converted against;
    # the first is the default, the others are chosen with --config NAME
    configs: tuple[str, ...]
    # "text": encoder states only; "text_time": SDXL's pooled text_embeds and time_ids as well
    conditioning: str = "text"
    # "latent": denoise latents, decode with a VAE; "pixel": a cascade denoising pixels
    # (DeepFloyd IF), whose last denoiser's output is the image
    space: str = "latent"
    # (component, like): components whose LoRAs are keyed as `like`'s are (DeepFloyd IF stage
    # II's UNet: a LoRA saved by IFSuperResolutionPipeline names its layers unet.*)
    lora_alternates: tuple = ()

    def __post_init__(self):
        for spec in self.specs:
            if spec.role not in ROLES:
                raise AssertionError(f"{self.name}.{spec.stage}: role {spec.role!r}")

    # --- the stages -----------------------------------------------------------------------------

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s.stage for s in self.specs)

    def spec(self, stage: str) -> GraphSpec:
        for s in self.specs:
            if s.stage == stage:
                return s
        raise KeyError(stage)

    def by_role(self, role: str) -> list[GraphSpec]:
        return [s for s in self.specs if s.role == role]

    def one(self, role: str) -> str:
        (spec,) = self.by_role(role)
        return spec.stage

    @property
    def pipeline(self) -> tuple[str, ...]:
        """Stages of a text-to-image run, in order."""
        return tuple(s.stage for s in self.specs if s.role != "encode_image")

    def config_dir(self, name: str | None = None) -> Path:
        if not (name or self.configs):
            raise AssertionError(f"{self.name} ships no config set")
        return DATA / (name or self.configs[0])

    def describe(self, stages, zero_empty_negative: bool = False) -> dict:
        """The manifest's `family` block: what the runtime needs to run the built stages."""
        return {
            "name": self.name,
            "title": self.title,
            "roles": {s.stage: s.role for s in self.specs if s.stage in stages},
            "pipeline": list(self.pipeline),  # a text-to-image run's stages, built or not
            "text_encoders": [{"stage": t.stage, "tokenizer": t.tokenizer, "states": t.states,
                               **({"pooled": t.pooled} if t.pooled else {}),
                               **({"kind": t.kind} if t.kind != "clip" else {}),
                               **({"mask": t.mask} if t.mask else {})}
                              for t in self.text_encoders],
            "conditioning": self.conditioning,
            **({"space": self.space} if self.space != "latent" else {}),
            # SDXL's pipelines encode an empty negative prompt as zeros (model_index.json's
            # force_zeros_for_empty_prompt), not as the encoded empty string
            "zero_empty_negative": bool(zero_empty_negative),
        }
