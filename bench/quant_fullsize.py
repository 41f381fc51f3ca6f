"""Benchmark the torch-free quantization pass (`sdc build --from FLOAT --precision int8|int4`) on
the full-size SD1.5 architecture (RANDOM weights: speed, memory and sizes are those of the real
model; PSNRs are of random-weight graphs, indicative only). Not a test.

Measured, each heavy step in its own subprocess (peak RSS is the child's high-water mark from the
OS, `os.wait4` rusage; Linux folds in the child's own reaped children, so a build's peak is the
max over it and its memory-profile subprocesses, not their sum):

  builds     int8, int4 block 32, int4 block 64 from the fp32 build: wall time, peak RSS, bytes
             per stage (manifest `files`; unchanged stages are hard links to the fp32 build's
             files, counted as `linked_bytes`), parity (PSNR vs the fp32 graph), quality search
  runs       `sdc run` 512x512, 20 steps, seed 1, no --vram-budget, fp32 / int8 / int4-b32:
             wall time, peak RSS, sdc's own stage timings and "peak RSS" line
  unet step  one UNet session opened as the runtime opens it (runtime.sessions.open_session,
             CPU), batch 2 at 64x64 latents: 1 warm-up + 3 timed `run`s, per contender in its
             own process: fp32, int8, int4-b32, and onnxruntime's `quantize_dynamic` (MatMul,
             QInt8: integer kernels) on the fp32 graph as it is and, as an extra, on a scratch
             copy with the Linear weights' Transpose nodes folded into their initializers (the
             as-is graph's MatMul weights sit behind Transposes, which quantize_dynamic skips).
             Output PSNR of each vs fp32 on the same inputs.

Resumable: finished steps are kept in WORK/quant_fullsize.partial.json (--redo STEP reruns one).

    python bench/quant_fullsize.py [--work /tmp/sdc-bench] [--int4-target DB]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "quant_fullsize.json"
sys.path.insert(0, str(HERE))
from build_fullsize import MAKE_MODEL  # noqa: E402  (bench/ is not a package)

REPO = HERE.parent
SDC = [str(REPO / ".venv" / "bin" / "sdc")] if (REPO / ".venv" / "bin" / "sdc").exists() \
    else [sys.executable, "-m", "sdc.cli.main"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300", "PYTHONWARNINGS": "ignore"}

BUILDS = {  # label -> extra `sdc build --from` arguments
    "int8": ["--precision", "int8"],
    "int4_b32": ["--precision", "int4"],
    "int4_b64": ["--precision", "int4", "--block-size", "64"],
}
RUNS = ("fp32", "int8", "int4_b32")

UNET_CHILD = r"""
import json, sys, time
import numpy as np
from pathlib import Path
from sdc.runtime.manifest import load_manifest
from sdc.runtime.sessions import open_session
folder, out = Path(sys.argv[1]), sys.argv[2]
onnx_file = sys.argv[3] if len(sys.argv) > 3 else None
graph_from = Path(sys.argv[4]) if len(sys.argv) > 4 else folder
graph = load_manifest(graph_from)["graphs"]["unet"]
rng = np.random.default_rng(0)
feeds = {"sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
         "timestep": np.full(2, 500.0, np.float32),
         "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
t0 = time.perf_counter()
s = open_session(folder, "unet", graph, "cpu", onnx_file=onnx_file)
load = time.perf_counter() - t0
times = []
for i in range(4):
    t0 = time.perf_counter()
    y = s.run(feeds)
    times.append(time.perf_counter() - t0)
np.save(out, y)
print(json.dumps({"load_s": round(load, 2), "warmup_s": round(times[0], 2),
                  "timed_s": [round(t, 2) for t in times[1:]],
                  "step_s": round(float(np.mean(times[1:])), 2), "provider": s.provider}))
"""

DYNAMIC_CHILD = r"""
import json, os, sys, time
from collections import Counter
from pathlib import Path
import onnx
src, work, fold = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "fold"
work.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
info = {}
inp = work / "src"
inp.mkdir(exist_ok=True)
if fold:
    # scratch copy with every Transpose of an initializer folded into a pre-transposed initializer
    import numpy as np
    from onnx import numpy_helper
    m = onnx.load(str(src))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    keep, folded = [], 0
    for n in g.node:
        if n.op_type == "Transpose" and n.input[0] in inits:
            perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
            w = numpy_helper.to_array(inits[n.input[0]])
            t = numpy_helper.from_array(np.ascontiguousarray(np.transpose(w, perm)), n.output[0])
            g.initializer.append(t)
            folded += 1
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    alive = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(alive)
    onnx.save(m, str(inp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=1024)
    del m, g, inits, keep, alive
    info["transposes_folded"] = folded
    info["fold_s"] = round(time.perf_counter() - t0, 1)
else:
    # a copy, so quantize_dynamic's "-inferred" side file lands here, not in the fp32 build (not
    # a hard link: onnx refuses external data with several links, "potential hardlink attack")
    import shutil
    for f in ("model.onnx", "model.onnx_data"):
        shutil.copyfile(src.parent / f, inp / f)
t1 = time.perf_counter()
from onnxruntime.quantization import QuantType, quantize_dynamic
out = work / "model.onnx"
quantize_dynamic(str(inp / "model.onnx"), str(out), op_types_to_quantize=["MatMul"],
                 weight_type=QuantType.QInt8, use_external_data_format=True)
info["quantize_s"] = round(time.perf_counter() - t1, 1)
q = onnx.load(str(out), load_external_data=False)
ops = Counter(n.op_type for n in q.graph.node)
s = onnx.load(str(inp / "model.onnx"), load_external_data=False)
sops = Counter(n.op_type for n in s.graph.node)
inits = {t.name for t in s.graph.initializer}
mm = [n for n in s.graph.node if n.op_type == "MatMul"]
info.update(source_matmuls=sops["MatMul"], source_gemms=sops["Gemm"],
            source_transposes=sops["Transpose"], output_gemms=ops["Gemm"],
            source_matmuls_const_b=sum(1 for n in mm if n.input[1] in inits),
            matmul_integer=ops["MatMulInteger"], matmul_left_float=ops["MatMul"],
            dynamic_quantize_linear=ops["DynamicQuantizeLinear"],
)
import shutil
shutil.rmtree(inp, ignore_errors=True)  # the (folded or linked) input: not needed to run
info["bytes"] = sum(p.stat().st_size for p in work.iterdir() if p.is_file())
print(json.dumps(info))
"""


def child(cmd: list[str], log_path: Path, timeout: float | None = None, watch=None) -> dict:
    """Run one child to completion (or `timeout` s, or until `watch(log_text, elapsed)` returns a
    reason, then kill its process group): wall time, the child's own peak RSS from wait4, exit
    code, and its output in `log_path` (tail kept)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()  # other work on this machine skews times: recorded, not prevented
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    code = code_version()  # at the start: a child imports sdc then
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(map(str, cmd)) + "\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                                env=ENV, cwd=REPO, start_new_session=True)
        timed_out, killed = False, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.perf_counter() - t0
            if watch is not None:
                killed = watch(log_path.read_text(errors="replace"), elapsed)
            if killed or (timeout is not None and elapsed > timeout):
                timed_out = not killed
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(1.0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log_path.read_text(errors="replace")
    r = {"cmd": " ".join(map(str, cmd)), "code": code, "started": started,
         "loadavg_before": load0, "loadavg_after": os.getloadavg(), "seconds": round(wall, 1),
         "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2), "rc": proc.returncode,
         # CPU seconds of the child (and its reaped children): with other work on the machine,
         # cpu_s / seconds well under the core count means it was starved
         "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
         "log": str(log_path)}
    if timed_out:
        r["timed_out"] = True
    if killed:
        r["killed"] = killed
    if proc.returncode != 0:
        r["error_tail"] = text[-6000:]
    try:  # children that report something print it as JSON on their last line
        r["report"] = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        pass
    return r


def _cpu_times() -> tuple[float, float]:
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]  # total, idle + iowait (jiffies)


def busy_cores(seconds: float = 3.0) -> float:
    """Cores in use on the whole machine over `seconds` (/proc/stat)."""
    t0, i0 = _cpu_times()
    time.sleep(seconds)
    t1, i1 = _cpu_times()
    return round((1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1), 2)


def wait_quiet(max_wait: float, limit: float = 0.3) -> dict:
    """Before a timed child: wait (up to `max_wait` s) until other work uses under `limit`
    cores. Other people's jobs on this machine are not ours to stop; how busy it was is
    recorded with each timing."""
    t0 = time.perf_counter()
    busy = busy_cores()
    while busy > limit and time.perf_counter() - t0 < max_wait:
        time.sleep(7)
        busy = busy_cores()
    return {"busy_cores_before": busy, "waited_s": round(time.perf_counter() - t0)}


def code_version() -> dict:
    """The sdc commit a child ran, and whether quant/ runtime/ export/ had uncommitted edits."""
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": git("status", "--porcelain", "--", "quant", "runtime", "export").splitlines()}


def psnr(ref: np.ndarray, out: np.ndarray) -> float | None:
    """20 log10((max - min of ref) / RMSE); None for non-finite output."""
    d = out.astype(np.float64) - ref.astype(np.float64)
    rmse = float(np.sqrt(np.mean(d * d)))
    if not np.isfinite(rmse):
        return None
    if rmse == 0:
        return 200.0
    return round(20 * float(np.log10(float(ref.max() - ref.min()) / rmse)), 2)


def stage_bytes(folder: Path, manifest: dict, source: Path | None) -> dict:
    """Bytes per stage folder from the manifest's `files`, and how many of them are hard links
    to the source build's files (no new disk space)."""
    src_inodes = set()
    if source is not None:
        src_inodes = {(p.stat().st_dev, p.stat().st_ino) for p in source.rglob("*") if p.is_file()}
    out: dict[str, dict] = {}
    for rel, e in manifest["files"].items():
        stage = rel.split("/", 1)[0] if "/" in rel else "(top)"
        s = out.setdefault(stage, {"bytes": 0, "linked_bytes": 0, "files": 0})
        s["bytes"] += e["bytes"]
        s["files"] += 1
        st = (folder / rel).stat()
        if (st.st_dev, st.st_ino) in src_inodes:
            s["linked_bytes"] += e["bytes"]
    for s in out.values():
        s["mib"] = round(s["bytes"] / 2**20, 1)
    return out


def build_summary(folder: Path, source: Path | None) -> dict:
    m = json.loads((folder / "manifest.json").read_text())
    per = stage_bytes(folder, m, source)
    total = sum(s["bytes"] for s in per.values())
    linked = sum(s["linked_bytes"] for s in per.values())
    graphs = {}
    for stage, g in m["graphs"].items():
        q = g.get("quantization") or {}
        search = q.get("search")
        by_fmt: dict[str, list[int]] = {}
        for layer in (q.get("layers") or {}).values():
            n = by_fmt.setdefault(layer["format"], [0, 0])
            n[0] += 1
            n[1] += layer["bytes"]
        graphs[stage] = {
            "precision": g["precision"],
            "parity": {"metric": g.get("parity", {}).get("metric"),
                       "value": g.get("parity", {}).get("value"),
                       "threshold": g.get("parity", {}).get("threshold")},
            "quantization": None if not q else {
                "format": q.get("format"), "block_size": q.get("block_size"),
                "target_db": q.get("target_db"), "achieved_db": q.get("achieved_db"),
                "kept_16bit_layers": len(q.get("kept") or {}),
                "weights_by_format": {f: {"weights": n, "mib": round(b / 2**20, 1)}
                                      for f, (n, b) in sorted(by_fmt.items())},
                "search": search,
                "kept_fp16_groups": None if search is None else len(search.get("kept_fp16_groups")
                                                                    or []),
            },
        }
    import onnx

    unet = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False)
    ops = {}
    for n in unet.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    unet_ops = {"DequantizeLinear": ops.get("DequantizeLinear", 0), "Cast": ops.get("Cast", 0),
                "decode_tie_nodes": sum(n.name.endswith(".tie") for n in unet.graph.node),
                "MatMul": ops.get("MatMul", 0), "Conv": ops.get("Conv", 0)}
    del unet
    return {"path": str(folder), "precision": m["precision"], "stages": per,
            "unet_graph_ops": unet_ops,
            "total_bytes": total, "total_mib": round(total / 2**20, 1),
            "total_gb": round(total / 1e9, 3), "new_bytes": total - linked,
            "new_mib": round((total - linked) / 2**20, 1), "graphs": graphs,
            "manifest_build_seconds": m["build"]["seconds"],
            "manifest_peak_rss_gib": round(m["build"]["peak_rss_bytes"] / 2**30, 2),
            "calibration": (m.get("quantization") or {}).get("calibration")}


RUN_LINE = re.compile(r"seed (\d+); (.*?); ran on (\S+)")
PEAK_LINE = re.compile(r"peak RSS (.+?) above a (.+?) baseline \(planned (.+?)\)")


def parse_run_log(text: str) -> dict:
    r = {}
    if m := RUN_LINE.search(text):
        r["timings_s"] = {k: float(v.rstrip(" s")) for k, v in
                          (part.strip().rsplit(" ", 2)[0:2] for part in m.group(2).split(","))}
        r["ran_on"] = m.group(3)
    if m := PEAK_LINE.search(text):
        r["sdc_peak_line"] = m.group(0)
        r["sdc_peak_above_baseline"], r["sdc_baseline"], r["sdc_planned"] = m.groups()
    return r


ENCODED = re.compile(r"\[(\w+)\] \w+: \d+ of \d+ weights encoded")
ALL_IN = re.compile(r"\[(\w+)\] every weight in its format: ([-\d.]+) dB \(target ([\d.]+) dB\)")


def search_groups(fp32: Path) -> dict[str, int]:
    """Per stage, roughly how many layer groups a quality search measures one by one (the
    weights' module paths cut as quant/plan.py cuts them, kept layers and norms left out)."""
    from sdc.quant import plan as qp

    m = json.loads((fp32 / "manifest.json").read_text())
    out = {}
    for stage, g in m["graphs"].items():
        paths = [p for p in (g.get("weights") or {}).get("map", {}) if p.endswith(".weight")
                 and "norm" not in p and not qp.kept_reason(p)]
        out[stage] = len({qp.group_of(p) for p in paths})
    return out


class SearchWatch:
    """Kills a build whose quality search (all weights in their format below the target, so every
    layer group is measured alone, then a bisection) would outlast `budget` seconds: estimated as
    (groups + 8) evaluations, one evaluation timed as half the encode -> all-in interval (the
    Judge's reference run plus the all-in trial)."""

    def __init__(self, groups: dict[str, int], budget: float):
        self.groups, self.budget, self.encoded_at, self.decided = groups, budget, {}, set()
        self.estimate = None

    def __call__(self, text: str, elapsed: float):
        for m in ENCODED.finditer(text):
            self.encoded_at.setdefault(m.group(1), elapsed)
        for m in ALL_IN.finditer(text):
            stage, value, target = m.group(1), float(m.group(2)), float(m.group(3))
            if stage in self.decided:
                continue
            self.decided.add(stage)
            if value >= target:
                continue
            eval_s = max(1.0, (elapsed - self.encoded_at.get(stage, elapsed)) / 2)
            n = self.groups.get(stage, 50) + 8
            self.estimate = {"stage": stage, "all_in_db": value, "target_db": target,
                             "eval_s": round(eval_s, 1), "evaluations": n,
                             "search_s": round(n * eval_s), "at_s": round(elapsed)}
            if elapsed + n * eval_s > self.budget:
                return (f"[{stage}] every weight in its format {value:.2f} dB < target "
                        f"{target:g} dB: the search would take ~{n} evaluations x {eval_s:.0f} s "
                        f"= ~{n * eval_s / 60:.0f} min (after {elapsed / 60:.1f} min), over the "
                        f"{self.budget / 60:.0f} min budget")
        return None


class State:
    def __init__(self, path: Path, redo: set[str]):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}
        for k in redo:
            self.data.pop(k, None)

    def done(self, key: str) -> bool:
        return key in self.data

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdc-bench"))
    ap.add_argument("--int4-target", default=None,
                    help="--quality-target for the int4 builds from the start (e.g. 15dB)")
    ap.add_argument("--fallback-target", default="15dB",
                    help="--quality-target used when a build exceeds --build-timeout")
    ap.add_argument("--build-timeout", type=float, default=25 * 60)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--redo", nargs="*", default=[], help="state keys to rerun")
    ap.add_argument("--skip", nargs="*", default=[], help="phases to skip: builds unet runs")
    ap.add_argument("--quiet-wait", type=float, default=120,
                    help="s to wait for other work on the machine to stop before a timed child")
    ap.add_argument("--no-fold", action="store_true", help="skip the folded quantize_dynamic extra")
    args = ap.parse_args()
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    st = State(work / "quant_fullsize.partial.json", set(args.redo))
    py = sys.executable
    model, fp32 = work / "sd15-random", work / "sd15-fp32"
    t_all = time.perf_counter()

    # 0. the fp32 build ------------------------------------------------------------------------
    if not (fp32 / "manifest.json").is_file():
        if not (model / "model_index.json").exists():
            print("writing a random full-size SD1.5 diffusers folder ...", flush=True)
            r = child([py, "-c", MAKE_MODEL, str(model)], logs / "make-model.log")
            if r["rc"]:
                sys.exit(f"make model failed:\n{r['error_tail']}")
        print("sdc build --precision fp32 ...", flush=True)
        r = child([*SDC, "build", str(model), "--precision", "fp32", "--out", str(fp32)],
                  logs / "build-fp32.log")
        if r["rc"]:
            sys.exit(f"fp32 build failed:\n{r['error_tail']}")
        st.set("build_fp32_run", {k: v for k, v in r.items() if k != "report"})
    if not st.done("fp32"):
        st.set("fp32", build_summary(fp32, None))

    # 1. quantized builds ----------------------------------------------------------------------
    if "builds" not in args.skip:
        groups = search_groups(fp32)
        st.set("search_groups_estimate", groups)
        for label, extra in BUILDS.items():
            key = f"build_{label}"
            if st.done(key):
                continue
            out = work / f"sd15-{label}"
            extra = list(extra)
            target = args.int4_target if label.startswith("int4") else None
            if label == "int4_b64" and (st.data.get("build_int4_b32") or {}).get("lowered_target"):
                target = target or st.data["build_int4_b32"]["lowered_target"]
            if target:
                extra += ["--quality-target", target]
            cmd = [*SDC, "--debug", "build", "--from", str(fp32), *extra, "--out", str(out),
                   "--force"]
            print(f"[{time.perf_counter() - t_all:6.0f} s] build {label}: {' '.join(cmd)}",
                  flush=True)
            watch = SearchWatch(groups, args.build_timeout)
            r = child(cmd, logs / f"build-{label}.log", timeout=args.build_timeout, watch=watch)
            if watch.estimate:
                r["search_estimate"] = watch.estimate
            if target:
                r["quality_target"] = target
            if (r.get("timed_out") or r.get("killed")) and not target:
                lowered = args.fallback_target
                if watch.estimate and watch.estimate["all_in_db"] < float(lowered.rstrip("dB")):
                    lowered = f"{int(watch.estimate['all_in_db'])}dB"  # below the all-in value
                print(f"  stopped after {r['seconds']} s ({r.get('killed') or 'timeout'}); again "
                      f"with --quality-target {lowered}", flush=True)
                first = r
                cmd += ["--quality-target", lowered]
                r = child(cmd, logs / f"build-{label}-lowered.log", timeout=args.build_timeout)
                r["first_attempt"] = {k: v for k, v in first.items() if k != "error_tail"}
                r["first_attempt"]["log_tail"] = first.get("error_tail", "")[-3000:]
                r["lowered_target"] = r["quality_target"] = lowered
            if r["rc"] == 0:
                r.update(build_summary(out, fp32))
                r["build_log_db_lines"] = [ln.strip() for ln in
                                           Path(r["log"]).read_text().splitlines()
                                           if "dB" in ln or "calibration" in ln or "wrote" in ln]
            else:
                print(f"  FAILED rc={r['rc']}:\n{r.get('error_tail', '')[-3000:]}", flush=True)
            st.set(key, r)
            print(f"  {label}: rc {r['rc']}, {r['seconds']} s, peak {r['peak_rss_gib']} GiB",
                  flush=True)

    # 2. UNet time per CFG step ----------------------------------------------------------------
    if "unet" not in args.skip:
        outs = work / "unet-out"
        outs.mkdir(exist_ok=True)
        contenders = {"fp32": (fp32, None, None), "int8": (work / "sd15-int8", None, None),
                      "int4_b32": (work / "sd15-int4_b32", None, None)}
        for label, (folder, onnx_file, graph_from) in contenders.items():
            key = f"unet_{label}"
            if st.done(key) or not (folder / "manifest.json").is_file():
                continue
            quiet = wait_quiet(args.quiet_wait)
            print(f"[{time.perf_counter() - t_all:6.0f} s] unet step {label} {quiet}", flush=True)
            cmd = [py, "-c", UNET_CHILD, str(folder), str(outs / f"{label}.npy")]
            st.set(key, {**child(cmd, logs / f"unet-{label}.log"), **quiet})
        unet_files = json.loads((fp32 / "manifest.json").read_text())["graphs"]["unet"]["files"]
        src = fp32 / next(f for f in unet_files if f.endswith(".onnx"))
        variants = [("int8_dynamic", "asis")] + ([] if args.no_fold else
                                                 [("int8_dynamic_folded", "fold")])
        for label, mode in variants:
            scratch = work / f"scratch-{label}"
            need_unet = not st.done(f"unet_{label}")
            if not st.done(f"quantize_{label}") or (need_unet and
                                                    not (scratch / "model.onnx").exists()):
                # again for a re-timed step: the scratch model is deleted after each use (the
                # first quantize's record is kept)
                shutil.rmtree(scratch, ignore_errors=True)
                print(f"[{time.perf_counter() - t_all:6.0f} s] quantize_dynamic ({mode})",
                      flush=True)
                q = child([py, "-c", DYNAMIC_CHILD, str(src), str(scratch), mode],
                          logs / f"quantize-{label}.log")
                if not st.done(f"quantize_{label}"):
                    st.set(f"quantize_{label}", q)
            q = st.data[f"quantize_{label}"]
            if q["rc"] == 0 and need_unet:
                quiet = wait_quiet(args.quiet_wait)
                print(f"[{time.perf_counter() - t_all:6.0f} s] unet step {label} {quiet}",
                      flush=True)
                cmd = [py, "-c", UNET_CHILD, str(scratch), str(outs / f"{label}.npy"),
                       "model.onnx", str(fp32)]
                st.set(f"unet_{label}", {**child(cmd, logs / f"unet-{label}.log"), **quiet})
            shutil.rmtree(scratch, ignore_errors=True)
        ref = outs / "fp32.npy"
        if ref.exists():
            r0 = np.load(ref)
            psnrs = {}
            for f in sorted(outs.glob("*.npy")):
                o = np.load(f)
                psnrs[f.stem] = psnr(r0, o)
            st.set("unet_psnr_vs_fp32", psnrs)

    # 3. sdc run 512x512 -----------------------------------------------------------------------
    if "runs" not in args.skip:
        for label in RUNS:
            key = f"run_{label}"
            folder = fp32 if label == "fp32" else work / f"sd15-{label}"
            if st.done(key) or not (folder / "manifest.json").is_file():
                continue
            out = work / "runs" / label
            shutil.rmtree(out, ignore_errors=True)
            cmd = [*SDC, "run", "a photo", "-a", str(folder), "--width", str(args.size),
                   "--height", str(args.size), "--steps", str(args.steps), "--seed", "1",
                   "--out", str(out)]
            quiet = wait_quiet(args.quiet_wait)
            print(f"[{time.perf_counter() - t_all:6.0f} s] run {label} {quiet}", flush=True)
            r = {**child(cmd, logs / f"run-{label}.log"), **quiet}
            r.update(parse_run_log(Path(r["log"]).read_text()))
            st.set(key, r)
        ims = {}
        for label in RUNS:
            p = work / "runs" / label / "1.png"
            if p.exists():
                from PIL import Image

                ims[label] = np.asarray(Image.open(p).convert("RGB"), np.float64)
        if "fp32" in ims:
            st.set("image_psnr_vs_fp32", {k: psnr(ims["fp32"], v) for k, v in ims.items()
                                          if k != "fp32"})

    # results -----------------------------------------------------------------------------------
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if ln.startswith("Model name")), "unknown")
    import onnxruntime

    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu, "cores": os.cpu_count(),
                    "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                     / 2**30, 1)},
        "onnxruntime": onnxruntime.__version__,
        "note": "full-size SD1.5 architecture with RANDOM weights (no download possible): sizes, "
                "speed and memory are the real model's; PSNRs are of random-weight graphs and "
                "only indicative of real-weight quality. Peak RSS: the child's ru_maxrss from "
                "os.wait4 (Linux includes its reaped children's max, e.g. the build's "
                "memory-profile subprocesses).",
        "settings": {"run": {"size": args.size, "steps": args.steps, "seed": 1,
                             "prompt": "a photo", "vram_budget": None},
                     "unet_step": {"sample": [2, 4, 64, 64], "timestep": [2],
                                   "encoder_hidden_states": [2, 77, 768], "warmup": 1,
                                   "timed": 3, "provider": "cpu",
                                   "session": "sdc.runtime.sessions.open_session"}},
        "work": str(work),
        **st.data,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"wrote {RESULTS} ({time.perf_counter() - t_all:.0f} s)")


def table(r: dict) -> str:
    rows = ["| build | total MiB (GB) | unet MiB | text enc MiB | build s | build peak GiB | "
            "unet PSNR dB | text enc PSNR dB | fp16 groups kept | run s (CPU s) | run peak GiB | "
            "unet step s | step peak GiB | step-out PSNR dB |", "|" + "---|" * 14]
    psnrs = r.get("unet_psnr_vs_fp32", {})
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    for label in ("fp32", "int8", "int4_b32", "int4_b64", "int8_dynamic", "int8_dynamic_folded"):
        b = r.get("fp32") if label == "fp32" else r.get(f"build_{label}")
        run, step = r.get(f"run_{label}", {}), r.get(f"unet_{label}", {})
        if not b and not step:
            continue
        b = b or {}
        g, st = b.get("graphs", {}), b.get("stages", {})
        q = (g.get("unet") or {}).get("quantization") or {}
        par = lambda s: None if label == "fp32" else ((g.get(s) or {}).get("parity") or {}).get(  # noqa: E731
            "value")
        rows.append("| " + " | ".join([
            label,
            f"{b['total_mib']:.0f} ({b['total_gb']:.2f})" if "total_mib" in b else "-",
            fmt((st.get("unet") or {}).get("mib"), "{:.0f}"),
            fmt((st.get("text_encoder") or {}).get("mib"), "{:.0f}"),
            fmt(b.get("seconds"), "{:.0f}"), fmt(b.get("peak_rss_gib")),
            fmt(par("unet")), fmt(par("text_encoder")),
            fmt(q.get("kept_fp16_groups"), "{}"),
            "-" if not run else f"{run['seconds']:.0f} ({fmt(run.get('cpu_s'), '{:.0f}')})",
            fmt(run.get("peak_rss_gib")),
            fmt((step.get("report") or {}).get("step_s")), fmt(step.get("peak_rss_gib")),
            fmt(psnrs.get(label)),
        ]) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
