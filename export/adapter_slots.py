"""Adapter slots: the LoRA-targetable weights of a graph made overridable inputs, so a warm
runtime switches adapters by binding other arrays to the same session instead of creating one.

Which weights: every Linear weight (the exporter's `Transpose(W) -> MatMul`) and every 1x1 Conv
filter (SD1's transformer proj_in/proj_out, which kohya's default LoRA targets). Each stays an
initializer (the base weight, in the same data file at the same offset) *and* is listed as a
graph input: ONNX's overridable initializer. A session run without it uses the base; a run that
binds it uses what is bound. LoCon's 3x3 convs are not slots: an adapter that touches them is
swapped in at session creation instead (runtime/adapters.py).

The Linear pattern is rewritten as `Reshape(x, [-1, K]) -> Gemm(., W, transB=1) -> Reshape`, which
reads W as stored: a `Transpose` of an overridable weight is not constant-folded, so onnxruntime
would transpose 290 M parameters on every SD1.5 UNet call. Measured on the full-size SD1.5 UNet
(fp32, 2 cores, one batch-2 64x64 call, basic optimisation as the runtime opens it): exported
graph 7.0 s per call, 4.06 GiB peak, 2.8 s to create; slots behind the Transpose 7.2 s, 4.63 GiB;
slots as Gemm 6.8 s, 3.92 GiB, 0.4 s to create (no transposes to fold). Output vs the exported
graph: max |diff| 1.4e-6 (another summation order, the same as the Transpose slots show).

Only the graph's structure (the .onnx file) changes: the data file, the weight names and their
offsets, which the manifest's weight table records, are untouched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def add_adapter_slots(onnx_path: Path) -> list[str]:
    """Rewrite `onnx_path` (structure only) so its Linear and 1x1 Conv weights are overridable
    inputs; returns the slot initializer names, sorted."""
    import onnx
    from onnx import helper, numpy_helper

    from ..quant.graph import find_sites

    proto = onnx.load(str(onnx_path), load_external_data=False)
    g = proto.graph
    sites = find_sites(proto)
    linear = {s.transpose: s for s in sites.values() if s.kind == "linear"}
    convs = [s.init for s in sites.values() if s.kind == "conv" and s.shape[2:] == [1, 1]]
    consts = {"slot_start": np.array([0], np.int64), "slot_drop_last": np.array([-1], np.int64)}
    nodes = []
    for node in g.node:
        if node.op_type == "Transpose" and node.output[0] in linear:
            continue  # the Gemm reads W itself
        if node.op_type == "MatMul" and node.input[1] in linear:
            site = linear[node.input[1]]
            n_out, k_in = site.shape
            x, y = node.input[0], node.output[0]
            p = f"{y}/slot"
            consts[f"{p}/n"] = np.array([n_out], np.int64)
            consts[f"{p}/rows"] = np.array([-1, k_in], np.int64)
            nodes += [
                helper.make_node("Shape", [x], [f"{p}/shape"]),
                helper.make_node("Slice", [f"{p}/shape", "slot_start", "slot_drop_last"],
                                 [f"{p}/lead"]),
                helper.make_node("Concat", [f"{p}/lead", f"{p}/n"], [f"{p}/out_shape"], axis=0),
                helper.make_node("Reshape", [x, f"{p}/rows"], [f"{p}/x2"]),
                helper.make_node("Gemm", [f"{p}/x2", site.init], [f"{p}/y2"], transB=1),
                helper.make_node("Reshape", [f"{p}/y2", f"{p}/out_shape"], [y]),
            ]
            continue
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    slots = sorted([s.init for s in linear.values()] + convs)
    inits = {t.name: t for t in g.initializer}
    g.input.extend(helper.make_tensor_value_info(name, inits[name].data_type,
                                                 list(inits[name].dims)) for name in slots)
    onnx.save(proto, str(onnx_path))
    return slots


def strip_adapter_slots(proto) -> None:
    """Drop the slot inputs (graph inputs that are initializers) from a ModelProto in place: the
    quantizer's graphs replace those weights, and a quantized build takes no adapters."""
    inits = {t.name for t in proto.graph.initializer}
    keep = [i for i in proto.graph.input if i.name not in inits]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
