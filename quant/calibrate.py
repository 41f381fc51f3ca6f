"""Calibration inputs drawn from the float build's own denoising trajectories.

Each graph's quality is judged on what the pipeline really feeds it: the prompts' token ids, the
UNet's (latents, timestep, text states) at steps spread over the schedule, the final latents the
decoder sees and the decoded pixels (the encoder's input in img2img). They come from `sdc run`'s
own pipeline on the float build (with the requested LoRAs swapped in), through its `observe`
hook, at the model's native size capped at 256 px (a full-size SD1.5 calibrates in ~3.5 min
on 2 cores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

# Two prompts in sdc-tiny's vocabulary of shapes and colours and two in any SD's; a model sees
# the other kind as ordinary text. Fixed, so a build's calibration is reproducible.
PROMPTS = ("a red circle on a blue background", "a yellow triangle on a green background",
           "a photo of a small house by a lake at dusk", "a portrait of an old sailor, oil painting")
STEPS = 8
MAX_SIZE = 256
UNET_SNAPSHOTS = 3  # UNet feeds kept per prompt (first, middle, last step): each search trial
# runs every feed, so this bounds the full-size UNet's search


@dataclass
class Calibration:
    feeds: dict[str, list[dict]]  # stage -> feeds
    prompts: tuple[str, ...]
    steps: int
    size: int
    images: list = None  # the float build's images (uint8 HxWx3), one per prompt

    def options(self, folder: Path, k: int, loras=()):
        from ..runtime.pipeline import GenerateOptions

        return GenerateOptions(prompt=self.prompts[k], artifacts=folder, steps=self.steps,
                               seed=1000 + k, width=self.size, height=self.size,
                               loras=tuple(loras), verify=False, vae_tile=0, provider="cpu")

    def describe(self) -> dict:
        return {"prompts": list(self.prompts), "steps": self.steps, "size": self.size,
                "feeds": {s: len(f) for s, f in self.feeds.items()},
                "source": "the float build's own trajectories (sdc run, observe hook)"}


def calibrate(folder: Path, manifest: dict, stages: set[str], loras=(), prompts=PROMPTS,
              log: Callable[[str], None] = print) -> Calibration:
    from ..runtime.pipeline import run_pipeline

    model = manifest["model"]
    step = model["vae_scale_factor"] * model["unet_multiple"]
    size = max(step, min(int(model.get("default_size") or MAX_SIZE), MAX_SIZE) // step * step)
    feeds: dict[str, list[dict]] = {s: [] for s in stages}
    denoiser = next(s for s, role in manifest["family"]["roles"].items() if role == "denoise")
    calib = Calibration(feeds, tuple(prompts), STEPS, size, [])
    for k, prompt in enumerate(prompts):
        seen: dict[str, list[dict]] = {s: [] for s in stages}

        def observe(stage, f, seen=seen):
            if stage in seen:
                seen[stage].append({n: np.array(v, copy=True) for n, v in f.items()})

        result = run_pipeline(calib.options(folder, k, loras), observe=observe)
        calib.images.append(np.asarray(result.images[0]))
        unet = seen.pop(denoiser, None)
        if unet is not None:
            picks = np.linspace(0, len(unet) - 1, min(UNET_SNAPSHOTS, len(unet))).round().astype(int)
            feeds[denoiser] += [unet[i] for i in sorted(set(picks.tolist()))]
        for stage, got in seen.items():
            feeds[stage] += got
    log(f"calibration: {len(prompts)} prompts, {STEPS} steps at {size}x{size}: "
        + ", ".join(f"{s} {len(f)} inputs" for s, f in feeds.items()))
    return calib


def image_psnr(calib: Calibration, folder: Path) -> list[float]:
    """The quantized build's images for the calibration prompts against the float build's, same
    seeds (PSNR over 8-bit pixels, peak 255)."""
    from ..runtime.pipeline import run_pipeline

    out = []
    for k in range(len(calib.prompts)):
        img = np.asarray(run_pipeline(calib.options(folder, k)).images[0]).astype(np.float64)
        mse = float(np.mean((img - calib.images[k].astype(np.float64)) ** 2))
        out.append(200.0 if mse == 0 else min(200.0, 10 * float(np.log10(255.0 ** 2 / mse))))
    return out
