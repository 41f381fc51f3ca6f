"""CPU speed levers (issue 21), measured on the full-size SD1.5 UNet of an sdc fp32 build: one
batch-2 64² call (one 512² CFG step), each setting in its own process (peak RSS from wait4).

  basic        what the runtime opens today: ORT_ENABLE_BASIC, no memory pattern
  extended     ORT_ENABLE_EXTENDED (operator fusions)
  all          ORT_ENABLE_ALL (adds the CPU layout transformer: NCHWc convolutions)
  all-saved    the ENABLE_ALL graph saved once (what a build could write beside the graph), then
               opened with optimisation off: what a run would pay to load it
  basic-1t     basic with 1 intra-op thread (the 2-core machine's other half idle)
  profile      basic with onnxruntime's profiler: time per op type over the call
  w8a8         the UNet of a w8a8 build (--w8a8 BUILD: 8-bit activations and weights, opened at
               ORT_ENABLE_ALL as the runtime does), and its profile (w8a8-profile)
  w8a8-thp     the w8a8 UNet with glibc's malloc asking for transparent huge pages
               (GLIBC_TUNABLES=glibc.malloc.hugetlb=1; the kernel's THP mode is madvise here)
  ovep-bf16    onnxruntime's OpenVINO execution provider (onnxruntime-openvino, in its own venv:
               --ortov-python) on the fp32 graph, INFERENCE_PRECISION_HINT bf16 through its
               load_config; ovep-f32 the same at f32

Each child runs the call three times (the first includes one-time kernel setup) and reports load
seconds, the best of the later calls, and peak RSS. Outputs are compared with `basic`'s (max
relative difference), so a faster setting that changes the numbers is seen as such.

    python bench/cpu_levers.py BUILD_DIR [--only NAME,...] [--w8a8 W8A8_BUILD]
        [--ortov-python .venv-ortov/bin/python]
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
sys.path.insert(0, str(HERE))
from cpu_speed import machine_info, machine_slug  # noqa: E402

RESULTS_DIR = HERE / "results"

CHILD = r"""
import json, sys, time, numpy as np, onnxruntime as ort
model, level, threads, save, profile, out, ep, x64 = sys.argv[1:9]
so = ort.SessionOptions()
so.log_severity_level = 3
so.enable_mem_pattern = False
so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
if level == "all" and x64 == "1":  # as runtime/sessions.py apply_level (CPUs without VNNI)
    so.add_session_config_entry("session.x64quantprecision", "1")
if int(threads):
    so.intra_op_num_threads = int(threads)
if save != "-":
    so.optimized_model_filepath = save
    data_name = save.rsplit("/", 1)[-1] + "_data"
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                data_name)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                "1024")
if profile != "-":
    so.enable_profiling = True
    so.profile_file_prefix = profile
t0 = time.perf_counter()
if ep == "-":
    providers = ["CPUExecutionProvider"]
else:
    providers = [("OpenVINOExecutionProvider", {"device_type": "CPU", "load_config": json.dumps(
        {"CPU": {"INFERENCE_PRECISION_HINT": ep}})}), "CPUExecutionProvider"]
s = ort.InferenceSession(model, so, providers=providers)
wanted = providers[0] if ep == "-" else providers[0][0]
if s.get_providers()[0] != wanted:  # an EP that fails to start falls back to CPU silently
    sys.exit(f"asked for {providers[0]}, got {s.get_providers()}")
load = time.perf_counter() - t0
rng = np.random.default_rng(0)
feeds = {"sample": rng.standard_normal((2, 4, 64, 64)).astype(np.float32),
         "timestep": np.array([500.0, 500.0], np.float32),
         "encoder_hidden_states": rng.standard_normal((2, 77, 768)).astype(np.float32)}
times = []
for _ in range(3):
    t0 = time.perf_counter()
    y = s.run(["out_sample"], feeds)[0]
    times.append(time.perf_counter() - t0)
np.save(out, y)
prof = s.end_profiling() if profile != "-" else None
try:  # how much of the heap the kernel backs with transparent huge pages (Linux)
    huge = next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup")
                if l.startswith("AnonHugePages:")) / 2**20
except (OSError, StopIteration):
    huge = None
print(json.dumps({"load_s": round(load, 2), "calls_s": [round(t, 2) for t in times],
                  "best_s": round(min(times[1:]), 2), "profile": prof,
                  "anon_huge_gib": None if huge is None else round(huge, 2)}))
"""


# settings that differ from another only in the child's environment
ENV = {"w8a8-thp": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}}


def run_child(args: list[str], python: str = sys.executable, env: dict | None = None) -> dict:
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([python, "-c", CHILD, *args], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        log = out.read()
    code = os.waitstatus_to_exitcode(status)
    if code:
        return {"exit": code, "log": log[-2000:]}
    res = json.loads(log.strip().splitlines()[-1])
    res["peak_rss_gib"] = round(usage.ru_maxrss * 1024 / 2**30, 2)
    return res


def by_op_type(profile_json: str) -> dict:
    events = json.loads(Path(profile_json).read_text())
    total: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            total[op] = total.get(op, 0.0) + e["dur"] / 1e6
    # three calls were profiled: per call
    return {k: round(v / 3, 3) for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def main() -> int:
    import numpy as np

    from sdc.quant.formats import psnr

    ap = argparse.ArgumentParser()
    ap.add_argument("build", type=Path)
    ap.add_argument("--only", default="")
    ap.add_argument("--w8a8", type=Path, default=None, help="a w8a8 build of the same model")
    ap.add_argument("--ortov-python", default=None,
                    help="a python with onnxruntime-openvino installed (not .venv's onnxruntime)")
    args = ap.parse_args()
    model = str(args.build / "unet" / "model.onnx")
    work = Path(tempfile.mkdtemp(prefix="sdc-levers-"))
    saved = work / "unet-all.onnx"
    settings = {
        "basic": ("basic", 0, "-", "-"), "extended": ("extended", 0, "-", "-"),
        "all": ("all", 0, str(saved), "-"), "all-saved": (None, 0, "-", "-"),
        "basic-1t": ("basic", 1, "-", "-"), "profile": ("basic", 0, "-", str(work / "prof")),
    }
    if args.w8a8:
        settings["w8a8"] = ("all", 0, "-", "-")
        settings["w8a8-profile"] = ("all", 0, "-", str(work / "prof-w8a8"))
        settings["w8a8-thp"] = ("all", 0, "-", "-")
    if args.ortov_python:
        settings["ovep-bf16"] = ("basic", 0, "-", "-")
        settings["ovep-f32"] = ("basic", 0, "-", "-")
    only = [s for s in args.only.split(",") if s] or list(settings)
    machine = machine_info()
    res = {"build": str(args.build), "date": time.strftime("%Y-%m-%d"), "cores": machine["cores"],
           "cpu": machine.get("cpu"), "flags": machine.get("flags")}
    import onnxruntime

    res["onnxruntime"] = onnxruntime.__version__
    from sdc.runtime.cpu import u8s8_saturates

    x64 = "1" if u8s8_saturates() else "0"
    res["x64quantprecision"] = x64 == "1"
    outs = {}
    for name in only:
        level, threads, save, profile = settings[name]
        path = model
        if name == "all-saved":
            if not saved.is_file():
                continue
            level, path = "off", str(saved)
        if name.startswith("w8a8"):
            path = str(args.w8a8 / "unet" / "model.onnx")
        ep, python = "-", sys.executable
        if name.startswith("ovep-"):
            ep, python = name.removeprefix("ovep-"), args.ortov_python
        out = work / f"{name}.npy"
        r = run_child([path, level, str(threads), save, profile, str(out), ep, x64], python,
                      ENV.get(name))
        if r.get("profile"):
            r["by_op_type_s"] = by_op_type(r.pop("profile"))
        if out.is_file():
            outs[name] = np.load(out)
            ref = outs.get("basic")
            if ref is not None:
                r["max_rel_vs_basic"] = float(np.abs(outs[name] - ref).max() / np.abs(ref).max())
                r["psnr_vs_basic_db"] = round(psnr(ref, outs[name]), 2)
        res[name] = r
        print(name, {k: v for k, v in r.items() if k != "by_op_type_s"}, flush=True)
    # one file per build and kind of CPU (cpu_speed.machine_slug: xeon-amx, epyc-avx512vnni, ...)
    results = RESULTS_DIR / f"cpu_levers_{args.build.name}-{machine_slug(machine)}.json"
    if results.is_file():  # settings not rerun (--only) keep their figures from the same CPU
        old = json.loads(results.read_text())
        if all(old.get(k) == res.get(k) for k in ("cpu", "flags", "cores")):
            res = {**old, **res}
    results.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written: {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
