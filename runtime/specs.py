"""GraphSpec: the I/O contract of each exported graph, one per stage.

Export, the parity gate, the manifest and (through the manifest) the runtime all read these; nobody
else states a graph's names, shapes or dtypes. Shapes are symbolic: dynamic dims are named
(`batch`, `sequence`, `latent_height`, ...) and model constants (`hidden_size`, `latent_channels`,
`vae_scale_factor`) are resolved from the model's own config at build time, so one spec serves the
tiny test model and full-size SD1.5 alike.

I/O names follow Optimum's convention so tools that read Optimum's layout read ours:
  text_encoder  input_ids -> last_hidden_state
  unet          sample, timestep, encoder_hidden_states -> out_sample
  vae_decoder   latent_sample -> sample
  vae_encoder   sample -> latent_parameters (mean and log-variance, concatenated on channels)

Graph boundaries are float32 (int64 for token ids) at every precision: an fp16 graph casts inside
itself, so the numpy runtime's scheduler math never handles fp16 and one runtime serves both.

This module is torch-free (the runtime may import it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STAGES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


@dataclass(frozen=True)
class ModelDims:
    """Model constants the symbolic shapes refer to; read from the component configs."""

    hidden_size: int  # text encoder width = UNet cross-attention dim (768 for SD1.x)
    vocab_size: int  # 49408 for CLIP
    max_sequence: int  # 77: CLIP's position embeddings
    latent_channels: int  # 4 for SD1.x
    vae_scale_factor: int  # pixels per latent (8 for SD1.x)
    unet_multiple: int  # latent sizes must be multiples of this (2 ** (UNet levels - 1))
    scaling_factor: float  # latents = vae.encode(x) * scaling_factor (0.18215 for SD1.x)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, dynamic dim names, model-constant names, or "<dim>*<const>" products
    dtype: str  # numpy dtype name

    def resolve(self, dims: ModelDims) -> dict:
        """The shape with model constants filled in, as written to the manifest."""
        consts = dims.as_dict()
        out = []
        for d in self.shape:
            if not isinstance(d, str):
                out.append(d)
                continue
            numeric, symbols = 1, []
            for factor in d.split("*"):
                if factor in consts:
                    numeric *= int(consts[factor])
                elif factor.isdigit():
                    numeric *= int(factor)
                else:
                    symbols.append(factor)
            out.append("*".join(symbols + ([str(numeric)] if numeric != 1 else [])) if symbols
                       else numeric)
        return {"name": self.name, "shape": out, "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    stage: str  # also the artifact folder, manifest key, runtime session name, log prefix
    component: str  # the diffusers component the graph is cut from
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Dynamic dims per input: {input name: {axis: dim name}}; read by the exporter.
    dynamic_axes: dict
    # fp16 builds keep this graph fp32 when "fp32": the SD VAE decoder overflows fp16 on some
    # latents (NaN/black images), a known failure of fp16-as-a-final-cast.
    fp16_policy: str = "fp16"
    # attention as onnxruntime's fused MultiHeadAttention (export/attention.py) instead of
    # MatMul-Softmax-MatMul: no full score matrix (1 GiB per SD1.5 self-attention at 512 px)
    fused_attention: bool = False
    # LoRA-targetable weights (Linear, 1x1 Conv) as overridable inputs: a warm runtime binds an
    # adapter's fused weights instead of creating a session per adapter (export/adapter_slots.py)
    adapter_slots: bool = False
    fp32_max_rel: float = 1e-4  # max|onnx - torch| / max|torch|; exporter noise is ~1e-6
    fp16_min_psnr: float = 35.0  # dB vs the fp32 torch output; Apple's conversion gate
    description: str = ""

    def case_dims(self, dims: ModelDims) -> dict:
        """Symbolic dims for the export trace and the parity cases.

        The trace uses batch 2 and distinct sizes per dim: a size-1 (or repeated) dim can be
        specialised to a constant by the exporter. Parity runs one square case at batch 2 and one
        non-square case at batch 1, so a graph that only works at its trace shape is caught.
        """
        m = dims.unet_multiple
        f = dims.vae_scale_factor
        lat = {
            "trace": (2, 2 * m, 3 * m),
            "square": (2, 4 * m, 4 * m),
            "non_square": (1, 3 * m, 5 * m),
        }
        cases = {}
        for name, (b, h, w) in lat.items():
            seq = dims.max_sequence if name != "non_square" else max(8, dims.max_sequence // 4)
            if name == "trace":
                seq = dims.max_sequence - 1  # distinct from every other dim
            cases[name] = {"batch": b, "sequence": seq, "latent_height": h, "latent_width": w,
                           "height": h * f, "width": w * f}
        return cases

    def input_shape(self, spec: TensorSpec, dims: ModelDims, case: dict) -> tuple[int, ...]:
        consts = dims.as_dict()
        return tuple(d if isinstance(d, int) else case[d] if d in case else int(consts[d])
                     for d in spec.shape)

    def dummy_inputs(self, dims: ModelDims, case: dict, seed: int = 0) -> dict[str, np.ndarray]:
        """Deterministic inputs in the value ranges the pipeline feeds each graph."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for spec in self.inputs:
            shape = self.input_shape(spec, dims, case)
            if spec.name == "input_ids":
                feeds[spec.name] = rng.integers(0, dims.vocab_size, size=shape, dtype=np.int64)
            elif spec.name == "timestep":
                feeds[spec.name] = rng.uniform(0, 999, size=shape).astype(np.float32)
            elif spec.name == "sample" and self.stage == "vae_encoder":
                feeds[spec.name] = rng.uniform(-1, 1, size=shape).astype(np.float32)  # pixels
            elif spec.name == "latent_sample":
                # what the pipeline hands the decoder: unit-variance latents / scaling_factor
                noise = rng.standard_normal(size=shape) / dims.scaling_factor
                feeds[spec.name] = noise.astype(np.float32)
            else:
                feeds[spec.name] = rng.standard_normal(size=shape).astype(np.float32)
        return feeds


TEXT_ENCODER = GraphSpec(
    stage="text_encoder",
    component="text_encoder",
    inputs=(TensorSpec("input_ids", ("batch", "sequence"), "int64"),),
    outputs=(TensorSpec("last_hidden_state", ("batch", "sequence", "hidden_size"), "float32"),),
    dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}},
    adapter_slots=True,
    description="CLIP text encoder: token ids -> per-token hidden states (UNet conditioning)",
)

UNET = GraphSpec(
    stage="unet",
    component="unet",
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
    inputs=(TensorSpec("sample", ("batch", 3, "height", "width"), "float32"),),
    outputs=(
        TensorSpec("latent_parameters", ("batch", "latent_channels*2", "latent_height",
                                         "latent_width"), "float32"),
    ),
    dynamic_axes={"sample": {0: "batch", 2: "height", 3: "width"}},
    fp16_policy="fp32",
    description="VAE encoder (encoder + quant_conv): pixels -> latent mean and log-variance",
)

GRAPH_SPECS: dict[str, GraphSpec] = {s.stage: s for s in (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)}
