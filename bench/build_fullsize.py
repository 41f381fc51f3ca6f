"""Benchmark `sdc build` on the full-size SD1.5 architecture (random weights; values don't change
speed or memory). Not a test: `make bench` runs it and the README quotes its output.

Measured, each in its own subprocess so peak RSS (getrusage of the finished child, from the OS)
belongs to that run alone:
  baseline   a bare `torch.onnx.export` (dynamo) of the fp32 UNet alone, as a user would write it
             without sdc: no other graphs, no parity, no manifest
  sdc fp32   `sdc build --precision fp32`: all four graphs + parity gate + manifest
  sdc fp16   `sdc build --precision fp16`
Ratios are against the baseline run in this same script on this same machine.

    python bench/build_fullsize.py [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "build_fullsize.json"

MAKE_MODEL = r"""
import sys, torch
from pathlib import Path
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
from sdc.export.tiny_model import SD15_CONFIGS
import shutil
out = Path(sys.argv[1]); torch.manual_seed(0)
UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIGS / "unet")).save_pretrained(out / "unet")
AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIGS / "vae")).save_pretrained(out / "vae")
CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIGS / "text_encoder")).save_pretrained(out / "text_encoder")
for p in ("tokenizer", "scheduler"):
    shutil.copytree(SD15_CONFIGS / p, out / p)
shutil.copy(SD15_CONFIGS / "model_index.json", out / "model_index.json")
"""

BASELINE = r"""
import sys, torch
from diffusers import UNet2DConditionModel
unet = UNet2DConditionModel.from_pretrained(sys.argv[1], subfolder="unet").eval()
class G(torch.nn.Module):
    def __init__(s, u): super().__init__(); s.u = u
    def forward(s, a, b, c): return s.u(a, b, c, return_dict=False)[0]
args = (torch.randn(2, 4, 16, 24), torch.rand(2) * 999, torch.randn(2, 76, 768))
dyn = {"a": {0: "batch", 2: "h", 3: "w"}, "b": {0: "batch"}, "c": {0: "batch", 1: "seq"}}
with torch.no_grad():
    p = torch.onnx.export(G(unet), args, dynamo=True, opset_version=18, optimize=False,
                          dynamic_shapes=dyn)
p.save(sys.argv[2], external_data=True)
"""


def run(cmd: list[str], label: str) -> dict:
    """Run a child to completion; wall time and that child's own peak RSS (wait4's rusage)."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        log = out.read()
    if proc.returncode != 0:
        sys.exit(f"{label} failed ({proc.returncode}):\n{log[-4000:]}")
    return {"seconds": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2),
            "log": log[-4000:]}


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="sdc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "sd15-random"
    py = sys.executable
    try:
        if not (model / "model_index.json").exists():
            print("writing a random full-size SD1.5 diffusers folder ...", flush=True)
            run([py, "-c", MAKE_MODEL, str(model)], "make model")
        results = {"machine": f"{os.cpu_count()} cores", "model_bytes": dir_bytes(model)}
        print("baseline: bare dynamo export of the fp32 UNet ...", flush=True)
        results["baseline_unet_export"] = run([py, "-c", BASELINE, str(model / "unet"),
                                               str(work / "bare-unet.onnx")], "baseline")
        for precision in ("fp32", "fp16"):
            out = work / f"sd15-{precision}"
            print(f"sdc build --precision {precision} ...", flush=True)
            r = run([py, "-m", "sdc.cli.main", "build", str(model), "--precision", precision,
                     "--out", str(out), "--force"], f"sdc build {precision}")
            m = json.loads((out / "manifest.json").read_text())
            r["graphs"] = {s: {"precision": g["precision"],
                               "bytes": sum(m["files"][f]["bytes"] for f in g["files"]),
                               "parity": f"{g['parity']['metric']} {g['parity']['value']:.3g}"}
                           for s, g in m["graphs"].items()}
            r["manifest_build_seconds"] = m["build"]["seconds"]
            r["manifest_peak_rss_gib"] = round(m["build"]["peak_rss_bytes"] / 2**30, 2)
            results[f"sdc_{precision}"] = r
        base = results["baseline_unet_export"]["seconds"]
        for p in ("fp32", "fp16"):
            results[f"sdc_{p}"]["time_vs_baseline"] = round(results[f"sdc_{p}"]["seconds"] / base, 2)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "log"}
                              if isinstance(v, dict) else v) for k, v in results.items()}, indent=1))
        print(f"wrote {RESULTS}")
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
