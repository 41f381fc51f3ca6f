"""SD2.x / SDXL build variants, opt-in (`make test-families`, run by CI): an SDXL single-file
checkpoint built with UNet chunks and streamed under a budget, a LoRA fused at build, a
textual inversion added at build, a quantized SDXL build. Each is a further full build of the
tiny SDXL, which is why they sit beside the default suite (tests/test_families.py, whose
fixtures and oracles they share) rather than in it. Tolerances as there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_family, read_manifest, run_sdc
from family_models import load_sdxl_pipeline
from ldm_checkpoint import write_sdxl_single_file
from test_families import (GUIDANCE, H, PROMPT, STEPS, W, _assert_matches, _call, _latents,
                           _opts, _peft_lora, _reference)

from sdc.runtime.pipeline import GenerateOptions, run_pipeline

pytestmark = pytest.mark.families


@pytest.fixture(scope="module")
def xl_from_file(sdxl_folder, tmp_path_factory):
    """The tiny SDXL as an SGM single file, built with its UNet cut into 3 chunks."""
    tmp = tmp_path_factory.mktemp("xl-file")
    ckpt = write_sdxl_single_file(sdxl_folder, tmp / "xl.safetensors")
    return build_family(ckpt, tmp / "from-file", "--config", sdxl_folder, "--unet-chunks", "3",
                        "--stages", "text_encoder,text_encoder_2,unet,vae_decoder")


def test_sdxl_single_file_builds_the_same_images(sdxl_build, xl_from_file):
    m = read_manifest(xl_from_file)
    assert (m["base_model"]["kind"], m["base_model"]["family"]) == ("single_file", "sdxl")
    opts = dict(prompt=PROMPT, negative="blurry", steps=2, guidance=GUIDANCE, width=W, height=H,
                latents=_latents(batch=1), provider="cpu", vram_budget=None)
    a = run_pipeline(GenerateOptions(artifacts=sdxl_build, **opts))
    b = run_pipeline(GenerateOptions(artifacts=xl_from_file, **opts))
    if b.plan.unet == "whole":  # same graphs, same plan: bit for bit
        np.testing.assert_array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    else:  # the planner streamed the chunks (their times tie on a model this small)
        diff = np.abs(np.asarray(a.images[0], np.int16) - np.asarray(b.images[0], np.int16))
        assert diff.max() <= 1


def test_sdxl_streams_chunks_under_a_budget(sdxl_folder, xl_from_file):
    """The smallest plan streams the UNet's chunks (the pooled text and time ids are carried
    through the chain) and still draws diffusers' image. (The reference is diffusers, not an
    unbudgeted run of the same build: on a model this small the planner may stream the chunks
    unbudgeted too, when their measured times tie with the whole graph's.)"""
    from sdc.runtime.planner import candidate_plans

    m = read_manifest(xl_from_file)
    assert m["graphs"]["unet"]["chunks"]["parity"]["passed"]
    smallest = min(candidate_plans(m, batch=1, cfg=True, width=W, height=H, steps=2, budget=1),
                   key=lambda p: p.peak)
    assert smallest.unet == "chunks"
    latents = _latents(batch=1)
    streamed = run_pipeline(GenerateOptions(
        prompt=PROMPT, negative="blurry", steps=2, guidance=GUIDANCE, width=W, height=H,
        latents=latents, provider="cpu", artifacts=xl_from_file, vram_budget=smallest.peak))
    assert streamed.plan.unet == "chunks" and streamed.plan.peak <= smallest.peak
    with torch.no_grad():
        ref = load_sdxl_pipeline(sdxl_folder)(
            PROMPT, negative_prompt="blurry", num_inference_steps=2, guidance_scale=GUIDANCE,
            width=W, height=H, latents=torch.from_numpy(latents), output_type="np").images
    _assert_matches(streamed, ref, "streamed chunks")


def test_sdxl_lora_at_build_matches_diffusers(sdxl_folder, tmp_path):
    lora = _peft_lora(load_sdxl_pipeline(sdxl_folder), tmp_path / "xl-lora.safetensors",
                      ("unet", "text_encoder", "text_encoder_2"))
    latents = _latents(batch=1)
    ref = _reference(load_sdxl_pipeline, sdxl_folder, lora, **_call(latents))
    fused = build_family(sdxl_folder, tmp_path / "xl+lora", "--lora", lora,
                         "--stages", "text_encoder,text_encoder_2,unet,vae_decoder")
    m = read_manifest(fused)
    assert {lo["name"] for lo in m["loras"]} == {"xl-lora"}
    _assert_matches(run_pipeline(GenerateOptions(artifacts=fused, **_opts(latents))), ref,
                    "build-time LoRA")


def test_sdxl_embedding_in_both_encoders_matches_diffusers(sdxl_folder, tmp_path):
    """An SDXL textual inversion (clip_l + clip_g vectors) added at build: each encoder gets its
    vectors, as diffusers' load_textual_inversion twice does."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(8)
    clip_l = rng.standard_normal((2, 32)).astype(np.float32)
    clip_g = rng.standard_normal((2, 48)).astype(np.float32)
    emb = tmp_path / "xl-emb.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(emb))
    out = build_family(sdxl_folder, tmp_path / "xl+emb", "--embedding", f"{emb}:<xl>",
                 "--stages", "text_encoder,text_encoder_2,unet,vae_decoder")
    prompt = "a <xl> on a blue background"
    latents = _latents(batch=1)
    ours = run_pipeline(GenerateOptions(prompt=prompt, negative="blurry", artifacts=out,
                                        steps=STEPS, guidance=GUIDANCE, width=W, height=H,
                                        latents=latents, provider="cpu"))
    pipe = load_sdxl_pipeline(sdxl_folder)
    tokens = ["<xl>", "<xl>_1"]
    pipe.load_textual_inversion(torch.from_numpy(clip_l), token=tokens,
                                text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(torch.from_numpy(clip_g), token=tokens,
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    with torch.no_grad():  # diffusers expands the multi-vector token as sdc does: <xl> <xl>_1
        ref = pipe(prompt, negative_prompt="blurry",
                   num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=W, height=H,
                   latents=torch.from_numpy(latents), output_type="np").images
    _assert_matches(ours, ref, "sdxl embedding")


def test_sdxl_quantizes_by_role(sdxl_build, tmp_path):
    """The int4 recipe by stage role: both text encoders int8, the UNet int4, the VAE fp16
    weights; the quantized build runs and stays close to its float source."""
    out = tmp_path / "xl-int4"
    run_sdc("build", "--from", sdxl_build, "--precision", "int4", "--out", out)
    m = read_manifest(out)
    assert m["quantization"]["formats"] == {"text_encoder": "int8", "text_encoder_2": "int8",
                                            "unet": "int4", "vae_decoder": "fp16",
                                            "vae_encoder": "fp16"}
    assert m["family"] == read_manifest(sdxl_build)["family"]
    opts = dict(prompt=PROMPT, negative="blurry", steps=2, guidance=GUIDANCE, width=W, height=H,
                latents=_latents(batch=1), provider="cpu")
    a = np.asarray(run_pipeline(GenerateOptions(artifacts=sdxl_build, **opts)).images[0], float)
    b = np.asarray(run_pipeline(GenerateOptions(artifacts=out, **opts)).images[0], float)
    psnr = 10 * np.log10(255**2 / np.mean((a - b) ** 2))
    assert psnr > 20, psnr  # random tiny weights: a loose floor that a broken graph misses
