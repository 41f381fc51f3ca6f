"""One generic torch -> ONNX exporter driven by a GraphSpec.

Each stage is wrapped in a small nn.Module whose forward takes the spec's inputs in order and
returns its single output, casting float32 graph boundaries to the module's dtype and back. The
dynamo exporter runs with `optimize=False` so every weight stays an initializer named by its module
path (`unet.down_blocks.0.attentions.0.proj_in.weight`); the manifest records the exact map so LoRA
adapters can be re-fused later without torch (ORT `add_external_initializers`). Weights are
always stored as external data (`model.onnx_data`) for the same reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir
import torch

from .quiet import quiet_torch_stack
from ..families.graph_spec import GraphSpec, ModelDims

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
OPSET = 18


class TextEncoderGraph(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids, return_dict=True)
        return out.last_hidden_state.float()


class PenultimateTextGraph(torch.nn.Module):
    """SDXL's use of CLIP: the hidden states before the last layer (no final layer norm)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-2].float()


class PenultimatePooledTextGraph(PenultimateTextGraph):
    """SDXL's second encoder: penultimate states and the pooled projection (text_embeds)."""

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-2].float(), out.text_embeds.float()


class T5Graph(torch.nn.Module):
    """DeepFloyd IF's T5 encoder: token ids and their attention mask -> last hidden states."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids, attention_mask):
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                return_dict=True)
        return out.last_hidden_state.float()


class UNetGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        dt = self.unet.dtype
        out = self.unet(sample.to(dt), timestep, encoder_hidden_states.to(dt), return_dict=False)[0]
        return out.float()


class TextTimeUNetGraph(UNetGraph):
    """SDXL's UNet: added conditioning from the pooled text and the size/crop ids."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        dt = self.unet.dtype
        cond = {"text_embeds": text_embeds.to(dt), "time_ids": time_ids.to(dt)}
        out = self.unet(sample.to(dt), timestep, encoder_hidden_states.to(dt),
                        added_cond_kwargs=cond, return_dict=False)[0]
        return out.float()


class ClassLabelsUNetGraph(UNetGraph):
    """DeepFloyd IF stage II: the noise level of the upscaled image as `class_labels`."""

    def forward(self, sample, timestep, encoder_hidden_states, class_labels):
        dt = self.unet.dtype
        out = self.unet(sample.to(dt), timestep, encoder_hidden_states.to(dt),
                        class_labels=class_labels, return_dict=False)[0]
        return out.float()


class VaeDecoderGraph(torch.nn.Module):
    """post_quant_conv + decoder; the runtime divides by scaling_factor before feeding it."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        dt = self.vae.dtype
        return self.vae.decode(latent_sample.to(dt), return_dict=False)[0].float()


class VaeEncoderGraph(torch.nn.Module):
    """encoder + quant_conv: the Gaussian's parameters, so the runtime may sample or take the mean."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        h = self.vae.encoder(sample.to(self.vae.dtype))
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h)
        return h.float()


# GraphSpec.graph -> its wrapper, and the attribute the wrapper stores its component under
# (stripped from parameter names to give module paths).
GRAPH_MODULES = {
    "clip_last": (TextEncoderGraph, "text_encoder."),
    "clip_penultimate": (PenultimateTextGraph, "text_encoder."),
    "clip_penultimate_pooled": (PenultimatePooledTextGraph, "text_encoder."),
    "t5": (T5Graph, "text_encoder."),
    "unet": (UNetGraph, "unet."),
    "unet_class_labels": (ClassLabelsUNetGraph, "unet."),
    "unet_text_time": (TextTimeUNetGraph, "unet."),
    "vae_decoder": (VaeDecoderGraph, "vae."),
    "vae_encoder": (VaeEncoderGraph, "vae."),
}


def wrap(spec: GraphSpec, component) -> torch.nn.Module:
    return GRAPH_MODULES[spec.graph][0](component).eval()


def export_graph(spec: GraphSpec, graph: torch.nn.Module, dims: ModelDims, out_dir: Path) -> dict:
    """Export `graph` (a wrapped component) to out_dir/model.onnx(+_data); returns manifest facts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    case = spec.case_dims(dims)["trace"]
    feeds = spec.dummy_inputs(dims, case)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    extra = {}
    if spec.fused_attention:
        from .attention import fused_attention_table

        extra["custom_translation_table"] = fused_attention_table()
    with torch.no_grad(), quiet_torch_stack():
        program = torch.onnx.export(
            graph, args, dynamo=True, opset_version=OPSET, optimize=False, verbose=False,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes={name: axes for name, axes in spec.dynamic_axes.items()}, **extra,
        )
    # Save through onnx_ir, which streams tensors straight to the data file: converting to a
    # ModelProto first would hold a second full copy of the weights (7.2 vs 3.8 GiB peak for the
    # fp32 SD1.5 UNet, measured by bench/build_fullsize.py).
    model = program.model
    _name_output_dims(model, spec, dims)
    onnx_ir.save(model, out_dir / ONNX_FILE, external_data=DATA_FILE, size_threshold_bytes=1024)
    os.chmod(out_dir / DATA_FILE, 0o644)  # artifacts are shared read-only data
    weights = _weight_map(spec, graph, set(model.graph.initializers))
    del program, model
    weights["data"] = _external_data_table(out_dir / ONNX_FILE, set(weights["map"].values()))
    weights["data_file"] = DATA_FILE
    return {"weights": weights}


def _external_data_table(onnx_path: Path, names: set[str]) -> dict:
    """{initializer: [offset, length, dtype, shape]} for the mapped weights stored in the data file,
    so torch-free tools (LoRA re-fuse, run-time swap) read and patch them with numpy alone."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    table = {}
    for init in proto.graph.initializer:
        if init.name not in names or init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        if info.get("location") != DATA_FILE:
            continue
        table[init.name] = [int(info.get("offset", 0)), int(info["length"]),
                            numpy_dtype(init.data_type), list(init.dims)]
    return table


def _name_output_dims(model, spec: GraphSpec, dims: ModelDims) -> None:
    """The exporter names output dims by arithmetic (`2*((latent_height - 1)//2) + 2`); write the
    spec's names instead, which hold for every input the manifest admits (multiples of
    unet_multiple), so the graph's declared schema reads like the manifest."""
    for out, spec_out in zip(model.graph.outputs, spec.outputs):
        out.shape = onnx_ir.Shape(spec_out.resolve(dims)["shape"])


def _weight_map(spec: GraphSpec, graph: torch.nn.Module, inits: set[str]) -> dict:
    """{component parameter path: ONNX initializer name}, exact, for every parameter kept."""
    prefix = GRAPH_MODULES[spec.graph][1]
    mapping, dropped = {}, []
    for name, _ in graph.named_parameters():
        key = name.removeprefix(prefix)
        if name in inits:
            mapping[key] = name
        else:
            dropped.append(key)  # e.g. the VAE encoder's graph has no decoder weights
    out = {"map": mapping, "count": len(mapping), "not_in_graph": len(dropped)}
    if spec.adapter_slots:  # e.g. the last CLIP layer, under SDXL's penultimate-layer output:
        out["unused"] = sorted(dropped)  # LoRA keys for these are accepted and change nothing
    return out


def numpy_dtype(elem_type: int) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
