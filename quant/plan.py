"""Which format each stage and each weight gets: the recipe, the kept layers, the layer groups.

Stage formats come from `--precision` (one recipe per format) and `--stage-precision` overrides.
The int4 recipe is the seeds' extreme-compression one: the UNet 4-bit, the text encoder 8-bit
(sdc keeps it, as the seeds do; `--stage-precision text_encoder=int4` is there to measure), the VAE with fp16 weights computed in fp32 (its
pixels are the image; fp16 *activations* overflow, fp16 weights do not).

Inside a quantized graph some layers are kept in 16 bits by default, as stable-diffusion.cpp and
the seeds do, and each is named in the manifest with its reason: the UNet's time embedding (every
block reads it), conv_in/conv_out (the latent interface, a few thousand weights), the VAE's
(post_)quant_conv, the text encoder's position embedding. An embedding table is quantized at
8 bits at most (per row). Norms and biases are never touched (they are not Conv/MatMul weights).

Layer groups, the unit of the quality search: a weight's module path cut after its last index
(`down_blocks.1.resnets.0`, `encoder.layers.7`, `decoder.up_blocks.2.resnets.1`), or its first
component when it has none (`conv_in`, `time_embedding`).
"""

from __future__ import annotations

from ..errors import SdcError
from . import formats as fm

# By stage role (families/graph_spec.py ROLES), so every family's text encoders, UNet and VAE
# graphs get the same treatment.
RECIPES = {
    "fp16": {"*": "fp16"},
    "fp32": {},
    "int8": {"text": "int8", "denoise": "int8", "upscale": "int8", "decode": "fp16",
             "encode_image": "fp16"},
    "int4": {"text": "int8", "denoise": "int4", "upscale": "int4", "decode": "fp16",
             "encode_image": "fp16"},
    # CPU speed (quant/static.py): the UNets and the VAE decoder on 8-bit activations and
    # weights, computed by the integer kernels (the decoder falls back to fp16 weights where its
    # gate refuses w8a8: FALLBACK); text encoder int8 weights; the VAE encoder (img2img only)
    # keeps float arithmetic
    "w8a8": {"text": "int8", "denoise": "w8a8", "upscale": "w8a8", "decode": "w8a8",
             "encode_image": "fp16"},
}

# (recipe, role) -> the format a stage the *recipe* put in w8a8 falls back to when its gate
# refuses it, said in the log and recorded in the manifest (graphs.<stage>.quantization.
# fallback). The decoder's pixels are the image, and a trained decoder's activation outliers
# may not fit one 8-bit scale per tensor (the full-size architecture with random weights measures
# 46-49 dB on real latents, 30.4-33.5 dB on the gate's random ones, so it is the gate that
# decides, per model). A stage the user names in --stage-precision is refused instead, as every
# quantized graph is.
FALLBACK = {("w8a8", "decode"): "fp16"}


# (path component, reason): weights under a module with this name stay in 16 bits.
KEPT = (
    ("time_embedding", "time embedding: every block reads it"),
    ("conv_in", "conv_in: the latent interface, a few thousand weights"),
    ("conv_out", "conv_out: the latent interface, a few thousand weights"),
    ("quant_conv", "VAE quant_conv: the latent interface"),
    ("post_quant_conv", "VAE post_quant_conv: the latent interface"),
    ("position_embedding", "position embedding: 77 rows, read by every token"),
)


def parse_stage_precision(text: str | None, stages) -> dict[str, str]:
    """'text_encoder=int8,unet=int4' -> {stage: format}; unknown stage or format is refused."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        stage, sep, fmt = item.partition("=")
        stage, fmt = stage.strip(), fmt.strip()
        if not sep or not stage or not fmt:
            raise SdcError(f"--stage-precision {item!r}: expected STAGE=FORMAT, e.g. unet=int4")
        if stage not in stages:
            raise SdcError(f"--stage-precision: no stage {stage!r} in this build; expected one "
                           f"of {', '.join(stages)}")
        fm.get(fmt)
        out[stage] = fmt
    return out


def _roles(stages) -> dict[str, str]:
    """{stage: role}: a build's `family.roles`, or stage names of the default (SD1) family."""
    if isinstance(stages, dict):
        return stages
    from ..families import SD1

    return {s: SD1.spec(s).role for s in stages}


def _recipe_format(recipe: dict, role: str) -> str:
    return recipe.get(role, recipe.get("*", "fp32"))


def stage_formats(precision: str | None, overrides: dict[str, str], stages) -> dict[str, str]:
    """{stage: format}; `stages` is the build's {stage: role} (or SD1 stage names)."""
    if precision is not None and precision not in RECIPES:
        raise SdcError(f"--precision {precision}: expected one of {', '.join(RECIPES)}")
    recipe = RECIPES[precision or "fp32"]
    out = {s: _recipe_format(recipe, role) for s, role in _roles(stages).items()}
    out.update(overrides)
    return out


def fallback(precision: str | None, role: str, overrides: dict[str, str], stage: str
             ) -> str | None:
    """The format `stage` falls back to when its gate refuses the recipe's, or None (refused)."""
    return None if stage in overrides else FALLBACK.get((precision, role))


def label(formats: dict[str, str], roles: dict[str, str] | None = None) -> str:
    """The build's precision label: the recipe name it matches, else 'mixed'."""
    roles = roles or _roles(list(formats))
    for name, recipe in RECIPES.items():
        if all(formats[s] == _recipe_format(recipe, roles[s]) for s in formats):
            return name
    return "mixed"


def group_of(path: str) -> str:
    parts = path.split(".")
    head = parts[:-2]
    last = max((i for i, p in enumerate(head) if p.isdigit()), default=-1)
    return ".".join(parts[:last + 1]) if last >= 0 else parts[0]


def kept_reason(path: str) -> str | None:
    parts = set(path.split(".")[:-1])
    return next((why for name, why in KEPT if name in parts), None)


def weight_format(stage_fmt: str, path: str, kind: str) -> tuple[str, str | None]:
    """(format, reason kept or None) for one weight of a stage whose format is `stage_fmt`."""
    if not fm.get(stage_fmt).quantized:
        return stage_fmt, None
    why = kept_reason(path)
    if why:
        return "fp16", why
    if kind == "gather" and stage_fmt == "int4":
        return "int8", "embedding table: 8 bits per row at most"
    return stage_fmt, None
