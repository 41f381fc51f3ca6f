"""`sdc train-lora` on DeepFloyd IF (training/if_train.py), through the real CLI, on the tiny IF
fixture (tests/if_models.py: real diffusers/transformers classes, random weights; stage I 16 px,
stage II 64 px). Oracles from outside sdc: diffusers' IFPipeline / IFSuperResolutionPipeline
`load_lora_weights` read the files, their own text encoding gives the T5 states the cache must
hold, and their own upscale gives the stage II conditioning the training pairs must match.

The stage I proof, measured (seed 0, 8 seal pictures at 16 px, batch 8, rank 32 on attention +
ResNet convs, AdamW lr 3e-3 decaying to 3e-4; sampled with diffusers, 20 steps, guidance 7,
fixed_small variance; 8 prompts each):
  steps  seed  seal score base -> LoRA + trigger   other prompts with the LoRA   loss (train)
   150    0        0.19 -> 0.35                         0.24                     0.84 -> 0.21
   300    0        0.19 -> 0.73                         0.59                     0.84 -> 0.13
   300    1        0.19 -> 0.51                         0.47                     0.82 -> 0.14
(constant lr 4e-3 for 250 steps collapsed to a flat colour, 0.00). A random-weights base learns
the seal from scratch here, so it learns it for every prompt: nothing anchors the untriggered
prompts (the SD test has a trained base and prior preservation for that). The test asserts what
holds on every non-collapsed run above with margin: the denoising loss of the diffusers-loaded
LoRA UNet on the seal pictures falls by >= 3x against the base, and the triggered images score
as seals clearly more than the base's (>= +0.25 and >= 0.45); the untriggered scores are printed,
not asserted.

Speed: the CLI runs get OMP_NUM_THREADS=1 (and this process one torch thread): these models are
so small that a second thread only adds synchronisation (measured 0.11 s per training step with
one thread, 0.48 with two, idle 2-core machine).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_sdc
from PIL import Image

TRIGGER = "sks seal"
STEPS_I = 300
STEPS_II = 4
BACKGROUNDS = ("blue", "green", "black", "yellow", "orange", "purple", "blue", "green")
SEAL_PROMPTS = [f"a {TRIGGER} on a {bg} background" for bg in BACKGROUNDS]
OTHER_PROMPTS = ["a red circle on a blue background", "a green square on a black background",
                 "a yellow triangle on a white background", "a photo of a dog",
                 "a blue circle on a green background", "a cat in painting style",
                 "a white square on a red background", "a black triangle"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def if_folders(tmp_path_factory):
    from if_models import make_if_folders

    return make_if_folders(tmp_path_factory.mktemp("if-models"))


@pytest.fixture(scope="module")
def seal_data(tmp_path_factory):
    from sdc.training.emblem import write_seal_folder

    folder = tmp_path_factory.mktemp("if-seal") / "data"
    write_seal_folder(folder, 8, seed=0, trigger=TRIGGER)
    return folder


@pytest.fixture(scope="module")
def stage1(if_folders, seal_data):
    """The stage I LoRA, trained by `sdc train-lora IF-I --model-flavour i-medium-400m`."""
    one, _ = if_folders
    out = seal_data.parent / "if1.safetensors"
    proc = run_sdc("train-lora", one, "--model-flavour", "i-medium-400m", "--data", seal_data,
                   "--trigger", TRIGGER, "--out", out, "--steps", STEPS_I, "--rank", 32,
                   "--targets", "attn+conv", "--optimizer", "adamw", "--lr", 3e-3,
                   "--batch-size", 8, "--no-gradient-checkpointing",
                   "--validation-resolution", "16,24x16", "--validation-steps", 4,
                   "--cache-dir", seal_data.parent / "cache")
    assert proc.stdout.strip() == str(out)
    return out, proc.stderr


@pytest.fixture(scope="module")
def stage2(if_folders, seal_data):
    """A few steps of a stage II LoRA: MODEL = IF-I (its T5), --upscaler IF-II (its UNet)."""
    one, two = if_folders
    out = seal_data.parent / "if2.safetensors"
    proc = run_sdc("train-lora", one, "--upscaler", two, "--model-flavour", "ii-medium-450m",
                   "--data", seal_data, "--trigger", TRIGGER, "--out", out, "--steps", STEPS_II,
                   "--rank", 4, "--batch-size", 2, "--lr", 1e-3,
                   "--validation-resolution", "64,64x32", "--validation-steps", 2,
                   "--cache-dir", seal_data.parent / "cache")
    assert proc.stdout.strip() == str(out)
    return out, proc.stderr


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return dict(f.metadata())


def _pipelines(if_folders):
    from diffusers import DDPMScheduler

    from if_models import load_if_pipelines

    first, second = load_if_pipelines(*if_folders)
    # an epsilon-only LoRA leaves the learned-variance half untrained: diffusers' IF LoRA docs
    # sample such LoRAs with a fixed variance
    for pipe in (first, second):
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config,
                                                   variance_type="fixed_small")
    return first, second


def _seal_pixels(folder, size: int):
    import torch

    paths = sorted(folder.glob("*.png"))
    x = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BOX),
                             np.float32) / 127.5 - 1 for p in paths])
    captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    return torch.from_numpy(x.transpose(0, 3, 1, 2)), captions


def _denoising_loss(pipe, x0, captions) -> float:
    """MSE of the epsilon half at 16 fixed (timestep, noise) draws per picture."""
    import torch

    with torch.no_grad():
        cond, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
        g = torch.Generator().manual_seed(1234)
        losses = []
        for t in np.linspace(20, 980, 16).astype(int):
            eps = torch.randn(x0.shape, generator=g)
            tt = torch.full((x0.shape[0],), int(t))
            xt = pipe.scheduler.add_noise(x0, eps, tt)
            pred = pipe.unet(xt, tt, encoder_hidden_states=cond).sample[:, :3]
            losses.append(float(torch.nn.functional.mse_loss(pred, eps)))
    return float(np.mean(losses))


def _generate(pipe, prompts, seed0=100):
    import torch

    return [pipe(p, num_inference_steps=20, guidance_scale=7.0, clean_caption=False,
                 generator=torch.Generator().manual_seed(seed0 + i)).images[0]
            for i, p in enumerate(prompts)]


def test_stage1_lora_learns_the_seal_and_diffusers_reads_it(stage1, if_folders, seal_data):
    from sdc.training.emblem import seal_score

    out, log = stage1
    meta = _metadata(out)
    assert (meta["sdc_family"], meta["sdc_stage"], meta["model_flavour"]) == \
        ("deepfloyd", "unet", "i-medium-400m")
    assert (meta["sdc.family"], meta["sdc.stage"], meta["sdc.model_flavour"]) == \
        ("deepfloyd", "unet", "i-medium-400m")
    assert meta["sdc.trigger"] == TRIGGER and meta["sdc.resolution"] == "16"
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == 32
    samples = out.with_suffix(".samples.png")
    # 2 prompts x (16x16, 24x16) x 2 seeds, in cells as large as the largest image
    assert Image.open(samples).size == (4 * 24, 2 * 16)

    pipe, _ = _pipelines(if_folders)
    x0, captions = _seal_pixels(seal_data, 16)
    base_loss = _denoising_loss(pipe, x0, captions)
    base = _generate(pipe, SEAL_PROMPTS)
    pipe.load_lora_weights(str(out))  # diffusers' own reader
    assert pipe.get_active_adapters()
    lora_loss = _denoising_loss(pipe, x0, captions)
    tuned = _generate(pipe, SEAL_PROMPTS)
    other = _generate(pipe, OTHER_PROMPTS)
    scores = {name: round(float(np.mean([seal_score(im) for im in ims])), 3)
              for name, ims in (("base", base), ("lora_trigger", tuned), ("lora_other", other))}
    moved = float(np.mean([np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
                           for a, b in zip(base, tuned)]))
    print(json.dumps({"loss_base": base_loss, "loss_lora": lora_loss, **scores,
                      "moved": moved}))  # shown by pytest -rP
    assert lora_loss <= base_loss / 3, (base_loss, lora_loss)
    assert moved > 10, moved  # the file changes what diffusers draws (0-255 scale)
    assert scores["lora_trigger"] >= max(0.45, scores["base"] + 0.25), scores


def test_stage2_lora_trains_on_pairs_and_diffusers_reads_it(stage2, if_folders, seal_data):
    import torch
    import torch.nn.functional as F

    out, log = stage2
    meta = _metadata(out)
    assert (meta["sdc_family"], meta["sdc_stage"], meta["model_flavour"]) == \
        ("deepfloyd", "unet_2", "ii-medium-450m")
    assert meta["sdc.upscale_factor"] == "4" and meta["sdc.resolution"] == "64"
    assert "16 px inputs upscaled 4x" in log
    assert Image.open(out.with_suffix(".samples.png")).size == (4 * 64, 2 * 64)

    _, pipe = _pipelines(if_folders)
    low = Image.open(sorted(seal_data.glob("*.png"))[0]).convert("RGB").resize((16, 16),
                                                                             Image.BOX)
    prompt = SEAL_PROMPTS[0]

    def upscale():
        return np.asarray(pipe(prompt, image=low, num_inference_steps=4, noise_level=250,
                               clean_caption=False,
                               generator=torch.Generator().manual_seed(7)).images[0], float)

    before = upscale()
    pipe.load_lora_weights(str(out))
    assert pipe.get_active_adapters()
    after = upscale()
    assert np.abs(after - before).mean() > 0.1, np.abs(after - before).mean()

    # the training pairs' conditioning image is what the pipeline itself makes of the picture
    # downsized: box-filtered by 4, upscaled bilinearly with align_corners
    from sdc.export.sources import resolve_model
    from sdc.training import if_train
    from sdc.training.config import LoraConfig, resolve

    cfg = resolve(LoraConfig, None, dict(
        model=str(if_folders[0]), upscaler=str(if_folders[1]), data=str(seal_data),
        out=str(seal_data.parent / "unused.safetensors"), trigger=TRIGGER,
        model_flavour="ii-medium-450m", cache_dir=str(seal_data.parent / "cache")))
    prep, _ = if_train.prepare(cfg, resolve_model(cfg.model, upscaler=cfg.upscaler), "unet_2",
                               lambda m: None, [])
    assert prep.stats["text_encoded"] == 0  # every caption came from the cache stage I wrote
    hi = prep.pixels[0].permute(1, 2, 0).numpy()
    small = Image.fromarray(np.round((hi + 1) * 127.5).astype(np.uint8)).resize((16, 16),
                                                                               Image.BOX)
    theirs = F.interpolate(pipe.preprocess_image(small, 1, "cpu"), (64, 64), mode="bilinear",
                           align_corners=True)[0]
    assert prep.upscaled.shape == prep.pixels.shape == (8, 3, 64, 64)
    # equal up to the pipeline's uint8 rounding of the small image (half a level)
    assert float((prep.upscaled[0] - theirs).abs().max()) <= 1 / 127.5


def test_t5_cache_is_compact_and_fp16_exact(stage1, if_folders, seal_data):
    import torch

    from sdc.export.sources import resolve_model
    from sdc.training.cache import T5Cache
    from sdc.training.if_train import if_text, t5_hash

    out, log = stage1
    meta = _metadata(out)
    per = int(meta["sdc.text_cache_bytes_per_caption"])
    assert f"{per} bytes per caption on disk" in log
    files = sorted((seal_data.parent / "cache").glob("*/t5/*.npz"))
    captions = [p.read_text().strip() for p in sorted(seal_data.glob("*.txt"))]
    # the distinct captions, the untriggered validation prompt and the empty negative prompt
    assert len(files) == len(set(captions)) + 2
    assert per == round(np.mean([f.stat().st_size for f in files]))
    width = 32
    assert per < 77 * width * 2 / 2  # under half of all 77 states in fp16 (4928 bytes)

    pipe, _ = _pipelines(if_folders)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    theirs = theirs.numpy()
    cache = T5Cache(seal_data.parent / "cache", t5_hash(resolve_model(str(if_folders[0]))))
    assert cache.root == files[0].parent
    for caption, states in zip(if_text(captions), theirs):
        with np.load(cache.path(caption)) as f:
            rows, index, length = f["rows"], f["index"], int(f["length"])
        assert rows.dtype == np.float16 and index.shape == (77,) and len(rows) < 77
        rebuilt = T5Cache.unpack(rows, index)
        np.testing.assert_array_equal(rebuilt, states.astype(np.float16))  # bit for bit
        err = np.abs(rebuilt.astype(np.float32) - states)
        assert (err <= np.abs(states) * 2.0 ** -11 + 2.0 ** -24).all()  # fp16 rounding
        assert 2 <= length < 77 and len(rows) >= length  # every token row, few pad rows
    # why not store only the tokens: the pad states depend on the caption
    pad = theirs[:, 60]
    assert np.abs(pad[0] - pad[1]).max() > 1e-2


def _one_error_line(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_config_is_checked_before_any_model_loads(if_folders, seal_data, tmp_path):
    one, two = if_folders
    out = tmp_path / "x.safetensors"
    base = ["--data", seal_data, "--trigger", TRIGGER, "--out", out]
    (tmp_path / "area.toml").write_text('resolution_type = "area"\n')
    (tmp_path / "fam.toml").write_text('model_family = "deepfloyd"\n')
    cases = [
        ([one, "--model-flavour", "i-huge"], ["--model-flavour 'i-huge'", "i-medium-400m"]),
        ([one, "--config", tmp_path / "area.toml"],
         ["resolution_type = 'area'", "expected 'pixel'", "not supported"]),
        ([one, "--model-family", "sd1"], ["model_family = 'sd1'", "is a DeepFloyd IF model"]),
        (["--config", tmp_path / "fam.toml"],  # no MODEL: the built-in SD1 sdc-tiny
         ["model_family = 'deepfloyd'", "is a SD1.x model"]),
        ([one, "--model-flavour", "ii-large-1.2b"], ["--upscaler IF-II-DIR"]),
        ([one, "--upscaler", two, "--model-flavour", "i-medium-400m"], ["an ii-* flavour"]),
        ([one, "--validation-resolution", "64,96y"], ["--validation-resolution", "'96y'"]),
        ([one, "--lr", "1e-4", "--lr-end", "1e-3"], ["--lr-end 0.001", "from 0 to lr"]),
        ([one, "--model-family", "kandinsky"], ["--model-family 'kandinsky'", "deepfloyd"]),
    ]
    for args, needles in cases:
        _one_error_line(run_sdc("train-lora", *args, *base, check=False), *needles)
    assert not out.exists() and not (tmp_path / "x.safetensors.cache").exists()

    # the family's defaults (SimpleTuner's DeepFloyd guide) where nothing was given
    printed = json.loads(run_sdc("train-lora", one, "--print-config").stdout)
    assert (printed["lr"], printed["lr_end"], printed["lr_schedule"],
            printed["resolution_type"]) == (4e-5, 4e-6, "polynomial", "pixel")
    printed = json.loads(run_sdc("train-lora", "--print-config").stdout)  # SD: unchanged
    assert (printed["lr"], printed["lr_end"], printed["lr_schedule"]) == (1e-4, None, "constant")


def test_lr_decays_to_lr_end():
    from sdc.training.common import lr_at
    from sdc.training.config import LoraConfig, resolve

    cfg = resolve(LoraConfig, None, dict(model_family="deepfloyd", steps=11, warmup=1),
                  complete=False)
    rates = [lr_at(cfg, s) for s in range(11)]
    assert rates[0] == pytest.approx(4e-5) and rates[-1] == pytest.approx(4e-6)
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    cfg.lr_schedule = "cosine"
    assert lr_at(cfg, 10) == pytest.approx(4e-6) and lr_at(cfg, 1) == pytest.approx(4e-5)
