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
import torch

from .quiet import quiet_torch_stack
from .specs import GraphSpec, ModelDims

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


class UNetGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        dt = self.unet.dtype
        out = self.unet(sample.to(dt), timestep, encoder_hidden_states.to(dt), return_dict=False)[0]
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


GRAPH_MODULES = {
    "text_encoder": TextEncoderGraph,
    "unet": UNetGraph,
    "vae_decoder": VaeDecoderGraph,
    "vae_encoder": VaeEncoderGraph,
}
# The attribute the wrapper stores its component under: stripped to give module paths.
WRAPPER_PREFIX = {"text_encoder": "text_encoder.", "unet": "unet.", "vae_decoder": "vae.",
                  "vae_encoder": "vae."}


def wrap(spec: GraphSpec, component) -> torch.nn.Module:
    return GRAPH_MODULES[spec.stage](component).eval()


def export_graph(spec: GraphSpec, graph: torch.nn.Module, dims: ModelDims, out_dir: Path) -> dict:
    """Export `graph` (a wrapped component) to out_dir/model.onnx(+_data); returns manifest facts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    case = spec.case_dims(dims)["trace"]
    feeds = spec.dummy_inputs(dims, case)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    with torch.no_grad(), quiet_torch_stack():
        program = torch.onnx.export(
            graph, args, dynamo=True, opset_version=OPSET, optimize=False, verbose=False,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes={name: axes for name, axes in spec.dynamic_axes.items()},
        )
    model = program.model_proto
    del program
    _name_output_dims(model, spec, dims)
    onnx.save_model(model, str(out_dir / ONNX_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
    os.chmod(out_dir / DATA_FILE, 0o644)  # onnx writes it 0600; artifacts are shared read-only
    return {"weights": _weight_map(spec, graph, model)}


def _name_output_dims(model: onnx.ModelProto, spec: GraphSpec, dims: ModelDims) -> None:
    """The exporter names output dims by arithmetic (`2*((latent_height - 1)//2) + 2`); write the
    spec's names instead, which hold for every input the manifest admits (multiples of
    unet_multiple), so the graph's declared schema reads like the manifest."""
    for out, spec_out in zip(model.graph.output, spec.outputs):
        shape = spec_out.resolve(dims)["shape"]
        for d, want in zip(out.type.tensor_type.shape.dim, shape):
            if isinstance(want, str):
                d.dim_param = want
            else:
                d.dim_value = want


def _weight_map(spec: GraphSpec, graph: torch.nn.Module, model: onnx.ModelProto) -> dict:
    """{component parameter path: ONNX initializer name}, exact, for every parameter kept."""
    inits = {i.name for i in model.graph.initializer}
    prefix = WRAPPER_PREFIX[spec.stage]
    mapping, dropped = {}, []
    for name, _ in graph.named_parameters():
        key = name.removeprefix(prefix)
        if name in inits:
            mapping[key] = name
        else:
            dropped.append(key)  # e.g. the VAE encoder's graph has no decoder weights
    return {"map": mapping, "count": len(mapping), "not_in_graph": len(dropped)}


def numpy_dtype(elem_type: int) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
