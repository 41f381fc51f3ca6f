"""DeepFloyd IF: a pixel-space cascade (no VAE).

A T5 encoder (`T5EncoderModel`, 77 tokens, with its attention mask) conditions two UNets that
denoise *pixels*:

  text_encoder  T5: input_ids, attention_mask -> last_hidden_state (4096 wide for IF's XXL)
  unet          stage I: 3-channel noisy image at 64 px -> 6 channels (noise and the learned
                variance's interpolation value, `learned_range`); the UNet projects T5's states
                itself (`encoder_hid_dim`) and pools them into its time embedding
                (`addition_embed_type="text"`), with added-KV attention
  unet_2        stage II (super-resolution, 4x): the noisy 256 px image and stage I's image,
                upscaled and noised to `noise_level`, stacked on channels (6 in), the noise level
                as `class_labels` -> 6 channels

Stage I comes from an IF-I diffusers folder (IFPipeline), stage II from an IF-II folder
(IFSuperResolutionPipeline, `sdc build --upscaler DIR`); each has its own DDPM scheduler, and
stage II a second one that noises the upscaled image. The runtime (runtime/cascade.py) runs
prompt -> T5 -> stage I -> stage II -> PNG with one stage resident at a time.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .base import Family, TextEncoder
from .graph_spec import GraphSpec, ModelDims, TensorSpec

_IMAGE = ("batch", "latent_channels", "latent_height", "latent_width")
_IMAGE_2 = ("batch", "latent_channels*2", "latent_height", "latent_width")  # image + variance

TEXT_ENCODER = GraphSpec(
    stage="text_encoder",
    component="text_encoder",
    role="text",
    graph="t5",
    inputs=(TensorSpec("input_ids", ("batch", "sequence"), "int64"),
            TensorSpec("attention_mask", ("batch", "sequence"), "int64")),
    outputs=(TensorSpec("last_hidden_state", ("batch", "sequence", "hidden_size"), "float32"),),
    dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                  "attention_mask": {0: "batch", 1: "sequence"}},
    description="T5 encoder: token ids and their mask -> per-token hidden states",
)

UNET = GraphSpec(
    stage="unet",
    component="unet",
    role="denoise",
    graph="unet",
    inputs=(TensorSpec("sample", _IMAGE, "float32"),
            TensorSpec("timestep", ("batch",), "float32"),
            TensorSpec("encoder_hidden_states", ("batch", "sequence", "hidden_size"), "float32")),
    outputs=(TensorSpec("out_sample", _IMAGE_2, "float32"),),
    dynamic_axes={"sample": {0: "batch", 2: "latent_height", 3: "latent_width"},
                  "timestep": {0: "batch"},
                  "encoder_hidden_states": {0: "batch", 1: "sequence"}},
    fused_attention=True,
    adapter_slots=True,
    description="stage I: noisy 64 px image, timestep, T5 states -> noise and learned variance",
)

# stage I's graph with the image input doubled (noisy image + noised upscaled stage I) and the
# noise level as class_labels
UNET_2 = replace(
    UNET,
    stage="unet_2",
    component="unet_2",
    role="upscale",
    graph="unet_class_labels",
    inputs=(TensorSpec("sample", _IMAGE_2, "float32"), *UNET.inputs[1:],
            TensorSpec("class_labels", ("batch",), "float32")),
    dynamic_axes={**UNET.dynamic_axes, "class_labels": {0: "batch"}},
    multiple="upscale_multiple",
    description="stage II: noisy 256 px image stacked with the noised, upscaled stage I image, "
                "timestep, T5 states, noise level -> noise and learned variance",
)


def _multiple(unet: dict) -> int:
    return 2 ** (len(unet["block_out_channels"]) - 1)


def dims(configs: dict) -> ModelDims:
    te, unet = configs["text_encoder"], configs["unet"]
    multiple = _multiple(unet)
    factor = multiple_2 = None
    if "unet_2" in configs:  # stage II sizes must suit its own UNet too
        unet_2 = configs["unet_2"]
        factor = max(1, int(unet_2.get("sample_size", 256)) // int(unet.get("sample_size", 64)))
        multiple_2 = _multiple(unet_2)
        multiple = math.lcm(multiple, -(-multiple_2 // factor))
    return ModelDims(hidden_size=int(te["d_model"]), vocab_size=int(te["vocab_size"]),
                     max_sequence=77, latent_channels=int(unet["in_channels"]),
                     vae_scale_factor=1, unet_multiple=multiple, scaling_factor=1.0,
                     upscale_factor=factor, upscale_multiple=multiple_2)


DEEPFLOYD = Family(
    name="deepfloyd",
    title="DeepFloyd IF",
    specs=(TEXT_ENCODER, UNET, UNET_2),
    text_encoders=(TextEncoder("text_encoder", "tokenizer", "last_hidden_state", kind="t5",
                               mask="attention_mask"),),
    components={"text_encoder": ("transformers", "T5EncoderModel"),
                "unet": ("diffusers", "UNet2DConditionModel"),
                "unet_2": ("diffusers", "UNet2DConditionModel")},
    dims=dims,
    pipeline_classes=("IFPipeline",),
    ldm_prefixes={},
    kohya_prefixes={"unet": "lora_unet_"},
    diffusers_prefixes={"unet": "unet."},
    configs=(),
    space="pixel",
    lora_alternates=(("unet_2", "unet"),),
)

# the folder of an IF-II download: what `--upscaler` names
UPSCALER_PIPELINES = ("IFSuperResolutionPipeline",)
# components read from the upscaler folder: {ours: its}
UPSCALER_COMPONENTS = {"unet_2": "unet"}
