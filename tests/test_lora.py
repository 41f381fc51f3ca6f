"""LoRA fusion (sdc.fusion) against diffusers' own loader as the oracle, and the three ways to apply
an adapter (build, torch-free re-fuse, run-time swap) against each other.

Tolerances: fused weights within 1e-6 of diffusers' `load_lora_weights` + `fuse_lora` relative to
the weight's largest magnitude (both are float32 results of the same float math; sdc sums in
float64, diffusers in float32, so they differ by float32 rounding, ~1e-7). Images of the three
apply paths: PSNR >= 50 dB on an fp32 build (the paths give the same fp32 weights up to float32
rounding of the same float64 sum; 50 dB is the issue's bar, well above uint8 rounding noise).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import assert_cli_torch_free, read_manifest, run_sdc
from lora_files import make_peft_lora, rewrite, to_kohya

torch = pytest.importorskip("torch")

from sdc.errors import SdcError  # noqa: E402
from sdc.fusion.artifact import fused_initializers, known_modules  # noqa: E402
from sdc.fusion.fuse import (LoraSpec, block_multiplier, parse_lora_arg,  # noqa: E402
                             plan)
from sdc.fusion.lora import read_lora  # noqa: E402

REL = 1e-6


@pytest.fixture(scope="module")
def loras(tiny_folder, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    a = make_peft_lora(tiny_folder, d / "a", seed=11)
    b = make_peft_lora(tiny_folder, d / "b", seed=12, rank=2, alpha=1.0)
    conv = make_peft_lora(tiny_folder, d / "conv", seed=13, conv=True)
    # peft's own random init, unscaled: an update big enough to change the tiny model's image
    strong = make_peft_lora(tiny_folder, d / "strong", seed=14, scale=1.0)
    meta = {"ss_output_name": "seal", "ss_tag_frequency": json.dumps(
        {"10_sks": {"sks seal": 12, "photo": 3}}), "modelspec.trigger_phrase": "sks"}
    kohya = to_kohya(conv, d / "conv-kohya.safetensors", metadata=meta)
    return {"a": a, "b": b, "conv": conv, "kohya": kohya, "strong": strong}


def _diffusers_fused(base, adapters: list[tuple], te: bool = True) -> dict:
    """{(component, param): tensor} after diffusers loads, weights and fuses the adapters."""
    from diffusers import StableDiffusionPipeline

    from sdc.export.quiet import quiet_torch_stack
    from sdc.training.stack import check_peft_stack

    check_peft_stack("diffusers' load_lora_weights (the test oracle)")
    with quiet_torch_stack():
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None,
                                                       requires_safety_checker=False)
        names = []
        for i, (path, _) in enumerate(adapters):
            pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
            names.append(f"l{i}")
        pipe.set_adapters(names, [w for _, w in adapters])
        pipe.fuse_lora(components=["unet", "text_encoder"] if te else ["unet"])
    out = {}
    for comp, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for name, p in model.named_parameters():
            if "lora_" not in name:
                out[(comp, name.replace(".base_layer", ""))] = p.detach().numpy().copy()
    return out


def _known(tiny_folder):
    from sdc.export.sources import resolve_model
    from sdc.fusion.torch_apply import known_from_configs

    return known_from_configs(resolve_model(str(tiny_folder)).configs())


def _sdc_torch_fused(tiny_folder, specs: list[LoraSpec]) -> dict:
    from sdc.export.sources import resolve_model
    from sdc.fusion.torch_apply import TorchFusion

    known = _known(tiny_folder)
    fusion = TorchFusion(plan([(read_lora(s.path, known), s) for s in specs]))
    source = resolve_model(str(tiny_folder))
    out = {}
    for comp in ("unet", "text_encoder"):
        module = source.load(comp)
        fusion.apply(module, comp)
        out.update({(comp, n): p.detach().numpy() for n, p in module.named_parameters()})
    return out


def _assert_close(ours: dict, ref: dict):
    assert set(ref) <= set(ours)
    for key, want in ref.items():
        scale = max(float(np.abs(want).max()), 1e-12)
        assert np.abs(ours[key] - want).max() / scale <= REL, key


@pytest.mark.parametrize("which", ["a", "conv", "kohya"])
def test_fused_weights_match_diffusers(tiny_folder, loras, which):
    # peft format with alpha (8) != rank (4) from the adapter metadata; LoCon conv layers; the
    # kohya layout of the same conv adapter with per-module .alpha. The kohya file is a renamed
    # copy of the diffusers one, so diffusers fusing the original is its oracle (diffusers' own
    # kohya converter does not take text-encoder + conv files of this tiny model).
    spec = LoraSpec(loras[which], 0.7)
    ref = _diffusers_fused(tiny_folder, [(loras["conv" if which == "kohya" else which], 0.7)])
    ours = _sdc_torch_fused(tiny_folder, [spec])
    _assert_close(ours, ref)
    lora = read_lora(loras[which], _known(tiny_folder))
    assert {layer.component for layer in lora.layers} == {"unet", "text_encoder"}
    assert lora.alphas() == [3.0, 8.0] and lora.ranks() == [2, 4]
    if which != "a":
        assert any(layer.down.ndim == 4 for layer in lora.layers)  # the 3x3 conv LoRAs
    # the update is real: some weights moved by far more than the tolerance
    base = _sdc_torch_fused(tiny_folder, [])
    moved = [k for k in ref if np.abs(ref[k] - base[k]).max() > 1e-3]
    assert len(moved) == len(lora.layers)


def test_two_loras_with_weights_match_set_adapters(tiny_folder, loras):
    specs = [LoraSpec(loras["a"], 0.8), LoraSpec(loras["b"], 0.5)]
    ref = _diffusers_fused(tiny_folder, [(loras["a"], 0.8), (loras["b"], 0.5)])
    _assert_close(_sdc_torch_fused(tiny_folder, specs), ref)


def test_numpy_fusion_from_a_build_matches_diffusers(tiny_folder, build_fp32, loras):
    # the torch-free path (re-fuse and run-time swap) reads base weights from the build's data
    manifest = read_manifest(build_fp32)
    known = known_modules(manifest)
    adapters = [(read_lora(loras["a"], known), LoraSpec(loras["a"], 0.8)),
                (read_lora(loras["b"], known), LoraSpec(loras["b"], 0.5))]
    fused, deltas = fused_initializers(build_fp32, manifest, plan(adapters))
    ref = _diffusers_fused(tiny_folder, [(loras["a"], 0.8), (loras["b"], 0.5)])
    n = 0
    for stage, arrays in fused.items():
        names = {v: k for k, v in manifest["graphs"][stage]["weights"]["map"].items()}
        for init, arr in arrays.items():
            want = ref[(stage, names[init])]
            assert np.abs(arr - want).max() / np.abs(want).max() <= REL, init
            n += 1
    assert n == len(adapters[0][0].layers)  # b targets a subset of a's modules
    assert set(deltas) == {str(loras["a"]), str(loras["b"])} and min(deltas.values()) > 0


def test_block_weights():
    blocks = parse_lora_arg("x.safetensors:1:down=0,mid=0.5,up.1=2,te=0").blocks
    assert block_multiplier("unet", "down_blocks.1.attentions.0.proj_in", blocks) == 0
    assert block_multiplier("unet", "mid_block.attentions.0.proj_in", blocks) == 0.5
    assert block_multiplier("unet", "up_blocks.1.attentions.0.proj_in", blocks) == 2
    assert block_multiplier("unet", "up_blocks.0.resnets.0.conv1", blocks) == 1
    assert block_multiplier("unet", "conv_in", blocks) == 1
    assert block_multiplier("text_encoder", "encoder.layers.0.self_attn.q_proj", blocks) == 0


def test_block_weights_zero_leave_blocks_at_base(tiny_folder, loras):
    spec = parse_lora_arg(f"{loras['a']}:1.0:down=0,te=0")
    ours = _sdc_torch_fused(tiny_folder, [spec])
    base = _sdc_torch_fused(tiny_folder, [])
    full = _sdc_torch_fused(tiny_folder, [LoraSpec(loras["a"])])
    for key in base:
        comp, name = key
        untouched = comp == "text_encoder" or name.startswith("down_blocks.")
        if untouched:
            np.testing.assert_array_equal(ours[key], base[key])
        else:
            np.testing.assert_array_equal(ours[key], full[key])


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors") == LoraSpec(__import__("pathlib").Path("a.safetensors"))
    s = parse_lora_arg("/x:y/a.safetensors:0.25")
    assert str(s.path) == "/x:y/a.safetensors" and s.weight == 0.25
    for bad in ("a.safetensors:1:down=x", "a.safetensors:1:left=1", "a.safetensors:nan"):
        with pytest.raises(SdcError):
            parse_lora_arg(bad)


# ---------------------------------------------------------------------------------------------
# three ways to apply, one image


def _image(path):
    from PIL import Image

    return np.asarray(Image.open(path)).astype(np.float64)


def _psnr(a, b):
    mse = np.mean((a - b) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


RUN = ["a seal", "--steps", "3", "--seed", "5", "--width", "64", "--height", "64", "--quiet"]


def test_three_apply_paths_give_the_same_image(tiny_folder, build_fp32, loras, tmp_path):
    spec = f"{loras['strong']}:0.8"
    fused = tmp_path / "fused"
    run_sdc("build", tiny_folder, "--precision", "fp32", "--lora", spec, "--out", fused)
    refused = tmp_path / "refused"
    proc = run_sdc("build", "--from", build_fp32, "--lora", spec, "--out", refused)
    assert "no torch" in proc.stdout + proc.stderr
    imgs = {}
    for name, art, extra in (("build", fused, []), ("refuse", refused, []),
                             ("swap", build_fp32, ["--lora", spec]), ("base", build_fp32, [])):
        run_sdc("run", *RUN, "--artifacts", art, "--out", tmp_path / f"{name}.png", *extra)
        imgs[name] = _image(tmp_path / f"{name}.png")
    for a, b in (("build", "refuse"), ("build", "swap"), ("refuse", "swap")):
        assert _psnr(imgs[a], imgs[b]) >= 50.0, (a, b, _psnr(imgs[a], imgs[b]))
    assert _psnr(imgs["build"], imgs["base"]) < 40.0  # the adapter visibly changes the image
    m = read_manifest(fused)
    lo = m["loras"][0]
    assert lo["applied"] == "build" and lo["weight"] == 0.8 and lo["rank"] == [2, 4]
    assert lo["alpha"] == [3.0, 8.0] and lo["alpha_source"] == "metadata"
    assert lo["max_abs_delta"] > 0 and lo["matched_keys"] == lo["total_keys"]
    r = read_manifest(refused)
    assert r["loras"][0]["applied"] == "refuse" and r["refused_from"]["build_key"] == \
        read_manifest(build_fp32)["build_key"]
    # only the changed graphs' data files differ from the base build
    base_files = read_manifest(build_fp32)["files"]
    changed = {f for f in r["files"] if r["files"][f]["sha256"] != base_files[f]["sha256"]}
    assert changed == {"unet/model.onnx_data", "text_encoder/model.onnx_data"}
    # PNG metadata names the LoRA
    from PIL import Image

    assert "Lora weights: \"lora-14: 0.8\"" in Image.open(tmp_path / "swap.png").info["parameters"]


def test_swap_a_b_a_is_bit_identical(build_fp32, loras):
    from sdc.runtime import generate

    kw = dict(artifacts=build_fp32, steps=2, seed=9, width=64, height=64, verify=False)
    a1 = np.asarray(generate("a seal", loras=(f"{loras['a']}:0.8",), **kw)[0])
    b = np.asarray(generate("a seal", loras=(f"{loras['b']}",), **kw)[0])
    a2 = np.asarray(generate("a seal", loras=(f"{loras['a']}:0.8",), **kw)[0])
    np.testing.assert_array_equal(a1, a2)
    assert np.abs(a1.astype(int) - b).max() > 0


def test_refuse_and_swap_are_torch_free(build_fp32, loras, tmp_path):
    assert_cli_torch_free(["build", "--from", str(build_fp32), "--lora", str(loras["a"]),
                           "--out", str(tmp_path / "r")])
    assert_cli_torch_free(["run", *RUN, "--artifacts", str(build_fp32), "--lora",
                           str(loras["a"]), "--out", str(tmp_path / "s.png")])
    assert_cli_torch_free(["inspect", str(loras["kohya"])])


def test_inspect_lora_reports_format_rank_alpha_triggers(loras):
    proc = run_sdc("inspect", loras["kohya"], "--json")
    rep = json.loads(proc.stdout)
    assert rep["format"] == "kohya" and rep["rank"] == [2, 4] and rep["alpha"] == [3.0, 8.0]
    assert rep["alpha_source"] == "file" and rep["matched_keys"] == rep["total_keys"]
    assert rep["triggers"][:2] == ["sks", "sks seal"]
    assert rep["layers_by_component"]["unet"]["conv"] > 0
    text = run_sdc("inspect", loras["a"]).stdout
    assert "peft" in text and "alpha: 3/8 (from metadata)" in text


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


def _bad(tmp_path, name, edit, loras):
    return rewrite(loras["a"], tmp_path / f"{name}.safetensors", edit)


def _rank_mismatch(t, m):
    k = next(k for k in t if k.endswith("lora_A.weight"))
    t[k] = t[k][:-1]


def _nan(t, m):
    k = next(k for k in t if k.endswith("lora_B.weight"))
    t[k] = t[k].copy()
    t[k][0, 0] = np.nan


def _foreign(t, m):
    t["lora_unet_input_blocks_99_1_proj_in.lora_down.weight"] = np.zeros((2, 4), np.float32)


def _loha(t, m):
    t["lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a"] = np.zeros((2, 4), np.float32)


def _sdxl(t, m):
    t["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = \
        np.zeros((2, 4), np.float32)


@pytest.mark.parametrize("edit,needle", [
    (_rank_mismatch, "rank differs"), (_nan, "NaN"), (_foreign, "match no layer"),
    (_loha, "LoHa"), (_sdxl, "SDXL"),
])
def test_bad_lora_files(tmp_path, build_fp32, loras, edit, needle):
    bad = _bad(tmp_path, edit.__name__, edit, loras)
    out = tmp_path / "out"
    proc = run_sdc("build", "--from", build_fp32, "--lora", bad, "--out", out, check=False)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_truncated_and_missing_files(tmp_path, build_fp32, loras):
    data = loras["a"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    for path, needle in ((cut, "truncated"), (tmp_path / "nope.safetensors", "no such file"),
                         (loras["a"].with_suffix(".pt"), "no such file")):
        proc = run_sdc("run", *RUN, "--artifacts", build_fp32, "--lora", path, "--out",
                       tmp_path / "x.png", check=False)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert not (tmp_path / "x.png").exists()


def test_refuse_needs_a_base_build(tmp_path, build_fp32, loras):
    once = tmp_path / "once"
    run_sdc("build", "--from", build_fp32, "--lora", loras["a"], "--out", once)
    proc = run_sdc("build", "--from", once, "--lora", loras["b"], "--out", tmp_path / "twice",
                   check=False)
    assert proc.returncode == 2 and "already has LoRA" in proc.stderr
    # a second identical re-fuse is reused by build key
    again = run_sdc("build", "--from", build_fp32, "--lora", loras["a"], "--out", once)
    assert "up to date" in again.stdout + again.stderr


def test_fp16_range_is_checked(tiny_folder, loras):
    from sdc.fusion.fuse import fuse_param

    layer = read_lora(loras["a"], _known(tiny_folder)).layers[0]
    base = np.zeros((layer.up.shape[0], layer.down.shape[1]), np.float32)
    with pytest.raises(SdcError, match="65504"):
        fuse_param("w", base, [(1e9, layer)], np.float16)
    fused, _ = fuse_param("w", base, [(1e9, layer)], np.float32)  # fp32 holds it
    assert np.isfinite(fused).all()


def test_kohya_without_alpha_means_alpha_equals_rank(tiny_folder, loras, tmp_path):
    # kohya files may omit .alpha; then alpha = rank (scale 1), which the report must say
    def drop_alpha(t, m):
        for k in [k for k in t if k.endswith(".alpha")]:
            del t[k]

    no_alpha = rewrite(loras["kohya"], tmp_path / "no-alpha.safetensors", drop_alpha)
    lora = read_lora(no_alpha, _known(tiny_folder))
    assert all(layer.alpha == layer.rank for layer in lora.layers)
    assert lora.alpha_source == "rank (no alpha in the file)"
    with_alpha = read_lora(loras["kohya"], _known(tiny_folder))
    assert [layer.module for layer in lora.layers] == [layer.module for layer in with_alpha.layers]
