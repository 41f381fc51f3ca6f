"""Benchmark the memory planner on the full-size SD1.5 architecture (random weights): 512², 20
steps PNDM, CFG 7.5, fp32 on CPU, under no budget, fixed budgets and the smallest budget the
build can run, against diffusers' StableDiffusionPipeline in the same script (same latents).

Each run is its own subprocess. Reported per run: the plan, its estimated peak, the measured peak
RSS above the run's baseline (the budget's unit on CPU; kernel VmHWM, runtime/memory.py), the
baseline itself, the whole process's peak RSS (wait4) and wall time. Needs an fp32 build with UNet
chunks (made here if missing):

    python bench/budget_fullsize.py --work /tmp/sdc-bench [--budgets 3GiB 2GiB] [--chunks 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from run_fullsize import DIFFUSERS_CHILD, run  # noqa: E402

RESULTS = HERE / "results" / "budget_fullsize.json"

SDC_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from sdc.runtime import GenerateOptions, run_pipeline
art, steps, size, lat, budget, out = sys.argv[1:7]
r = run_pipeline(GenerateOptions(prompt="a red circle on a blue background", artifacts=art,
                 steps=int(steps), width=int(size), height=int(size), scheduler="pndm",
                 guidance=7.5, latents=lat, provider="cpu", verify=False,
                 vram_budget=None if budget == "none" else budget))
r.images[0].save(out)
print(json.dumps({"generate_s": time.perf_counter() - t0, "stages": r.timings,
                  "memory": r.memory, "plan": r.plan.describe()}))
"""


def smallest_budget(art: Path, size: int, steps: int) -> int:
    """The smallest estimated peak over every plan this build allows, in whole MiB."""
    from sdc.runtime.manifest import load_manifest
    from sdc.runtime.planner import candidate_plans

    plans = candidate_plans(load_manifest(art), batch=1, cfg=True, width=size, height=size,
                            steps=steps, budget=1)
    return -(-min(p.peak for p in plans) // 2**20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdc-bench"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--budgets", nargs="*", default=["2GiB"])
    ap.add_argument("--no-diffusers", action="store_true", help="reuse the last diffusers figures")
    args = ap.parse_args()
    model, art = args.work / "sd15-random", args.work / f"sd15-fp32-c{args.chunks}"
    if not (art / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "sdc.cli.main", "build", str(model), "--precision",
                        "fp32", "--unet-chunks", str(args.chunks), "--out", str(art)], check=True)
    lat = args.work / f"latents-{args.size}.npy"
    f = args.size // 8
    subprocess.run([sys.executable, "-c", f"import numpy as np; np.save({str(lat)!r}, np.random."
                    f"default_rng(0).standard_normal((1, 4, {f}, {f})).astype(np.float32))"],
                   check=True)
    py = sys.executable
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results = {"settings": {"size": args.size, "steps": args.steps, "scheduler": "pndm",
                            "guidance": 7.5, "precision": "fp32", "provider": "cpu",
                            "unet_chunks": args.chunks}, "runs": {}}
    if args.no_diffusers and "diffusers" in old:
        results["diffusers"] = old["diffusers"]
    else:
        print("diffusers ...", flush=True)
        results["diffusers"] = run([py, "-c", DIFFUSERS_CHILD, str(model), str(args.steps),
                                    str(args.size), str(lat), str(args.work / "diffusers-b.png")])
    small = smallest_budget(art, args.size, args.steps)
    for label in ["none", *args.budgets, f"{small}MiB"]:
        print(f"sdc --vram-budget {label} ...", flush=True)
        r = run([py, "-c", SDC_CHILD, str(art), str(args.steps), str(args.size), str(lat), label,
                 str(args.work / f"budget-{label}.png")])
        r["time_vs_diffusers"] = round(r["wall_s"] / results["diffusers"]["wall_s"], 2)
        r["peak_vs_diffusers"] = round(r["peak_rss_gib"] / results["diffusers"]["peak_rss_gib"], 2)
        results["runs"][label] = r
        print(json.dumps(r), flush=True)
    base = results["runs"]["none"]["wall_s"]
    for r in results["runs"].values():
        r["time_vs_no_budget"] = round(r["wall_s"] / base, 2)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
