"""SD2.x and SDXL end to end: tiny models of the real diffusers/transformers classes built by
`sdc build`, run by `sdc run`, against diffusers' own pipelines given the same initial latents.

The tolerance is the SD1 one (test_run.py's PIXEL_TOL, 2 levels of 255): the graphs pass the fp32
parity gate (max_rel <= 1e-4) and the numpy schedulers match diffusers' to float rounding, so an
image may differ from diffusers' by a rounding level at a few pixels, never more. A wrong
conditioning (missing pooled text, wrong time ids, the last instead of the penultimate layer, the
wrong pad token, v read as epsilon) moves pixels by tens of levels on these models.

Single-file checkpoints (tests/ldm_checkpoint.py writes them in the layout real SD2 and SDXL files
have; test_family_fixtures.py checks that writer against diffusers' own converters) load to the
folder's own weights. Further full builds (an SDXL single file with chunks, a LoRA and an
embedding at build, int4) are in test_families_builds.py (`make test-families`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import read_manifest, run_sdc
from family_models import load_sd2_pipeline, load_sdxl_pipeline
from ldm_checkpoint import write_sd2_single_file, write_sdxl_single_file

from sdc.runtime.pipeline import GenerateOptions, run_pipeline

PIXEL_TOL = 2  # levels of 255, as for SD1 (test_run.py)
W, H, STEPS, GUIDANCE = 96, 64, 4, 6.0
PROMPT = "a red circle on a blue background!"  # "!" is SD2's and bigG's pad token


def _latents(seed=5, batch=2):
    return np.random.default_rng(seed).standard_normal((batch, 4, H // 8, W // 8)).astype(np.float32)


def _assert_matches(ours, ref, what):
    ref = (ref * 255).round().astype(np.int16)
    for img, r in zip(ours.images, ref):
        diff = np.abs(np.asarray(img, np.int16) - r)
        assert img.size == (W, H)
        assert diff.max() <= PIXEL_TOL, (what, diff.max(), diff.mean())
    assert ref.std() > 10  # the images are not flat: the comparison has something to compare


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sd2_matches_diffusers(sd2_folders, sd2_builds, prediction):
    m = read_manifest(sd2_builds[prediction])
    assert m["base_model"]["family"] == "sd2" and m["family"]["name"] == "sd2"
    assert m["model"]["prediction_type"] == prediction
    assert m["model"]["default_size"] == (96 if prediction == "v_prediction" else 64)
    latents = _latents()
    ours = run_pipeline(GenerateOptions(
        prompt=PROMPT, negative="blurry", artifacts=sd2_builds[prediction], steps=STEPS,
        guidance=GUIDANCE, width=W, height=H, batch=2, latents=latents, provider="cpu"))
    assert ours.scheduler == ("ddim" if prediction == "v_prediction" else "pndm")
    with torch.no_grad():
        ref = load_sd2_pipeline(sd2_folders[prediction])(
            PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            width=W, height=H, num_images_per_prompt=2, latents=torch.from_numpy(latents),
            output_type="np").images
    _assert_matches(ours, ref, prediction)


@pytest.mark.parametrize("negative", ["blurry", ""])
def test_sdxl_matches_diffusers(sdxl_folder, sdxl_build, negative):
    """Both text encoders (penultimate states, bigG's pooled text_embeds), the size/crop time ids,
    and diffusers' zeroed conditioning for an absent negative prompt
    (force_zeros_for_empty_prompt)."""
    latents = _latents()
    ours = run_pipeline(GenerateOptions(
        prompt=PROMPT, negative=negative, artifacts=sdxl_build, steps=STEPS, guidance=GUIDANCE,
        width=W, height=H, batch=2, latents=latents, provider="cpu"))
    assert ours.scheduler == "euler"
    assert set(ours.timings) >= {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    with torch.no_grad():
        ref = load_sdxl_pipeline(sdxl_folder)(
            PROMPT, negative_prompt=negative or None, num_inference_steps=STEPS,
            guidance_scale=GUIDANCE, width=W, height=H, num_images_per_prompt=2,
            latents=torch.from_numpy(latents), output_type="np").images
    _assert_matches(ours, ref, negative)


def test_sdxl_manifest_describes_the_family(sdxl_build):
    m = read_manifest(sdxl_build)
    fam = m["family"]
    assert fam["name"] == "sdxl" and fam["conditioning"] == "text_time"
    assert fam["zero_empty_negative"] is True
    assert [e["stage"] for e in fam["text_encoders"]] == ["text_encoder", "text_encoder_2"]
    assert fam["text_encoders"][1]["pooled"] == "text_embeds"
    assert m["pipeline"] == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    assert [t["name"] for t in m["graphs"]["unet"]["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    unet_ctx = m["graphs"]["unet"]["inputs"][2]["shape"][-1]
    te = [m["graphs"][s]["outputs"][0]["shape"][-1] for s in ("text_encoder", "text_encoder_2")]
    assert unet_ctx == sum(te) == 80  # 32 + 48: both encoders' states side by side
    assert m["model"]["scaling_factor"] == pytest.approx(0.13025)
    # every graph was gated; the fp32 VAE
    assert all(g["parity"]["passed"] for g in m["graphs"].values())
    # each tokenizer travels with the build; the second pads with "!"
    tok2 = json.loads((sdxl_build / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert tok2["pad_token"] == "!"
    assert "tokenizer_2/tokenizer.json" in m["tokenizer"]["files"]
    # the planner plans both encoders, one at a time
    proc = run_sdc("run", "-a", sdxl_build, "a cat", "--plan", "--width", "64", "--height", "64")
    assert "text_encoder_2" in proc.stdout, proc.stdout


def test_sdxl_cli_run_and_img2img(sdxl_build, tmp_path):
    out = tmp_path / "cat.png"
    run_sdc("run", "-a", sdxl_build, "a cat", "--steps", "2", "--width", "64", "--height", "64",
            "--seed", "3", "--out", out)
    from PIL import Image

    with Image.open(out) as img:
        assert img.size == (64, 64)
        params = img.text.get("parameters", "")
    assert "a cat" in params and "Steps: 2" in params
    out2 = tmp_path / "cat2.png"
    run_sdc("run", "-a", sdxl_build, "a dog", "--init-image", out, "--strength", "0.6",
            "--steps", "3", "--seed", "3", "--out", out2)
    assert out2.is_file()


def test_sd2_single_file_loads_the_folder_weights(sd2_folders, tmp_path):
    """An SD2 checkpoint (OpenCLIP text encoder with a 24th layer diffusers drops) is detected as
    sd2 and converted by diffusers' converters to exactly the folder's modules."""
    from sdc.export.sources import resolve_model

    folder = sd2_folders["v_prediction"]
    ckpt = write_sd2_single_file(folder, tmp_path / "sd2v.safetensors")
    source = resolve_model(str(ckpt), str(folder))
    assert (source.kind, source.family) == ("single_file", "sd2")
    for component in ("text_encoder", "unet", "vae"):
        from_file = source.load(component).state_dict()
        from_folder = resolve_model(str(folder)).load(component).state_dict()
        assert from_file.keys() == from_folder.keys(), component
        for k, v in from_folder.items():
            assert torch.equal(from_file[k], v), (component, k)
    source.close()


def test_family_refusals(sdxl_folder, sd2_folders, tmp_path):

    # a shipped config set of another family
    ckpt = write_sdxl_single_file(sdxl_folder, tmp_path / "xl.safetensors")
    proc = run_sdc("build", ckpt, "--config", "sd21", "--out", tmp_path / "o", check=False)
    assert proc.returncode != 0 and "SD2.x configs" in proc.stderr and "SDXL" in proc.stderr
    # an SDXL refiner folder (text_encoder_2 only)
    import shutil

    refiner = tmp_path / "refiner"
    shutil.copytree(sdxl_folder, refiner)
    shutil.rmtree(refiner / "text_encoder")
    proc = run_sdc("build", refiner, "--out", tmp_path / "o2", check=False)
    assert proc.returncode != 0 and "refiner" in proc.stderr and "Traceback" not in proc.stderr
    # a stage another family has
    proc = run_sdc("build", sd2_folders["epsilon"], "--stages", "text_encoder_2", "--out",
                   tmp_path / "o3", check=False)
    assert proc.returncode != 0 and "text_encoder_2" in proc.stderr and "SD2.x" in proc.stderr


def _older_layout_copy(build, out):
    """A copy of `build` whose manifest looks as a layout-5 build's did (no family block)."""
    import shutil

    shutil.copytree(build, out)
    m = read_manifest(out)
    del m["family"]
    m["layout"] = 5
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def test_older_layout_is_told_to_rebuild(sd2_builds, tmp_path):
    from sdc.errors import SdcError
    from sdc.runtime.manifest import load_manifest

    old = _older_layout_copy(sd2_builds["epsilon"], tmp_path / "old")
    with pytest.raises(SdcError, match=r"older sdc \(build layout 5.*rebuild"):
        load_manifest(old)


# ---------------------------------------------------------------------------------------------
# LoRAs and embeddings through `sdc build` / `sdc run`, against diffusers' own loaders


def _peft_lora(pipe, out, components, seed=21):
    """A LoRA on `components` of a diffusers pipeline (peft, random non-zero updates), written by
    diffusers' save_lora_weights: what a diffusers/peft trainer produces."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sdc.export.quiet import quiet_torch_stack

    targets = {"unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"],
               "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
               "text_encoder_2": ["q_proj", "v_proj", "fc1", "fc2"]}
    torch.manual_seed(seed)
    layers, meta = {}, {}
    for c in components:
        module = getattr(pipe, c)
        module.add_adapter(LoraConfig(r=4, lora_alpha=6.0, target_modules=targets[c],
                                      init_lora_weights=False))
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_" in name:
                    p.mul_(0.3)
        layers[f"{c}_lora_layers"] = get_peft_model_state_dict(module)
        meta[f"{c}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    with quiet_torch_stack():
        type(pipe).save_lora_weights(out.parent, weight_name=out.name, **layers, **meta)
    return out


def _reference(load, folder, lora, **call):
    pipe = load(folder)
    with torch.no_grad():
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
        return pipe(**call, output_type="np").images


def test_sd2_lora_matches_diffusers(sd2_folders, sd2_builds, tmp_path):
    folder = sd2_folders["v_prediction"]
    lora = _peft_lora(load_sd2_pipeline(folder), tmp_path / "sd2-lora.safetensors",
                      ("unet", "text_encoder"))
    latents = _latents(batch=1)
    ref = _reference(load_sd2_pipeline, folder, lora, prompt=PROMPT, negative_prompt="blurry",
                     num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=W, height=H,
                     latents=torch.from_numpy(latents))
    ours = run_pipeline(GenerateOptions(
        prompt=PROMPT, negative="blurry", artifacts=sd2_builds["v_prediction"], steps=STEPS,
        guidance=GUIDANCE, width=W, height=H, latents=latents, provider="cpu",
        loras=(str(lora),)))
    _assert_matches(ours, ref, "sd2 LoRA")


def test_sdxl_lora_at_run_matches_diffusers(sdxl_folder, sdxl_build, tmp_path):
    """One peft LoRA on the UNet and both text encoders, bound at run time to the build's adapter
    slots (numpy; text_encoder_2's slots included). At build: test_families_builds.py."""
    lora = _peft_lora(load_sdxl_pipeline(sdxl_folder), tmp_path / "xl-lora.safetensors",
                      ("unet", "text_encoder", "text_encoder_2"))
    latents = _latents(batch=1)
    ref = _reference(load_sdxl_pipeline, sdxl_folder, lora, **_call(latents))
    opts = _opts(latents)
    at_run = run_pipeline(GenerateOptions(artifacts=sdxl_build, loras=(str(lora),), **opts))
    _assert_matches(at_run, ref, "run-time LoRA")
    base = run_pipeline(GenerateOptions(artifacts=sdxl_build, **opts))
    moved = np.abs(np.asarray(base.images[0], np.int16) - np.asarray(at_run.images[0], np.int16))
    assert moved.max() > 10  # the adapter changes the image: the comparison means something


def _call(latents):
    return dict(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, width=W, height=H, latents=torch.from_numpy(latents))


def _opts(latents):
    return dict(prompt=PROMPT, negative="blurry", steps=STEPS, guidance=GUIDANCE, width=W,
                height=H, latents=latents, provider="cpu")


def test_trainers_refuse_sdxl_by_name(sdxl_folder, sd2_folders):
    from sdc.errors import SdcError
    from sdc.export.sources import resolve_model
    from sdc.training.common import check_trainable

    with pytest.raises(SdcError, match=r"SDXL model; `sdc train-lora` trains SD1.x and SD2.x"):
        check_trainable(resolve_model(str(sdxl_folder)), "train-lora")
    check_trainable(resolve_model(str(sd2_folders["epsilon"])), "train-lora")  # SD2: accepted


def test_a_build_of_an_older_layout_is_rebuilt_in_place(sd2_folders, sd2_builds, tmp_path):
    """`sdc build --force` over a build made before families replaces it (its files are sdc's,
    listed by its manifest), rather than calling them foreign."""
    out = _older_layout_copy(sd2_builds["epsilon"], tmp_path / "old")
    run_sdc("build", sd2_folders["epsilon"], "--precision", "fp32", "--out", out, "--force",
            "--stages", "text_encoder")
    assert "family" in read_manifest(out)
