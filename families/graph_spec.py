"""GraphSpec: the I/O contract of one exported graph. Each family (families/sd1.py, ...) declares
one per stage; export, the parity gate, the manifest and (through the manifest) the runtime read
them, and nobody else states a graph's names, shapes or dtypes. Shapes are symbolic: dynamic dims are named
(`batch`, `sequence`, `latent_height`, ...) and model constants (`hidden_size`, `latent_channels`,
`vae_scale_factor`) are resolved from the model's own config at build time, so one spec serves the
tiny test model and full-size SD1.5 alike.

I/O names follow Optimum's convention so tools that read Optimum's layout read ours (SD1):
  text_encoder  input_ids -> last_hidden_state
  unet          sample, timestep, encoder_hidden_states -> out_sample
  vae_decoder   latent_sample -> sample
  vae_encoder   sample -> latent_parameters (mean and log-variance, concatenated on channels)
Other families add their own (SDXL: hidden_states, text_embeds, time_ids).

Graph boundaries are float32 (int64 for token ids) at every precision: an fp16 graph casts inside
itself, so the numpy runtime's scheduler math never handles fp16 and one runtime serves both.

This module is torch-free (the runtime may import it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# What a stage does in the pipeline; the runtime, planner and memory profiler dispatch on it.
# "upscale": a cascade's super-resolution denoiser (DeepFloyd IF stage II), conditioned on the
# previous stage's image as well as the text.
ROLES = ("text", "denoise", "upscale", "decode", "encode_image")


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
    # Families with more than one text encoder or added UNet conditioning (SDXL); None elsewhere,
    # and then absent from the manifest.
    hidden_size_2: int | None = None  # the second text encoder's width (1280 for SDXL's bigG)
    pooled_size: int | None = None  # its pooled projection (SDXL's text_embeds, 1280)
    cross_attention_dim: int | None = None  # the UNet's context width when not hidden_size (2048)
    time_ids: int | None = None  # SDXL's micro-conditioning: original size, crop, target size (6)
    # Pixel cascades (DeepFloyd IF): the super-resolution stage's size over stage I's (4: 64 ->
    # 256 px); None elsewhere.
    upscale_factor: int | None = None
    upscale_multiple: int | None = None  # sizes the super-resolution UNet takes are multiples

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


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
    role: str  # ROLES: text | denoise | decode | encode_image
    graph: str  # how export wraps the component (export/exporter.py GRAPH_MODULES)
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
    # the ModelDims constant the graph's spatial sizes are multiples of (parity cases, traces)
    multiple: str = "unet_multiple"
    fp32_max_rel: float = 1e-4  # max|onnx - torch| / max|torch|; exporter noise is ~1e-6
    fp16_min_psnr: float = 35.0  # dB vs the fp32 torch output; Apple's conversion gate
    description: str = ""

    def case_dims(self, dims: ModelDims) -> dict:
        """Symbolic dims for the export trace and the parity cases.

        The trace uses batch 2 and distinct sizes per dim: a size-1 (or repeated) dim can be
        specialised to a constant by the exporter. Parity runs one square case at batch 2 and one
        non-square case at batch 1, so a graph that only works at its trace shape is caught.
        """
        m = int(getattr(dims, self.multiple))
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
        consts = {**dims.as_dict(), **case}
        out = []
        for d in spec.shape:
            if isinstance(d, int):
                out.append(d)
                continue
            n = 1
            for factor in d.split("*"):  # "latent_channels*2": products of names and numbers
                n *= int(factor) if factor.isdigit() else int(consts[factor])
            out.append(n)
        return tuple(out)

    def dummy_inputs(self, dims: ModelDims, case: dict, seed: int = 0) -> dict[str, np.ndarray]:
        """Deterministic inputs in the value ranges the pipeline feeds each graph."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for spec in self.inputs:
            shape = self.input_shape(spec, dims, case)
            if spec.name == "input_ids":
                feeds[spec.name] = rng.integers(0, dims.vocab_size, size=shape, dtype=np.int64)
            elif spec.name == "attention_mask":  # T5: a run of real tokens, then padding
                lengths = rng.integers(1, shape[1] + 1, size=shape[0])
                feeds[spec.name] = (np.arange(shape[1])[None] < lengths[:, None]).astype(np.int64)
            elif spec.name in ("timestep", "class_labels"):  # class_labels: IF's noise level
                feeds[spec.name] = rng.uniform(0, 999, size=shape).astype(np.float32)
            elif spec.name == "time_ids":  # sizes and crop offsets in pixels
                feeds[spec.name] = rng.uniform(0, 1024, size=shape).round().astype(np.float32)
            elif spec.name == "sample" and self.role == "encode_image":
                feeds[spec.name] = rng.uniform(-1, 1, size=shape).astype(np.float32)  # pixels
            elif spec.name == "latent_sample":
                # what the pipeline hands the decoder: unit-variance latents / scaling_factor
                noise = rng.standard_normal(size=shape) / dims.scaling_factor
                feeds[spec.name] = noise.astype(np.float32)
            else:
                feeds[spec.name] = rng.standard_normal(size=shape).astype(np.float32)
        return feeds
