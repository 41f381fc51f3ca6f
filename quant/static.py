"""w8a8: 8-bit weights *and* 8-bit activations, computed by onnxruntime's integer kernels.

The int8/int4 formats shrink the weights but compute in float (DequantizeLinear feeds each
Conv/MatMul). w8a8 is the CPU *speed* format: every convolution and constant-weight matmul of
the UNet (and of the VAE decoder) reads uint8 activations and int8 weights, so onnxruntime runs
them on its u8s8 kernels (VNNI on AVX-512, AMX tiles on Xeons that have them) instead of fp32
GEMMs.

How a graph becomes w8a8 (onnxruntime's own quantization tool, `quantize_static`, QDQ format):

  1. constants folded once (the float graph saved at ORT_ENABLE_BASIC, LoRAs fused): our exports
     feed some matmuls through a Transpose of the weight, and only a constant weight is quantized
     per channel;
  2. exact rewrites of the folded graph (quant/rewrite.py: GEGLU's chunk as Slices, GELU as one
     kernel, the Linear biases into their Gemms);
  3. activation ranges calibrated on the float build's own trajectories (quant/calibrate.py, the
     same inputs the gate judges), MinMax per tensor, uint8 asymmetric; weights symmetric int8 per
     output channel;
  4. Conv, Gemm and MatMul-with-constant-B quantized, except the time embedding's path (one row
     per image: negligible work, read by every block) and the layers KEPT by quant/plan.py; norms,
     attention (MultiHeadAttention) and elementwise ops stay float; the matmuls' outputs stay
     float (FLOAT_OUTPUT).

onnxruntime fuses each DequantizeLinear -> Conv -> QuantizeLinear unit into QLinearConv (and the
matmuls into their integer forms) at ORT_ENABLE_EXTENDED and above, so the manifest records
`optimization: "all"` for the graph and the runtime opens it at that level (runtime/sessions.py);
at the runtime's usual BASIC level the same graph would run in float with dequantized values.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SdcError
from . import plan as qp
from . import rewrite

FORMAT = "w8a8"
OPTIMIZATION = "all"  # the graph's session level (manifest graphs.<stage>.optimization)
OP_TYPES = ("Conv", "MatMul", "Gemm")
# Gemms on the time embedding's path compute one row per image: negligible work, read by every
# block, so they stay float
TIME_PATH = ("time_embedding", "time_emb_proj", "add_embedding")
CALIBRATION = "MinMax"
# The integer matmuls write float (QGemm/MatMulIntegerToFloat): their outputs feed float ops
# (the bias-free projections into attention, the slot's Reshape), so a uint8 output would only
# add a rounding and a DequantizeLinear pass. Convolutions keep a uint8 output: onnxruntime
# fuses only DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv. Measured on the
# full-size SD1.5 UNet with the rewrites (quant/rewrite.py), one 512² CFG call on the AVX-512
# VNNI EPYC: 3.9-4.2 s against 4.2-4.5 s, peak 1.47 against 1.94 GiB, load 1.7-2.2 against
# 3.6-5.0 s, 33.77 against 33.74 dB.
FLOAT_OUTPUT = ("Gemm", "MatMul")


def check_source(stage: str, graph: dict, from_dir: Path) -> None:
    """Refuse, before any work, a stage w8a8 cannot take: a UNet split into chunks (cut from the
    float graph, each would need its own calibration) and fp16 graphs (the calibration measures
    fp32 activations). A decoder's exact tiling segments are not kept (quant/build.py)."""
    if graph.get("chunks"):
        raise SdcError(f"w8a8 for {stage}: {from_dir}'s {stage} is split into UNet chunks; "
                       "w8a8 quantizes whole graphs, so quantize a build made without them (or "
                       "use int8 for this stage)")
    if graph["precision"] != "fp32":
        raise SdcError(f"w8a8 for {stage}: {from_dir}'s {stage} computes "
                       f"{graph['precision']}; w8a8 calibrates fp32 activations, so quantize an "
                       "fp32 build")


def fold_constants(src: Path, dst: Path, overrides: dict[str, np.ndarray]) -> Path:
    """The float graph at `src` with its constants folded (ORT_ENABLE_BASIC: standard ONNX ops
    only), `overrides` (fused LoRA weights, by initializer) applied, saved at `dst` with its
    weights in one external data file beside it. The adapter slots (weights that are also graph
    inputs, so a LoRA can be bound at run time) become plain constants first: a w8a8 graph binds
    no LoRA, and onnxruntime folds and quantizes only constants."""
    import onnx
    import onnxruntime as ort

    from ..runtime.sessions import override_initializers
    from .search import judge_copy

    dst.parent.mkdir(parents=True, exist_ok=True)
    plain = judge_copy(src, dst.parent / "source")  # every weight external, data hard-linked
    proto = onnx.load(str(plain), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    onnx.save(proto, str(plain))
    src = plain
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                  dst.name + "_data")
    opts.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    opts.add_session_config_entry("session.disable_prepacking", "1")
    keep = override_initializers(opts, overrides)
    session = ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    del session, keep
    return dst


def kept_nodes(proto, param_of: dict[str, str]) -> dict[str, str]:
    """{node name: reason} for the quantizable nodes whose weight quant/plan.py keeps in float
    (the UNet's conv_in/conv_out, ...). `proto` is the source graph (no external data loaded);
    a weight reached through a Transpose counts as the node's."""
    produced_by = {o: n for n in proto.graph.node for o in n.output}
    out = {}
    for node in proto.graph.node:
        if node.op_type not in OP_TYPES or len(node.input) < 2:
            continue
        w = node.input[1]
        via = produced_by.get(w)
        if via is not None and via.op_type == "Transpose":
            w = via.input[0]
        path = param_of.get(w, w)
        why = qp.kept_reason(path)
        if not why and any(part in TIME_PATH for part in path.split(".")):
            why = "time embedding path: one row per image, read by every block"
        if why:
            out[node.name] = why
    return out


def quantize(src: Path, dst: Path, feeds: list[dict], exclude: dict[str, str],
             overrides: dict[str, np.ndarray], work: Path,
             log: Callable[[str], None] = print) -> dict:
    """Write the w8a8 graph of float graph `src` at `dst` (its data in `dst`'s folder),
    calibrated on `feeds`; returns what the manifest records about it."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    if not feeds:
        raise AssertionError("w8a8 needs calibration inputs")
    t0 = time.perf_counter()
    try:
        folded = fold_constants(src, work / "folded.onnx", overrides)
        proto = onnx.load(str(folded), load_external_data=False)
        rewrites = rewrite.rewrite(proto)
        onnx.save(proto, str(folded))
        del proto

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter(feeds)

            def get_next(self):
                return next(self._it, None)

        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR  # its advice to pre-process: done (1.)
        try:
            quantize_static(
                str(folded), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=list(OP_TYPES), nodes_to_exclude=sorted(exclude),
                use_external_data_format=True,
                calibrate_method=getattr(CalibrationMethod, CALIBRATION),
                # (MinMax's calibration graph outputs one ReduceMin/ReduceMax scalar pair per
                # tensor, so every feed's ranges fit in memory; CalibMaxIntermediateOutputs would
                # drop earlier feeds' ranges: onnxruntime 1.32 clears them without merging)
                extra_options={"MatMulConstBOnly": True,
                               "OpTypesToExcludeOutputQuantization": list(FLOAT_OUTPUT)})
        finally:
            root.level = level
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"w8a8: calibrated on {len(feeds)} inputs and quantized "
        f"({time.perf_counter() - t0:.1f} s; rewrites: "
        + ", ".join(f"{k} {v}" for k, v in rewrites.items()) + ")")
    return {"method": f"onnxruntime quantize_static, QDQ, {CALIBRATION} per tensor",
            "activations": "uint8 asymmetric, one scale per tensor",
            "weights": "int8 symmetric, one scale per output channel",
            "op_types": list(OP_TYPES), "calibration_inputs": len(feeds),
            "float_outputs": list(FLOAT_OUTPUT), "rewrites": rewrites,
            "execution": "QuantizeLinear/DequantizeLinear around each Conv/Gemm/MatMul, fused by "
                         "onnxruntime (ORT_ENABLE_ALL) into QLinearConv and QGemm: uint8 x int8 "
                         "on the CPU provider's VNNI/AMX kernels, uint8 x uint8 on a CPU without "
                         "VNNI (the x64 precision mode, runtime/sessions.py apply_level); the "
                         "CUDA provider has no QLinearConv",
            "kept_float": dict(sorted(exclude.items()))}


def describe(path: Path, param_of: dict[str, str]) -> tuple[dict, dict[str, dict]]:
    """What the w8a8 graph at `path` became, read once: ({quantized_nodes, float_nodes},
    {weight: {format, bytes}}). A Conv/Gemm/MatMul reading a DequantizeLinear output computes
    on 8-bit activations; its weight is `w8a8` when it too comes through a DequantizeLinear of
    an initializer (quantize_static names it `<weight>_quantized`), else `fp32`."""
    import onnx

    from .graph import _nbytes

    proto = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: _nbytes(t) for t in proto.graph.initializer}
    produced_by = {o: n for n in proto.graph.node for o in n.output}

    def dequantized(tensor: str):
        src = produced_by.get(tensor)
        return src if src is not None and src.op_type == "DequantizeLinear" else None

    counts, weights = {"quantized_nodes": 0, "float_nodes": 0}, {}
    for node in proto.graph.node:
        if node.op_type not in OP_TYPES:
            continue
        counts["quantized_nodes" if dequantized(node.input[0]) else "float_nodes"] += 1
        if len(node.input) < 2:
            continue
        w, fmt, dq = node.input[1], "fp32", dequantized(node.input[1])
        if dq is not None and dq.input[0] in sizes:
            w, fmt = dq.input[0], FORMAT
        if w not in sizes:
            continue  # an activation (MatMul of two computed tensors)
        name = w.removesuffix("_quantized")
        weights[param_of.get(name, name)] = {"format": fmt, "bytes": sizes[w]}
    return counts, weights
