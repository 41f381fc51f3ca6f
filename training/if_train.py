"""`sdc train-lora` on DeepFloyd IF: a LoRA for stage I (`unet`, 64 px text-to-image) or stage II
(`unet_2`, the 4x super-resolution UNet), in pixel space, read by diffusers' `IFPipeline` /
`IFSuperResolutionPipeline.load_lora_weights`.

Which UNet: the stage is II when `upscaler` names the IF-II folder (MODEL stays the IF-I folder:
IF's stages share one T5, stage I's, and its captions are encoded with it), else I;
`model_flavour` (SimpleTuner's names: i-medium-400m, i-large-900m, i-xlarge-4.3b, ii-medium-450m,
ii-large-1.2b) must agree with that and is recorded in the file. Defaults (config.py
FAMILY_DEFAULTS): lr 4e-5 decaying polynomially (power 1: linearly) to lr_end 4e-6 at the last
step, SimpleTuner's guide (lr_end not given: a tenth of lr);
resolution = the trained UNet's sample_size (64 for IF-I, 256 for IF-II).

Loss (no VAE): the pictures at the resolution, scaled to [-1, 1], noised by the stage's own DDPM
scheduler (its config: squaredcos_cap_v2, 1000 steps) at a uniform random timestep. The UNets
predict 6 channels, noise and IF's learned-variance interpolation (`learned_range`); the MSE is
on the first 3 (epsilon) only, as SimpleTuner and diffusers' IF scripts train it: the variance
half gets no target. Validation images therefore use the scheduler with variance_type
"fixed_small", as diffusers' IF LoRA docs prescribe for such LoRAs (metadata
`sdc.variance_type`).

Stage II pairs: the low-resolution image is the training picture itself at res / factor (box
filter, `area`; factor = IF-II sample_size / IF-I sample_size, 4), upscaled back bilinearly with
align_corners=True (IFSuperResolutionPipeline's own upscale), noised by the IF-II folder's
`image_noising_scheduler` at a noise level drawn uniformly from [0, its num_train_timesteps) each
time (the level the UNet gets as `class_labels`; inference uses 250), so the LoRA keeps working
at any level the pipeline is run with. Model input: concat(noisy high-res, noised upscaled
low-res) on channels.

T5 states come from the compact fp16 cache (cache.T5Cache); T5 is loaded only for captions
missing from it (and the validation prompts and the empty negative prompt, encoded once so
validation never reloads T5) and released before the UNet trains.

LoRA targets: the attention projections to_q, to_k, to_v, to_out.0 and the added-KV attention's
add_k_proj, add_v_proj (IF's UNets attend to T5 through them); + ResNet conv1/conv2 with
`targets = "attn+conv"`. Determinism as for SD (common.py): every draw of step s comes from the
step's generator.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import SdcError
from ..export.quiet import quiet_torch_stack
from . import common
from .cache import T5Cache
from .config import IF_FLAVOURS, LoraConfig, parse_sizes

IF_ATTN = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
IF_CONV = ["conv1", "conv2"]
STAGE_TITLES = {"unet": "stage I", "unet_2": "stage II"}
MAX_TOKENS = 77  # IF's pipelines encode 77 T5 tokens
VALIDATION_NOISE_LEVEL = 250  # IFSuperResolutionPipeline's default
VALIDATION_VARIANCE = "fixed_small"


@dataclass
class IFPrepared:
    """What common.train_step reads (`source`, `precision`) plus IF's own tensors."""

    source: object
    device: object
    precision: common.Precision
    stage: str
    resolution: int
    factor: int | None
    pixels: object  # torch [N, 3, R, R] in [-1, 1]
    upscaled: object | None  # stage II: torch [N, 3, R, R], the low-res image upscaled back
    text: object  # torch [N, 77, width] T5 states, per item
    noise: object  # DDPMScheduler of the trained stage
    noising: object | None  # stage II's image_noising_scheduler
    captions: list[str]
    stats: dict = field(default_factory=dict)


def stage_of(cfg: LoraConfig) -> str:
    if cfg.model_flavour is not None:
        return IF_FLAVOURS[cfg.model_flavour]
    return "unet_2" if cfg.upscaler else "unet"


def if_text(texts: list[str]) -> list[str]:
    """The captions as IF's pipelines encode them (`_text_preprocessing`): cleaned when
    beautifulsoup4 and ftfy are installed (clean_caption=True, the pipelines' default), else
    lower-cased and stripped, as the pipelines then fall back to."""
    from diffusers import IFPipeline
    from diffusers.utils import is_bs4_available, is_ftfy_available

    pre = IFPipeline.__new__(IFPipeline)  # the method needs no module, only the class's regexes
    return pre._text_preprocessing(list(texts), clean_caption=is_bs4_available()
                                   and is_ftfy_available())


def t5_hash(source) -> str:
    """The identity of what encodes captions: T5's weights and configs and the tokenizer."""
    h = hashlib.sha256()
    for rel, digest in sorted(source.file_hashes().items()):
        if rel.startswith(("text_encoder/", "config:text_encoder/", "config:tokenizer/")):
            h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def _upscaler_config(source, sub: str) -> dict:
    """A scheduler config of the IF-II folder (checked to exist by resolve_model)."""
    folder, _ = source.parts["unet_2"]
    path = Path(folder) / sub / "scheduler_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SdcError(f"--upscaler {folder}: cannot read {sub}/scheduler_config.json ({e}); "
                       "restore it from the IF-II download") from None


def _tokenizer(source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source.config_dir / "tokenizer"))


def _sizes(cfg: LoraConfig, resolution: int, multiple: int, what: str) -> list[tuple[int, int]]:
    sizes = parse_sizes(cfg.validation_resolution) if cfg.validation_resolution else \
        [(resolution, resolution)]
    bad = [f"{w}x{h}" for w, h in sizes if w % multiple or h % multiple]
    if bad:
        raise SdcError(f"--validation-resolution {cfg.validation_resolution!r}: {bad[0]} is not a "
                       f"multiple of {multiple}, which {what} needs; give sizes such as "
                       f"{resolution},{resolution + multiple}x{resolution}")
    return sizes


def prepare(cfg: LoraConfig, source, stage: str, log: Callable[[str], None],
            extra_texts: list[str]) -> tuple[IFPrepared, dict]:
    """Pictures (and stage II's conditioning images) in memory, T5 states from the cache; returns
    the prepared data and the T5 states of `extra_texts` (validation prompts), by text."""
    import torch
    from diffusers import DDPMScheduler

    from .data import items, load_pixels, read_folder

    configs = source.configs()
    unet_cfg = configs[stage]
    multiple = 2 ** (len(unet_cfg["block_out_channels"]) - 1)
    res = cfg.resolution or int(unet_cfg.get("sample_size", 64))
    factor = None
    if stage == "unet_2":
        factor = source.dims().upscale_factor
        multiple = math.lcm(multiple, factor)
    if res % multiple:
        raise SdcError(f"--resolution {res}: expected a multiple of {multiple} for DeepFloyd IF's "
                       f"{STAGE_TITLES[stage]} UNet"
                       + (f" (and of the upscale factor {factor})" if factor else ""))
    what = f"IF's {STAGE_TITLES[stage]} UNet" + (f" and the upscale factor {factor}"
                                                  if factor else "")
    sizes = _sizes(cfg, res, multiple, what)
    samples = read_folder(Path(cfg.data), cfg.instance_prompt)
    if cfg.reg_data:
        samples += read_folder(Path(cfg.reg_data))
    device = common.pick_device(cfg.device)
    prec = common.pick_precision(cfg, device)
    its = items(samples, res, cfg.crop, cfg.flip, cfg.crops, cfg.seed)
    captions = [it.sample.caption for it in its]
    pixels = torch.from_numpy(np.stack([load_pixels(it, res) for it in its]))
    upscaled = None
    if factor:
        import torch.nn.functional as F

        low = F.interpolate(pixels, scale_factor=1 / factor, mode="area")
        upscaled = F.interpolate(low, size=(res, res), mode="bilinear", align_corners=True)

    texts = if_text(captions + list(extra_texts))
    unique = list(dict.fromkeys(texts))
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(str(cfg.out) + ".cache")
    cache = T5Cache(cache_dir, t5_hash(source), MAX_TOKENS)
    te = tok = None

    def encode(idx: list[int]):
        nonlocal te, tok
        if te is None:
            log("loading T5 to encode the captions")
            with quiet_torch_stack():
                te = source.load("text_encoder", "fp16" if prec.name == "fp16" else "fp32")
                te = te.to(device, torch.bfloat16) if prec.name == "bf16" else te.to(device)
                tok = _tokenizer(source)
        t = tok([unique[i] for i in idx], padding="max_length", max_length=MAX_TOKENS,
                truncation=True, add_special_tokens=True, return_tensors="pt")
        with torch.no_grad():
            states = te(t.input_ids.to(device), attention_mask=t.attention_mask.to(device))[0]
        return states.float().cpu().numpy(), t.attention_mask.sum(1).numpy()

    states, lengths = cache.states(unique, encode)
    del te
    row = {t: i for i, t in enumerate(unique)}
    text = torch.from_numpy(states[[row[t] for t in texts[:len(captions)]]])
    extra = {raw: torch.from_numpy(states[row[t]][None])
             for raw, t in zip(extra_texts, texts[len(captions):])}
    width = states.shape[-1]
    full_fp32 = MAX_TOKENS * width * 4
    per = cache.bytes_per_caption()
    stats = {"text_cache_bytes_per_caption": per, "text_cache_full_fp32_bytes": full_fp32,
             "text_cache_full_fp16_bytes": full_fp32 // 2, "text_encoded": cache.encoded,
             "text_cached": cache.reused, "caption_tokens_mean": round(float(lengths.mean()), 1),
             "validation_sizes": [f"{w}x{h}" for w, h in sizes]}
    log(f"data: {len(samples)} image(s) -> {len(its)} item(s) at {res} px ({STAGE_TITLES[stage]}"
        + (f", {res // factor} px inputs upscaled {factor}x" if factor else "") + f"); T5 states "
        f"{cache.encoded} encoded, {cache.reused} cached, {per} bytes per caption on disk (fp16, "
        f"distinct rows; all {MAX_TOKENS} states in fp32: {full_fp32})")
    if stage == "unet":
        sched = source.scheduler_config()
        noising = None
    else:
        sched = _upscaler_config(source, "scheduler")
        noising = DDPMScheduler.from_config(_upscaler_config(source, "image_noising_scheduler"))
    prep = IFPrepared(source, device, prec, stage, res, factor, pixels, upscaled, text,
                      DDPMScheduler.from_config(sched), noising, captions, stats)
    prep.stats["sizes"] = sizes
    prep.stats["scheduler_config"] = dict(sched)
    return prep, extra


def loss_fn(cfg: LoraConfig, prep: IFPrepared, unet) -> Callable:
    """The step's loss from the step's generator: items, timesteps, noise (and for stage II the
    noise levels and the conditioning image's noise), then MSE on the epsilon half."""
    import torch

    dev, prec = prep.device, prep.precision
    n_train = prep.noise.config.num_train_timesteps

    def loss_of(g):
        idx = torch.randint(0, prep.pixels.shape[0], (cfg.batch_size,), generator=g)
        x0 = prep.pixels[idx]
        t = torch.randint(0, n_train, (cfg.batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        labels = None
        x0, t, eps = x0.to(dev), t.to(dev), eps.to(dev)
        xt = prep.noise.add_noise(x0, eps, t)
        if prep.noising is not None:
            level = torch.randint(0, prep.noising.config.num_train_timesteps, (cfg.batch_size,),
                                  generator=g)
            eps_low = torch.randn(x0.shape, generator=g)
            low = prep.noising.add_noise(prep.upscaled[idx].to(dev), eps_low.to(dev),
                                         level.to(dev))
            xt = torch.cat([xt, low], dim=1)
            labels = level.to(dev)
        target = (prep.noise.get_velocity(x0, eps, t)
                  if prep.noise.config.prediction_type == "v_prediction" else eps)
        cond = prep.text[idx].to(dev, prec.weights)
        with torch.autocast(dev.type, dtype=prec.autocast, enabled=prec.autocast is not None):
            pred = unet(xt.to(prec.weights), t, encoder_hidden_states=cond,
                        class_labels=labels).sample
        # 6 channels: epsilon, then the learned variance's interpolation value (no target)
        return torch.nn.functional.mse_loss(pred[:, :x0.shape[1]].float(), target.float())

    return loss_of


def sample_images(prep: IFPrepared, unet, prompt_states: dict, prompts: list[str],
                  seeds: list[int], steps: int, guidance: float, low_res_of) -> list:
    """diffusers' own IF pipelines on the UNet being trained, at every validation size: stage I
    text-to-image, stage II upscaling `low_res_of(width, height)`; T5 states are the cached
    ones (no T5 in memory), the scheduler with fixed_small variance (module doc)."""
    import torch
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline

    sched = DDPMScheduler.from_config(prep.stats["scheduler_config"],
                                      variance_type=VALIDATION_VARIANCE)
    common_kw = dict(tokenizer=None, text_encoder=None, unet=unet, scheduler=sched,
                     safety_checker=None, feature_extractor=None, watermarker=None,
                     requires_safety_checker=False)
    if prep.stage == "unet":
        pipe = IFPipeline(**common_kw)
    else:
        pipe = IFSuperResolutionPipeline(image_noising_scheduler=prep.noising, **common_kw)
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    negative = prompt_states[""].to(prep.device, prep.precision.weights)
    images = []
    with torch.no_grad():
        for p in prompts:
            embeds = prompt_states[p].to(prep.device, prep.precision.weights)
            for w, h in prep.stats["sizes"]:
                for s in seeds:
                    kw = dict(prompt_embeds=embeds, negative_prompt_embeds=negative,
                              num_inference_steps=steps, guidance_scale=guidance, height=h,
                              width=w, generator=torch.Generator("cpu").manual_seed(s))
                    if prep.stage == "unet_2":
                        kw.update(image=low_res_of(w, h), noise_level=VALIDATION_NOISE_LEVEL)
                    images.append(pipe(**kw).images[0])
    unet.train(was_training)
    del pipe
    return images


def train_if_lora(cfg: LoraConfig, source, resume: str | None, log: Callable[[str], None],
                  progress: Callable[[int, int, float], None], t_start: float) -> dict:
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig as PeftConfig
    from PIL import Image

    from .lora_train import _strip_trigger, _trainable, _write_lora

    stage = stage_of(cfg)
    if cfg.train_text_encoder:
        raise SdcError("--train-text-encoder: DeepFloyd IF's T5 is not trained by sdc (4.7B "
                       "parameters in IF); train the UNet LoRA alone")
    out = Path(cfg.out)
    base_hash = source.content_hash()
    if resume:
        common.check_checkpoint(Path(resume), {"base_model_sha256": base_hash, "kind": "lora"})
    from .data import read_folder

    captions = [s.caption for s in read_folder(Path(cfg.data), cfg.instance_prompt)]
    trigger_prompt = next((c for c in captions if cfg.trigger.lower() in c.lower()), captions[0])
    prompts = [trigger_prompt, _strip_trigger(trigger_prompt, cfg.trigger)]
    with quiet_torch_stack():
        prep, prompt_states = prepare(cfg, source, stage, log, prompts + [""])
        unet = source.load(stage, "fp32").to(prep.device, prep.precision.weights)
    alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
    targets = IF_ATTN + (IF_CONV if cfg.targets == "attn+conv" else [])
    unet.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # peft's lora_A init draws from the global generator
    unet.add_adapter(PeftConfig(r=cfg.rank, lora_alpha=alpha, target_modules=targets,
                                init_lora_weights="gaussian"))
    cast_training_params([unet], dtype=torch.float32)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    named = {f"unet.{k}": p for k, p in _trainable(unet).items()}
    params = list(named.values())
    opt = common.make_optimizer(cfg, params)
    scaler = torch.amp.GradScaler("cuda") if prep.precision.loss_scaling else None
    must_match = {"base_model_sha256": base_hash, "kind": "lora", "stage": stage,
                  "model_flavour": cfg.model_flavour, "rank": cfg.rank, "alpha": alpha,
                  "targets": cfg.targets, "seed": cfg.seed, "batch_size": cfg.batch_size,
                  "grad_accum": cfg.grad_accum, "resolution": prep.resolution,
                  "optimizer": cfg.optimizer}
    start = common.resume_into(resume, named, opt, must_match, cfg.steps, log)
    ckpt_dir = Path(str(out) + ".checkpoints")
    samples_dir = out.with_suffix(".samples")
    guidance = cfg.validation_guidance if cfg.validation_guidance is not None else (
        7.0 if stage == "unet" else 4.0)  # the pipelines' defaults
    first_trigger = next((i for i, c in enumerate(prep.captions)
                          if cfg.trigger.lower() in c.lower()), 0)

    def low_res_of(w: int, h: int):
        """A training picture downsized to the stage II input for an output of w x h."""
        x = prep.pixels[first_trigger].permute(1, 2, 0).numpy()
        im = Image.fromarray(np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8))
        return im.resize((w // prep.factor, h // prep.factor), Image.Resampling.BOX)

    def validate(step: int, path: Path) -> None:
        with quiet_torch_stack():
            imgs = sample_images(prep, unet, prompt_states, prompts, [0, 1],
                                 cfg.validation_steps, guidance, low_res_of)
        path.parent.mkdir(parents=True, exist_ok=True)
        common.grid(imgs, 2 * len(prep.stats["sizes"])).save(path)
        log(f"step {step}: samples at {', '.join(prep.stats['validation_sizes'])} (rows: "
            f"{prompts[0]!r}, {prompts[1]!r}) -> {path}")

    loss_of = loss_fn(cfg, prep, unet)
    advice = f"lower --lr (now {cfg.lr:g}) or --alpha (now {alpha:g}, rank {cfg.rank})"
    losses = []
    t_train = time.perf_counter()
    for step in range(start, cfg.steps):
        losses.append(common.train_step(cfg, step, prep, unet, opt, params, None, scaler,
                                        advice=advice, start=start, loss_of=loss_of))
        done = step + 1
        progress(done, cfg.steps, float(np.mean(losses[-20:])))
        common.between_steps(done, cfg, named, opt, {**must_match, "base_model": source.name},
                             validate, ckpt_dir, samples_dir)
    train_s = time.perf_counter() - t_train

    st = prep.stats
    metadata = {
        "sdc.kind": "lora", "sdc.trigger": cfg.trigger.strip(), "sdc.base_model": source.name,
        "sdc.base_model_sha256": base_hash, "sdc.rank": str(cfg.rank), "sdc.alpha": f"{alpha:g}",
        "sdc.target_modules": ",".join(targets), "sdc.steps": str(cfg.steps),
        "sdc.resolution": str(prep.resolution), "sdc.version": __version__,
        "sdc.family": "deepfloyd", "sdc.stage": stage,
        "sdc.model_flavour": cfg.model_flavour or "",
        "sdc.resolution_type": cfg.resolution_type,
        "sdc.variance_type": VALIDATION_VARIANCE,
        "sdc.text_cache_bytes_per_caption": str(st["text_cache_bytes_per_caption"]),
        # the same three under the names the trainer's issue gives them
        "sdc_family": "deepfloyd", "sdc_stage": stage, "model_flavour": cfg.model_flavour or "",
    }
    if stage == "unet_2":
        metadata.update({"sdc.upscale_factor": str(prep.factor),
                         "sdc.upscaler": Path(source.parts["unet_2"][0]).name})
    grid_path = common.finish(out, lambda tmp: _write_lora(tmp, unet, None, metadata), named,
                              cfg, opt, {**must_match, "base_model": source.name}, validate,
                              ckpt_dir)
    from ..export.memory import process_peak_rss_bytes

    result = {"out": str(out), "samples": str(grid_path) if cfg.samples else None,
              "family": "deepfloyd", "stage": stage, "model_flavour": cfg.model_flavour,
              "steps": cfg.steps, "resumed_from": start, "resolution": prep.resolution,
              "lr": cfg.lr, "lr_end": cfg.lr_end, "lr_schedule": cfg.lr_schedule,
              "loss_first": round(float(np.mean(losses[:20])), 5) if losses else None,
              "loss_final": round(float(np.mean(losses[-20:])), 5) if losses else None,
              "train_seconds": round(train_s, 1),
              "seconds": round(time.perf_counter() - t_start, 1),
              "peak_rss_gib": round(process_peak_rss_bytes() / 2**30, 2),
              **{k: v for k, v in st.items() if k not in ("sizes", "scheduler_config")},
              "precision": prep.precision.name, "device": str(prep.device),
              "trainable_params": sum(p.numel() for p in params)}
    if prep.device.type == "cuda":
        result["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    log(json.dumps(result))
    return result
