"""SD1.x (and the built-in sdc-tiny): one CLIP text encoder, a cross-attention UNet, a KL VAE."""

from __future__ import annotations

from .base import Family, TextEncoder
from .graph_spec import GraphSpec, ModelDims, TensorSpec

TEXT_ENCODER = GraphSpec(
    stage="text_encoder",
    component="text_encoder",
    role="text",
    graph="clip_last",
    inputs=(TensorSpec("input_ids", ("batch", "sequence"), "int64"),),
    outputs=(TensorSpec("last_hidden_state", ("batch", "sequence", "hidden_size"), "float32"),),
    dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}},
    adapter_slots=True,
    description="CLIP text encoder: token ids -> per-token hidden states (UNet conditioning)",
)

UNET = GraphSpec(
    stage="unet",
    component="unet",
    role="denoise",
    graph="unet",
    inputs=(
        TensorSpec("sample", ("batch", "latent_channels", "latent_height", "latent_width"), "float32"),
        TensorSpec("timestep", ("batch",), "float32"),
        TensorSpec("encoder_hidden_states", ("batch", "sequence", "hidden_size"), "float32"),
    ),
    outputs=(
        TensorSpec("out_sample", ("batch", "latent_channels", "latent_height", "latent_width"),
                   "float32"),
    ),
    dynamic_axes={
        "sample": {0: "batch", 2: "latent_height", 3: "latent_width"},
        "timestep": {0: "batch"},
        "encoder_hidden_states": {0: "batch", 1: "sequence"},
    },
    fused_attention=True,
    adapter_slots=True,
    description="denoiser: noisy latents, timestep, text states -> predicted noise (or v)",
)

VAE_DECODER = GraphSpec(
    stage="vae_decoder",
    component="vae",
    role="decode",
    graph="vae_decoder",
    inputs=(
        TensorSpec("latent_sample", ("batch", "latent_channels", "latent_height", "latent_width"),
                   "float32"),
    ),
    outputs=(
        TensorSpec("sample", ("batch", 3, "latent_height*vae_scale_factor",
                              "latent_width*vae_scale_factor"), "float32"),
    ),
    dynamic_axes={"latent_sample": {0: "batch", 2: "latent_height", 3: "latent_width"}},
    fp16_policy="fp32",
    description="VAE decoder (post_quant_conv + decoder): unscaled latents -> pixels in [-1, 1]",
)

VAE_ENCODER = GraphSpec(
    stage="vae_encoder",
    component="vae",
    role="encode_image",
    graph="vae_encoder",
    inputs=(TensorSpec("sample", ("batch", 3, "height", "width"), "float32"),),
    outputs=(
        TensorSpec("latent_parameters", ("batch", "latent_channels*2", "latent_height",
                                         "latent_width"), "float32"),
    ),
    dynamic_axes={"sample": {0: "batch", 2: "height", 3: "width"}},
    fp16_policy="fp32",
    description="VAE encoder (encoder + quant_conv): pixels -> latent mean and log-variance",
)

COMPONENTS = {
    "text_encoder": ("transformers", "CLIPTextModel"),
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}


def latent_dims(unet: dict, vae: dict) -> dict:
    return {
        "latent_channels": int(vae.get("latent_channels", 4)),
        "vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1),
        "unet_multiple": 2 ** (len(unet["block_out_channels"]) - 1),
        "scaling_factor": float(vae.get("scaling_factor", 0.18215)),
    }


def dims(configs: dict) -> ModelDims:
    te = configs["text_encoder"]
    return ModelDims(hidden_size=int(te["hidden_size"]), vocab_size=int(te["vocab_size"]),
                     max_sequence=int(te.get("max_position_embeddings", 77)),
                     **latent_dims(configs["unet"], configs["vae"]))


SD1 = Family(
    name="sd1",
    title="SD1.x",
    specs=(TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER),
    text_encoders=(TextEncoder("text_encoder", "tokenizer", "last_hidden_state"),),
    components=COMPONENTS,
    dims=dims,
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    ldm_prefixes={"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                  "text_encoder": "cond_stage_model.transformer."},
    kohya_prefixes={"unet": "lora_unet_", "text_encoder": "lora_te_"},
    diffusers_prefixes={"unet": "unet.", "text_encoder": "text_encoder."},
    configs=("sd15",),
)
