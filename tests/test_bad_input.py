"""Bad input to `sdc build`: one-line error naming what was expected and found, non-zero exit, and
no output directory created. Most cases are refused from metadata alone, before torch loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import run_sdc
from ldm_checkpoint import write_single_file


def assert_clean_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])


def fake_checkpoint(path, shapes: dict):
    save_file({k: np.zeros(s, np.float16) for k, s in shapes.items()}, str(path))
    return path


UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
TO_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.mark.parametrize("name,shapes,needles", [
    ("sdxl", {"conditioner.embedders.0.transformer.text_model.x": [2],
              UNET_IN: [320, 4, 3, 3]}, ["SDXL"]),
    ("sd2", {"cond_stage_model.model.token_embedding.weight": [4, 2], UNET_IN: [320, 4, 3, 3],
             TO_K: [320, 1024], "first_stage_model.x": [1]}, ["SD2"]),
    ("inpaint", {"cond_stage_model.transformer.text_model.x": [1], UNET_IN: [320, 9, 3, 3],
                 TO_K: [320, 768], "first_stage_model.x": [1]}, ["inpainting", "9 input channels"]),
    ("lora", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [4, 8]},
     ["LoRA", "--lora"]),
    ("vae-only", {"encoder.conv_in.weight": [4, 3, 3, 3]}, ["not a Stable Diffusion checkpoint"]),
])
def test_unsupported_checkpoints_are_named(tmp_path, name, shapes, needles):
    ckpt = fake_checkpoint(tmp_path / f"{name}.safetensors", shapes)
    proc = run_sdc("build", ckpt, "--out", tmp_path / "out", check=False)
    assert_clean_error(proc, *needles)
    assert not (tmp_path / "out").exists()


def test_missing_model(tmp_path):
    assert_clean_error(run_sdc("build", tmp_path / "nope", check=False), "model not found")


def test_folder_that_is_not_sd(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "README.txt").write_text("hello")
    assert_clean_error(run_sdc("build", tmp_path / "m", check=False), "model_index.json")


def test_sdxl_diffusers_folder(tmp_path):
    (tmp_path / "xl").mkdir()
    (tmp_path / "xl" / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert_clean_error(run_sdc("build", tmp_path / "xl", check=False), "SDXL")


def test_truncated_safetensors(tiny_folder, tmp_path):
    full = write_single_file(tiny_folder, tmp_path / "full.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    proc = run_sdc("build", cut, "--config", tiny_folder, "--out", tmp_path / "out", check=False)
    assert_clean_error(proc, "truncated")
    assert not (tmp_path / "out").exists()


def test_truncated_weights_in_diffusers_folder(tiny_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    w = broken / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    assert_clean_error(run_sdc("build", broken, "--out", tmp_path / "o", check=False), "truncated")


def test_garbage_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    assert_clean_error(run_sdc("build", bad, check=False), "safetensors")


def test_unknown_file_type(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    assert_clean_error(run_sdc("build", f, check=False), "unknown model file type")


def test_unwritable_out(tiny_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_sdc("build", tiny_folder, "--out", blocker / "sub", check=False)
    assert_clean_error(proc, "--out")


def test_out_holding_foreign_files_is_not_touched(tiny_folder, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    proc = run_sdc("build", tiny_folder, "--out", out, check=False)
    assert_clean_error(proc, "not an sdc build")
    assert (out / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_out_that_is_a_file(tiny_folder, tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("x")
    assert_clean_error(run_sdc("build", tiny_folder, "--out", f, check=False), "is a file")


def test_unknown_precision_and_stage(tiny_folder, tmp_path):
    proc = run_sdc("build", tiny_folder, "--precision", "int3", check=False)
    assert proc.returncode == 2 and "int3" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_sdc("build", tiny_folder, "--stages", "unet,refiner", "--out", tmp_path / "o",
                   check=False)
    assert_clean_error(proc, "refiner")


def test_config_folder_mismatch(tiny_folder, tmp_path):
    """A tiny checkpoint against the shipped full-size SD1.5 configs: refused up front."""
    ckpt = write_single_file(tiny_folder, tmp_path / "tiny.safetensors")
    assert_clean_error(run_sdc("build", ckpt, "--out", tmp_path / "o", check=False), "--config")


def test_weights_that_do_not_fit_the_config(tiny_folder, tmp_path):
    """Valid files that diffusers cannot load (config says 48 channels, weights have 32)."""
    import shutil

    broken = tmp_path / "mismatch"
    shutil.copytree(tiny_folder, broken)
    cfg = json.loads((broken / "text_encoder" / "config.json").read_text())
    cfg["hidden_size"], cfg["projection_dim"] = 48, 48
    (broken / "text_encoder" / "config.json").write_text(json.dumps(cfg))
    proc = run_sdc("build", broken, "--stages", "text_encoder", "--out", tmp_path / "o", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "LOAD REPORT" not in proc.stderr  # the library's table is silenced
    last = proc.stderr.strip().splitlines()[-1]  # after the build's own "model: ..." log line
    assert last.startswith("error: ") and "cannot load its text_encoder" in last
    assert not (tmp_path / "o").exists()
