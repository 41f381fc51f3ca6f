"""A pixel cascade run (DeepFloyd IF): T5 states -> stage I (64 px) -> stage II (4x) -> pixels.

The Engine encodes the prompt as for every family (runtime/engine.py `encode_prompt`: T5 with its
attention mask, negative prompt first under CFG); this module runs the denoisers, one stage's
session at a time, with diffusers' IFPipeline / IFSuperResolutionPipeline semantics so images
match them given the same noise:

  stage I    x ~ N(0, 1) * init_noise_sigma at the requested size (3 channels); per step the UNet
             predicts 6 channels: CFG mixes the first 3 (noise), the learned variance is the
             prompt half's last 3; DDPM steps with `learned_range` variance (or drops the
             variance half: `fixed_small`, what LoRA'd IF models are sampled with, and every
             scheduler other than DDPM)
  stage II   x ~ N(0, 1) at factor x the size; stage I's image (unclamped, as diffusers hands
             `output_type="pt"` on) upscaled bilinearly with align_corners, noised to
             `noise_level` by the image-noising scheduler; the UNet sees [x, upscaled] on
             channels and the noise level as `class_labels`
  image      the last stage's pixels, (x / 2 + 0.5) clipped, rounded to uint8 (the Engine)

Noise per image comes from that image's seeded PCG64 generator, in diffusers' order: stage I's
initial noise, then each step's variance noise (none at the last step), then stage II's initial
noise, the upscaled image's noise, and its steps' noise.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import SdcError
from .store import contained, read_json_object

CASCADE_STAGES = ("I", "II")
LEARNED = ("learned", "learned_range")


def upscale_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch.nn.functional.interpolate(x, (height, width), mode="bilinear", align_corners=True)
    for [N, C, h, w] float arrays, in float64, returned in float32."""
    n, c, h, w = x.shape

    def axis(src: int, dst: int):
        pos = np.arange(dst, dtype=np.float64) * ((src - 1) / (dst - 1) if dst > 1 else 0.0)
        lo = np.clip(np.floor(pos).astype(np.int64), 0, src - 1)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, pos - lo

    y0, y1, fy = axis(h, height)
    x0, x1, fx = axis(w, width)
    v = x.astype(np.float64)
    rows = v[:, :, y0] * (1 - fy)[:, None] + v[:, :, y1] * fy[:, None]
    out = rows[..., x0] * (1 - fx) + rows[..., x1] * fx
    return out.astype(np.float32)


def cascade_stages(manifest: dict, asked: str | None) -> list[str]:
    """The denoising stages a run goes through: `--stages I` stops after stage I; the default
    runs every stage the build has."""
    from .manifest import stage_with

    first, up = stage_with(manifest, "denoise"), stage_with(manifest, "upscale")
    if asked is not None and asked not in CASCADE_STAGES:
        raise SdcError(f"--stages {asked}: expected I (stage I only, {manifest['model'].get('default_size', 64)} px) "
                       "or II (stage I then stage II)")
    if asked == "II" and up is None:
        raise SdcError("--stages II: this build has no stage II UNet (unet_2); rebuild with "
                       "`sdc build IF-I --upscaler IF-II`, or run --stages I")
    return [first] if asked == "I" or up is None else [first, up]


def output_size(manifest: dict, stages: list[str], width: int, height: int) -> tuple[int, int]:
    if len(stages) > 1:
        f = manifest["cascade"]["upscale"]["factor"]
        return width * f, height * f
    return width, height


def upscale_settings(opts, manifest: dict) -> tuple[int, float, int]:
    """Stage II's (steps, guidance, noise level): the request's, else the model's defaults
    (`defaults.upscale_*`), else IF's 50, 4.0 and the build's cascade noise level (250)."""
    defaults = manifest.get("defaults") or {}
    up = (manifest.get("cascade") or {}).get("upscale") or {}
    steps = opts.upscale_steps or int(defaults.get("upscale_steps", 50))
    guidance = float(opts.upscale_guidance if opts.upscale_guidance is not None
                     else defaults.get("upscale_guidance", 4.0))
    level = opts.noise_level if opts.noise_level is not None else int(up.get("noise_level", 250))
    return steps, guidance, level


def _scheduler(engine, entry: dict, name: str | None, variance: str | None, what: str):
    """The scheduler a manifest entry {"class", "config"} names (or `name`), with the variance
    type forced when given (DDPM only: the other schedulers drop the variance half)."""
    from .schedulers import SCHEDULERS, make_scheduler

    config = read_json_object(contained(engine.folder, entry["config"], what))
    if name is None:
        name = next((n for n, s in SCHEDULERS.items()
                     if s.diffusers_class == entry.get("class")), "ddpm")
    forced = {"variance_type": variance} if variance is not None and name == "ddpm" else {}
    return make_scheduler(name, config, **forced)


def _keeps_variance(scheduler) -> bool:
    return scheduler.name == "ddpm" and scheduler.config.get("variance_type") in LEARNED


def variance_for(engine, run) -> str | None:
    """`fixed_small` when a LoRA shapes the UNet (at build or for this request): the DeepFloyd
    guide's setting, since a LoRA trains the noise half and leaves the learned variance as the
    base model had it. None: the scheduler config's own (IF: learned_range)."""
    if run.adapters is not None or engine.manifest.get("loras"):
        return "fixed_small"
    return None


def run_cascade(engine, run, cond: dict) -> list:
    """Pixels [1, 3, H, W] per image after the run's cascade stages."""
    job, opts = run.job, run.job.opts
    manifest = engine.manifest
    stages = job.cascade
    variance = variance_for(engine, run)
    if variance:
        run.log(f"[cascade] a LoRA is applied: sampling with variance_type={variance}")
    c = manifest["model"]["latent_channels"]
    first = stages[0]
    scheduler = _scheduler(engine, manifest["scheduler"], job.scheduler, variance,
                           "scheduler.config")
    scheduler.set_timesteps(opts.steps)
    shape = (opts.batch, c, job.height, job.width)
    x = job.latents if job.latents is not None else _noise(run, shape)
    x = x * np.float32(scheduler.init_noise_sigma)
    image = engine.denoise(run, x, cond, scheduler.timesteps, scheduler, stage=first,
                           guidance=opts.guidance, keep_variance=_keeps_variance(scheduler))
    if len(stages) == 1 or run.interrupted:
        return [image[i:i + 1] for i in range(len(image))]
    up = manifest["cascade"]["upscale"]
    t0 = time.perf_counter()
    sr = _scheduler(engine, up["scheduler"], None, variance, "cascade.upscale.scheduler.config")
    noiser = _scheduler(engine, up["noising_scheduler"], "ddpm", None,
                        "cascade.upscale.noising_scheduler.config")
    steps, guidance, level = upscale_settings(opts, manifest)
    sr.set_timesteps(steps)
    h, w = job.height * up["factor"], job.width * up["factor"]
    x2 = _noise(run, (opts.batch, c, h, w)) * np.float32(sr.init_noise_sigma)
    upscaled = upscale_bilinear(image, h, w)
    upscaled = noiser.add_noise(upscaled, _noise(run, upscaled.shape),
                                np.full(opts.batch, level)).astype(np.float32)
    engine._timed(run, "upscale_input", t0)
    # the prompt's rows as encoded (with the negative's when either stage guides); denoise
    # takes the prompt half for a stage that does not guide
    cond_2 = {**cond, "class_labels": np.full(len(cond["encoder_hidden_states"]), level,
                                              np.float32)}
    out = engine.denoise(run, x2, cond_2, sr.timesteps, sr, stage=stages[1], guidance=guidance,
                         keep_variance=_keeps_variance(sr), concat=upscaled)
    return [out[i:i + 1] for i in range(len(out))]


def _noise(run, shape: tuple) -> np.ndarray:
    """One standard-normal draw per image from its own generator (image i reproduces alone)."""
    return np.concatenate([rng.standard_normal((1, *shape[1:]), dtype=np.float32)
                           for rng in run.rngs])
