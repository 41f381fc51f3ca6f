"""SDXL: two text encoders and added UNet conditioning.

The prompt goes through CLIP-L (`text_encoder`) and OpenCLIP-bigG (`text_encoder_2`, a
CLIPTextModelWithProjection), each tokenized by its own tokenizer (the second pads with `!`). The
UNet's context is both encoders' penultimate hidden states concatenated on the channel axis
(768 + 1280 = 2048); its added conditioning is bigG's pooled projection (`text_embeds`) and six
`time_ids` (original size, crop top-left, target size, in pixels), as diffusers'
StableDiffusionXLPipeline computes them. The VAE is SD's with scaling factor 0.13025; it overflows
fp16 like SD1's, so fp16 builds keep it fp32.
"""

from __future__ import annotations

from dataclasses import replace

from . import sd1
from .base import Family, TextEncoder
from .graph_spec import ModelDims, TensorSpec
from .sd1 import COMPONENTS, VAE_DECODER, VAE_ENCODER, latent_dims

TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)

# SD1's graphs, changed where SDXL differs (the VAE graphs are SD1's as they are)
TEXT_ENCODER = replace(
    sd1.TEXT_ENCODER, graph="clip_penultimate",
    outputs=(TensorSpec("hidden_states", ("batch", "sequence", "hidden_size"), "float32"),),
    description="CLIP-L text encoder: token ids -> penultimate-layer hidden states")

TEXT_ENCODER_2 = replace(
    sd1.TEXT_ENCODER, stage="text_encoder_2", component="text_encoder_2",
    graph="clip_penultimate_pooled",
    outputs=(TensorSpec("hidden_states", ("batch", "sequence", "hidden_size_2"), "float32"),
             TensorSpec("text_embeds", ("batch", "pooled_size"), "float32")),
    description="OpenCLIP-bigG text encoder: token ids -> penultimate hidden states and the "
                "pooled projection")

UNET = replace(
    sd1.UNET, graph="unet_text_time",
    inputs=(*sd1.UNET.inputs[:2],
            TensorSpec("encoder_hidden_states", ("batch", "sequence", "cross_attention_dim"),
                       "float32"),
            TensorSpec("text_embeds", ("batch", "pooled_size"), "float32"),
            TensorSpec("time_ids", ("batch", "time_ids"), "float32")),
    dynamic_axes={**sd1.UNET.dynamic_axes, "text_embeds": {0: "batch"}, "time_ids": {0: "batch"}},
    description="denoiser: noisy latents, timestep, both encoders' states, pooled text and "
                "size/crop ids -> predicted noise")


def dims(configs: dict) -> ModelDims:
    te, te2, unet = configs["text_encoder"], configs["text_encoder_2"], configs["unet"]
    return ModelDims(
        hidden_size=int(te["hidden_size"]), vocab_size=int(te["vocab_size"]),
        max_sequence=int(te.get("max_position_embeddings", 77)),
        **latent_dims(unet, configs["vae"]),
        hidden_size_2=int(te2["hidden_size"]), pooled_size=int(te2["projection_dim"]),
        cross_attention_dim=int(unet["cross_attention_dim"]), time_ids=TIME_IDS)


SDXL = Family(
    name="sdxl",
    title="SDXL",
    specs=(TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER, VAE_ENCODER),
    text_encoders=(TextEncoder("text_encoder", "tokenizer", "hidden_states"),
                   TextEncoder("text_encoder_2", "tokenizer_2", "hidden_states", "text_embeds")),
    components={**COMPONENTS, "text_encoder_2": ("transformers", "CLIPTextModelWithProjection")},
    dims=dims,
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    ldm_prefixes={"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                  "text_encoder": "conditioner.embedders.0.transformer.",
                  "text_encoder_2": "conditioner.embedders.1.model."},
    kohya_prefixes={"unet": "lora_unet_", "text_encoder": "lora_te1_",
                    "text_encoder_2": "lora_te2_"},
    diffusers_prefixes={"unet": "unet.", "text_encoder": "text_encoder.",
                        "text_encoder_2": "text_encoder_2."},
    configs=("sdxl",),
    conditioning="text_time",
)
