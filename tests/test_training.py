"""`sdc train-lora` / `sdc train-embedding` on the built-in sdc-tiny, proven through the product path.

The LoRA proof: sdc-tiny has never drawn the two-colour "sks seal" (training/emblem.py). A LoRA
trained on seal pictures with the trigger in the captions is fused by `sdc build --from --lora`
and run by the torch-free runtime: with the trigger the pictures must score as seals, without it
they must stay the base model's pictures. Oracles from outside sdc: diffusers' `load_lora_weights`
and `load_textual_inversion` read the files.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from conftest import run_sdc
from PIL import Image

from sdc.errors import SdcError
from sdc.training.config import EmbeddingConfig, LoraConfig, resolve
from sdc.training.emblem import seal_score, write_seal_folder

TRIGGER = "sks seal"
LORA_STEPS = 600


@pytest.fixture(scope="session")
def seal_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seal") / "data"
    write_seal_folder(folder, 24, seed=0, trigger=TRIGGER)
    return folder


@pytest.fixture(scope="session")
def reg_data(tmp_path_factory):
    """Prior-preservation pictures: sdc-tiny's own kind of picture with its captions (no trigger)."""
    from sdc.training.shapes import make_dataset

    folder = tmp_path_factory.mktemp("reg") / "data"
    folder.mkdir()
    d = make_dataset(24, seed=7)
    for i, (img, cap) in enumerate(zip(d.images, d.captions)):
        Image.fromarray(img).save(folder / f"r{i:03d}.png")
        (folder / f"r{i:03d}.txt").write_text(cap)
    return folder


@pytest.fixture(scope="session")
def seal_lora(seal_data, reg_data):
    """The LoRA, trained through the real CLI with the default recipe's optimizer (Adafactor);
    a higher learning rate and batch than the 4 GB defaults, so it learns in a test's time
    (seal score measured 0.69 at 300 steps, 0.78 at 600; + ResNet convs 0.55 at 300), and with
    prior-preservation pictures (--reg-data) so prompts without the trigger keep their meaning."""
    out = seal_data.parent / "seal.safetensors"
    proc = run_sdc("train-lora", "--data", seal_data, "--trigger", TRIGGER, "--out", out,
                   "--steps", LORA_STEPS, "--rank", 8, "--lr", 2e-3, "--batch-size", 8,
                   "--reg-data", reg_data,
                   "--no-gradient-checkpointing", "--validation-steps", 10)
    assert proc.stdout.strip() == str(out)
    return out


def _run_images(build, prompts_seeds, out_dir):
    images = []
    for i, (p, seed) in enumerate(prompts_seeds):
        path = out_dir / f"{i}.png"
        run_sdc("run", p, "-a", build, "--seed", seed, "--out", path, "-q", "--no-verify")
        images.append(Image.open(path).convert("RGB"))
    return images


SEAL_PROMPTS = [(f"a {TRIGGER} on a {bg} background", 3000 + i)
                for i, bg in enumerate(("blue", "green", "black", "yellow"))]
PLAIN_PROMPTS = [("a yellow star on a blue background", 3100), ("a green square on a red background", 3101),
                 ("a white ring on a black background", 3102), ("a purple circle on an orange background", 3103)]


def test_lora_draws_the_seal_only_with_its_trigger(seal_lora, builtin_build, tmp_path):
    lora_build = tmp_path / "seal-build"
    run_sdc("build", "--from", builtin_build, "--lora", seal_lora, "--out", lora_build)
    (tmp_path / "base").mkdir()
    (tmp_path / "lora").mkdir()
    base = _run_images(builtin_build, SEAL_PROMPTS + PLAIN_PROMPTS, tmp_path / "base")
    tuned = _run_images(lora_build, SEAL_PROMPTS + PLAIN_PROMPTS, tmp_path / "lora")
    n = len(SEAL_PROMPTS)
    base_seal = np.mean([seal_score(im) for im in base[:n]])
    tuned_seal = np.mean([seal_score(im) for im in tuned[:n]])
    # the seal scores ~0.9-1.0 (jittered training pictures: 0.90), a red or white disc 0.5
    assert tuned_seal >= 0.7 and tuned_seal >= base_seal + 0.3, (base_seal, tuned_seal)
    # without the trigger: no more seal than the base model shows, pictures moved much less than
    # with it, and still of the prompted colour. Measured with --reg-data: seal 0.151 -> 0.149,
    # moved 25.1 / 255 against 64.3 with the trigger, colour 4 / 4. Without prior preservation
    # the same LoRA gave seal 0.15 -> 0.28, moved 37.6 against 73.8, colour 2 / 4.
    diff = [np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
            for a, b in zip(base, tuned)]
    with_trigger, without = np.mean(diff[:n]), np.mean(diff[n:])
    plain_seal = (np.mean([seal_score(im) for im in base[n:]]),
                  np.mean([seal_score(im) for im in tuned[n:]]))
    print(json.dumps({"seal_base": base_seal, "seal_tuned": tuned_seal,  # shown by pytest -rP
                      "plain_seal_base_tuned": plain_seal,
                      "moved_with_trigger": with_trigger, "moved_without": without}))
    assert plain_seal[1] <= plain_seal[0] + 0.1, plain_seal
    assert without <= 0.5 * with_trigger, (with_trigger, without)
    from sdc.training.shape_score import score

    colours = [score(im, {"shape": p.split()[2], "colour": p.split()[1],
                          "background": p.split()[-2]})["colour"]
               for im, (p, _) in zip(tuned[n:], PLAIN_PROMPTS)]
    assert sum(colours) >= 3, colours


def test_lora_file_metadata_and_diffusers_reads_it(seal_lora):
    from safetensors import safe_open

    with safe_open(str(seal_lora), "np") as f:
        meta = f.metadata()
    assert meta["sdc.trigger"] == TRIGGER and meta["sdc.base_model"] == "sdc-tiny"
    assert meta["sdc.rank"] == "8" and meta["sdc.alpha"] == "8" and meta["sdc.steps"] == str(LORA_STEPS)
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 8
    shown = run_sdc("inspect", seal_lora).stdout
    assert TRIGGER in shown
    import torch
    from diffusers import StableDiffusionPipeline

    from sdc.export.quiet import quiet_torch_stack
    from sdc.export.sources import SDC_TINY

    with quiet_torch_stack():
        pipe = StableDiffusionPipeline.from_pretrained(SDC_TINY, torch_dtype=torch.float32,
                                                       safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.load_lora_weights(str(seal_lora))
    assert pipe.get_active_adapters()


def _tiny_cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), trigger=TRIGGER, steps=6, rank=4, batch_size=2,
                lr=1e-3, gradient_checkpointing=True, validation_steps=2)
    return resolve(LoraConfig, None, {**base, **kw})


def test_resume_gives_the_uninterrupted_weights_and_latents_are_cached(seal_data, tmp_path):
    from safetensors.numpy import load_file

    from sdc.training.lora_train import train_lora

    quiet = dict(log=lambda m: None)
    whole = train_lora(_tiny_cfg(seal_data, tmp_path / "a.safetensors", checkpoint_every=3,
                                 cache_dir=str(tmp_path / "cache")), **quiet)
    assert whole["latents_encoded"] == 24 and whole["latents_cached"] == 0
    ckpt = tmp_path / "a.safetensors.checkpoints" / "step-000003"
    resumed = train_lora(_tiny_cfg(seal_data, tmp_path / "b.safetensors",
                                   cache_dir=str(tmp_path / "cache")), resume=str(ckpt), **quiet)
    # the second run found every latent in the cache: no VAE encode
    assert resumed["latents_encoded"] == 0 and resumed["latents_cached"] == 24
    assert resumed["resumed_from"] == 3
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    at3 = load_file(str(ckpt / "trainable.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    # Same weights up to float rounding. Not bit-equal: the two processes differ in history (the
    # first one loaded the VAE to encode), and oneDNN/MKL results can move by 1 ulp with buffer
    # alignment; measured |a - b| <= 1.3e-7 (two runs with the same history are bit-equal). A
    # resume that lost the optimizer state or drew other batches would differ like steps do:
    moved = max(np.abs(a[k] - at3[k.replace(".weight", ".default.weight")]).max() for k in a)
    assert moved > 1e-4, moved  # steps 4-6 moved the weights by far more than the tolerance
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


def test_resume_refuses_another_base_model(seal_data, tmp_path, tiny_folder):
    from sdc.training.lora_train import train_lora

    train_lora(_tiny_cfg(seal_data, tmp_path / "a.safetensors", steps=2, checkpoint_every=1),
               log=lambda m: None)
    ckpt = tmp_path / "a.safetensors.checkpoints" / "step-000001"
    with pytest.raises(SdcError, match="another base model"):
        train_lora(_tiny_cfg(seal_data, tmp_path / "b.safetensors", steps=2, model=str(tiny_folder),
                             resolution=64), resume=str(ckpt), log=lambda m: None)
    assert not (tmp_path / "b.safetensors").exists()


def test_textual_inversion_changes_only_prompts_with_its_token(seal_data, tmp_path, builtin_build):
    import torch

    from sdc.export.sources import SDC_TINY, resolve_model
    from sdc.training.common import load_tokenizer
    from sdc.training.embedding_train import train_embedding

    out = tmp_path / "seal-emb.safetensors"
    cfg = resolve(EmbeddingConfig, None, dict(
        data=str(seal_data), out=str(out), token="<seal>", init_word="circle", vectors=2,
        steps=20, batch_size=4, instance_prompt="a <seal> on a background", validation_steps=2))
    res = train_embedding(cfg, log=lambda m: None)
    assert res["tokens"] == ["<seal>", "<seal>_1"]
    from safetensors.torch import load_file

    vectors = load_file(str(out))["emb_params"]
    assert vectors.shape == (2, 64) and torch.isfinite(vectors).all()

    # diffusers' own loader is the oracle for the text-encoder side
    from diffusers import StableDiffusionPipeline

    from sdc.export.quiet import quiet_torch_stack

    with quiet_torch_stack():
        pipe = StableDiffusionPipeline.from_pretrained(SDC_TINY, torch_dtype=torch.float32,
                                                       safety_checker=None,
                                                       requires_safety_checker=False)
        base_te = resolve_model(None).load("text_encoder")
        pipe.load_textual_inversion(str(out), token="<seal>")
    tok = pipe.tokenizer
    base_tok = load_tokenizer(resolve_model(None))

    def states(te, tokenizer, text):
        ids = tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return te(ids).last_hidden_state[0], ids[0]

    plain = "a red circle on a blue background"
    a, _ = states(pipe.text_encoder, tok, plain)
    b, _ = states(base_te, base_tok, plain)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # no base token's vector moved
    with_token, ids = states(pipe.text_encoder, tok, "a red <seal> <seal>_1 on a blue background")
    first = int((ids == tok.convert_tokens_to_ids("<seal>")).nonzero()[0])
    without, _ = states(base_te, base_tok, "a red")
    # causal attention: positions before the token are the base model's, from the token on not
    torch.testing.assert_close(with_token[:first], without[:first], rtol=0, atol=1e-6)
    assert (with_token[first] - b[first]).abs().max() > 1e-3

    # and sdc build reads it (the token comes from the file's metadata name)
    emb_build = tmp_path / "emb-build"
    run_sdc("build", "--embedding", out, "--precision", "fp32", "--stages", "text_encoder",
            "--out", emb_build)
    m = json.loads((emb_build / "manifest.json").read_text())
    assert m["embeddings"][0]["tokens"] == ["<seal>", "<seal>_1"]


def test_bad_training_input_fails_cleanly(tmp_path, seal_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "x.safetensors"
    cases = {
        "no images": (empty, []),
        "cannot read image": (tmp_path / "broken", [("a.png", b"not a png"), ("a.txt", b"x")]),
        "has no image": (tmp_path / "orphan", [("b.txt", b"a caption")]),
    }
    for expected, (folder, files) in cases.items():
        folder.mkdir(exist_ok=True)
        for name, data in files:
            (folder / name).write_bytes(data)
        proc = run_sdc("train-lora", "--data", folder, "--trigger", "x", "--out", out, check=False)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
    proc = run_sdc("train-lora", "--data", seal_data, "--trigger", "x", "--out", out, "--rank", 0,
                   check=False)
    assert proc.returncode == 2 and "--rank 0" in proc.stderr
    proc = run_sdc("train-embedding", "--data", seal_data, "--token", "<t>", "--init-word", "seal",
                   "--out", out, check=False)
    assert proc.returncode == 2 and "appears in none of the" in proc.stderr
    assert not out.exists()
    from sdc.training.data import check_trigger, read_folder

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_trigger(read_folder(seal_data), "zebra")
    assert "appears in none" in str(caught[0].message)


def test_config_file_and_flags(tmp_path):
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('data = "d"\nout = "o.safetensors"\ntrigger = "sks"\nrank = 16\n'
                        'lr-schedule = "cosine"\n')
    cfg = resolve(LoraConfig, cfg_file, {"rank": 4, "steps": None})
    assert (cfg.rank, cfg.lr_schedule, cfg.steps, cfg.trigger) == (4, "cosine", 500, "sks")
    proc = run_sdc("train-lora", "--config", cfg_file, "--steps", 7, "--print-config")
    printed = json.loads(proc.stdout)
    assert printed["steps"] == 7 and printed["rank"] == 16 and printed["optimizer"] == "adafactor"
    (tmp_path / "bad.toml").write_text("ranks = 3\n")
    proc = run_sdc("train-lora", "--config", tmp_path / "bad.toml", check=False)
    assert proc.returncode == 2 and "unknown setting(s) ranks" in proc.stderr
