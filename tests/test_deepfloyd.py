"""DeepFloyd IF: a tiny IF (T5 + stage I + stage II, the real classes, tests/if_models.py) built
by `sdc build MODEL --upscaler DIR`, every graph gated, and `sdc run` against diffusers'
IFPipeline + IFSuperResolutionPipeline given the same noise.

Same noise: the runtime draws image i's noise from its seeded PCG64 generator in diffusers' order
(stage I's initial noise, each DDPM step's variance noise but the last's, stage II's initial
noise, the upscaled image's noise, stage II's steps). diffusers draws through `randn_tensor`;
the oracle replaces it with draws from the same generator in the order diffusers asks, so both
sides see identical arrays wherever diffusers' own code calls for noise, and nothing else of
diffusers' arithmetic is touched.

Tolerance: 2/255 per pixel, the SD families' (onnxruntime vs torch kernels, ~1e-6 relative per
graph, through 2 x the steps; the DDPM's thresholding takes a quantile of x0, where a last-bit
difference can move the clip by a hair).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_sdc

TOLERANCE = 2  # levels of 255


@pytest.fixture(scope="session")
def if_folders(tmp_path_factory):
    from if_models import make_if_folders

    return make_if_folders(tmp_path_factory.mktemp("if"))


@pytest.fixture(scope="session")
def if_build(if_folders, tmp_path_factory):
    one, two = if_folders
    out = tmp_path_factory.mktemp("if-build") / "fp32"
    run_sdc("build", one, "--upscaler", two, "--precision", "fp32", "--out", out)
    return out


class SharedNoise:
    """diffusers' randn_tensor drawing from numpy generators, image by image, as sdc does."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.calls = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        import torch

        draws = [self.rng.standard_normal((1, *shape[1:]), dtype=np.float32)
                 for _ in range(shape[0])]
        self.calls.append(tuple(shape))
        out = torch.from_numpy(np.concatenate(draws))
        return out.to(dtype) if dtype is not None else out


def diffusers_images(if_folders, monkeypatch, prompt, negative, seed, steps, steps_2, guidance,
                     guidance_2, stage_ii=True):
    import diffusers.pipelines.deepfloyd_if.pipeline_if as p1
    import diffusers.pipelines.deepfloyd_if.pipeline_if_superresolution as p2
    import diffusers.schedulers.scheduling_ddpm as ddpm
    from if_models import load_if_pipelines

    noise = SharedNoise(seed)
    for module in (p1, p2, ddpm):
        monkeypatch.setattr(module, "randn_tensor", noise)
    first, second = load_if_pipelines(*if_folders)
    image = first(prompt, negative_prompt=negative or None, num_inference_steps=steps,
                  guidance_scale=guidance, output_type="pt", clean_caption=False).images
    if not stage_ii:
        out = (image / 2 + 0.5).clamp(0, 1)
    else:
        out = second(image=image, prompt=prompt, negative_prompt=negative or None,
                     num_inference_steps=steps_2, guidance_scale=guidance_2, output_type="pt",
                     clean_caption=False).images
        out = (out / 2 + 0.5).clamp(0, 1)
    arr = out[0].permute(1, 2, 0).numpy()
    return (arr * 255).round().astype(np.uint8), noise.calls


def sdc_image(if_build, prompt, negative, seed, steps, steps_2, guidance, guidance_2, *extra):
    from PIL import Image

    out = if_build.parent / f"run-{seed}-{steps}-{steps_2}.png"
    run_sdc("run", prompt, "-a", if_build, "--negative", negative, "--seed", seed, "--steps",
            steps, "--upscale-steps", steps_2, "--guidance", guidance, "--upscale-guidance",
            guidance_2, "--out", out, *extra)
    return np.asarray(Image.open(out).convert("RGB"))


def test_build_gates_every_graph_and_records_the_cascade(if_build):
    manifest = json.loads((if_build / "manifest.json").read_text())
    assert manifest["family"]["name"] == "deepfloyd"
    assert manifest["family"]["space"] == "pixel"
    assert manifest["pipeline"] == ["text_encoder", "unet", "unet_2"]
    assert manifest["family"]["roles"] == {"text_encoder": "text", "unet": "denoise",
                                           "unet_2": "upscale"}
    for stage, graph in manifest["graphs"].items():
        assert graph["parity"]["value"] <= graph["parity"]["threshold"], stage
    io = {s: [t["name"] for t in g["inputs"]] for s, g in manifest["graphs"].items()}
    assert io["text_encoder"] == ["input_ids", "attention_mask"]
    assert io["unet_2"] == ["sample", "timestep", "encoder_hidden_states", "class_labels"]
    assert manifest["graphs"]["unet"]["outputs"][0]["shape"][1] == 6  # learned variance
    up = manifest["cascade"]["upscale"]
    assert (up["stage"], up["factor"], up["noise_level"]) == ("unet_2", 4, 250)
    assert manifest["defaults"] == {"steps": 100, "guidance": 7.0, "upscale_steps": 50,
                                    "upscale_guidance": 4.0}
    assert manifest["memory_profile"]["graphs"]["unet_2"]["whole"]["points"][-1]["lat"] == 64


# CFG on both stages; stage II unguided; stage I unguided with stage II guided (the negative's
# states are then encoded for stage II only)
@pytest.mark.parametrize("negative,guidance,guidance_2", [("", 7.0, 4.0), ("blurry", 5.0, 1.0),
                                                         ("blurry", 1.0, 4.0)])
def test_run_matches_diffusers_if_pipelines(if_build, if_folders, monkeypatch, negative, guidance,
                                            guidance_2):
    prompt, seed, steps, steps_2 = "a photo of a red circle", 11, 6, 4
    ours = sdc_image(if_build, prompt, negative, seed, steps, steps_2, guidance, guidance_2)
    ref, calls = diffusers_images(if_folders, monkeypatch, prompt, negative, seed, steps, steps_2,
                                  guidance, guidance_2)
    # stage I: init + 5 steps with noise; stage II: init, the upscaled image, 3 steps with noise
    assert calls == [(1, 3, 16, 16)] * steps + [(1, 3, 64, 64)] * (2 + steps_2 - 1)
    assert ours.shape == ref.shape == (64, 64, 3)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= TOLERANCE, diff.max()
    assert ref.std() > 5  # a picture, not a flat field both sides could agree on


def test_stage_i_alone(if_build, if_folders, monkeypatch):
    prompt, seed = "a sks seal", 3
    ours = sdc_image(if_build, prompt, "", seed, 5, 1, 7.0, 4.0, "--stages", "I")
    ref, _ = diffusers_images(if_folders, monkeypatch, prompt, "", seed, 5, 1, 7.0, 4.0,
                              stage_ii=False)
    assert ours.shape == (16, 16, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= TOLERANCE


def test_stage_i_build_and_refusals(if_folders, tmp_path):
    one, two = if_folders
    out = tmp_path / "stage-i"
    run_sdc("build", one, "--precision", "fp32", "--out", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["graphs"]) == ["text_encoder", "unet"]
    png = tmp_path / "i.png"
    run_sdc("run", "a red circle", "-a", out, "--steps", 3, "--seed", 0, "--out", png)
    from PIL import Image

    assert Image.open(png).size == (16, 16)
    r = run_sdc("run", "x", "-a", out, "--stages", "II", "--out", tmp_path / "x.png", check=False)
    assert r.returncode != 0 and "no stage II UNet" in r.stderr
    r = run_sdc("build", one, "--stages", "text_encoder,unet,unet_2", "--out", tmp_path / "b",
                check=False)
    assert r.returncode != 0 and "--upscaler DIR" in r.stderr
    r = run_sdc("build", one, "--upscaler", one, "--out", tmp_path / "c", check=False)
    assert r.returncode != 0 and "IFSuperResolutionPipeline" in r.stderr
    r = run_sdc("build", two, "--out", tmp_path / "d", check=False)
    assert r.returncode != 0 and "IFSuperResolutionPipeline" in r.stderr
    r = run_sdc("run", "x", "-a", out, "--plan", "--vram-budget", "1MiB", check=False)
    assert r.returncode != 0 and "the largest stage" in r.stderr and "--unet-chunks" not in r.stderr
    plan = run_sdc("run", "x", "-a", out, "--plan").stdout
    assert "cascade     text_encoder -> unet," in plan and "vae tile" not in plan
    r = run_sdc("run", "x", "-a", out, "--noise-level", 1000, "--out", tmp_path / "y.png",
                check=False)
    assert r.returncode != 0 and "--noise-level 1000" in r.stderr


@pytest.fixture(scope="session")
def if_loras(if_folders, tmp_path_factory):
    from if_models import make_if_lora

    root = tmp_path_factory.mktemp("if-loras")
    one, two = if_folders
    return {"unet": make_if_lora(one, two, root, "unet", seed=21),
            "unet_2": make_if_lora(one, two, root, "unet_2", seed=22, stage_metadata=False)}


@pytest.mark.families
def test_loras_at_build_and_run_match_diffusers(if_build, if_folders, if_loras, monkeypatch,
                                                tmp_path):
    """Stage I and stage II LoRAs (the second without sdc's stage metadata: found by its
    shapes) fused at build and at run time, against diffusers' load_lora_weights + fuse_lora,
    both sampled with variance_type="fixed_small" (what a LoRA'd IF runs with)."""
    from diffusers import DDPMScheduler
    from PIL import Image

    import if_models

    one, two = if_folders
    built = tmp_path / "lora-build"
    run_sdc("build", one, "--upscaler", two, "--precision", "fp32", "--out", built,
            "--lora", if_loras["unet"], "--lora", if_loras["unet_2"])
    manifest = json.loads((built / "manifest.json").read_text())
    assert sorted(lo["layers"] > 0 for lo in manifest["loras"]) == [True, True]
    prompt, seed, steps, steps_2 = "a sks seal", 4, 5, 3
    args = ("--seed", seed, "--steps", steps, "--upscale-steps", steps_2)
    run_sdc("run", prompt, "-a", built, *args, "--out", tmp_path / "b.png")
    run_sdc("run", prompt, "-a", if_build, *args, "--out", tmp_path / "r.png",
            "--lora", if_loras["unet"], "--lora", if_loras["unet_2"])
    run_sdc("run", prompt, "-a", if_build, *args, "--out", tmp_path / "plain.png")
    refused = tmp_path / "from-build"  # torch-free re-fuse into a copy of the plain build
    run_sdc("build", "--from", if_build, "--lora", if_loras["unet"], "--lora", if_loras["unet_2"],
            "--out", refused)
    run_sdc("run", prompt, "-a", refused, *args, "--out", tmp_path / "f.png")
    at_build, at_run, plain, at_from = (
        np.asarray(Image.open(tmp_path / f).convert("RGB")).astype(int)
        for f in ("b.png", "r.png", "plain.png", "f.png"))
    assert np.abs(at_from - at_run).max() <= 1

    original = if_models.load_if_pipelines

    def with_loras(a, b):
        first, second = original(a, b)
        first.load_lora_weights(str(if_loras["unet"]))
        second.load_lora_weights(str(if_loras["unet_2"]))
        for pipe in (first, second):
            pipe.fuse_lora()
            pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config,
                                                       variance_type="fixed_small")
        return first, second

    monkeypatch.setattr(if_models, "load_if_pipelines", with_loras)
    ref, _ = diffusers_images(if_folders, monkeypatch, prompt, "", seed, steps, steps_2, 7.0, 4.0)
    ref = ref.astype(int)
    assert np.abs(at_build - ref).max() <= TOLERANCE
    assert np.abs(at_run - ref).max() <= TOLERANCE
    assert np.abs(plain - ref).max() > 10  # the LoRAs change the picture


@pytest.mark.families
def test_int8_build_quantizes_t5_and_both_unets(if_build, tmp_path):
    """`--precision int8` from the float cascade: T5 and both UNets int8 (recipes by role), each
    graph gated by its own quality target, and the build runs."""
    out = tmp_path / "int8"
    run_sdc("build", "--from", if_build, "--precision", "int8", "--out", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s: g["precision"] for s, g in manifest["graphs"].items()} == {
        "text_encoder": "int8", "unet": "int8", "unet_2": "int8"}
    run_sdc("run", "a red circle", "-a", out, "--steps", 3, "--upscale-steps", 2, "--seed", 1,
            "--out", tmp_path / "q.png")
    from PIL import Image

    assert Image.open(tmp_path / "q.png").size == (64, 64)
