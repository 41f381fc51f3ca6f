"""Quantized builds (quant/): the formats decode exactly as onnxruntime's DequantizeLinear does,
the rewrite keeps weights small on disk and in the session, builds of sdc-tiny pass their graph
and image gates, the quality target drives the search, LoRAs are fused before quantization, chunks
and tiles survive, bad input is one line with nothing written, and it all runs without torch.

Oracles: onnxruntime itself (DequantizeLinear on the same encoded tensors must produce our decoded
weights bit for bit), the float build's own graphs and images (the reference every quantized
graph is gated against), and the LoRA re-fuse path (a LoRA fused then quantized must produce the
same bytes as quantizing a float build that already holds that LoRA).
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from conftest import assert_cli_torch_free, read_manifest, run_sdc
from sdc.quant import formats as fm
from sdc.quant import plan as qp

PROMPT = "a red circle on a blue background"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_dq(enc: fm.Encoded) -> np.ndarray:
    """onnxruntime's DequantizeLinear on the encoded tensors, through the rewrite's own nodes."""
    import onnx
    import onnxruntime as ort

    from sdc.quant.graph import _DataWriter, _nodes_for

    nodes, inits = _nodes_for("w", "y", enc, _DataWriter(None))
    shape = list(enc.q.shape)
    g = onnx.helper.make_graph(nodes, "dq", [], [onnx.helper.make_tensor_value_info(
        "y", onnx.TensorProto.FLOAT, shape)], inits)
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {})[0]


@pytest.mark.parametrize("fmt,shape,axis,block", [
    ("int8", (48, 40, 3, 3), 0, 0),  # a Conv, per output channel
    ("int8", (40, 48), 1, 0),  # a MatMul's [K, N], per output column
    ("int4", (16, 40, 3, 3), 1, 32),  # a Conv blocked along its input channels, last block partial
    ("int4", (200, 24), 0, 64),  # a MatMul blocked along K: 4 blocks, 1 super-block
    ("int4", (1100, 8), 0, 32),  # 35 blocks: 5 super-blocks, the last partial
    ("fp16", (24, 24), 0, 0),
])
def test_decode_is_bit_identical_to_dequantize_linear(fmt, shape, axis, block):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.05
    f = fm.get(fmt)
    enc = f.encode(w, axis, block or 32)
    ours = f.decode(enc)
    assert ours.dtype == np.float32 and ours.shape == w.shape
    assert np.array_equal(ours, _run_dq(enc))  # the search's fake-quant is the graph's weight


def test_int4_blocks_beat_naive_4bit_and_size():
    # "why Q4_K beats naive 4-bit": one scale per tensor vs per 32-block with zero points
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((320, 320, 3, 3)) * rng.uniform(0.2, 3, (320, 1, 1, 1))).astype(
        np.float32) * 0.02
    enc = fm.get("int4").encode(w, 1, 32)
    err = np.sqrt(np.mean((fm.get("int4").decode(enc) - w) ** 2))
    s = np.abs(w).max() / 7
    naive = np.sqrt(np.mean((np.clip(np.rint(w / s), -8, 7) * s - w) ** 2))
    assert err < naive / 3
    bits = enc.nbytes() * 8 / w.size
    assert 4.5 <= bits <= 4.6  # 4 + 4 (zero point) / 32 + 8 (scale) / 32 + 32 (super) / 256
    e8 = fm.get("int8").encode(w, 0)
    per_ch = np.abs(w).reshape(320, -1).max(1) / 127
    assert (np.abs(fm.get("int8").decode(e8) - w).reshape(320, -1).max(1)
            <= per_ch * 0.5 * (1 + 1e-5)).all()


def test_pack4_roundtrip():
    v = np.random.default_rng(2).integers(0, 16, size=(7, 5), dtype=np.uint8)
    assert np.array_equal(fm.unpack4(fm.pack4(v), v.shape), v)
    assert fm.pack4(np.array([1, 2], np.uint8)) == bytes([0x21])  # first value in the low nibble


def test_plan_rules():
    assert qp.group_of("down_blocks.1.resnets.0.conv1.weight") == "down_blocks.1.resnets.0"
    assert qp.group_of("text_model.encoder.layers.7.mlp.fc1.weight") == "text_model.encoder.layers.7"
    assert qp.group_of("conv_in.weight") == "conv_in"
    assert qp.group_of("time_embedding.linear_1.weight") == "time_embedding"
    assert qp.weight_format("int4", "time_embedding.linear_1.weight", "gemm")[0] == "fp16"
    assert qp.weight_format("int4", "embeddings.token_embedding.weight", "gather")[0] == "int8"
    assert qp.stage_formats("int4", {"vae_decoder": "fp32"}, ("text_encoder", "unet",
                                                              "vae_decoder")) == {
        "text_encoder": "int8", "unet": "int4", "vae_decoder": "fp32"}
    assert qp.label({"text_encoder": "int8", "unet": "int4", "vae_decoder": "fp16"}) == "int4"
    assert qp.label({"text_encoder": "fp32", "unet": "int4"}) == "mixed"


@pytest.fixture(scope="module")
def quantized(builtin_build, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for fmt in ("int8", "int4"):
        out[fmt] = root / f"sdc-tiny-{fmt}"
        run_sdc("build", "--from", builtin_build, "--precision", fmt, "--out", out[fmt])
    return out


def _data_bytes(folder, stage) -> int:
    m = read_manifest(folder)
    return m["files"][f"{stage}/model.onnx_data"]["bytes"]


def test_sdc_tiny_quantized_builds(builtin_build, quantized):
    fp32 = read_manifest(builtin_build)
    for fmt, folder in quantized.items():
        m = read_manifest(folder)
        assert m["precision"] == fmt
        assert m["quantized_from"] == {"path": str(builtin_build), "build_key": fp32["build_key"],
                                       "precision": "fp32"}
        unet, te = m["graphs"]["unet"], m["graphs"]["text_encoder"]
        assert unet["precision"] == fmt and te["precision"] == "int8"
        assert m["graphs"]["vae_decoder"]["precision"] == "fp16"
        target = fm.get(fmt).default_target_db
        assert unet["parity"]["passed"] and unet["parity"]["value"] >= target
        assert unet["parity"]["metric"] == "psnr_db" and len(unet["parity"]["cases"]) == 14
        q = unet["quantization"]
        # the kept layers are named with their reasons, and stored in 16 bits
        assert set(q["kept"]) == {"conv_in.weight", "conv_out.weight",
                                  "time_embedding.linear_1.weight", "time_embedding.linear_2.weight"}
        assert all(q["layers"][k]["format"] == "fp16" for k in q["kept"])
        assert sum(1 for v in q["layers"].values() if v["format"] == fmt) > 100
        # the images of the built-in prompts are gated against the float build's
        img = m["quantization"]["images"]
        assert img["gated"] and img["worst_db"] >= img["threshold_db"] == {"int8": 30, "int4": 18}[fmt]
        # onnx_data shrinks by the format's bits (int8 ~ 1/4 + scales; int4 ~ 1/7)
        ratio = _data_bytes(folder, "unet") / _data_bytes(builtin_build, "unet")
        assert ratio < {"int8": 0.28, "int4": 0.17}[fmt], ratio
        assert _data_bytes(folder, "text_encoder") < 0.3 * _data_bytes(builtin_build, "text_encoder")
        run_sdc("verify", folder)
    text = run_sdc("inspect", quantized["int4"]).stdout
    assert "kept in 16 bits: conv_in, conv_out, time_embedding" in text
    assert "quality target 25 dB" in text and "quantized from" in text


def _image(folder, tmp_path, name, *extra):
    from PIL import Image

    out = tmp_path / name
    run_sdc("run", PROMPT, "-a", folder, "--seed", "7", "--out", out, *extra)
    return np.asarray(Image.open(next(out.glob("*.png")))).astype(np.float64)


def test_run_quantized_images_close_to_fp32(builtin_build, quantized, tmp_path):
    ref = _image(builtin_build, tmp_path, "fp32")
    for fmt, floor in (("int8", 30.0), ("int4", 18.0)):
        img = _image(quantized[fmt], tmp_path, fmt)
        psnr = 10 * np.log10(255 ** 2 / np.mean((img - ref) ** 2))
        assert psnr >= floor, (fmt, psnr)


def test_session_keeps_weights_quantized(quantized, tmp_path):
    # the runtime's CPU sessions (ORT_ENABLE_BASIC) must not constant-fold DequantizeLinear back
    # into float initializers: that would put the fp32 weights in memory again
    import onnx
    import onnxruntime as ort

    src = quantized["int4"] / "unet" / "model.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False)
    dq = [n for n in opt.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) >= 2 * 120
    kinds = {onnx.TensorProto.UINT4, onnx.TensorProto.INT8}
    assert sum(1 for t in opt.graph.initializer if t.data_type in kinds) >= 120


def test_quality_target_search(builtin_build, tmp_path):
    out = tmp_path / "unet-int4-40"
    proc = run_sdc("build", "--from", builtin_build, "--stage-precision", "unet=int4",
                   "--quality-target", "40dB", "--out", out)
    m = read_manifest(out)
    assert m["precision"] == "mixed"
    assert m["graphs"]["text_encoder"]["precision"] == "fp32"  # untouched: hard-linked
    assert _sha(out / "text_encoder" / "model.onnx_data") == _sha(
        builtin_build / "text_encoder" / "model.onnx_data")
    q = m["graphs"]["unet"]["quantization"]
    s = q["search"]
    assert q["target_db"] == 40 and q["achieved_db"] >= 40
    assert len(s["sensitivity_db"]) > 20 and s["kept_fp16_groups"]
    for g in s["kept_fp16_groups"]:
        members = [v for v in q["layers"].values() if v["group"] == g]
        assert members and all(v["format"] == "fp16" for v in members)
    # the most sensitive groups are the ones kept
    worst = sorted(s["sensitivity_db"], key=s["sensitivity_db"].get)[:len(s["kept_fp16_groups"])]
    assert set(worst) == set(s["kept_fp16_groups"])
    assert "kept" in proc.stderr + proc.stdout


BAD = [
    (["--precision", "int3"], "expected one of fp16, fp32, int8, int4"),
    (["--precision", "int4", "--block-size", "48"], "--block-size 48: expected one of 32, 64, 128"),
    (["--stage-precision", "decoder=int8"], "no stage 'decoder'"),
    (["--stage-precision", "unet=int5"], "unknown weight format 'int5'"),
    (["--stage-precision", "unet"], "expected STAGE=FORMAT"),
    (["--precision", "int8", "--quality-target", "loud"], "expected a PSNR in dB"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_quantize_input(builtin_build, tmp_path, args, message):
    out = tmp_path / "out"
    proc = run_sdc("build", "--from", builtin_build, *args, "--out", out, check=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], proc.stderr
    assert not out.exists()


def test_quality_target_refusal_names_best_and_layers(build_fp32, tmp_path):
    # the random test model's fp32 weights (sdc-tiny ships fp16-exact weights, which fp16 keeps
    # exactly, so any target is reachable there)
    proc = run_sdc("build", "--from", build_fp32, "--stage-precision", "text_encoder=int8",
                   "--quality-target", "150dB", "--out", tmp_path / "x", check=False)
    err = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(err) == 1 and "cannot be met" in err[0]
    assert "with every layer group at fp16 it reaches" in err[0]
    assert "encoder.layers." in err[0] and "dB alone" in err[0]
    assert not (tmp_path / "x").exists()


def test_already_quantized_and_lora_refusals(builtin_build, quantized, tmp_path):
    int8 = quantized["int8"]
    proc = run_sdc("build", "--from", int8, "--precision", "int4", "--out", tmp_path / "a",
                   check=False)
    assert proc.returncode != 0 and "is already quantized (int8)" in proc.stderr
    assert f"--from {builtin_build}" in proc.stderr
    # sdc run --lora on a quantized build: refused by name, never applied to dequantized weights
    proc = run_sdc("run", PROMPT, "-a", int8, "--lora", "x.safetensors", check=False)
    assert proc.returncode != 0 and "is a quantized build" in proc.stderr
    assert "fused into its float weights before quantizing" in proc.stderr
    # a copy whose float source is gone cannot take a LoRA
    copy = tmp_path / "copy"
    shutil.copytree(int8, copy)
    m = read_manifest(copy)
    m["quantized_from"]["path"] = str(tmp_path / "gone")
    (copy / "manifest.json").write_text(json.dumps(m))
    proc = run_sdc("build", "--from", copy, "--lora", "x.safetensors", "--out", tmp_path / "b",
                   check=False)
    assert proc.returncode != 0 and "float source" in proc.stderr and "is gone" in proc.stderr
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def lora_a(tiny_folder, tmp_path_factory):
    from lora_files import make_peft_lora

    return make_peft_lora(tiny_folder, tmp_path_factory.mktemp("qlora"), seed=21)


def test_lora_fused_before_quantization(build_fp32, lora_a, tmp_path):
    # one step: fuse into the float weights, then quantize ...
    direct = tmp_path / "direct"
    run_sdc("build", "--from", build_fp32, "--precision", "int8", "--lora", f"{lora_a}:0.8",
            "--out", direct)
    # ... equals quantizing a float build that holds the LoRA (sdc build --from --lora, fp32)
    fused = tmp_path / "fused-fp32"
    run_sdc("build", "--from", build_fp32, "--lora", f"{lora_a}:0.8", "--out", fused)
    after = tmp_path / "after"
    run_sdc("build", "--from", fused, "--precision", "int8", "--out", after)
    for stage in ("unet", "text_encoder"):
        assert _sha(direct / stage / "model.onnx_data") == _sha(after / stage / "model.onnx_data")
    m = read_manifest(direct)
    assert m["loras"][0]["applied"] == "before quantization"
    assert not m["quantization"]["images"]["gated"]  # random test model: recorded, not gated
    # a LoRA onto a quantized build goes to its float source, with its recipe
    plain = tmp_path / "plain"
    run_sdc("build", "--from", build_fp32, "--precision", "int8", "--out", plain)
    again = tmp_path / "again"
    run_sdc("build", "--from", plain, "--lora", f"{lora_a}:0.8", "--out", again)
    assert _sha(again / "unet" / "model.onnx_data") == _sha(direct / "unet" / "model.onnx_data")
    assert read_manifest(again)["quantized_from"]["path"] == str(build_fp32)
    # and a quantized build that already holds a LoRA is refused (its float base has none)
    proc = run_sdc("build", "--from", direct, "--lora", f"{lora_a}:0.5", "--out", tmp_path / "x",
                   check=False)
    assert proc.returncode != 0 and "already has LoRA" in proc.stderr


def test_quantize_is_torch_free(build_fp32, tmp_path):
    assert_cli_torch_free(["build", "--from", str(build_fp32), "--precision", "int4", "--out",
                           str(tmp_path / "q4")])
    assert read_manifest(tmp_path / "q4")["precision"] == "int4"


def test_chunks_and_tiles_of_a_quantized_build(chunked_tiny, tmp_path):
    from sdc.runtime.manifest import load_manifest
    from sdc.runtime.unet_chunks import ChunkedUNet
    from sdc.runtime.sessions import open_session

    out = tmp_path / "c3-int8"  # int8: the UNet meets its target without a search (faster)
    run_sdc("build", "--from", chunked_tiny, "--precision", "int8", "--out", out)
    m = load_manifest(out)
    unet = m["graphs"]["unet"]
    parts = unet["chunks"]["parts"]
    assert len(parts) == 3 and unet["chunks"]["parity"]["passed"]
    assert all(c["max_rel"] <= 1e-4 for c in unet["chunks"]["parity"]["chunks"])
    # no chunk boundary carries a dequantized weight
    assert not any(t.endswith(".weight") for p in parts for t in p["inputs"])
    tiled = m["graphs"]["vae_decoder"]["tiled"]
    assert tiled["parity"]["passed"] and tiled["parity"]["value"] <= 1e-4
    # the segments share the whole decoder's data file: no second copy of its weights
    assert all(f.startswith("vae_decoder/tiled-") for f in tiled["files"])
    assert not any(f.endswith("_data") for f in tiled["files"])
    assert m["graphs"]["vae_decoder"]["files"] == ["vae_decoder/model.onnx",
                                                   "vae_decoder/model.onnx_data"]
    # the runtime's chunk runner gives the whole quantized graph's output
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
             "timestep": np.array([500.0, 20.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 64)).astype(np.float32)}
    whole = open_session(out, "unet", unet, "cpu").run(feeds, 4)
    chained = ChunkedUNet(out, "unet", unet, "cpu", ()).run(feeds, 4)
    assert np.abs(chained - whole).max() <= 1e-4 * np.abs(whole).max()
    run_sdc("verify", out)
