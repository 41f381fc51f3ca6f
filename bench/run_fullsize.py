"""Benchmark `sdc run` against diffusers' StableDiffusionPipeline on the full-size SD1.5
architecture (random weights), same machine, same script, same settings and initial latents.

Each side runs in its own subprocess; peak RSS is that process's own high-water mark from the OS
(wait4 rusage), wall time is the whole process (imports, loading, denoising, decode), and the
child also reports its in-process generation time. Needs the folders bench/build_fullsize.py
leaves with --keep:

    python bench/build_fullsize.py --work /tmp/sdc-bench --keep
    python bench/run_fullsize.py --work /tmp/sdc-bench [--steps 20] [--sizes 256 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "run_fullsize.json"

SDC_CHILD = r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
from sdc.runtime import GenerateOptions, run_pipeline
art, steps, size, tile, lat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
r = run_pipeline(GenerateOptions(prompt="a red circle on a blue background", artifacts=art,
                 steps=steps, width=size, height=size, scheduler="pndm", latents=lat,
                 provider="cpu", verify=False, vae_tile=tile))
r.images[0].save(sys.argv[6])
print(json.dumps({"generate_s": time.perf_counter() - t0, "stages": r.timings}))
"""

DIFFUSERS_CHILD = r"""
import json, sys, time
import numpy as np, torch
t0 = time.perf_counter()
from diffusers import StableDiffusionPipeline
model, steps, size, lat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
lt = torch.from_numpy(np.load(lat))  # [batch, 4, size/8, size/8]: one image per latent
with torch.no_grad():
    images = pipe("a red circle on a blue background", num_inference_steps=steps,
                  guidance_scale=7.5, width=size, height=size, latents=lt,
                  num_images_per_prompt=lt.shape[0]).images
for i, im in enumerate(images):  # image i > 0 beside the first: NAME-i.png
    im.save(sys.argv[5] if i == 0 else sys.argv[5].replace(".png", f"-{i}.png"))
print(json.dumps({"generate_s": time.perf_counter() - t0}))
"""


def run(cmd: list[str]) -> dict:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{cmd[:3]} failed:\n{errors[-3000:]}")
    try:  # children that report something print it as JSON on their last line
        extra = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        extra = {}
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2),
            **extra}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdc-bench"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    args = ap.parse_args()
    model, art = args.work / "sd15-random", args.work / "sd15-fp32"
    if not (art / "manifest.json").is_file():
        sys.exit(f"{art}: no build; run bench/build_fullsize.py --work {args.work} --keep first")
    runs = [_bench_size(args, model, art, size) for size in args.sizes]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(runs, indent=1) + "\n")
    print(json.dumps(runs, indent=1))


def _bench_size(args, model: Path, art: Path, size: int) -> dict:
    lat = args.work / f"latents-{size}.npy"
    f = size // 8
    np_code = (f"import numpy as np; np.save({str(lat)!r}, np.random.default_rng(0)"
               f".standard_normal((1, 4, {f}, {f})).astype(np.float32))")
    subprocess.run([sys.executable, "-c", np_code], check=True)
    py = sys.executable
    results = {"settings": {"size": size, "steps": args.steps, "scheduler": "pndm",
                            "guidance": 7.5, "precision": "fp32", "provider": "cpu",
                            "cores": os.cpu_count()}}
    print(f"{size} px: diffusers ...", flush=True)
    results["diffusers"] = run([py, "-c", DIFFUSERS_CHILD, str(model), str(args.steps),
                                str(size), str(lat), str(args.work / f"diffusers-{size}.png")])
    for label, tile in (("sdc_untiled", 0), ("sdc_tiled32", 32)):
        print(f"{size} px: {label} ...", flush=True)
        results[label] = run([py, "-c", SDC_CHILD, str(art), str(args.steps), str(size),
                              str(tile), str(lat), str(args.work / f"{label}-{size}.png")])
    d = results["diffusers"]
    for label in ("sdc_untiled", "sdc_tiled32"):
        r = results[label]
        r["time_vs_diffusers"] = round(r["wall_s"] / d["wall_s"], 2)
        r["peak_vs_diffusers"] = round(r["peak_rss_gib"] / d["peak_rss_gib"], 2)
    print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
