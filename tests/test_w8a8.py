"""w8a8 builds (quant/static.py): sdc-tiny's UNet on 8-bit activations and weights.

Oracles from outside: onnxruntime's own graph optimizer must turn the w8a8 graph into integer
kernels (QLinearConv and integer matmuls) at the level the manifest records, the float build's
graph and images are the references the gate and the test measure against, and `sdc run` must
open the graph at that level (a BASIC session would compute the same graph in float).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import read_manifest, run_sdc
from sdc.errors import SdcError

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def w8a8(builtin_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("w8a8") / "sdc-tiny-w8a8"
    run_sdc("build", "--from", builtin_build, "--precision", "w8a8", "--out", out)
    return out


def test_w8a8_build_manifest(builtin_build, w8a8):
    m = read_manifest(w8a8)
    assert m["precision"] == "w8a8"
    unet = m["graphs"]["unet"]
    assert unet["precision"] == "w8a8" and unet["optimization"] == "all"
    assert m["graphs"]["text_encoder"]["precision"] == "int8"
    # the decoder too, on its pixel gate; its exact tiling segments are not kept (the float
    # build has them), and the VAE encoder (img2img only) keeps float arithmetic
    dec = m["graphs"]["vae_decoder"]
    assert dec["precision"] == "w8a8" and dec["optimization"] == "all"
    assert dec["parity"]["passed"] and dec["parity"]["value"] >= dec["parity"]["threshold"] == 30.0
    assert "tiled" in read_manifest(builtin_build)["graphs"]["vae_decoder"] and "tiled" not in dec
    assert "segments" in dec["quantization"]["exact_tiles"]
    assert not any(r.startswith("vae_decoder/tiled") for r in m["files"])
    assert dec["quantization"]["static"]["quantized_nodes"] >= 20
    assert m["graphs"]["vae_encoder"]["precision"] == "fp16"
    assert unet["parity"]["passed"] and unet["parity"]["value"] >= 30.0 == unet["parity"]["threshold"]
    q = unet["quantization"]
    info = q["static"]
    # every conv and linear but the kept ones and the time embedding's path reads 8-bit inputs
    assert info["quantized_nodes"] >= 45 and info["calibration_inputs"] == 12
    kept = set(info["kept_float"].values())
    assert any("conv_in" in why for why in kept) and any("time embedding" in why for why in kept)
    assert info["float_nodes"] == len(info["kept_float"])
    # quant/rewrite.py found every GEGLU (chunk and GELU) and biased Linear of the 7 blocks
    assert info["rewrites"] == {"split_slices": 7, "gelu": 7, "gemm_bias": 28}
    formats = {v["format"] for v in q["layers"].values()}
    assert formats == {"w8a8", "fp32"}
    assert q["layers"]["conv_in.weight"]["format"] == "fp32"
    # int8 weights on disk: the UNet's data is ~1/4 of the float build's
    fp32 = read_manifest(builtin_build)
    data = lambda man: sum(e["bytes"] for r, e in man["files"].items()  # noqa: E731
                           if r.startswith("unet/") and not r.endswith((".onnx", ".json")))
    assert data(m) < 0.3 * data(fp32)
    img = m["quantization"]["images"]
    assert img["gated"] and img["worst_db"] >= img["threshold_db"] == 20.0
    run_sdc("verify", w8a8)
    text = run_sdc("inspect", w8a8).stdout
    assert "w8a8" in text and "8-bit activations" in text


def test_onnxruntime_runs_the_w8a8_unet_on_integer_kernels(w8a8, tmp_path):
    import onnx
    import onnxruntime as ort

    from sdc.runtime.cpu import u8s8_saturates
    from sdc.runtime.sessions import apply_level

    opts = ort.SessionOptions()
    apply_level(opts, read_manifest(w8a8)["graphs"]["unet"]["optimization"])
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(w8a8 / "unet" / "model.onnx"), opts,
                         providers=["CPUExecutionProvider"])
    graph = onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    # the weights stay int8 (u8s8 kernels) on a VNNI CPU; the precision mode makes them uint8
    # (exact u8u8 kernels) where u8s8 saturates
    dtypes = {i.name: i.data_type for i in graph.initializer}
    weights = {dtypes[n.input[3]] for n in graph.node if n.op_type == "QLinearConv"}
    assert weights == {onnx.TensorProto.UINT8 if u8s8_saturates() else onnx.TensorProto.INT8}
    assert ops.count("QLinearConv") >= 30, sorted(set(ops))
    integer_matmuls = sum(ops.count(o) for o in ("QGemm", "QLinearMatMul", "MatMulIntegerToFloat",
                                                 "DynamicQuantizeMatMul"))
    assert integer_matmuls >= 10, sorted(set(ops))
    assert ops.count("Conv") + ops.count("FusedConv") <= 4  # conv_in, conv_out (kept), no more


def test_run_w8a8_image_close_to_fp32(builtin_build, w8a8, tmp_path):
    from PIL import Image

    def image(folder, name):
        out = tmp_path / name
        run_sdc("run", PROMPT, "-a", folder, "--seed", "7", "--out", out)
        return np.asarray(Image.open(next(out.glob("*.png")))).astype(np.float64)

    ref, img = image(builtin_build, "fp32"), image(w8a8, "w8a8")
    psnr = 10 * np.log10(255 ** 2 / np.mean((img - ref) ** 2))
    assert psnr >= 20.0, psnr


def test_runtime_opens_w8a8_at_its_level(w8a8):
    from sdc.runtime.manifest import load_manifest
    from sdc.runtime.sessions import open_session

    m = load_manifest(w8a8)
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
             "timestep": np.array([500.0, 20.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 64)).astype(np.float32)}
    graph = m["graphs"]["unet"]
    fused = open_session(w8a8, "unet", graph, "cpu").run(feeds, 4)
    # the same graph at the float level computes with dequantized values: close, not equal
    plain = open_session(w8a8, "unet", {**graph, "optimization": "basic"}, "cpu").run(feeds, 4)
    assert not np.array_equal(fused, plain)
    assert np.abs(fused - plain).max() <= 0.1 * np.abs(plain).max()
    with pytest.raises(SdcError, match="graph optimization 'extended'"):
        open_session(w8a8, "unet", {**graph, "optimization": "extended"}, "cpu")


def test_w8a8_refuses_an_fp16_build(build_fp16, tmp_path):
    out = tmp_path / "bad"
    proc = run_sdc("build", "--from", build_fp16, "--precision", "w8a8", "--out", out,
                   check=False)
    assert proc.returncode != 0 and "calibrates fp32 activations" in proc.stderr, proc.stderr
    assert not out.exists()


def test_w8a8_decoder_falls_back_to_fp16_when_its_gate_refuses(builtin_build, tmp_path,
                                                                monkeypatch):
    """The recipe's decoder falls back to fp16 weights (exact tiles kept) when its gate refuses
    w8a8; named in --stage-precision it is refused instead. The gate is made unreachable here
    (a trained decoder whose outliers do not fit 8 bits is what it stands for)."""
    from sdc.errors import ParityError
    from sdc.quant import build
    from sdc.quant.build import QuantizeOptions, quantize_build

    real_gate = build._gate

    def strict_decoder_gate(stage, inputs, reference, outs, target):
        w8a8 = stage == "vae_decoder" and target == 30.0  # fp16's fallback gate is 35 dB
        return real_gate(stage, inputs, reference, outs, 120.0 if w8a8 else target)

    monkeypatch.setattr(build, "_gate", strict_decoder_gate)
    out, m, _ = quantize_build(QuantizeOptions(from_dir=builtin_build, precision="w8a8",
                                               out=tmp_path / "fallback"), log=lambda s: None)
    dec = m["graphs"]["vae_decoder"]
    assert dec["precision"] == "fp16" and "tiled" in dec
    refused = dec["quantization"]["fallback"]
    assert refused["format"] == "w8a8" and refused["target_db"] == 30.0
    assert "parity failed for the quantized vae_decoder" in refused["why"]
    assert "required psnr_db >= 120" in refused["why"]
    assert m["graphs"]["unet"]["precision"] == "w8a8"
    assert m["quantization"]["formats"]["vae_decoder"] == "fp16" and m["precision"] == "mixed"
    run_sdc("verify", out)

    named = tmp_path / "named"
    with pytest.raises(ParityError, match="vae_decoder"):
        quantize_build(QuantizeOptions(from_dir=builtin_build, precision="w8a8",
                                       stage_precision={"vae_decoder": "w8a8"}, out=named),
                       log=lambda s: None)
    assert not named.exists()


def test_w8a8_decoder_tiles_are_blended(w8a8, tmp_path):
    proc = run_sdc("run", PROMPT, "-a", w8a8, "--seed", "7", "--vae-tile", "8",
                   "--out", tmp_path / "tiled")
    assert len(list((tmp_path / "tiled").glob("*.png"))) == 1
    assert "no exact tiled decoder" in proc.stderr and "vae_decoder=fp16" in proc.stderr


def test_w8a8_refuses_unet_chunks(chunked_tiny, tmp_path):
    out = tmp_path / "bad"
    proc = run_sdc("build", "--from", chunked_tiny, "--precision", "w8a8", "--out", out,
                   check=False)
    assert proc.returncode != 0 and "UNet chunks" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("flags, machine, saturates", [
    ("fpu sse2 avx2 fma", "x86_64", True),                     # AVX2 only: VPMADDUBSW
    ("fpu avx2 avx512f avx512bw", "x86_64", True),             # AVX-512 without VNNI
    ("fpu avx2 avx512f avx512_vnni avx512_bf16", "x86_64", False),
    ("fpu avx2 avx_vnni", "x86_64", False),                    # AVX-VNNI (256-bit)
    ("fpu avx2 avx512_vnni amx_int8", "AMD64", False),
    (None, "x86_64", True),                                    # flags unreadable: exact kernels
    ("fp asimd asimddp", "aarch64", False),                    # no such mode off x86
])
def test_u8s8_saturates_reads_the_cpu_flags(flags, machine, saturates):
    from sdc.runtime.cpu import u8s8_saturates

    cpuinfo = "processor\t: 0\nmodel name\t: test\n" + (f"flags\t\t: {flags}\n" if flags else "")
    assert u8s8_saturates(cpuinfo, machine) is saturates
