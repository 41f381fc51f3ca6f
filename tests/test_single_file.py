"""Single-file (A1111/CompVis) checkpoints: made from the tiny diffusers folder, built by the CLI,
and required to give the same graphs as the folder they came from."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import read_manifest, run_sdc
from ldm_checkpoint import write_single_file
from tiny import load_components


@pytest.fixture(scope="module")
def single_file(tiny_folder, tmp_path_factory):
    return write_single_file(tiny_folder, tmp_path_factory.mktemp("ckpt") / "tiny-sd1.safetensors")


def test_test_converter_agrees_with_diffusers_loader(single_file, tiny_folder):
    """The test-side diffusers->LDM writer, read back by diffusers' own LDM converters (through
    sdc's loader), reproduces every tensor of the original folder exactly."""
    from sdc.export.sources import resolve_model

    src = resolve_model(str(single_file), str(tiny_folder))
    ref = load_components(tiny_folder)
    try:
        for comp in ("unet", "vae", "text_encoder"):
            got, want = src.load(comp).state_dict(), ref[comp].state_dict()
            assert got.keys() == want.keys(), comp
            for k in want:
                assert torch.equal(got[k], want[k]), (comp, k)
    finally:
        src.close()


def test_single_file_build_equals_folder_build(single_file, tiny_folder, build_fp32, tmp_path):
    out = tmp_path / "from-file"
    run_sdc("build", single_file, "--config", tiny_folder, "--precision", "fp32", "--out", out)
    m = read_manifest(out)
    assert m["base_model"]["kind"] == "single_file"
    assert m["base_model"]["name"] == "tiny-sd1"
    assert all(g["parity"]["passed"] for g in m["graphs"].values())
    # same weights -> same graphs: outputs agree with the folder build's to float noise
    rng = np.random.default_rng(0)
    feeds = {"unet": {"sample": rng.standard_normal((2, 4, 4, 6)).astype(np.float32),
                      "timestep": np.array([3.0, 999.0], np.float32),
                      "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)},
             "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 4, 6)).astype(np.float32)},
             "text_encoder": {"input_ids": rng.integers(0, 49408, (2, 77), dtype=np.int64)}}
    for stage, f in feeds.items():
        a = ort.InferenceSession(str(out / stage / "model.onnx")).run(None, f)[0]
        b = ort.InferenceSession(str(build_fp32 / stage / "model.onnx")).run(None, f)[0]
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_ckpt_is_loaded_weights_only(tiny_folder, tmp_path):
    ckpt = write_single_file(tiny_folder, tmp_path / "tiny.ckpt")
    out = tmp_path / "ckpt-build"
    run_sdc("build", ckpt, "--config", tiny_folder, "--precision", "fp32", "--out", out,
            "--stages", "text_encoder")
    m = read_manifest(out)
    assert list(m["graphs"]) == ["text_encoder"] and m["base_model"]["kind"] == "single_file"


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_ckpt_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": payload}}, evil)
    proc = run_sdc("build", evil, "--out", tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert "weights-only" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists(), "unpickling ran code"
    assert not (tmp_path / "out").exists()


def test_folder_with_only_fp16_variant_weights(tiny_folder, tmp_path):
    """Folders downloaded as the `fp16` variant name their weights `*.fp16.safetensors`."""
    import shutil

    variant = tmp_path / "variant"
    shutil.copytree(tiny_folder, variant)
    for comp, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        (variant / comp / f"{stem}.safetensors").rename(variant / comp / f"{stem}.fp16.safetensors")
    out = tmp_path / "out"
    run_sdc("build", variant, "--precision", "fp32", "--stages", "text_encoder", "--out", out)
    assert read_manifest(out)["graphs"]["text_encoder"]["parity"]["passed"]
