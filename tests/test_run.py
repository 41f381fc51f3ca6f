"""`sdc run` / `sdc.runtime.generate` against diffusers' own StableDiffusionPipeline.

The oracle is diffusers' pipeline on the same tiny torch components and the same initial latents
(`--latents`), with the diffusers scheduler of the same name. Both sides are fp32; the ONNX graphs
differ from torch by ~1e-6 relative per call (parity gate), which after a few steps and the uint8
rounding leaves at most 1-2 levels of 255 on a pixel: we allow 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_cli_torch_free, run_sdc
from sdc.runtime import GenerateOptions, run_pipeline

DIFFUSERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
             "dpmpp-2m": "DPMSolverMultistepScheduler", "lms": "LMSDiscreteScheduler",
             "dpmpp-2m-karras": "DPMSolverMultistepScheduler"}
PIXEL_TOL = 2  # levels of 255, see module docstring


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_folder):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from tiny import load_components

    comps = load_components(tiny_folder)
    tok = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")

    def make(name):
        import diffusers

        cls = getattr(diffusers, DIFFUSERS[name])
        cfg = dict(cls.load_config(tiny_folder / "scheduler"))
        extra = {"use_karras_sigmas": True} if name == "dpmpp-2m-karras" else {}
        sched = cls.from_config(cfg, **extra)
        pipe = StableDiffusionPipeline(vae=comps["vae"], text_encoder=comps["text_encoder"],
                                       tokenizer=tok, unet=comps["unet"], scheduler=sched,
                                       safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


@pytest.mark.parametrize("scheduler", list(DIFFUSERS))
def test_images_match_diffusers_pipeline(build_fp32, diffusers_pipe, scheduler):
    w, h, steps, guidance = 96, 64, 4, 6.0
    latents = np.random.default_rng(5).standard_normal((2, 4, h // 8, w // 8)).astype(np.float32)
    ours = run_pipeline(GenerateOptions(
        prompt="a red circle on a blue background", negative="blurry", artifacts=build_fp32,
        steps=steps, guidance=guidance, width=w, height=h, scheduler=scheduler, batch=2,
        latents=latents, provider="cpu"))
    with torch.no_grad():
        ref = diffusers_pipe(scheduler)(
            "a red circle on a blue background", negative_prompt="blurry", num_inference_steps=steps,
            guidance_scale=guidance, width=w, height=h, num_images_per_prompt=2,
            latents=torch.from_numpy(latents), output_type="np").images
    ref = (ref * 255).round().astype(np.int16)
    for img, r in zip(ours.images, ref):
        diff = np.abs(np.asarray(img, dtype=np.int16) - r)
        assert img.size == (w, h)
        assert diff.max() <= PIXEL_TOL, (scheduler, diff.max(), diff.mean())


def test_guidance_one_skips_unconditional_and_matches_diffusers(build_fp32, diffusers_pipe):
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ours = run_pipeline(GenerateOptions(prompt="a cat", artifacts=build_fp32, steps=3,
                                        guidance=1.0, width=64, height=64, scheduler="ddim",
                                        latents=latents))
    with torch.no_grad():
        ref = diffusers_pipe("ddim")("a cat", num_inference_steps=3, guidance_scale=1.0, width=64,
                                     height=64, latents=torch.from_numpy(latents),
                                     output_type="np").images[0]
    diff = np.abs(np.asarray(ours.images[0], np.int16) - (ref * 255).round().astype(np.int16))
    assert diff.max() <= PIXEL_TOL


def test_seeds_reproduce_and_batch_uses_consecutive_seeds(build_fp32):
    common = dict(prompt="a blue square", artifacts=build_fp32, steps=2, width=64, height=64,
                  scheduler="euler-a")
    a = run_pipeline(GenerateOptions(seed=10, batch=2, **common))
    b = run_pipeline(GenerateOptions(seed=11, **common))
    assert a.seeds == [10, 11]
    # image 2 of a seed-10 batch is the seed-11 image, ancestral noise included
    np.testing.assert_array_equal(np.asarray(a.images[1]), np.asarray(b.images[0]))
    c = run_pipeline(GenerateOptions(seed=10, **common))
    np.testing.assert_array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(a.images[1]))


def test_cli_writes_png_with_a1111_parameters(build_fp32, tmp_path):
    out = tmp_path / "img.png"
    proc = run_sdc("run", "a red circle", "-a", build_fp32, "--steps", "2", "--width", "64",
                   "--height", "96", "--seed", "42", "--negative", "ugly", "--scheduler",
                   "dpmpp-2m-karras", "--out", out)
    assert proc.stdout.strip() == str(out)
    img = Image.open(out)
    assert img.size == (64, 96)
    text = img.text["parameters"]
    lines = text.splitlines()
    assert lines[0] == "a red circle" and lines[1] == "Negative prompt: ugly"
    for field in ("Steps: 2", "Sampler: DPM++ 2M Karras", "CFG scale: 7.5", "Seed: 42",
                  "Size: 64x96", "Model: tiny-sd1", "Model hash: "):
        assert field in lines[2], field
    assert "unet" in proc.stderr and "ran on CPUExecutionProvider" in proc.stderr


def test_long_prompt_is_truncated_with_a_warning(build_fp32, tmp_path):
    proc = run_sdc("run", "red " * 100, "-a", build_fp32, "--steps", "1", "--width", "64",
                   "--height", "64", "--seed", "1", "--out", tmp_path / "x.png")
    assert "warning: prompt longer than 77 tokens" in proc.stderr
    assert "Prompt truncated: yes" in Image.open(tmp_path / "x.png").text["parameters"]


def test_img2img_keeps_the_init_image_at_low_strength(build_fp32, tmp_path):
    src = np.zeros((64, 64, 3), np.uint8)
    src[:, :32] = (200, 30, 30)
    Image.fromarray(src).save(tmp_path / "init.png")
    common = dict(prompt="x", artifacts=build_fp32, steps=10, seed=3, scheduler="ddim",
                  init_image=tmp_path / "init.png")
    low = run_pipeline(GenerateOptions(strength=0.1, **common))
    full = run_pipeline(GenerateOptions(strength=1.0, **common))
    assert low.images[0].size == (64, 64)
    assert "vae_encoder" in low.providers
    err = lambda r: np.abs(np.asarray(r.images[0], float) - src).mean()  # noqa: E731
    assert err(low) < err(full)
    assert "Denoising strength: 0.1" in low.parameters[0]


@pytest.mark.parametrize("args,needle", [
    (["--width", "100"], "multiple of 16"),
    (["--steps", "0"], "--steps"),
    (["--steps", "100000"], "--steps"),
    (["--guidance", "-1"], "--guidance"),
    (["--scheduler", "heun"], "--scheduler heun"),
    (["--batch", "0"], "--batch"),
    (["--strength", "1.5", "--init-image", "INIT"], "--strength"),
    (["--init-image", "NOTIMG"], "cannot read it as an image"),
    (["--provider", "tpu"], "--provider tpu"),
    (["--latents", "BADLAT"], "--latents"),
])
def test_bad_run_input(build_fp32, tmp_path, args, needle):
    (tmp_path / "init.png").write_bytes(b"")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    np.save(tmp_path / "lat.npy", np.zeros((1, 4, 3, 3), np.float32))
    args = [str(tmp_path / "ok.png") if a == "INIT" else str(tmp_path / "init.png")
            if a == "NOTIMG" else str(tmp_path / "lat.npy") if a == "BADLAT" else a for a in args]
    proc = run_sdc("run", "x", "-a", build_fp32, "--out", tmp_path / "o.png", *args, check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not (tmp_path / "o.png").exists()


def test_run_refuses_tampered_or_missing_artifacts(build_fp32, tmp_path):
    import shutil

    proc = run_sdc("run", "x", "-a", tmp_path / "nope", check=False)
    assert proc.returncode != 0 and "artifacts not found" in proc.stderr
    copy = tmp_path / "copy"
    shutil.copytree(build_fp32, copy)
    data = copy / "unet" / "model.onnx_data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    proc = run_sdc("run", "x", "-a", copy, "--out", tmp_path / "o.png", check=False)
    assert proc.returncode != 0 and "do not match the manifest" in proc.stderr
    # --no-verify skips hashing (sizes still checked): the tampered bit is not caught, by design
    (copy / "unet" / "model.onnx").write_bytes(b"corrupt")
    proc = run_sdc("run", "x", "-a", copy, "--no-verify", "--out", tmp_path / "o.png", check=False)
    assert proc.returncode != 0 and "bytes" in proc.stderr


def test_runtime_run_path_never_imports_torch(build_fp32, tmp_path):
    assert_cli_torch_free(["run", "a cat", "-a", build_fp32, "--steps", "1", "--width", "64",
                           "--height", "64", "--out", tmp_path / "c.png", "-q"])
    assert (tmp_path / "c.png").is_file()


def test_cuda_request_without_cuda_is_one_line(build_fp32, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    proc = run_sdc("run", "x", "-a", build_fp32, "--provider", "cuda", "--out", tmp_path / "o.png",
                   check=False)
    assert proc.returncode != 0 and "install onnxruntime-gpu" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_corrupted_graph_is_one_line_even_without_verification(build_fp32, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(build_fp32, copy)
    g = copy / "unet" / "model.onnx"
    g.write_bytes(b"\xff" * g.stat().st_size)  # same size: only parsing can tell
    proc = run_sdc("run", "x", "-a", copy, "--no-verify", "--steps", "1", "--width", "64",
                   "--height", "64", "--out", tmp_path / "o.png", "--quiet", check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unet: onnxruntime cannot load unet/")
    assert not (tmp_path / "o.png").exists()
