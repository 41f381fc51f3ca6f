"""quant/rewrite.py: the w8a8 path's exact rewrites of a folded float graph.

Oracle: onnxruntime running the graph before and after. Each pattern is written as the exporter
writes it (and as the real exports hold it: tests/test_w8a8.py counts every site of sdc-tiny's
UNet), plus near misses that must be left alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdc.quant.rewrite import rewrite

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, feeds):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _check(model, feeds, expect: dict, tol: float):
    before = _run(model, feeds)
    counts = rewrite(model)
    assert counts == {"split_slices": 0, "gelu": 0, "gemm_bias": 0, **expect}
    after = _run(model, feeds)
    for b, a in zip(before, after):
        assert b.shape == a.shape and np.abs(a - b).max() <= tol * np.abs(b).max()
    return [n.op_type for n in model.graph.node]


def _geglu(half=0.5, sqrt2=float(np.sqrt(2)), mul_order="half_first", extra_use=False):
    """GEGLU as exported: chunk(2) then hidden * gelu(gate), gelu as Div/Erf/Add/Mul/Mul."""
    mul = (helper.make_node("Mul", ["half", "p1"], ["m1"]),
           helper.make_node("Mul", ["gate", "m1"], ["gelu"])) if mul_order == "half_first" else \
          (helper.make_node("Mul", ["gate", "p1"], ["m1"]),
           helper.make_node("Mul", ["m1", "half"], ["gelu"]))
    nodes = [helper.make_node("SplitToSequence", ["x", "size"], ["seq"], axis=-1),
             helper.make_node("SequenceAt", ["seq", "k0"], ["hidden"]),
             helper.make_node("SequenceAt", ["seq", "k1"], ["gate"]),
             helper.make_node("Div", ["gate", "sqrt2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["p1"]), *mul,
             helper.make_node("Mul", ["hidden", "gelu"], ["y"])]
    outputs = ["y"] + (["e"] if extra_use else [])
    inits = {"size": np.array(6, np.int64), "k0": np.array(0, np.int64),
             "k1": np.array(1, np.int64), "sqrt2": np.array(sqrt2, np.float32),
             "one": np.array(1.0, np.float32), "half": np.array(half, np.float32)}
    return _model(nodes, [("x", [2, 5, 12])], outputs, inits)


X = {"x": RNG.standard_normal((2, 5, 12)).astype(np.float32) * 3}


@pytest.mark.parametrize("order", ["half_first", "x_first"])
def test_geglu_becomes_slices_and_one_gelu(order):
    # the Gelu kernel evaluates the same erf formula in another order: float rounding only
    ops = _check(_geglu(mul_order=order), X, {"split_slices": 1, "gelu": 1}, 1e-6)
    assert sorted(ops) == ["Gelu", "Mul", "Slice", "Slice"]


@pytest.mark.parametrize("kwargs", [{"half": 0.4}, {"sqrt2": 1.5}, {"extra_use": True}])
def test_near_miss_gelu_is_left_alone(kwargs):
    ops = _check(_geglu(**kwargs), X, {"split_slices": 1}, 0.0)
    assert "Gelu" not in ops and "Erf" in ops


def test_split_with_sizes_and_a_second_reader():
    nodes = [helper.make_node("SplitToSequence", ["x", "sizes"], ["seq"], axis=2),
             helper.make_node("SequenceAt", ["seq", "k2"], ["c"]),
             helper.make_node("SequenceAt", ["seq", "k0"], ["a"]),
             helper.make_node("SequenceAt", ["seq", "k0"], ["a2"]),
             helper.make_node("Add", ["a", "a2"], ["y"])]
    inits = {"sizes": np.array([3, 4, 5], np.int64), "k0": np.array(0, np.int64),
             "k2": np.array(2, np.int64)}
    ops = _check(_model(nodes, [("x", [2, 5, 12])], ["y", "c"], inits), X,
                 {"split_slices": 1}, 0.0)
    assert ops.count("Slice") == 3 and "SplitToSequence" not in ops


def test_split_read_by_something_else_is_left_alone():
    nodes = [helper.make_node("SplitToSequence", ["x", "size"], ["seq"], axis=-1),
             helper.make_node("SequenceAt", ["seq", "k0"], ["a"]),
             helper.make_node("SequenceLength", ["seq"], ["n"]),
             helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["a", "nf"], ["y"])]
    inits = {"size": np.array(6, np.int64), "k0": np.array(0, np.int64)}
    ops = _check(_model(nodes, [("x", [2, 5, 12])], ["y"], inits), X, {}, 0.0)
    assert "SplitToSequence" in ops


def _linear(bias_shape=(8,), transB=1):
    """A Linear in its adapter slot (export/adapter_slots.py), its bias added after."""
    w = RNG.standard_normal((8, 12) if transB else (12, 8)).astype(np.float32)
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Slice", ["shape", "start", "drop_last"], ["lead"]),
             helper.make_node("Concat", ["lead", "n"], ["out_shape"], axis=0),
             helper.make_node("Reshape", ["x", "rows"], ["x2"]),
             helper.make_node("Gemm", ["x2", "w"], ["y2"], transB=transB),
             helper.make_node("Reshape", ["y2", "out_shape"], ["lin"]),
             helper.make_node("Add", ["lin", "b"], ["y"])]
    inits = {"start": np.array([0], np.int64), "drop_last": np.array([-1], np.int64),
             "n": np.array([8], np.int64), "rows": np.array([-1, 12], np.int64), "w": w,
             "b": RNG.standard_normal(bias_shape).astype(np.float32)}
    return _model(nodes, [("x", [2, 5, 12])], ["y"], inits)


@pytest.mark.parametrize("transB", [1, 0])
def test_linear_bias_goes_into_its_gemm(transB):
    # the bias is the GEMM's starting value instead of a later add: one rounding apart
    model = _linear(transB=transB)
    ops = _check(model, X, {"gemm_bias": 1}, 1e-6)
    assert "Add" not in ops
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert list(gemm.input) == ["x2", "w", "b"]


def test_bias_of_another_shape_is_left_alone():
    ops = _check(_linear(bias_shape=(5, 8)), X, {}, 0.0)
    assert "Add" in ops
