"""`sdc train-lora`: a LoRA for an SD1.x base, trained the small-VRAM way, written as a diffusers/peft
`.safetensors` that both `sdc build --lora` and diffusers' `load_lora_weights` read.

Recipe (the seeds' 4 GB recipe, config.py holds the defaults): LoRA on the UNet's attention
projections only (options: + ResNet convs, + text encoder), Adafactor, gradient checkpointing,
mixed precision on CUDA (fp32 on CPU), latents and text-encoder states cached on disk so neither
the VAE nor the text encoder is in memory while the UNet trains, batch + gradient accumulation,
constant or cosine learning rate with warmup, seeded (see common.py for determinism).

Metadata in the file (read back by `sdc inspect` and recorded in build manifests): diffusers'
`lora_adapter_metadata` (rank, alpha, targets per component) plus `sdc.trigger`, `sdc.base_model`,
`sdc.base_model_sha256`, `sdc.rank`, `sdc.alpha`, `sdc.target_modules`, `sdc.steps`,
`sdc.resolution`, `sdc.version`.

A DeepFloyd IF MODEL (stage I, or stage II with `upscaler`) is trained by if_train.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import SdcError
from ..export.quiet import quiet_torch_stack
from ..export.sources import resolve_model
from . import common
from .config import LoraConfig
from .stack import check_peft_stack

UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_CONV = ["conv1", "conv2"]
TEXT_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _strip_trigger(text: str, trigger: str) -> str:
    """The validation prompt without its trigger phrase: what the LoRA should leave alone."""
    import re

    out = " ".join(re.sub(re.escape(trigger), " ", text, flags=re.IGNORECASE).split())
    return out or "a picture"


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _check_out(out: Path) -> None:
    if not out.parent.is_dir():
        raise SdcError(f"--out {out}: folder {out.parent} does not exist; create it first")


def check_family(cfg: LoraConfig, source) -> None:
    """The family keys against the family MODEL is (detected from its metadata, nothing loaded
    yet): a one-line error naming the key when they disagree."""
    spec = source.spec
    if cfg.model_family is not None and cfg.model_family != source.family:
        from ..families import family as family_of

        title = family_of(cfg.model_family).title
        raise SdcError(f"model_family = {cfg.model_family!r} ({title}), but MODEL {source.path} "
                       f"is a {spec.title} model ({source.family}); fix model_family or leave it "
                       "out (it is detected)")
    if source.family != "deepfloyd":
        for key in ("model_flavour", "validation_resolution"):
            if getattr(cfg, key) is not None:
                raise SdcError(f"{key} = {getattr(cfg, key)!r} is read for DeepFloyd IF models; "
                               f"MODEL {source.path} is {spec.title}: leave it out")


def train_lora(cfg: LoraConfig, resume: str | None = None, log: Callable[[str], None] = print,
               progress: Callable[[int, int, float], None] | None = None) -> dict:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    _check_out(out)
    progress = progress or (lambda step, total, loss: None)
    from .data import check_trigger, read_folder

    check_trigger(read_folder(Path(cfg.data), cfg.instance_prompt), cfg.trigger)
    # the model's family from its metadata, before torch is imported: a mismatch fails at once
    source = resolve_model(cfg.model, upscaler=cfg.upscaler)
    check_family(cfg, source)
    common.check_trainable(source, "train-lora")
    check_peft_stack()
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig as PeftConfig

    if source.spec.space == "pixel":  # DeepFloyd IF: pixel-space stages, T5
        from .if_train import train_if_lora

        return train_if_lora(cfg, source, resume, log, progress, t_start)
    base_hash = source.content_hash()
    if resume:  # a wrong checkpoint fails before minutes of loading and encoding
        common.check_checkpoint(Path(resume), {"base_model_sha256": base_hash, "kind": "lora"})
    with quiet_torch_stack():
        prep = common.prepare(cfg, source, lambda c: c, cache_text=not cfg.train_text_encoder,
                              log=log)
        unet = source.load("unet", "fp32").to(prep.device, prep.precision.weights)
        text_encoder = tokenizer = None
        if cfg.train_text_encoder:
            text_encoder = source.load("text_encoder").to(prep.device, prep.precision.weights)
            tokenizer = common.load_tokenizer(source)
    alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
    targets = UNET_ATTN + (UNET_CONV if cfg.targets == "attn+conv" else [])
    unet.requires_grad_(False)
    # peft's initialisation of lora_A draws from the global generator: seed it right here, since
    # loading models (or not, when everything is cached) may draw from it before
    torch.manual_seed(cfg.seed)
    unet.add_adapter(PeftConfig(r=cfg.rank, lora_alpha=alpha, target_modules=targets,
                                init_lora_weights="gaussian"))
    models = [unet]
    if text_encoder is not None:
        text_encoder.requires_grad_(False)
        text_encoder.add_adapter(PeftConfig(r=cfg.rank, lora_alpha=alpha, target_modules=TEXT_ATTN,
                                            init_lora_weights="gaussian"))
        models.append(text_encoder)
    cast_training_params(models, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if text_encoder is not None:
            # non-reentrant: with reentrant checkpointing, frozen inputs would cut the LoRA's grads
            text_encoder.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    for m in models:
        m.train()
    named = {f"unet.{k}": p for k, p in _trainable(unet).items()}
    if text_encoder is not None:
        named.update({f"text_encoder.{k}": p for k, p in _trainable(text_encoder).items()})
    params = list(named.values())
    opt = common.make_optimizer(cfg, params)
    scaler = torch.amp.GradScaler("cuda") if prep.precision.loss_scaling else None
    ids_all = common.tokenize(tokenizer, prep.captions) if text_encoder is not None else None

    must_match = {"base_model_sha256": base_hash, "kind": "lora", "rank": cfg.rank,
                  "alpha": alpha, "targets": cfg.targets, "train_text_encoder":
                  cfg.train_text_encoder, "seed": cfg.seed, "batch_size": cfg.batch_size,
                  "grad_accum": cfg.grad_accum, "resolution": prep.resolution,
                  "optimizer": cfg.optimizer}
    start = common.resume_into(resume, named, opt, must_match, cfg.steps, log)
    ckpt_dir = Path(str(out) + ".checkpoints")
    samples_dir = out.with_suffix(".samples")
    trigger_prompt = next((c for c in prep.captions if cfg.trigger.lower() in c.lower()),
                          prep.captions[0])
    prompts = [trigger_prompt, _strip_trigger(trigger_prompt, cfg.trigger)]
    guidance = common.default_guidance(source, cfg)

    def validate(step: int, path: Path) -> None:
        te = text_encoder if text_encoder is not None else source.load("text_encoder").to(
            prep.device)
        tok = tokenizer or common.load_tokenizer(source)
        with quiet_torch_stack():
            imgs = common.sample_images(source, unet, te, tok, prompts, [0, 1],
                                        cfg.validation_steps, guidance, prep.resolution,
                                        prep.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        common.grid(imgs, 2).save(path)
        log(f"step {step}: samples (rows: {prompts[0]!r}, {prompts[1]!r}) -> {path}")

    losses = []
    t_train = time.perf_counter()
    if text_encoder is None:  # frozen text encoder: its states were cached by prepare()
        def condition(idx):
            return torch.from_numpy(prep.text[idx.numpy()]).to(prep.device)
    else:
        def condition(idx):
            return text_encoder(ids_all[idx].to(prep.device)).last_hidden_state
    # what to lower when the run diverges: alpha / rank multiplies every LoRA update
    advice = f"lower --lr (now {cfg.lr:g}) or --alpha (now {alpha:g}, rank {cfg.rank})"
    for step in range(start, cfg.steps):
        step_loss = common.train_step(cfg, step, prep, unet, opt, params, condition, scaler,
                                      advice=advice, start=start)
        losses.append(step_loss)
        done = step + 1
        progress(done, cfg.steps, float(np.mean(losses[-20:])))
        common.between_steps(done, cfg, named, opt, {**must_match, "base_model": source.name},
                             validate, ckpt_dir, samples_dir)
    train_s = time.perf_counter() - t_train

    metadata = {
        "sdc.kind": "lora", "sdc.trigger": cfg.trigger.strip(), "sdc.base_model": source.name,
        "sdc.base_model_sha256": base_hash, "sdc.rank": str(cfg.rank), "sdc.alpha": f"{alpha:g}",
        "sdc.target_modules": ",".join(targets + (TEXT_ATTN if text_encoder is not None else [])),
        "sdc.steps": str(cfg.steps), "sdc.resolution": str(prep.resolution),
        "sdc.version": __version__,
    }
    grid_path = common.finish(out, lambda tmp: _write_lora(tmp, unet, text_encoder, metadata),
                              named, cfg, opt, {**must_match, "base_model": source.name},
                              validate, ckpt_dir)
    from ..export.memory import process_peak_rss_bytes

    result = {"out": str(out), "samples": str(grid_path) if cfg.samples else None,
              "steps": cfg.steps,
              "resumed_from": start, "loss_first": round(float(np.mean(losses[:20])), 5)
              if losses else None, "loss_final": round(float(np.mean(losses[-20:])), 5)
              if losses else None, "train_seconds": round(train_s, 1),
              "seconds": round(time.perf_counter() - t_start, 1),
              "peak_rss_gib": round(process_peak_rss_bytes() / 2**30, 2),
              "latents_encoded": prep.cache.encoded["latents"],
              "latents_cached": prep.cache.reused["latents"], "precision": prep.precision.name,
              "device": str(prep.device), "trainable_params": sum(p.numel() for p in params)}
    if prep.device.type == "cuda":
        result["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    log(json.dumps(result))
    return result


def _write_lora(path: Path, unet, text_encoder, metadata: dict) -> None:
    """diffusers' own writer (it stores lora_alpha in `lora_adapter_metadata`, FACTS.md), then
    sdc's keys added to the same header."""
    import tempfile

    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, quiet_torch_stack():
        kwargs = {}
        if text_encoder is not None:
            kwargs = {"text_encoder_lora_layers": get_peft_model_state_dict(text_encoder),
                      "text_encoder_lora_adapter_metadata":
                          text_encoder.peft_config["default"].to_dict()}
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=get_peft_model_state_dict(unet),
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            weight_name="lora.safetensors", **kwargs)
        with safe_open(str(Path(tmp) / "lora.safetensors"), "pt") as f:
            meta = {**(f.metadata() or {}), **metadata}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=meta)
