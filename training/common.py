"""What `sdc train-lora` and `sdc train-embedding` share: device and precision, the cached data,
the diffusion loss, the optimizer and its schedule, checkpoints, validation images.

Determinism: every random draw of step s (which items, which timesteps, which noise) comes from a
generator seeded by (seed, s, micro-batch). A run resumed from a checkpoint therefore draws
exactly what the uninterrupted run drew, with no RNG state to save; on CPU the final weights are
bit-identical (tests/test_training.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SdcError
from ..export.sources import ModelSource
from .cache import FeatureCache
from .config import CommonConfig
from .data import Item, items, load_pixels, read_folder

CHECKPOINT_STATE = "state.json"
CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SdcError(f"--device {name}: CUDA is not available here; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise SdcError(f"--device {name}: expected auto, cpu or cuda[:N]")
    return torch.device(name)


@dataclass
class Precision:
    """Frozen weights in `weights`; trainable ones always float32; compute under `autocast`."""

    weights: object
    autocast: object | None
    loss_scaling: bool
    name: str


def pick_precision(cfg: CommonConfig, device) -> Precision:
    import torch

    want = cfg.mixed_precision
    if device.type == "cpu":
        if want in ("bf16", "fp16"):
            raise SdcError(f"--mixed-precision {want}: half-precision training is for CUDA; on "
                           "CPU use fp32 (the default there)")
        return Precision(torch.float32, None, False, "fp32")
    if want == "auto":
        want = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if want == "fp32":
        return Precision(torch.float32, None, False, "fp32")
    dtype = torch.bfloat16 if want == "bf16" else torch.float16
    return Precision(dtype, dtype, want == "fp16", want)


@dataclass
class Prepared:
    source: ModelSource
    device: object
    precision: Precision
    resolution: int
    items: list[Item]
    captions: list[str]  # per item, as trained (placeholders expanded)
    latents: np.ndarray  # [N, C, h, w], scaled, float32
    text: np.ndarray | None  # [N, tokens, width] cached text-encoder states, or None
    cache: FeatureCache
    noise: object  # diffusers DDPMScheduler on the model's betas
    stats: dict = field(default_factory=dict)


def prepare(cfg: CommonConfig, source: ModelSource, caption_of: Callable[[str], str],
            cache_text: bool, log: Callable[[str], None]) -> Prepared:
    """Read the data, then latents (and, when the text encoder is frozen, its states) from the
    cache, encoding only what is missing; the VAE and text encoder are loaded only for that and
    released before the UNet trains."""
    import torch
    from diffusers import DDPMScheduler

    samples = read_folder(Path(cfg.data), cfg.instance_prompt)
    if cfg.reg_data:
        samples += read_folder(Path(cfg.reg_data))
    device = pick_device(cfg.device)
    prec = pick_precision(cfg, device)
    dims = source.dims()
    multiple = dims.vae_scale_factor * dims.unet_multiple
    res = cfg.resolution or source.native_size()
    if res % multiple:
        raise SdcError(f"--resolution {res}: expected a multiple of {multiple} for this model")
    its = items(samples, res, cfg.crop, cfg.flip, cfg.crops, cfg.seed)
    captions = [caption_of(it.sample.caption) for it in its]
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(str(cfg.out) + ".cache")
    cache = FeatureCache(cache_dir, source.content_hash())
    vae = None

    def encode_latents(idx: list[int]) -> np.ndarray:
        nonlocal vae
        if vae is None:
            log("loading the VAE to encode latents")
            vae = source.load("vae").to(device)
        x = torch.from_numpy(np.stack([load_pixels(its[i], res) for i in idx])).to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean * dims.scaling_factor
        return z.float().cpu().numpy()

    latents = cache.latents([it.key(res) for it in its], encode_latents)
    del vae
    text = None
    if cache_text:
        te = tok = None

        def encode_text(idx: list[int]) -> np.ndarray:
            nonlocal te, tok
            if te is None:
                te, tok = source.load("text_encoder").to(device), load_tokenizer(source)
            ids = tokenize(tok, [captions[i] for i in idx]).to(device)
            with torch.no_grad():
                return te(ids).last_hidden_state.float().cpu().numpy()

        text = cache.text(captions, encode_text)
        del te
    log(f"data: {len(samples)} image(s) -> {len(its)} item(s) at {res} px; latents "
        f"{cache.encoded['latents']} encoded, {cache.reused['latents']} cached"
        + (f"; text {cache.encoded['text']} encoded, {cache.reused['text']} cached"
           if cache_text else ""))
    noise = DDPMScheduler.from_config(source.scheduler_config())
    return Prepared(source, device, prec, res, its, captions, latents, text, cache, noise)


def check_trainable(source: ModelSource, what: str) -> None:
    """The trainers drive a one-encoder UNet (SD1.x, SD2.x) and, for LoRAs, DeepFloyd IF's pixel
    UNets (training/if_train.py): an SDXL model is refused by name, before anything is loaded."""
    if source.spec.space == "pixel":
        if what != "train-lora":
            raise SdcError(f"{source.path}: a {source.spec.title} model; `sdc {what}` trains "
                           "SD1.x and SD2.x models — for DeepFloyd IF train a LoRA "
                           "(`sdc train-lora`); textual inversion of its T5 is not supported")
        return
    if source.spec.conditioning != "text" or len(source.spec.text_encoders) != 1:
        raise SdcError(f"{source.path}: a {source.spec.title} model; `sdc {what}` trains SD1.x and "
                       "SD2.x models (one text encoder, no added UNet conditioning) and DeepFloyd "
                       f"IF LoRAs for now — {source.spec.title} LoRAs and embeddings made "
                       "elsewhere are fused by `sdc build --lora/--embedding`")


def load_tokenizer(source: ModelSource):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(source.tokenizer_dir()))


def tokenize(tokenizer, texts: list[str]):
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def step_generator(seed: int, step: int, micro: int):
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + micro) % 2**63)


def draw(prep: Prepared, batch: int, g):
    """The step's items, timesteps and noise, all from the step's generator."""
    import torch

    idx = torch.randint(0, len(prep.items), (batch,), generator=g)
    x0 = torch.from_numpy(prep.latents[idx.numpy()])
    t = torch.randint(0, prep.noise.config.num_train_timesteps, (batch,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    return idx, x0, t, eps


def diffusion_loss(unet, prep: Prepared, x0, t, eps, cond):
    """MSE of the UNet's prediction against the model's own target (epsilon or v)."""
    import torch

    dev = prep.device
    x0, t, eps = x0.to(dev), t.to(dev), eps.to(dev)
    xt = prep.noise.add_noise(x0, eps, t)
    target = (prep.noise.get_velocity(x0, eps, t)
              if prep.noise.config.prediction_type == "v_prediction" else eps)
    with torch.autocast(dev.type, dtype=prep.precision.autocast,
                        enabled=prep.precision.autocast is not None):
        pred = unet(xt.to(prep.precision.weights), t, cond.to(prep.precision.weights)).sample
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def diverged(cfg: CommonConfig, step: int, what: str, advice: str | None) -> SdcError:
    """The one-line error for a run that blew up at `step` (0-based): nothing is written (the
    caller raises before any output; earlier checkpoints were taken from finite weights)."""
    advice = advice or f"lower --lr (now {cfg.lr:g})"
    return SdcError(f"training diverged at step {step + 1} of {cfg.steps}: {what}; {advice} and "
                    f"train again; {cfg.out} was not written")


def train_step(cfg: CommonConfig, step: int, prep: Prepared, unet, opt, params: list,
               condition: Callable, scaler=None, advice: str | None = None,
               start: int = 0, loss_of: Callable | None = None) -> float:
    """One optimiser step, shared by LoRA and embedding training: the step's learning rate,
    `grad_accum` micro-batches (each drawn from its own seeded generator, so a resumed run draws
    what an uninterrupted one would), gradient clipping at 1.0, the (scaled) step; returns the
    step's loss. `condition(idx)` gives the text states of the drawn items.

    A NaN/inf loss, or (without a loss scaler) a NaN/inf gradient norm, stops the run with
    `diverged` before the optimizer steps: clip_grad_norm_ of an inf norm scales every gradient
    by 0 (the run would silently stop learning) and a NaN one poisons every weight, which would
    then be written out. With fp16 loss scaling inf gradients are the scaler's business: it
    skips that step and lowers the scale. `start` is the run's first step: a NaN loss there
    comes before any update of this run, so no learning rate is to blame but the model.

    `loss_of(generator)`, when given, replaces the latent-diffusion draw and loss (DeepFloyd IF's
    pixel losses, if_train.py): it draws everything from the step's generator it is handed."""
    import torch

    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, step)
    step_loss = 0.0
    for micro in range(cfg.grad_accum):
        g = step_generator(cfg.seed, step, micro)
        if loss_of is None:
            idx, x0, t, eps = draw(prep, cfg.batch_size, g)
            loss = diffusion_loss(unet, prep, x0, t, eps, condition(idx)) / cfg.grad_accum
        else:
            loss = loss_of(g) / cfg.grad_accum
        value = float(loss.detach())
        if not math.isfinite(value):
            opt.zero_grad(set_to_none=True)
            if step == start:  # the trainable weights are still their (finite) starting values
                half = (" or train with --mixed-precision bf16 or fp32 (fp16 activations "
                        "overflow past 65504)" if prep.precision.name == "fp16" else "")
                raise SdcError(f"the loss is {value} at step {step + 1}, before any update of "
                               f"this run: the base model {prep.source.name} (or the checkpoint "
                               "resumed from) gives NaN/inf; check the model files (an fp16 merge "
                               f"can overflow){half}; {cfg.out} was not written")
            raise diverged(cfg, step, f"the loss is {value}", advice)
        (scaler.scale(loss) if scaler else loss).backward()
        step_loss += value
    if scaler:
        scaler.unscale_(opt)
    norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    if scaler is None and not math.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        raise diverged(cfg, step, f"the gradient norm is {norm}", advice)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return step_loss


def make_optimizer(cfg: CommonConfig, params: list):
    import torch

    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # a fixed learning rate (no relative step), as LoRA trainers use Adafactor
        return Adafactor(params, lr=cfg.lr, relative_step=False, scale_parameter=False,
                         warmup_init=False, weight_decay=0.0)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SdcError("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes, "
                           "CUDA only); or use adafactor / adamw") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=1e-2)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)


def lr_at(cfg: CommonConfig, step: int) -> float:
    """Linear warmup, then constant, cosine or polynomial (power 1: linear) decay from lr to
    lr_end (0 when not set) at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    end = cfg.lr_end or 0.0
    span = max(1, cfg.steps - 1 - cfg.warmup)
    done = min(1.0, (step - cfg.warmup) / span)
    if cfg.lr_schedule == "cosine":
        if cfg.lr_end is None:  # as before lr_end existed: the cosine's own span
            span = max(1, cfg.steps - cfg.warmup)
            return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / span)))
        return end + (cfg.lr - end) * 0.5 * (1 + math.cos(math.pi * done))
    if cfg.lr_schedule == "polynomial":
        return end + (cfg.lr - end) * (1 - done)
    return cfg.lr


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(folder: Path, step: int, tensors: dict, optimizer, state: dict) -> Path:
    """`folder/step-NNNNNN/`: trainable tensors, optimizer state, and what a resume must match."""
    import torch
    from safetensors.torch import save_file

    final = Path(folder) / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".step-", dir=folder))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(tmp / CHECKPOINT_WEIGHTS))
        torch.save(optimizer.state_dict(), tmp / CHECKPOINT_OPTIMIZER)
        (tmp / CHECKPOINT_STATE).write_text(json.dumps({**state, "step": step}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:  # a full disk or ^C mid-save leaves no half-written .step- folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def check_checkpoint(path: Path, expect: dict) -> dict:
    """The checkpoint's state, if it matches `expect` (keys it records); else a one-line error.
    Called before any model loads, and again with the full set of settings once they are known."""
    path = Path(path)
    if not (path / CHECKPOINT_STATE).is_file():
        raise SdcError(f"--resume {path}: not an sdc training checkpoint (no {CHECKPOINT_STATE}); "
                       "expected a step-NNNNNN folder written by --checkpoint-every")
    state = json.loads((path / CHECKPOINT_STATE).read_text())
    if state.get("base_model_sha256") != expect["base_model_sha256"]:
        raise SdcError(f"--resume {path}: the checkpoint was trained on another base model "
                       f"({state.get('base_model', '?')}, sha256 "
                       f"{str(state.get('base_model_sha256'))[:12]}), not this one "
                       f"({expect['base_model_sha256'][:12]}); resume with the same MODEL")
    for k, v in expect.items():
        if k != "base_model_sha256" and k in state and state[k] != v:
            raise SdcError(f"--resume {path}: the checkpoint has {k} = {state[k]!r}, this run "
                           f"{v!r}; resume with the settings it was trained with")
    return state


def load_checkpoint(path: Path, expect: dict, steps: int) -> tuple[int, dict, dict]:
    """(step, trainable tensors, optimizer state) of a checkpoint that matches `expect`."""
    import torch
    from safetensors.torch import load_file

    state = check_checkpoint(path, expect)
    if int(state["step"]) >= steps:
        raise SdcError(f"--resume {path}: the checkpoint is at step {state['step']}, this run has "
                       f"--steps {steps}; ask for more steps")
    tensors = load_file(str(Path(path) / CHECKPOINT_WEIGHTS))
    opt = torch.load(Path(path) / CHECKPOINT_OPTIMIZER, weights_only=True)
    return int(state["step"]), tensors, opt


def between_steps(done: int, cfg: CommonConfig, named: dict, opt, state: dict, validate,
                  ckpt_dir: Path, samples_dir: Path) -> None:
    """After step `done` (before the last): the periodic checkpoint and sample image."""
    if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
        check_finite(named, cfg, "LoRA weight")
        ckpt_dir.mkdir(exist_ok=True)
        save_checkpoint(ckpt_dir, done, named, opt, state)
    if cfg.validate_every and done % cfg.validate_every == 0 and done < cfg.steps:
        validate(done, samples_dir / f"step-{done:06d}.png")


def finish(out: Path, write, named: dict, cfg: CommonConfig, opt, state: dict, validate,
           ckpt_dir: Path) -> Path:
    """A trained adapter's last steps: its tensors checked finite, the file written atomically
    by `write(tmp)`, the final sample grid (OUT.samples.png) when asked, and the final
    checkpoint when checkpointing; returns the grid's path."""
    check_finite(named, cfg, "LoRA weight")
    atomic_write(out, write)
    grid_path = out.with_suffix(".samples.png")
    if cfg.samples:
        validate(cfg.steps, grid_path)
    if cfg.checkpoint_every:
        ckpt_dir.mkdir(exist_ok=True)
        save_checkpoint(ckpt_dir, cfg.steps, named, opt, state)
    return grid_path


def resume_into(resume, named: dict, opt, expect: dict, steps: int, log) -> int:
    """--resume: the checkpoint's tensors copied into `named` {key: parameter} and its optimizer
    state into `opt`; returns the step to continue from (0 without a checkpoint)."""
    if not resume:
        return 0
    import torch

    start, tensors, opt_state = load_checkpoint(Path(resume), expect, steps)
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(tensors[k])
    opt.load_state_dict(opt_state)
    log(f"resumed from {resume} at step {start}")
    return start


# ---------------------------------------------------------------------------------------------
# Validation images (diffusers' own pipeline on the model being trained)


def sample_images(source: ModelSource, unet, text_encoder, tokenizer, prompts: list[str],
                  seeds: list[int], steps: int, guidance: float, resolution: int, device) -> list:
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.schedulers import PNDMScheduler

    vae = source.load("vae").to(device)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(source.scheduler_config()), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    images = []
    with torch.no_grad():
        for p in prompts:
            for s in seeds:
                g = torch.Generator("cpu").manual_seed(s)
                images.append(pipe(p, num_inference_steps=steps, guidance_scale=guidance,
                                   height=resolution, width=resolution, generator=g).images[0])
    unet.train(was_training)
    del pipe, vae
    return images


def grid(images: list, columns: int):
    """Images in rows of `columns`; cells as large as the largest image (sizes may differ: IF's
    validation sizes), each image in its cell's top-left corner."""
    from PIL import Image

    w = max(im.size[0] for im in images)
    h = max(im.size[1] for im in images)
    rows = math.ceil(len(images) / columns)
    out = Image.new("RGB", (w * columns, h * rows), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % columns) * w, (i // columns) * h))
    return out


def check_finite(tensors: dict, cfg: CommonConfig, what: str) -> None:
    """Refuse to write trained weights holding NaN/inf (a file like that loads everywhere and
    then draws black or noise images). train_step stops a diverging run before its weights go
    bad; this is the last guard before any file is written."""
    import torch

    for name, t in tensors.items():
        if not bool(torch.isfinite(t.detach()).all()):
            raise SdcError(f"the trained {what} {name} holds NaN/inf values; training diverged: "
                           f"lower --lr (it is {cfg.lr:g}) and train again; {cfg.out} was not "
                           "written")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename onto `path`: a failed or killed run leaves the old file (or none)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_guidance(source: ModelSource, cfg: CommonConfig) -> float:
    return cfg.validation_guidance or source.defaults().get("guidance", 7.5)
