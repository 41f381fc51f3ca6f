"""Benchmark the full-size SDXL base architecture (random weights; values change neither speed nor
memory) on this CPU machine: `sdc build`, a 1024² run against diffusers' StableDiffusionXLPipeline
in the same script, and what the planner fits into small budgets. Not a test: `make bench` runs it
and the README quotes its output.

Each contender runs in its own subprocess, so peak RSS (wait4's rusage of the finished child, from
the OS) is that run's alone:
  model      the shipped export/data/sdxl configs, random weights, saved fp16 (disk)
  build      `sdc build --precision fp32 --unet-chunks 4`: five graphs + parity + memory profile
  sdc        `sdc run` at 1024², STEPS steps of Euler, CFG 5, fixed initial latents
  diffusers  StableDiffusionXLPipeline fp32 on CPU, the same latents, steps and guidance
  plan       the smallest --vram-budget the planner fits at 1024² (chunks, CFG split, VAE tiles),
             and the plan under 4 GiB; then `sdc run` under that smallest budget (its real peak)

    python bench/sdxl_fullsize.py [--work DIR] [--steps N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "sdxl_fullsize.json"
SIZE = 1024
GUIDANCE = 5.0

MAKE_MODEL = r"""
import json, shutil, sys, torch
from pathlib import Path
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from sdc.export.clip_tokenizer import shipped_tokenizer
SDXL = Path("export/data/sdxl")
out = Path(sys.argv[1]); torch.manual_seed(0)
def save(m, sub):
    m.to(torch.float16).save_pretrained(out / sub); del m
save(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL / "unet")), "unet")
save(AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL / "vae")), "vae")
save(CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL / "text_encoder")), "text_encoder")
save(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL / "text_encoder_2")), "text_encoder_2")
for t in ("tokenizer", "tokenizer_2"):
    shipped_tokenizer(SDXL / t, out / t)
shutil.copytree(SDXL / "scheduler", out / "scheduler")
shutil.copy(SDXL / "model_index.json", out / "model_index.json")
"""

DIFFUSERS = r"""
import sys, time, numpy as np, torch
from diffusers import StableDiffusionXLPipeline
folder, steps, latents_file, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(2)
t0 = time.perf_counter()
pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32,
                                                 add_watermarker=False, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
load = time.perf_counter() - t0
lat = torch.from_numpy(np.load(latents_file))
with torch.no_grad():
    img = pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=steps,
               guidance_scale=%(g)s, width=%(s)d, height=%(s)d, latents=lat,
               output_type="np").images[0]
np.save(out, img)
print(f"load_s {load:.1f}")
""" % {"g": GUIDANCE, "s": SIZE}


def run(cmd: list[str], label: str) -> dict:
    """Run a child to completion; wall time and that child's own peak RSS (wait4's rusage)."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        log = out.read()
    result = {"seconds": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2),
              "exit": code, "log": log[-3000:]}
    print(f"{label}: {result['seconds']} s, peak {result['peak_rss_gib']} GiB, exit {code}",
          flush=True)
    return result


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdc-bench/sdxl"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    import numpy as np

    work = args.work
    src, build = work / "sdxl-src", work / "sdxl-fp32"
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": os.uname().nodename, "size": SIZE, "steps": args.steps,
                 "guidance": GUIDANCE, "date": time.strftime("%Y-%m-%d")}
    try:
        res["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                          if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    res["cores"] = os.cpu_count()
    py = sys.executable
    sdc = [py, "-m", "sdc.cli.main"]
    if not (src / "model_index.json").is_file():
        res["model"] = run([py, "-c", MAKE_MODEL, str(src)], "model")
    res["source_bytes"] = dir_bytes(src)
    if not (build / "manifest.json").is_file():
        res["build"] = run(sdc + ["build", str(src), "--precision", "fp32", "--unet-chunks", "4",
                                  "--out", str(build)], "build")
        if res["build"]["exit"]:
            RESULTS.write_text(json.dumps(res, indent=2) + "\n")
            return 1
    elif RESULTS.is_file():  # a kept build (--keep): its build figures are the earlier run's
        earlier = json.loads(RESULTS.read_text())
        for key in ("model", "build"):
            if key in earlier:
                res[key] = {**earlier[key], "from_earlier_run": earlier.get("date")}
    manifest = json.loads((build / "manifest.json").read_text())
    res["build_bytes"] = dir_bytes(build)
    res["build_manifest"] = {"seconds": manifest["build"]["seconds"],
                             "peak_rss_gib": round(manifest["build"]["peak_rss_bytes"] / 2**30, 2),
                             "graphs": {s: {"precision": g["precision"],
                                            "parity": g["parity"]["value"],
                                            "weights": len(g["weights"]["map"])}
                                        for s, g in manifest["graphs"].items()}}
    lat = np.random.default_rng(0).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
    latents = work / "latents.npy"
    np.save(latents, lat)
    common = ["a photo of a cat", "--negative", "blurry", "--steps", str(args.steps),
              "--guidance", str(GUIDANCE), "--width", str(SIZE), "--height", str(SIZE),
              "--latents", str(latents), "--scheduler", "euler", "--provider", "cpu"]
    ours = work / "sdc.png"
    res["sdc"] = run(sdc + ["run", "-a", str(build), *common, "--out", str(ours)], "sdc run")
    ref = work / "diffusers.npy"
    res["diffusers"] = run([py, "-c", DIFFUSERS, str(src), str(args.steps), str(latents),
                            str(ref)], "diffusers")
    if not res["sdc"]["exit"] and not res["diffusers"]["exit"]:
        from PIL import Image

        a = np.asarray(Image.open(ours), np.int16)
        b = (np.load(ref) * 255).round().astype(np.int16)
        res["pixel_diff_max"] = int(np.abs(a - b).max())
        res["pixel_diff_mean"] = float(np.abs(a - b).mean())
        res["time_ratio_sdc_vs_diffusers"] = round(res["sdc"]["seconds"] /
                                                   res["diffusers"]["seconds"], 3)
        res["memory_ratio_sdc_vs_diffusers"] = round(res["sdc"]["peak_rss_gib"] /
                                                     res["diffusers"]["peak_rss_gib"], 3)
    # the planner: the smallest budget it fits at 1024², and what 4 GiB gets
    plan = run(sdc + ["run", "-a", str(build), *common, "--vram-budget", "1MiB", "--plan"],
               "plan at 1 MiB")
    m = re.search(r"is (\d+) MiB \(([^)]*)\)", plan["log"])
    res["smallest_budget_mib"] = int(m[1]) if m else None
    res["smallest_budget_plan"] = m[2] if m else plan["log"][-500:]
    four = run(sdc + ["run", "-a", str(build), *common, "--vram-budget", "4GiB", "--plan"],
               "plan at 4 GiB")
    res["plan_4gib"] = {"fits": four["exit"] == 0, "output": four["log"][-1500:]}
    if res["smallest_budget_mib"]:
        budget = f"{res['smallest_budget_mib']}MiB"
        res["sdc_smallest_budget"] = run(
            sdc + ["run", "-a", str(build), *common, "--steps", "1", "--vram-budget", budget,
                   "--out", str(work / "small.png")], f"sdc run at {budget}")
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=2))
    if not args.keep:
        shutil.rmtree(build, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
