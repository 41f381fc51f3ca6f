"""CPU speed against the peers (issue 21): `sdc run` fp32 and w8a8 against diffusers (torch fp32)
and OpenVINO (optimum-intel's OVStableDiffusionPipeline, fp32 and its default precision, bf16 on
CPUs that have it), full-size SD1.5 architecture with random weights, PNDM, CFG 7.5, the same
initial latents for everyone, each run in its own process.

Wall time is the whole process (imports, loading/compiling, denoising, decode); peak RSS is the
process's own high-water mark from the OS (wait4). Every image is compared with sdc fp32's on
the same latents (PSNR over 8-bit pixels). Contenders alternate within each repeat, so a noisy
neighbour shows up as spread, not as a bias against one of them.

OpenVINO runs in its own venv (it pins its own torch and transformers): `make bench-cpu` makes
.venv-openvino from requirements/openvino.txt. Its IR is exported once from the diffusers folder
(optimum-intel, ~2 min) into WORK/ov-sd15 and reused.

    python bench/cpu_speed.py --work /tmp/sdc-bench [--ov-python .venv-openvino/bin/python]
        [--configs 512x1 256x1 256x4] [--repeats 2] [--only sdc_fp32,ov_default,...]

Makes WORK/sd15-random (bench/build_fullsize.py's model) and WORK/sd15-fp32, WORK/sd15-w8a8
with `sdc build` when they are missing or stale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from run_fullsize import DIFFUSERS_CHILD, run  # noqa: E402

RESULTS = HERE / "results"  # one cpu_speed-VENDOR-ISA.json per kind of machine measured
PROMPT = "a red circle on a blue background"

SDC_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from sdc.runtime import GenerateOptions, run_pipeline
art, steps, size, batch, lat, out = sys.argv[1:7]
r = run_pipeline(GenerateOptions(prompt=%r, artifacts=art, steps=int(steps), width=int(size),
                 height=int(size), batch=int(batch), scheduler="pndm", latents=lat,
                 provider="cpu", verify=False))
for i, im in enumerate(r.images):
    im.save(out if i == 0 else out.replace(".png", f"-{i}.png"))
print(json.dumps({"generate_s": time.perf_counter() - t0, "stages": r.timings}))
""" % PROMPT

OV_EXPORT = r"""
import sys
from optimum.intel import OVStableDiffusionPipeline
OVStableDiffusionPipeline.from_pretrained(sys.argv[1], export=True, compile=False).save_pretrained(sys.argv[2])
"""

OV_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch
from optimum.intel import OVStableDiffusionPipeline
ir, steps, size, lat, out, precision = sys.argv[1:7]
lt = torch.from_numpy(np.load(lat))
cfg = {"INFERENCE_PRECISION_HINT": "f32"} if precision == "fp32" else {}
pipe = OVStableDiffusionPipeline.from_pretrained(ir, compile=False, ov_config=cfg)
pipe.reshape(batch_size=1, height=int(size), width=int(size), num_images_per_prompt=lt.shape[0])
pipe.compile()
pipe.set_progress_bar_config(disable=True)
images = pipe(%r, num_inference_steps=int(steps), guidance_scale=7.5, height=int(size),
              width=int(size), latents=lt, num_images_per_prompt=lt.shape[0]).images
for i, im in enumerate(images):
    im.save(out if i == 0 else out.replace(".png", f"-{i}.png"))
import openvino as ov
try:  # what the compiled UNet really computes in (bf16 where the CPU has it, unless told f32)
    precision = str(pipe.unet.request.get_property("INFERENCE_PRECISION_HINT"))
except Exception as e:  # noqa: BLE001 - optimum-intel's wrapper differs between releases
    precision = f"unknown ({type(e).__name__})"
print(json.dumps({"generate_s": time.perf_counter() - t0, "openvino": ov.__version__,
                  "inference_precision": precision}))
""" % PROMPT

CONTENDERS = ("sdc_fp32", "sdc_w8a8", "diffusers", "ov_fp32", "ov_default")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdc-bench"))
    ap.add_argument("--ov-python", type=Path, default=HERE.parent / ".venv-openvino/bin/python")
    ap.add_argument("--configs", nargs="+", default=["512x1", "256x1", "256x4"],
                    help="SIZExBATCH, e.g. 512x1")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated contenders: " + ",".join(CONTENDERS))
    args = ap.parse_args()
    only = [c for c in args.only.split(",") if c] or list(CONTENDERS)
    bad = sorted(set(only) - set(CONTENDERS))
    if bad:
        sys.exit(f"--only {','.join(bad)}: expected some of {', '.join(CONTENDERS)}")
    model = args.work / "sd15-random"
    if not (model / "model_index.json").is_file():
        from build_fullsize import MAKE_MODEL

        print(f"making {model} (random weights) ...", flush=True)
        subprocess.run([sys.executable, "-c", MAKE_MODEL, str(model)], check=True)
    builds = _builds(args.work, model, only)
    ov_ir = _ov_ir(args, model) if any(c.startswith("ov_") for c in only) else None
    import numpy as np

    res = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "steps": args.steps,
           "scheduler": "pndm", "guidance": 7.5, "prompt": PROMPT, "runs": {}}
    results = RESULTS / f"cpu_speed-{machine_slug(res['machine'])}.json"
    if results.is_file():  # other configurations measured earlier on the same CPU stay
        old = json.loads(results.read_text())
        same = ("cpu", "flags", "cores")
        if all(old.get("machine", {}).get(k) == res["machine"].get(k) for k in same):
            res["runs"] = old.get("runs", {})
    res["machine"]["onnxruntime"] = _version(sys.executable, "onnxruntime")
    if ov_ir:
        res["machine"]["openvino"] = _version(str(args.ov_python), "openvino")
    for config in args.configs:
        size, batch = (int(v) for v in config.lower().split("x"))
        lat = args.work / f"latents-{size}x{batch}.npy"
        np.save(lat, np.random.default_rng(0).standard_normal(
            (batch, 4, size // 8, size // 8)).astype(np.float32))
        runs: dict[str, list] = {c: [] for c in only}
        for rep in range(args.repeats):
            for c in only:
                png = args.work / f"cpu-{c}-{config}.png"
                print(f"{config} repeat {rep + 1}: {c} ...", flush=True)
                r = run(_command(c, args, builds, ov_ir, model, size, batch, lat, png))
                r["date"] = time.strftime("%Y-%m-%d %H:%M")
                runs[c].append(r)
                print(f"  {r['wall_s']} s, {r['peak_rss_gib']} GiB", flush=True)
        # contenders not rerun (--only) keep their earlier runs on this CPU if their images remain
        kept = {c: r for c, r in res["runs"].get(config, {}).get("runs", {}).items()
                if c not in runs and (args.work / f"cpu-{c}-{config}.png").is_file()}
        runs = {c: kept.get(c) or runs[c] for c in CONTENDERS if c in kept or c in runs}
        res["runs"][config] = _summary(runs, args.work, config, batch)
        RESULTS.mkdir(exist_ok=True)
        results.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v["summary"] for k, v in res["runs"].items()}, indent=1))
    print(f"written: {results}")
    return 0


def _command(c: str, args, builds: dict, ov_ir: Path | None, model: Path, size: int, batch: int,
             lat: Path, png: Path) -> list[str]:
    py, steps = sys.executable, str(args.steps)
    if c.startswith("sdc_"):
        return [py, "-c", SDC_CHILD, str(builds[c]), steps, str(size), str(batch), str(lat),
                str(png)]
    if c == "diffusers":
        return [py, "-c", DIFFUSERS_CHILD, str(model), steps, str(size), str(lat), str(png)]
    precision = "fp32" if c == "ov_fp32" else "default"
    return [str(args.ov_python), "-c", OV_CHILD, str(ov_ir), steps, str(size), str(lat), str(png),
            precision]


def _summary(runs: dict, work: Path, config: str, batch: int) -> dict:
    import numpy as np
    from PIL import Image

    def images(c):  # every child saves image 0 at its path and image i beside it as NAME-i.png
        names = [f"cpu-{c}-{config}.png"] + [f"cpu-{c}-{config}-{i}.png" for i in range(1, batch)]
        return [np.asarray(Image.open(work / n).convert("RGB"), np.float64) for n in names]

    ref = images("sdc_fp32") if "sdc_fp32" in runs else None
    summary = {}
    for c, rs in runs.items():
        walls = [r["wall_s"] for r in rs]
        s = {"wall_s": min(walls), "wall_spread_s": [min(walls), max(walls)],
             "peak_rss_gib": max(r["peak_rss_gib"] for r in rs)}
        if ref is not None:
            mse = np.mean([np.mean((a - b) ** 2) for a, b in zip(images(c), ref)])
            s["psnr_vs_sdc_fp32_db"] = 200.0 if mse == 0 else round(
                10 * float(np.log10(255.0 ** 2 / mse)), 2)
        summary[c] = s
    for c in [c for c in runs if c.startswith("sdc_")]:
        for peer in [p for p in runs if not p.startswith("sdc_")]:
            summary[c][f"vs_{peer}"] = {
                "time": round(summary[c]["wall_s"] / summary[peer]["wall_s"], 2),
                "memory": round(summary[c]["peak_rss_gib"] / summary[peer]["peak_rss_gib"], 2)}
    return {"summary": summary, "runs": runs}


def _builds(work: Path, model: Path, only: list[str]) -> dict:
    sdc = Path(sys.executable).parent / "sdc"
    out = {"sdc_fp32": work / "sd15-fp32", "sdc_w8a8": work / "sd15-w8a8"}
    if any(c.startswith("sdc_") for c in only):  # both: w8a8 is quantized from fp32
        # `sdc build` reuses an up-to-date build (same build key) and rebuilds a stale one
        subprocess.run([str(sdc), "build", str(model), "--precision", "fp32", "--out",
                        str(out["sdc_fp32"])], check=True)
    if "sdc_w8a8" in only:
        subprocess.run([str(sdc), "build", "--from", str(out["sdc_fp32"]), "--precision", "w8a8",
                        "--out", str(out["sdc_w8a8"])], check=True)
    return out


def _ov_ir(args, model: Path) -> Path:
    ir = args.work / "ov-sd15"
    if not args.ov_python.is_file():
        sys.exit(f"{args.ov_python}: no OpenVINO venv; `make bench-cpu` makes it (or --only sdc_fp32,"
                 "sdc_w8a8,diffusers)")
    stamp = ir / ".source"
    key = (model / "unet" / "config.json").read_text() + str(
        (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime)
    if not stamp.is_file() or stamp.read_text() != key:
        print(f"exporting the OpenVINO IR to {ir} ...", flush=True)
        subprocess.run([str(args.ov_python), "-c", OV_EXPORT, str(model), str(ir)], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        stamp.write_text(key)
    return ir


def machine_info() -> dict:
    from sdc.runtime.cpu import CPUINFO, cpu_flags

    info = {"cores": os.cpu_count()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in
                           CPUINFO.read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = cpu_flags()
    if flags is not None:
        info["flags"] = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                                        "amx_int8", "avx_vnni"})
    return info


def machine_slug(machine: dict) -> str:
    """The results file's name: vendor and the widest vector/matrix unit, e.g. xeon-amx, epyc-avx2
    (the same marketing name covers CPUs with and without AVX-512, so the flags decide)."""
    cpu, flags = machine.get("cpu", "").lower(), set(machine.get("flags", []))
    vendor = next((w for w in ("xeon", "epyc", "ryzen", "core") if w in cpu), "cpu")
    isa = next((name for flag, name in (("amx_int8", "amx"), ("avx512_vnni", "avx512vnni"),
                                        ("avx512f", "avx512"), ("avx2", "avx2")) if flag in flags),
               "base")
    return f"{vendor}-{isa}"


def _version(python: str, module: str) -> str:
    return subprocess.run([python, "-c", f"import {module}; print({module}.__version__)"],
                          capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
