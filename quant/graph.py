"""The ONNX -> ONNX rewrite: a float graph's weights replaced by stored formats, in numpy.

Which initializers are weights ("sites") is read from the graph itself, not from the model's
Python structure: an initializer feeding a Conv's filter, a Gemm's B, a MatMul's B (directly or
through the exporter's Transpose of a Linear weight) or a Gather's table. Each site knows its
per-channel axis and its reduction axis in the layout the graph will store. A Linear weight
behind a Transpose is stored already transposed, [in, out], and the Transpose node dropped, so
its DequantizeLinear feeds the MatMul directly (the pattern onnxruntime can also turn into
MatMulNBits). Everything else (norms, biases, shape constants) is copied as it is.

Weights are read one at a time from the source's external-data file (or inline), written one at a
time into the new graph's data file: the rewrite of the SD1.5 UNet never holds more than one
weight in float at once.

Each weight's decode is tied to its layer's input (`Shape(x)[0:0]`, an empty tensor, expands the
scale): onnxruntime's default order otherwise runs every DequantizeLinear first, since they read
only initializers, and all the float weights are alive at once (int8 SD1.5 UNet, 16² latents:
2.82 GiB resident after a call; with the tie 1.24 GiB, fp32 3.43 GiB; measured). Tied, a weight
is expanded just before its layer runs and freed after it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SdcError
from ..runtime import store
from . import formats as fm

DQ_OPSET = 21  # blocked DequantizeLinear with (u)int4 and uint8 inputs
_ALIGN = 64


@dataclass
class Site:
    """One weight initializer and how the graph uses it."""

    init: str
    kind: str  # conv | gemm | matmul | linear (Transpose -> MatMul) | gather
    shape: list[int]  # as the source stores it
    channel_axis: int  # int8: one scale per index of this axis (in the stored layout)
    reduce_axis: int  # int4: blocks along this axis (in the stored layout)
    transpose: str | None = None  # linear: the Transpose node's output, which the DQ replaces

    def stored(self, w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w.T) if self.kind == "linear" else w

    def unstored(self, w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w.T) if self.kind == "linear" else w


def find_sites(proto) -> dict[str, Site]:
    """{initializer: Site} for every float weight a Conv/Gemm/MatMul/Gather reads."""
    import onnx

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    consumers: dict[str, list] = {}
    for node in g.node:
        for k, x in enumerate(node.input):
            if x:
                consumers.setdefault(x, []).append((node, k))
    sites = {}
    for name, t in inits.items():
        uses = consumers.get(name, [])
        if t.data_type not in floats or len(uses) != 1 or len(t.dims) < 2:
            continue
        node, k = uses[0]
        dims = list(t.dims)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv" and k == 1:
            sites[name] = Site(name, "conv", dims, 0, 1)
        elif node.op_type == "Gemm" and k == 1 and len(dims) == 2:
            tb = attrs.get("transB", 0)
            sites[name] = Site(name, "gemm", dims, 0 if tb else 1, 1 if tb else 0)
        elif node.op_type == "MatMul" and k == 1 and len(dims) == 2:
            sites[name] = Site(name, "matmul", dims, 1, 0)
        elif node.op_type == "Gather" and k == 0 and len(dims) == 2 and attrs.get("axis", 0) == 0:
            sites[name] = Site(name, "gather", dims, 0, 1)
        elif (node.op_type == "Transpose" and len(dims) == 2
              and list(attrs.get("perm", [1, 0])) == [1, 0]):
            outs = consumers.get(node.output[0], [])
            if outs and all(n.op_type == "MatMul" and j == 1 for n, j in outs):
                sites[name] = Site(name, "linear", dims, 1, 0, transpose=node.output[0])
    return sites


class WeightReader:
    """Reads a graph's initializers as numpy arrays, external data contained in the graph's folder."""

    def __init__(self, folder: Path, proto):
        self.folder = folder
        self.inits = {t.name: t for t in proto.graph.initializer}

    def external(self, t) -> dict | None:
        import onnx

        if t.data_location != onnx.TensorProto.EXTERNAL:
            return None
        return {e.key: e.value for e in t.external_data}

    def read(self, name: str) -> np.ndarray:
        import onnx
        from onnx import numpy_helper

        t = self.inits[name]
        info = self.external(t)
        if info is None:
            return numpy_helper.to_array(t)
        path = store.contained(self.folder, info["location"], f"external data of {name}")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        offset, length = int(info.get("offset", 0)), int(info["length"])
        n = int(np.prod(t.dims, dtype=np.int64))
        if length != n * dtype.itemsize:
            raise SdcError(f"{name}: external data holds {length} bytes, its shape needs "
                           f"{n * dtype.itemsize}; rebuild the source build")
        arr = np.fromfile(path, dtype=dtype, count=n, offset=offset)
        if arr.size != n:
            raise SdcError(f"{name}: external data file {info['location']} is truncated; rebuild")
        return arr.reshape(list(t.dims))


class _DataWriter:
    def __init__(self, path: Path | None):
        self.path = path
        self.f = open(path, "wb") if path else None
        self.pos = 0

    def tensor(self, name: str, data_type: int, dims, raw: bytes, inline: bool = False):
        import onnx

        t = onnx.TensorProto()
        t.name, t.data_type = name, data_type
        t.dims.extend(int(d) for d in dims)
        if inline or self.f is None or len(raw) < 1024:
            t.raw_data = raw
            return t
        pad = (-self.pos) % _ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.pos += pad
        self.f.write(raw)
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(self.pos)),
                     ("length", str(len(raw)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.pos += len(raw)
        return t

    def close(self):
        if self.f:
            self.f.close()
            os.chmod(self.path, 0o644)


class _SharedWriter:
    """Hands out another graph's already written tensors (renamed) instead of writing bytes: a
    segment graph in the same folder then reads the whole graph's data file, no second copy."""

    def __init__(self, tensors: dict[str, object], whole: str, local: str):
        self.tensors, self.whole, self.local = tensors, whole, local

    def tensor(self, name: str, data_type: int, dims, raw: bytes, inline: bool = False):
        t = type(self.tensors[self.whole + name[len(self.local):]])()
        t.CopyFrom(self.tensors[self.whole + name[len(self.local):]])
        if t.data_type != data_type or list(t.dims) != [int(d) for d in dims]:
            raise AssertionError(f"shared tensor {name} does not match its source")
        t.name = name
        return t


def written_tensors(path: Path) -> dict[str, object]:
    """{name: TensorProto (external references kept)} of a rewritten graph, for `shared`."""
    import onnx

    return {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}


def _float_type(dtype: str) -> int:
    import onnx

    return {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}[dtype]


_ZERO = "sdc.tie.zero"
INSERTED = "sdc.quant: weight decode"  # doc_string of every node the rewrite adds


def rewrite(src: Path, dst: Path, choose: Callable[[Site], tuple[str, int]],
            overrides: dict[str, np.ndarray] | None = None, data_file: str | None = None,
            encoded_cache: dict | None = None,
            shared: tuple[dict, dict[str, str]] | None = None) -> dict[str, dict]:
    """Write `dst` (model file; its data file beside it, named `data_file`, or inline weights when
    None) from the float graph `src`. `choose(site)` returns (format name, block size) for each
    weight; "fp32" keeps it as it is. `overrides` replace source weights by initializer name
    (LoRA-fused float weights). `shared` = (written_tensors(other graph), {initializer: the other
    graph's initializer}) reuses that graph's stored tensors for those weights (`dst` must sit in
    its folder); `encoded_cache` is then keyed by the other graph's names. Returns
    {initializer: {format, bytes, ...}} for every site."""
    import onnx
    from onnx import helper

    from ..export.adapter_slots import strip_adapter_slots

    overrides = overrides or {}
    proto = onnx.load(str(src), load_external_data=False)
    strip_adapter_slots(proto)  # its weights are replaced; a quantized build takes no adapters
    reader = WeightReader(src.parent, proto)
    sites = find_sites(proto)
    g = proto.graph
    writer = _DataWriter(dst.parent / data_file if data_file else None)
    layers: dict[str, dict] = {}
    new_inits, before = [], {}  # before: consumer node id -> nodes to insert ahead of it
    dropped_transposes = set()
    consumer_of = {}
    for node in g.node:
        for x in node.input:
            consumer_of.setdefault(x, node)
    quantized = False
    ties: dict[str, str] = {}  # activation -> its empty "tie" tensor (one Shape/Slice each)
    tie_nodes: dict[str, list] = {}  # activation -> the nodes computing its tie
    try:
        for t in list(g.initializer):
            name = t.name
            site = sites.get(name)
            fmt_name, block = choose(site) if site else ("fp32", 0)
            if fmt_name == "fp32" and name not in overrides:
                info = reader.external(t)
                if info is None:
                    new_inits.append(t)
                else:
                    arr = reader.read(name)
                    new_inits.append(writer.tensor(name, t.data_type, t.dims, arr.tobytes()))
                if site:
                    layers[name] = {"format": "fp32", "bytes": _nbytes(t)}
                continue
            w = overrides.get(name)
            w = reader.read(name) if w is None else np.asarray(w, dtype=np.dtype(
                onnx.helper.tensor_dtype_to_np_dtype(t.data_type)))
            if list(w.shape) != list(t.dims):
                raise AssertionError(f"override {name} has shape {w.shape}, graph {list(t.dims)}")
            if fmt_name == "fp32":
                new_inits.append(writer.tensor(name, t.data_type, t.dims, w.tobytes()))
                if site:
                    layers[name] = {"format": "fp32", "bytes": w.nbytes}
                continue
            if fmt_name == "fp16" and w.dtype == np.float16:
                new_inits.append(writer.tensor(name, t.data_type, t.dims, w.tobytes()))
                layers[name] = {"format": "fp16", "bytes": w.nbytes}
                continue
            fmt = fm.get(fmt_name)
            stored = site.stored(w)
            other = shared[1].get(name) if shared else None
            cache_key = other or name
            if encoded_cache is not None and cache_key in encoded_cache:
                enc = encoded_cache[cache_key]
            else:
                axis = site.reduce_axis if fmt_name == "int4" else site.channel_axis
                enc = fmt.encode(stored, axis, block)
            out = site.transpose or name  # the tensor the consumer reads
            anchor = consumer_of[out]
            activation = anchor.input[1] if site.kind == "gather" else anchor.input[0]
            if activation not in ties:
                ties[activation] = f"{activation}.tie"
                tie_nodes[activation] = [
                    helper.make_node("Shape", [activation], [f"{activation}.shape0"], start=0,
                                     end=1, name=f"{activation}.shape0"),
                    helper.make_node("Slice", [f"{activation}.shape0", _ZERO, _ZERO],
                                     [ties[activation]], name=f"{activation}.tie")]
            target = _SharedWriter(shared[0], other, name) if other else writer
            nodes, inits = _nodes_for(name, out, enc, target, ties[activation])
            new_inits.extend(inits)
            quantized |= fmt.quantized
            before.setdefault(id(anchor), []).append((activation, nodes))
            if site.transpose:
                dropped_transposes.add(site.transpose)
            layers[name] = {"format": fmt_name, "bytes": enc.nbytes(),
                            **({"block": enc.block} if fmt_name == "int4" else {})}
    finally:
        writer.close()
    # In node order (export/unet_chunks.py cuts by position): an activation's tie goes before the
    # first layer that reads it, each weight's decode right before its own layer.
    nodes, emitted = [], set()
    for node in g.node:
        if node.op_type == "Transpose" and node.output[0] in dropped_transposes:
            continue
        for activation, decode in before.get(id(node), []):
            if activation not in emitted:
                emitted.add(activation)
                nodes.extend(tie_nodes[activation])
            nodes.extend(decode)
        nodes.append(node)
    inserted = [n for group in tie_nodes.values() for n in group] + \
        [n for entries in before.values() for _, decode in entries for n in decode]
    for node in inserted:
        node.doc_string = INSERTED  # export/unet_chunks.py never cuts right after these
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    if ties:
        from onnx import numpy_helper

        g.initializer.append(numpy_helper.from_array(np.array([0], np.int64), _ZERO))
    if quantized:
        for op in proto.opset_import:
            if op.domain in ("", "ai.onnx"):
                op.version = max(op.version, DQ_OPSET)
        proto.ir_version = max(proto.ir_version, 10)  # 4-bit tensor types
    onnx.save(proto, str(dst))
    return layers


def _nbytes(t) -> int:
    import onnx

    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def _nodes_for(name: str, out: str, enc: fm.Encoded, writer: _DataWriter, tie: str | None = None):
    """The initializers and nodes that produce tensor `out` (the weight as its consumer reads it).
    `tie` (an empty int64 tensor computed from the layer's input) makes the decode wait for it."""
    import onnx
    from onnx import helper

    T = onnx.TensorProto
    ftype = _float_type(enc.dtype)
    tied = []

    def after(tensor: str) -> str:  # `tensor` once `tie` exists: Expand to its own shape
        if tie is None:
            return tensor
        tied.append(helper.make_node("Expand", [tensor, tie], [f"{tensor}.tied"],
                                     name=f"{tensor}.tied"))
        return f"{tensor}.tied"

    if enc.fmt == "fp16":
        q = writer.tensor(f"{name}.fp16", T.FLOAT16, enc.q.shape, enc.q.tobytes())
        src = after(q.name)
        return tied + [helper.make_node("Cast", [src], [out], to=ftype, name=f"{name}.cast")], [q]
    if enc.fmt == "int8":
        q = writer.tensor(f"{name}.q", T.INT8, enc.q.shape, enc.q.tobytes())
        s = writer.tensor(f"{name}.scale", ftype, enc.scale.shape,
                          enc.scale.astype(enc.dtype).tobytes())
        scale = after(s.name)
        return tied + [helper.make_node("DequantizeLinear", [q.name, scale], [out],
                                        axis=enc.axis, name=f"{name}.dq")], [q, s]
    q = writer.tensor(f"{name}.q", T.UINT4, enc.q.shape, fm.pack4(enc.q))
    zp = writer.tensor(f"{name}.zero_point", T.UINT4, enc.zero_point.shape, fm.pack4(enc.zero_point))
    s8 = writer.tensor(f"{name}.scale_q", T.UINT8, enc.scale.shape, enc.scale.tobytes())
    sup = writer.tensor(f"{name}.super_scale", ftype, enc.super_scale.shape,
                        enc.super_scale.astype(enc.dtype).tobytes())
    sup_name = after(sup.name)
    nodes = tied + [
        helper.make_node("DequantizeLinear", [s8.name, sup_name], [f"{name}.scale"],
                         axis=enc.axis, block_size=fm.SUPER, name=f"{name}.dq_scale"),
        helper.make_node("DequantizeLinear", [q.name, f"{name}.scale", zp.name], [out],
                         axis=enc.axis, block_size=enc.block, name=f"{name}.dq"),
    ]
    return nodes, [q, zp, s8, sup]
