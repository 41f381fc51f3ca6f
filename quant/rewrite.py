"""Exact rewrites of a folded float graph before w8a8 quantization (quant/static.py).

The fp32 graphs are never touched (their images are held equal to diffusers); these rewrites run
on the w8a8 path's constant-folded copy only, so that onnxruntime's integer graph has fewer
passes over the activations. Each replaces a subgraph with one that computes the same values:

  split_slices  SplitToSequence(x, s) read by SequenceAt(k) (the exporter's `chunk`: GEGLU's
                hidden/gate halves) -> one Slice per read chunk. onnxruntime copies each chunk
                twice through the sequence, a Slice once.
  gelu          x * (0.5 * (1 + erf(x / sqrt 2))), in either Mul order -> com.microsoft Gelu,
                one kernel instead of five elementwise passes (onnxruntime's own GeluFusion
                does not match the order the exporter writes).
  gemm_bias     Gemm(x, W) -> Reshape(., Concat(lead, [N])) -> Add(., b[N]) (a Linear in its
                adapter slot, export/adapter_slots.py) -> Gemm(x, W, b) -> Reshape: the bias is
                added by the integer GEMM's output stage instead of a separate pass.

A pattern that does not match exactly (another consumer of an intermediate, a constant that is
not the one expected) is left as it is.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

MS_DOMAIN = "com.microsoft"
SQRT2 = float(np.sqrt(2.0))


class _Graph:
    def __init__(self, proto):
        self.proto = proto
        self.g = proto.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.refresh()

    def refresh(self):
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in self.g.output}

    def const(self, name: str):
        """The value of a small constant initializer (not external data), else None."""
        from onnx import numpy_helper

        t = self.inits.get(name)
        if t is None or t.data_location == 1:
            return None
        return numpy_helper.to_array(t)

    def only_consumer(self, tensor: str):
        """The single node reading `tensor` (None when several, none, or a graph output)."""
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def scalar(self, name: str) -> float | None:
        v = self.const(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

    def replace(self, remove: set[int], add: list) -> None:
        kept = [n for n in self.g.node if id(n) not in remove]
        del self.g.node[:]
        self.g.node.extend(kept + add)
        self.toposort()
        self.refresh()

    def toposort(self) -> None:
        ready = {i.name for i in self.g.input} | set(self.inits)
        pending = list(self.g.node)
        order = []
        while pending:
            rest = []
            for n in pending:
                if all(i in ready for i in n.input if i):
                    order.append(n)
                    ready.update(n.output)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                raise AssertionError("rewrite left a cycle or a dangling input")
            pending = rest
        del self.g.node[:]
        self.g.node.extend(order)


def split_slices(gr: _Graph) -> int:
    from onnx import helper, numpy_helper

    remove, add, consts, count = set(), [], {}, 0
    for node in gr.g.node:
        if node.op_type != "SplitToSequence" or len(node.input) < 2:
            continue
        sizes = gr.const(node.input[1])
        if sizes is None or sizes.dtype.kind not in "iu" or sizes.ndim > 1:
            continue
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        users = gr.consumers.get(node.output[0], [])
        picks = [gr.scalar(u.input[1]) if u.op_type == "SequenceAt" else None for u in users]
        if not users or node.output[0] in gr.outputs or any(
                k is None or k < 0 or k != int(k) for k in picks):
            continue
        if sizes.ndim == 1 and any(int(k) >= sizes.size for k in picks):
            continue
        starts = np.concatenate([[0], np.cumsum(sizes)]) if sizes.ndim == 1 else None
        for user, k in zip(users, picks):
            k = int(k)
            lo, hi = ((int(starts[k]), int(starts[k + 1])) if starts is not None
                      else (k * int(sizes), (k + 1) * int(sizes)))
            p = f"{user.output[0]}/slice"
            consts.update({f"{p}/starts": [lo], f"{p}/ends": [hi], f"{p}/axes": [int(axis)]})
            add.append(helper.make_node("Slice", [node.input[0], f"{p}/starts", f"{p}/ends",
                                                  f"{p}/axes"], [user.output[0]], name=p))
            remove.add(id(user))
        remove.add(id(node))
        count += 1
    if count:
        gr.g.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k)
                                for k, v in consts.items())
        gr.inits = {t.name: t for t in gr.g.initializer}
        gr.replace(remove, add)
    return count


def gelu(gr: _Graph) -> int:
    from onnx import helper

    remove, add = set(), []
    for div in gr.g.node:
        if div.op_type != "Div" or abs((gr.scalar(div.input[1]) or 0.0) - SQRT2) > 1e-6:
            continue
        x = div.input[0]
        erf = gr.only_consumer(div.output[0])
        add1 = erf and erf.op_type == "Erf" and gr.only_consumer(erf.output[0])
        if not add1 or add1.op_type != "Add":
            continue
        other = [i for i in add1.input if i != erf.output[0]]
        if len(other) != 1 or gr.scalar(other[0]) != 1.0:
            continue
        chain, seen, tensor = [], set(), add1.output[0]
        for _ in range(2):
            mul = gr.only_consumer(tensor)
            if mul is None or mul.op_type != "Mul":
                break
            (rest,) = [i for i in mul.input if i != tensor] or [tensor]
            seen.add("half" if gr.scalar(rest) == 0.5 else "x" if rest == x else "?")
            chain.append(mul)
            tensor = mul.output[0]
        if len(chain) != 2 or seen != {"half", "x"}:
            continue
        remove.update(id(n) for n in (div, erf, add1, *chain))
        add.append(helper.make_node("Gelu", [x], [chain[-1].output[0]], domain=MS_DOMAIN,
                                    name=f"{chain[-1].output[0]}/gelu"))
    if add:
        if not any(o.domain == MS_DOMAIN for o in gr.proto.opset_import):
            gr.proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        gr.replace(remove, add)
    return len(add)


def gemm_bias(gr: _Graph) -> int:
    from onnx import helper

    remove, count = set(), 0
    for gemm in gr.g.node:
        if gemm.op_type != "Gemm" or len(gemm.input) != 2 or gemm.input[1] not in gr.inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if attrs.get("transA", 0):
            continue
        w = gr.inits[gemm.input[1]]
        if len(w.dims) != 2:
            continue
        n = int(w.dims[0] if attrs.get("transB", 0) else w.dims[1])
        reshape = gr.only_consumer(gemm.output[0])
        if reshape is None or reshape.op_type != "Reshape" or reshape.input[0] != gemm.output[0]:
            continue
        concat = gr.producer.get(reshape.input[1])
        last = gr.const(concat.input[-1]) if concat is not None and concat.op_type == "Concat" \
            else None
        if last is None or last.reshape(-1).tolist() != [n]:
            continue
        add = gr.only_consumer(reshape.output[0])
        if add is None or add.op_type != "Add":
            continue
        (bias,) = [i for i in add.input if i != reshape.output[0]] or [None]
        b = gr.inits.get(bias)
        if b is None or list(b.dims) != [n] or b.data_type != w.data_type:
            continue
        gemm.input.append(bias)
        del gemm.attribute[:]
        gemm.attribute.extend(helper.make_attribute(k, v) for k, v in
                              {**attrs, "beta": 1.0}.items())
        reshape.output[0] = add.output[0]
        remove.add(id(add))
        count += 1
    if count:
        gr.replace(remove, [])
    return count


REWRITES = (("split_slices", split_slices), ("gelu", gelu), ("gemm_bias", gemm_bias))


def rewrite(proto) -> dict[str, int]:
    """Apply every rewrite to `proto` (a ModelProto; external data need not be loaded) in place;
    returns how many sites each changed."""
    gr = _Graph(proto)
    counts = {name: fn(gr) for name, fn in REWRITES}
    used = {i for n in gr.g.node for i in n.input} | {o.name for o in gr.g.output}
    unused = [t for t in gr.g.initializer if t.name not in used]  # the constants of removed nodes
    for t in unused:
        gr.g.initializer.remove(t)
    return counts
