"""Interop check: does Hugging Face Optimum's own ONNX Runtime client run an sdc build?

sdc writes its builds in the folder layout of Optimum's ONNX Stable Diffusion export
(model_index.json, text_encoder/ unet/ vae_decoder/ vae_encoder/ with model.onnx and a
config.json each, tokenizer/, scheduler/). This script holds sdc to that claim:

1. builds sdc-tiny (fp32) with the dev venv's `sdc build`;
2. draws one fixed noise tensor and generates an image with `sdc run --latents`;
3. loads the same build with `optimum.onnxruntime.ORTStableDiffusionPipeline.from_pretrained`
   on CPUExecutionProvider and generates with the same prompt, steps, guidance, scheduler and
   latents;
4. requires the two images to agree within 1/255 per pixel.

It runs in its own environment (.venv-interop, see `make interop`), because Optimum pins older
transformers / huggingface-hub than sdc's dev environment uses. Exits non-zero with a one-line
reason when the build does not load or the images differ.

    .venv-interop/bin/python bench/interop_optimum.py [--sdc .venv/bin/sdc] [--work /tmp/sdc-interop]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROMPT = "a red circle on a blue background"
SEED = 0
TOLERANCE = 1  # in 8-bit levels, i.e. 1/255

# diffusers scheduler class -> `sdc run --scheduler` name, so both sides use the same one.
SCHEDULERS = {
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler-a",
    "DPMSolverMultistepScheduler": "dpmpp-2m",
    "LMSDiscreteScheduler": "lms",
}


def fail(reason: str) -> None:
    print(f"interop FAILED: {reason}", file=sys.stderr)
    sys.exit(1)


def versions() -> dict[str, str]:
    out = {}
    for dist in ("optimum-onnx", "optimum", "transformers", "diffusers", "huggingface-hub",
                 "onnxruntime", "torch", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def sdc(sdc_bin: str, *args: str) -> None:
    cmd = [sdc_bin, *args]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        fail(f"`sdc {args[0]}` exited {proc.returncode}")


def optimum_generate(build: Path, latents: np.ndarray, steps: int, guidance: float,
                     size: int, scheduler_class: str) -> np.ndarray:
    """Generate with Optimum's pipeline; returns an HxWx3 uint8 image."""
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    try:
        pipe = ORTStableDiffusionPipeline.from_pretrained(str(build), provider="CPUExecutionProvider")
    except Exception as exc:  # any load failure is the finding
        fail(f"ORTStableDiffusionPipeline.from_pretrained: {type(exc).__name__}: {exc}")
    if type(pipe.scheduler).__name__ != scheduler_class:
        fail(f"Optimum loaded scheduler {type(pipe.scheduler).__name__}, build says {scheduler_class}")
    out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size,
               latents=torch.from_numpy(latents), output_type="np")
    image = np.asarray(out.images[0])
    # The same float -> 8-bit step diffusers uses for PIL output.
    return (image * 255).round().clip(0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdc", default=".venv/bin/sdc", help="sdc executable of the dev venv")
    ap.add_argument("--work", default="/tmp/sdc-interop", type=Path, help="scratch folder")
    ap.add_argument("--build", type=Path, help="use this existing build instead of building one")
    args = ap.parse_args()

    t0 = time.perf_counter()
    vers = versions()
    print("versions:", ", ".join(f"{k} {v}" for k, v in vers.items()))

    args.work.mkdir(parents=True, exist_ok=True)
    build = args.build or args.work / "build"
    if args.build is None:
        sdc(args.sdc, "build", "--precision", "fp32", "--out", str(build), "--force")

    manifest = json.loads((build / "manifest.json").read_text())
    model, defaults = manifest["model"], manifest.get("defaults", {})
    size = model["default_size"]
    steps = defaults.get("steps", 20)
    guidance = defaults["guidance"]
    scheduler_class = json.loads((build / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    if scheduler_class not in SCHEDULERS:
        fail(f"scheduler {scheduler_class} has no `sdc run --scheduler` name here")

    # One noise tensor for both sides: same seed, same shape, no generator differences.
    shape = (1, model["latent_channels"], size // model["vae_scale_factor"], size // model["vae_scale_factor"])
    latents = np.random.default_rng(SEED).standard_normal(shape, dtype=np.float32)
    latents_path = args.work / "latents.npy"
    np.save(latents_path, latents)
    print(f"latents {shape}, steps {steps}, guidance {guidance}, scheduler {scheduler_class}, {size} px")

    sdc_png = args.work / "sdc.png"
    sdc(args.sdc, "run", PROMPT, "-a", str(build), "--seed", str(SEED), "--latents", str(latents_path),
        "--steps", str(steps), "--guidance", str(guidance), "--scheduler", SCHEDULERS[scheduler_class],
        "--width", str(size), "--height", str(size), "--out", str(sdc_png))
    ours = np.asarray(Image.open(sdc_png).convert("RGB"))

    theirs = optimum_generate(build, latents, steps, guidance, size, scheduler_class)
    Image.fromarray(theirs).save(args.work / "optimum.png")

    if ours.shape != theirs.shape:
        fail(f"image shapes differ: sdc {ours.shape}, Optimum {theirs.shape}")
    diff = int(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max())
    print(f"max abs pixel difference: {diff}/255 (tolerance {TOLERANCE}/255); "
          f"images in {args.work}; {time.perf_counter() - t0:.1f} s")
    if diff > TOLERANCE:
        fail(f"sdc and Optimum images differ by up to {diff}/255 (> {TOLERANCE}/255)")
    print("interop OK: Optimum's ORTStableDiffusionPipeline reproduces sdc's image")


if __name__ == "__main__":
    main()
