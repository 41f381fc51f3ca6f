"""`sdc build --unet-chunks N`: the exported UNet cut into N sequential sub-graphs by weight size.

A memory budget smaller than the UNet's weights (3.3 GiB fp32 for SD1.5) can still run it: the
runtime loads chunk k, runs it, releases it and loads chunk k+1, so only one chunk's weights are
resident at a time (runtime/unet_chunks.py). This module makes the chunks from the whole graph the
build already exported and gated, at the ONNX level, so it knows nothing about the UNet's Python
structure and works for any topologically sorted graph without control flow.

Where to cut
    Nodes are in topological order. Each initializer is charged to its first consumer, giving a
    cumulative weight curve; cut k aims at k/N of the total. Near each target (±200 nodes) the cut
    with the fewest *carried* tensors wins (tensors produced before the cut and read after it: the
    skip connections, the time embedding, a few shape scalars), with a small penalty for drifting
    from the target. Graph inputs are fed to every chunk that reads them, and `Constant` nodes are
    copied into every chunk that reads them, so neither is carried.

Weights are not copied: every chunk's initializers keep their external-data references (location,
offset, length) into the whole graph's `model.onnx_data`, which is why the chunk files sit next
to it. onnxruntime maps that file, so a chunk's session touches only its own slice.

Each chunk's parity gate (export/parity.py `check_unet_chunks`) compares its outputs with the same
tensors inside the whole graph, and the chained chunks with torch, like the whole graph.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from ..errors import SdcError

CHUNK_FILE = "chunk-{k}-of-{n}.onnx"
MAX_CHUNKS = 16
_WINDOW = 200  # nodes either side of a weight target searched for a cheap cut
_DRIFT_PENALTY = 300.0  # carried tensors one whole-model share of drift is worth (1 % = 3)


def _tensor_bytes(init) -> int:
    import onnx

    n = int(np.prod(init.dims, dtype=np.int64))
    if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2  # two 4-bit values per byte (quantized builds, quant/)
    return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize


class _Graph:
    """Index of a graph's producers, consumers and weight curve."""

    def __init__(self, proto):
        import onnx

        g = proto.graph
        self.g = g
        self.nodes = list(g.node)
        for node in self.nodes:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for a in node.attribute):
                raise SdcError(f"--unet-chunks: the UNet graph has control flow ({node.op_type}); "
                               "it cannot be cut into chunks, build without --unet-chunks")
        self.inits = {t.name: t for t in g.initializer}
        self.inputs = [i.name for i in g.input if i.name not in self.inits]
        self.outputs = [o.name for o in g.output]
        self.const = {}  # Constant node outputs -> node (copied, never carried)
        self.produced = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                self.produced[out] = i
            if node.op_type == "Constant" and not node.input:
                self.const[node.output[0]] = node
        # A quantized build's weight-decode nodes (DequantizeLinear, Cast and their ties, marked
        # by quant/graph.py): a cut right after one would carry a whole float weight.
        from ..quant.graph import INSERTED

        self.weight_node = {i for i, node in enumerate(self.nodes) if node.doc_string == INSERTED}
        self.last_read = {}
        first_use = {}
        for i, node in enumerate(self.nodes):
            for x in node.input:
                if x in self.produced:
                    self.last_read[x] = i
                if x in self.inits:
                    first_use.setdefault(x, i)
        for name in self.outputs:
            self.last_read[name] = len(self.nodes)
        weights = np.zeros(len(self.nodes))
        for name, i in first_use.items():
            weights[i] += _tensor_bytes(self.inits[name])
        self.cumulative = np.cumsum(weights)

    def carried(self, cut: int) -> list[str]:
        """Tensors a cut before node `cut` must carry (produced before, read at or after)."""
        return [t for t, p in self.produced.items()
                if p < cut and self.last_read.get(t, -1) >= cut and t not in self.const]

    def choose_cuts(self, n: int) -> list[int]:
        total = float(self.cumulative[-1])
        cuts = []
        for k in range(1, n):
            target = total * k / n
            centre = int(np.searchsorted(self.cumulative, target))
            lo = max(cuts[-1] + 1 if cuts else 1, centre - _WINDOW)
            hi = min(len(self.nodes) - (n - k), centre + _WINDOW)
            if lo > hi:
                raise SdcError(f"--unet-chunks {n}: the UNet graph has too few nodes for {n} chunks")
            allowed = [c for c in range(lo, hi + 1) if c - 1 not in self.weight_node]
            if not allowed:
                raise SdcError(f"--unet-chunks {n}: no cut point near chunk {k}'s share")
            best = min(allowed, key=lambda c: len(self.carried(c)) + _DRIFT_PENALTY
                       * abs(float(self.cumulative[c - 1]) - target) / total)
            cuts.append(best)
        return cuts


def _value_infos(proto) -> dict:
    import onnx

    g = proto.graph
    infos = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    return infos if infos else {v.name: v for v in onnx.shape_inference.infer_shapes(proto).graph.value_info}


def split_graph(onnx_path: Path, n: int, out_dir: Path) -> list[dict]:
    """Write `n` chunk files into out_dir (the whole graph's folder, for its data file); returns
    the manifest's chunk entries in run order."""
    import onnx

    if not isinstance(n, int) or not 2 <= n <= MAX_CHUNKS:
        raise SdcError(f"--unet-chunks {n}: expected an integer from 2 to {MAX_CHUNKS} (1: no chunks)")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    graph = _Graph(proto)
    cuts = graph.choose_cuts(n)
    bounds = [0, *cuts, len(graph.nodes)]
    infos = _value_infos(proto)
    missing = None
    parts = []
    for k in range(n):
        a, b = bounds[k], bounds[k + 1]
        nodes = graph.nodes[a:b]
        produced_here = {o for node in nodes for o in node.output}
        reads = [x for node in nodes for x in node.input if x]
        const_needed = sorted({x for x in reads if x in graph.const and x not in produced_here})
        inputs = list(dict.fromkeys(x for x in reads if x not in produced_here
                                    and x not in graph.inits and x not in graph.const))
        outputs = [t for t in dict.fromkeys(o for node in nodes for o in node.output)
                   if graph.last_read.get(t, -1) >= b and t not in graph.const]
        inits = sorted({x for x in reads if x in graph.inits})
        for name in inputs + outputs:
            if name not in infos:
                if missing is None:  # value_info lacks it: let ONNX infer every shape once
                    missing = {v.name: v for v in
                               onnx.shape_inference.infer_shapes(proto).graph.value_info}
                    infos = {**missing, **infos}
                if name not in infos:
                    raise SdcError(f"--unet-chunks: no type known for tensor {name!r} at a cut; "
                                   "build without --unet-chunks")
        sub = onnx.helper.make_graph(
            [copy.deepcopy(graph.const[c]) for c in const_needed] + [copy.deepcopy(x) for x in nodes],
            f"unet_chunk_{k + 1}_of_{n}",
            [copy.deepcopy(infos[x]) for x in inputs],
            [copy.deepcopy(infos[x]) for x in outputs],
            initializer=[copy.deepcopy(graph.inits[x]) for x in inits],
        )
        model = onnx.helper.make_model(sub, opset_imports=list(proto.opset_import),
                                       ir_version=proto.ir_version)
        name = CHUNK_FILE.format(k=k + 1, n=n)
        onnx.save(model, str(out_dir / name))
        parts.append({"name": f"chunk{k + 1}", "file": name, "inputs": inputs,
                      "outputs": outputs, "nodes": [a, b], "initializers": inits,
                      "weight_bytes": int(sum(_tensor_bytes(graph.inits[x]) for x in inits))})
    return parts
