"""`sdc build` on a tiny diffusers folder: layout, manifest, and the graphs against diffusers itself.

The oracle is the diffusers/transformers module called the way the diffusers pipeline calls it
(`unet(...).sample`, `vae.decode(...).sample`, `vae.encode(...).latent_dist`), at shapes the build's
own parity gate never saw, so the dynamic axes are proven and not just the trace shape.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import read_manifest
from sdc.runtime.manifest import sha256_file
from tiny import load_components

OPTIMUM_IO = {
    "text_encoder": (["input_ids"], ["last_hidden_state"]),
    "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
    "vae_decoder": (["latent_sample"], ["sample"]),
    "vae_encoder": (["sample"], ["latent_parameters"]),
}
# fp32 ONNX vs torch: the exporter reorders float ops (~1e-6 relative on these graphs); 1e-4 is
# the build gate's own bound and two orders above that noise.
FP32_REL = 1e-4


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_layout_and_manifest(build_fp32):
    m = read_manifest(build_fp32)
    assert m["format"] == "sdc-artifacts" and m["format_version"] == 1
    assert len(m["build_key"]) == 64
    assert m["precision"] == "fp32"
    assert m["base_model"]["kind"] == "diffusers" and m["base_model"]["family"] == "sd1"
    assert m["base_model"]["builtin"] is False and m["defaults"] == {}
    assert m["pipeline"] == ["text_encoder", "unet", "vae_decoder"]
    assert m["model"]["latent_channels"] == 4 and m["model"]["vae_scale_factor"] == 8
    assert m["model"]["scaling_factor"] == pytest.approx(0.18215)
    for key in ("sdc", "torch", "onnx", "onnxruntime"):
        assert m["versions"][key]
    # Optimum's layout
    for rel in ("model_index.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "tokenizer/tokenizer.json", "scheduler/scheduler_config.json",
                "unet/model.onnx", "unet/model.onnx_data", "text_encoder/model.onnx",
                "vae_decoder/model.onnx", "vae_encoder/model.onnx"):
        assert (build_fp32 / rel).is_file(), rel
    # every file on disk is in the manifest with its true hash and size, and nothing else is
    on_disk = {p.relative_to(build_fp32).as_posix() for p in build_fp32.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == set(m["files"])
    for rel, entry in m["files"].items():
        assert entry["bytes"] == (build_fp32 / rel).stat().st_size
        assert entry["sha256"] == sha256_file(build_fp32 / rel)
    assert m["build"]["peak_rss_bytes"] > 0 and m["build"]["seconds"] > 0


def test_graph_io_follows_optimum_and_is_dynamic(build_fp32):
    m = read_manifest(build_fp32)
    for stage, (ins, outs) in OPTIMUM_IO.items():
        g = m["graphs"][stage]
        assert [t["name"] for t in g["inputs"]] == ins
        assert [t["name"] for t in g["outputs"]] == outs
        assert g["opset"] == 18
        proto = onnx.load(str(build_fp32 / stage / "model.onnx"), load_external_data=False)
        inits = {t.name for t in proto.graph.initializer}
        # the graph's own inputs; the others are adapter slots: overridable initializers, which
        # Optimum and onnxruntime's get_inputs() do not list as inputs
        real = [i for i in proto.graph.input if i.name not in inits]
        slots = [i.name for i in proto.graph.input if i.name in inits]
        assert [i.name for i in real] == ins
        assert slots == (g["weights"]["slots"] if stage in ("unet", "text_encoder") else [])
        assert any(i.domain in ("", "ai.onnx") and i.version == 18 for i in proto.opset_import)
        # batch (and spatial/sequence) axes are symbolic in the graph itself
        for inp in real:
            dims = [d.dim_param for d in inp.type.tensor_type.shape.dim]
            assert dims[0] == "batch", (stage, inp.name, dims)
    unet_in = m["graphs"]["unet"]["inputs"][0]["shape"]
    assert unet_in == ["batch", 4, "latent_height", "latent_width"]
    assert m["graphs"]["vae_decoder"]["outputs"][0]["shape"] == \
        ["batch", 3, "latent_height*8", "latent_width*8"]


def test_parity_recorded_at_two_shapes_including_non_square(build_fp32):
    m = read_manifest(build_fp32)
    for stage, g in m["graphs"].items():
        p = g["parity"]
        assert p["passed"] and p["metric"] == "max_rel" and p["threshold"] == FP32_REL
        assert 0 <= p["value"] <= FP32_REL
        assert len(p["cases"]) >= 2
        shapes = [c["input_shapes"] for c in p["cases"]]
        first = next(iter(shapes[1].values()))
        if stage != "text_encoder":
            assert first[-1] != first[-2], f"{stage}: no non-square parity case"
        assert len({str(s) for s in shapes}) == len(shapes)


def test_weights_keep_module_names_in_external_data(build_fp32, tiny_folder):
    m = read_manifest(build_fp32)
    comps = load_components(tiny_folder)
    for stage, comp in (("unet", "unet"), ("text_encoder", "text_encoder"), ("vae_decoder", "vae")):
        weights = m["graphs"][stage]["weights"]
        proto = onnx.load(str(build_fp32 / stage / "model.onnx"), load_external_data=False)
        inits = {i.name: i for i in proto.graph.initializer}
        params = dict(comps[comp].named_parameters())
        if stage != "vae_decoder":
            assert weights["not_in_graph"] == 0
            assert set(weights["map"]) == set(params)
        for module_name, onnx_name in weights["map"].items():
            init = inits[onnx_name]
            assert list(init.dims) == list(params[module_name].shape), module_name
        # the big weights (LoRA targets) live in model.onnx_data, swappable without re-export
        big = [i for i in proto.graph.initializer if np.prod(i.dims) >= 1024]
        assert big and all(i.data_location == onnx.TensorProto.EXTERNAL for i in big)


@pytest.fixture(scope="module")
def oracle(tiny_folder):
    return load_components(tiny_folder)


def test_unet_matches_diffusers_at_unseen_shape(build_fp32, oracle):
    rng = np.random.default_rng(7)
    sample = rng.standard_normal((3, 4, 6, 10)).astype(np.float32)
    t = np.array([981.0, 500.0, 1.0], np.float32)
    ehs = rng.standard_normal((3, 77, 32)).astype(np.float32)
    out = session(build_fp32 / "unet" / "model.onnx").run(
        None, {"sample": sample, "timestep": t, "encoder_hidden_states": ehs})[0]
    with torch.no_grad():
        ref = oracle["unet"](torch.from_numpy(sample), torch.from_numpy(t),
                             torch.from_numpy(ehs)).sample.numpy()
    assert rel_err(out, ref) < FP32_REL


def test_text_encoder_matches_transformers(build_fp32, oracle):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(build_fp32 / "tokenizer" / "tokenizer.json"))
    ids = [tok.encode(p).ids for p in ("a red circle on a blue background", "a photo of a cat")]
    for seq in (77, 9):
        batch = np.full((2, seq), 49407, np.int64)
        for i, row in enumerate(ids):
            batch[i, : min(len(row), seq)] = row[:seq]
        out = session(build_fp32 / "text_encoder" / "model.onnx").run(None, {"input_ids": batch})[0]
        with torch.no_grad():
            ref = oracle["text_encoder"](torch.from_numpy(batch)).last_hidden_state.numpy()
        assert out.shape == (2, seq, 32)
        assert rel_err(out, ref) < FP32_REL


def test_vae_graphs_match_diffusers(build_fp32, oracle):
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((1, 4, 5, 7)) / 0.18215).astype(np.float32)  # odd, non-square
    out = session(build_fp32 / "vae_decoder" / "model.onnx").run(None, {"latent_sample": z})[0]
    with torch.no_grad():
        ref = oracle["vae"].decode(torch.from_numpy(z)).sample.numpy()
    assert out.shape == (1, 3, 40, 56)
    assert rel_err(out, ref) < FP32_REL

    x = rng.uniform(-1, 1, (2, 3, 48, 80)).astype(np.float32)
    params = session(build_fp32 / "vae_encoder" / "model.onnx").run(None, {"sample": x})[0]
    with torch.no_grad():
        dist = oracle["vae"].encode(torch.from_numpy(x)).latent_dist
    mean, logvar = np.split(params, 2, axis=1)
    assert rel_err(mean, dist.mean.numpy()) < FP32_REL
    assert rel_err(np.clip(logvar, -30, 20), dist.logvar.numpy()) < FP32_REL


def test_fp16_build(build_fp16, build_fp32, oracle):
    m = read_manifest(build_fp16)
    assert m["precision"] == "fp16"
    g = m["graphs"]
    assert g["unet"]["precision"] == "fp16" and g["text_encoder"]["precision"] == "fp16"
    # the VAE stays fp32 in fp16 builds, and the manifest says why
    for stage in ("vae_decoder", "vae_encoder"):
        assert g[stage]["precision"] == "fp32" and "overflow" in g[stage]["precision_reason"]
    for stage in ("unet", "text_encoder"):
        p = g[stage]["parity"]
        assert p["metric"] == "psnr_db" and p["threshold"] == 35.0 and p["value"] >= 35.0
        assert p["reference"] == "torch fp32"
    proto = onnx.load(str(build_fp16 / "unet" / "model.onnx"), load_external_data=False)
    conv_in = next(i for i in proto.graph.initializer if i.name == "unet.conv_in.weight")
    assert conv_in.data_type == onnx.TensorProto.FLOAT16
    # graph boundaries stay float32 at every precision
    assert [t["dtype"] for t in g["unet"]["inputs"]] == ["float32"] * 3
    # fp16 UNet weights take half the bytes of fp32 ones
    size = lambda b: (b / "unet" / "model.onnx_data").stat().st_size  # noqa: E731
    assert size(build_fp16) < 0.55 * size(build_fp32)
    # and the fp16 graph still tracks diffusers fp32 at an unseen shape (PSNR, as the gate)
    rng = np.random.default_rng(11)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 4)).astype(np.float32),
             "timestep": np.array([10.0, 700.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    out = session(build_fp16 / "unet" / "model.onnx").run(None, feeds)[0]
    with torch.no_grad():
        ref = oracle["unet"](*[torch.from_numpy(v) for v in feeds.values()]).sample.numpy()
    psnr = 20 * np.log10((ref.max() - ref.min()) / np.sqrt(np.mean((out - ref) ** 2)))
    assert psnr >= 35.0
