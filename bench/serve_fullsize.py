"""Benchmark the warm runtime (`sdc serve`) against a cold `sdc run`, LoRA switching on the warm
server, and the server's memory over many adapter switches, for one build made by this sdc.

  1. cold vs warm   `sdc run PROMPT -a BUILD --steps S --width W --height H --seed 1` as a fresh
                    subprocess (wall time, the child's peak RSS from wait4), against N requests to
                    a warm `sdc serve` (POST /sdapi/v1/txt2img, same steps, size and seed) after
                    one warm-up request; the server's peak RSS is its VmHWM (/proc/PID/status).
                    The warm images must equal the cold one pixel for pixel.
  2. LoRA switch    on the same server: <lora:A:W> (first use: fuse + bind), A again (no
                    switch), <lora:B:W> (first use), B again, then A, B, A, ... (cached). Per
                    request: client wall time, the info's sdc.timings per stage, and the rest
                    (HTTP, validation, adapter lookup/fusion, PNG). Switch cost = request time
                    with a switch minus the median request time without one. /metrics before and
                    after each phase: a cached switch creates no session. Then, in a child
                    process without HTTP: Engine.adapter_set for a miss and a hit, and the bind
                    (StageSession.slot_values) per stage (the "cached switch <= 0.2 s" target).
  3. memory growth  100 switches (A, B, A, ...; one small request each, 64x64 px, 1 step) on the
                    same server: VmRSS after 10 and after 100 switches (target: growth <= 2 %).

LoRA files (--make-loras): random kohya-format files written from the build's own weight table
(manifest graphs.<stage>.weights.map/.data: module paths and shapes), torch-free, so the same code
serves the tiny and the full-size build. Rank 32, alpha 16 and small random values as in
bench/lora_fullsize.py; the targets default to the attention projections of the UNet (to_q, to_k,
to_v, to_out.0) and the text encoder (q/k/v/out_proj): weights that are adapter slots of the
graph, so a switch is a bind. Adding conv1,conv2 to --targets reproduces lora_fullsize.py's
targets; those 3x3 convs are outside the slots, so each switch then creates a UNet session (the
results count it: adapter_sessions).

Every request, child and the server start are bounded by --timeout; the server is always stopped
at the end. Writes bench/results/serve_<build folder name>.json.

    sdc build --precision fp32 --out /tmp/bench-tiny --force
    python bench/serve_fullsize.py --build /tmp/bench-tiny --work /tmp/sdc-bench --make-loras \\
        --steps 20 --width 64 --height 64

    python bench/build_fullsize.py --work /tmp/sdc-bench --keep
    python bench/serve_fullsize.py --build /tmp/sdc-bench/sd15-fp32 --work /tmp/sdc-bench \\
        --make-loras --steps 20 --width 512 --height 512
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
RESULTS = HERE / "results"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
PROMPT = "a red circle on a blue background"

# Engine.adapter_set and StageSession.slot_values, timed in a process of their own (no HTTP).
DIRECT = r"""
import json, statistics, sys, time
from pathlib import Path
t0 = time.perf_counter()
from sdc.runtime.engine import Engine
from sdc.runtime.prompt_loras import resolve_tags, split_prompt
from sdc.runtime.sessions import open_session
art, lora_dir, a, b, weight, provider, reps = sys.argv[1:8]
reps = int(reps)
eng = Engine(art, provider=provider, keep_sessions=True, lora_dir=lora_dir)
quiet = lambda msg: None
med = lambda xs: statistics.median(xs)

def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t

def specs(name):
    return resolve_tags(split_prompt(f"<lora:{name}:{weight}>")[1], Path(lora_dir))

(sa, resolve_first) = timed(specs, a)
sb = specs(b)
resolve = [timed(specs, n)[1] for _ in range(reps) for n in (a, b)]
ea, miss_a_first = timed(eng.adapter_set, sa, quiet)  # first call: LoRA file hashed, imports
eb, miss_b_first = timed(eng.adapter_set, sb, quiet)
hits = [timed(eng.adapter_set, s, quiet)[1] for _ in range(reps) for s in (sa, sb)]
misses = []
for _ in range(reps):
    eng.adapters.clear()  # the file hashes stay memoised: a miss is read + fuse
    for s in (sa, sb):
        misses.append(timed(eng.adapter_set, s, quiet)[1])
stages = sorted(set(ea.slots) | set(eb.slots))
sessions, created = {}, {}
for st in stages:
    sessions[st], created[st] = timed(open_session, Path(art), st, eng.manifest["graphs"][st],
                                      provider)
bind = {st: [] for st in stages}
for _ in range(reps):
    for e in (ea, eb):
        for st in stages:
            values, seconds = timed(sessions[st].slot_values, e.slots.get(st, {}))
            bind[st].append(seconds)
            del values
bind_med = {st: med(v) for st, v in bind.items()}
cached_switch = med(resolve) + med(hits) + sum(bind_med.values())
print(json.dumps({
    "reps": reps,
    "adapter": {n: {"bytes": e.nbytes, "slot_weights": {st: len(v) for st, v in e.slots.items()},
                    "session_weights": {st: len(v) for st, v in e.swaps.items()},
                    "layers": sum(r["layers"] for r in e.report)}
                for n, e in ((a, ea), (b, eb))},
    "resolve_tags_s": {"first": resolve_first, "median": med(resolve)},
    "adapter_set_miss_s": {"first_a": miss_a_first, "first_b": miss_b_first,
                           "median": med(misses), "max": max(misses)},
    "adapter_set_hit_s": {"median": med(hits), "max": max(hits)},
    "session_create_s": created,
    "slot_values_s": {st: {"median": bind_med[st], "max": max(v)} for st, v in bind.items()},
    "cached_switch_s": cached_switch,
    "cached_switch_target_s": 0.2,
    "cached_switch_target_met": cached_switch <= 0.2,
    "process_s": time.perf_counter() - t0,
}))
"""


# --- processes ------------------------------------------------------------------------------------

def child(cmd: list[str], timeout: float, label: str) -> dict:
    """Run a child to completion (killed after `timeout` s): wall time, its own peak RSS (wait4),
    and the JSON its last line prints, if any."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=ENV)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        why = f"killed after the {timeout:g} s timeout" if wall >= timeout else \
            f"exit {proc.returncode}"
        sys.exit(f"{label} failed ({why}):\n{text[-3000:]}")
    try:
        extra = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        extra = {}
    return {"wall_s": round(wall, 3), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 3), **extra}


def proc_status(pid: int) -> dict:
    """VmRSS / VmHWM (bytes) of a live process, from the OS."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`sdc serve` as a subprocess on 127.0.0.1 (stop() always; SIGTERM, then SIGKILL)."""

    def __init__(self, build: Path, lora_dir: Path, provider: str, log_path: Path, timeout: float):
        import requests

        self.http, self.timeout = requests, timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "sdc.cli.main", "serve", "--artifacts", str(build),
               "--port", str(self.port), "--lora-dir", str(lora_dir), "--provider", provider,
               "--max-steps", "1000"]
        with open(log_path, "wb") as log:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=ENV)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sdc serve exited {self.proc.returncode} before /health "
                                   f"answered:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sdc serve not healthy within {timeout:g} s:\n{self.tail()}")
            time.sleep(0.2)
        self.start_s = time.perf_counter() - t0

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def status(self) -> dict:
        return proc_status(self.proc.pid)

    def txt2img(self, prompt: str, steps: int, width: int, height: int, seed: int = 1) -> dict:
        body = {"prompt": prompt, "steps": steps, "width": width, "height": height, "seed": seed}
        t0 = time.perf_counter()
        r = self.http.post(self.url + "/sdapi/v1/txt2img", json=body, timeout=self.timeout)
        wall = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"txt2img {body}: HTTP {r.status_code} {r.text[:1000]}\n"
                               f"{self.tail()}")
        out = r.json()
        info = json.loads(out["info"])
        stages = info["sdc"]["timings"][0]
        return {"wall_s": wall, "stages": stages, "other_s": wall - sum(stages.values()),
                "png": base64.b64decode(out["images"][0]), "warnings": info["sdc"]["warnings"]}

    def metrics(self) -> dict:
        r = self.http.get(self.url + "/metrics", timeout=60)
        r.raise_for_status()
        values = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


# --- LoRA files -----------------------------------------------------------------------------------

def make_loras(build: Path, out: Path, names: list[str], rank: int, targets: list[str]) -> dict:
    """Random kohya LoRA files for `build`'s architecture, from its manifest's weight table."""
    from safetensors.numpy import save_file

    m = json.loads((build / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    for seed, name in enumerate(names):
        rng = np.random.default_rng(seed)
        tensors, slots, modules = {}, 0, 0
        for stage, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
            w = m["graphs"][stage]["weights"]
            slot_set = set(w.get("slots", ()))
            for param, init in sorted(w["map"].items()):
                module = param.removesuffix(".weight")
                if not param.endswith(".weight") or not any(
                        module == t or module.endswith("." + t) for t in targets):
                    continue
                shape = w["data"][init][3]
                if len(shape) not in (2, 4):
                    continue
                r = min(rank, shape[0], shape[1])
                fan_in = int(np.prod(shape[1:]))
                stem = prefix + module.replace(".", "_")
                down = rng.standard_normal((r, *shape[1:])) / np.sqrt(fan_in)
                up = rng.standard_normal((shape[0], r, *([1, 1] if len(shape) == 4 else []))) \
                    * (0.05 / np.sqrt(r))
                tensors[f"{stem}.lora_down.weight"] = down.astype(np.float32)
                tensors[f"{stem}.lora_up.weight"] = up.astype(np.float32)
                tensors[f"{stem}.alpha"] = np.array(min(16.0, r), np.float32)
                modules += 1
                slots += init in slot_set
        if not tensors:
            sys.exit(f"--targets {','.join(targets)}: no such modules in {build}")
        path = out / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"ss_network_dim": str(rank)})
        made[name] = {"file": str(path), "bytes": path.stat().st_size, "modules": modules,
                      "modules_in_slots": slots}
    return made


# --- helpers --------------------------------------------------------------------------------------

def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"))


def med(xs):
    return statistics.median(xs) if xs else None


def r3(x):
    return None if x is None else round(x, 4)


def machine() -> dict:
    cpu, mem = platform.processor() or "unknown", None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) * 1024 / 2**30, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "python": platform.python_version(),
            "sdc_commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def request_row(r: dict, adapter: str | None, kind: str) -> dict:
    return {"adapter": adapter, "kind": kind, "wall_s": r3(r["wall_s"]),
            "stages_s": {k: r3(v) for k, v in r["stages"].items()}, "other_s": r3(r["other_s"])}


def delta(after: dict, before: dict, names: list[str]) -> dict:
    return {n: after.get(n, 0) - before.get(n, 0) for n in names}


METRICS = ["sdc_sessions_created_total", "sdc_adapter_cache_hits_total",
           "sdc_adapter_cache_misses_total", "sdc_adapter_binds_total",
           "sdc_adapter_sessions_total"]


# --- the benchmark --------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, required=True, help="a build made by this sdc")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdc-bench"))
    ap.add_argument("--lora-dir", type=Path, default=None,
                    help="folder with the two LoRA files [default: WORK/loras-<build name>]")
    ap.add_argument("--make-loras", action="store_true",
                    help="write random LoRA files A and B into --lora-dir (overwrites them)")
    ap.add_argument("--adapters", nargs=2, default=["bench-a", "bench-b"], metavar=("A", "B"))
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--targets", default="to_q,to_k,to_v,to_out.0,q_proj,k_proj,v_proj,out_proj",
                    help="module names the made LoRAs touch (comma-separated)")
    ap.add_argument("--lora-weight", type=float, default=0.8)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--provider", default="auto")
    ap.add_argument("--requests", type=int, default=3, help="timed warm requests (part 1)")
    ap.add_argument("--lora-steps", type=int, default=None,
                    help="steps of the LoRA requests (part 2) [default: --steps]; fewer steps "
                         "make the with/without-switch difference less noisy")
    ap.add_argument("--cached-switches", type=int, default=4,
                    help="A, B, A, ... requests between cached adapters (part 2)")
    ap.add_argument("--switches", type=int, default=100, help="switches for memory growth")
    ap.add_argument("--switch-size", type=int, default=64)
    ap.add_argument("--switch-steps", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5, help="repeats of the in-process timings")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="seconds for each request, each child and the server start")
    args = ap.parse_args()
    build = args.build.resolve()
    if not (build / "manifest.json").is_file():
        sys.exit(f"{build}: no manifest.json; expected a build (sdc build --out DIR)")
    if args.cached_switches < 1:
        sys.exit("--cached-switches: expected at least 1")
    if args.switches < 10:
        sys.exit("--switches: expected at least 10 (growth is measured from the 10th)")
    name = build.name
    work = args.work / f"serve-{name}"
    work.mkdir(parents=True, exist_ok=True)
    lora_dir = (args.lora_dir or args.work / f"loras-{name}").resolve()
    a, b = args.adapters
    res = {"machine": machine(), "build": str(build),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.make_loras:
        res["loras"] = make_loras(build, lora_dir, [a, b], args.rank, targets)
        made = res["loras"][a]
        print(f"LoRA files in {lora_dir}: {made['modules']} modules each, "
              f"{made['modules_in_slots']} of them adapter slots", flush=True)
        if made["modules_in_slots"] < made["modules"]:
            print("  note: weights outside the slots go in at session creation, so each switch "
                  "creates a session", flush=True)
    else:
        missing = [n for n in (a, b) if not (lora_dir / f"{n}.safetensors").is_file()]
        if missing:
            sys.exit(f"{lora_dir}: no {', '.join(missing)}.safetensors; give --make-loras")
        res["loras"] = {n: {"file": str(lora_dir / f"{n}.safetensors"),
                            "bytes": (lora_dir / f"{n}.safetensors").stat().st_size}
                        for n in (a, b)}
    size = ["--steps", str(args.steps), "--width", str(args.width), "--height", str(args.height)]

    # 1a. cold: a fresh `sdc run`
    cold_png = work / "cold.png"
    cold_png.unlink(missing_ok=True)
    print(f"cold: sdc run {args.width}x{args.height}, {args.steps} steps ...", flush=True)
    res["cold"] = child([sys.executable, "-m", "sdc.cli.main", "run", args.prompt, "-a", str(build),
                         *size, "--seed", "1", "--provider", args.provider, "--out",
                         str(cold_png)], args.timeout, "sdc run")
    cold = pixels(cold_png.read_bytes())

    # 1b. warm server; 2. LoRA switching; 3. memory growth: one server
    print("warm: starting sdc serve ...", flush=True)
    srv = Server(build, lora_dir, args.provider, work / "serve.log", args.timeout)
    try:
        res["warm"] = warm = {"server_start_s": round(srv.start_s, 3),
                              "rss_after_start_bytes": srv.status()["VmRSS"]}
        first = srv.txt2img(args.prompt, args.steps, args.width, args.height)
        warm["first_request"] = request_row(first, None, "warm-up (sessions created)")
        runs = [srv.txt2img(args.prompt, args.steps, args.width, args.height)
                for _ in range(args.requests)]
        st = srv.status()
        base_png = runs[0]["png"]
        warm.update({
            "requests": [request_row(r, None, "warm") for r in runs],
            "request_s_median": r3(med([r["wall_s"] for r in runs])),
            "peak_rss_bytes": st["VmHWM"], "peak_rss_gib": round(st["VmHWM"] / 2**30, 3),
            "rss_bytes": st["VmRSS"],
            "identical_to_cold": all(np.array_equal(pixels(r["png"]), cold)
                                     for r in [first, *runs]),
            "png_bytes_identical_to_cold": all(r["png"] == cold_png.read_bytes()
                                               for r in [first, *runs]),
        })
        warm["speedup_vs_cold"] = r3(res["cold"]["wall_s"] / warm["request_s_median"])
        print(f"  warm {warm['request_s_median']:.2f} s vs cold {res['cold']['wall_s']:.2f} s; "
              f"identical: {warm['identical_to_cold']}", flush=True)

        # 2. LoRA switching over HTTP
        lora_steps = args.lora_steps or args.steps
        print(f"LoRA switching ({lora_steps} steps) ...", flush=True)

        def lora(n):
            return srv.txt2img(f"{args.prompt} <lora:{n}:{args.lora_weight:g}>", lora_steps,
                               args.width, args.height)

        rows, pngs = [], {a: [], b: []}
        m0 = srv.metrics()
        for n, kind in ((a, "first use"), (a, "same"), (b, "first use"), (b, "same")):
            r = lora(n)
            rows.append(request_row(r, n, kind))
            pngs[n].append(r["png"])
        m1 = srv.metrics()
        for _ in range(args.cached_switches):
            n = a if rows[-1]["adapter"] == b else b
            r = lora(n)
            rows.append(request_row(r, n, "cached switch"))
            pngs[n].append(r["png"])
        m2 = srv.metrics()
        last = rows[-1]["adapter"]
        r = lora(last)
        rows.append(request_row(r, last, "same"))
        pngs[last].append(r["png"])
        m3 = srv.metrics()
        same = med([x["wall_s"] for x in rows if x["kind"] == "same"])
        firsts = [x["wall_s"] for x in rows if x["kind"] == "first use"]
        cached = [x["wall_s"] for x in rows if x["kind"] == "cached switch"]
        res["lora_http"] = {
            "requests": rows,
            "request_s_median_same_adapter": r3(same),
            "steps": lora_steps,
            "request_s_median_no_lora": warm["request_s_median"] if lora_steps == args.steps
            else None,
            "switch_cost_first_use_s": [r3(t - same) for t in firsts],
            "switch_cost_cached_s_median": r3(med(cached) - same) if cached else None,
            "switch_cost_cached_s": [r3(t - same) for t in cached],
            "metrics_first_uses": delta(m1, m0, METRICS),
            "metrics_cached_switches": delta(m2, m1, METRICS),
            "metrics_whole": delta(m3, m0, METRICS),
            "cached_switch_created_no_session": delta(m2, m1, METRICS)[
                "sdc_sessions_created_total"] == 0 and args.cached_switches > 0,
            "a_repeat_identical": all(p == pngs[a][0] for p in pngs[a]),
            "b_repeat_identical": all(p == pngs[b][0] for p in pngs[b]),
            "a_differs_from_no_lora": not np.array_equal(pixels(pngs[a][0]), pixels(base_png)),
            "a_differs_from_b": not np.array_equal(pixels(pngs[a][0]), pixels(pngs[b][0])),
        }

        # 3. memory growth over many switches (small requests)
        print(f"memory: {args.switches} switches at {args.switch_size} px, "
              f"{args.switch_steps} step(s) ...", flush=True)
        rss, times = {}, []
        g0 = srv.metrics()
        rss_before = srv.status()["VmRSS"]
        for i in range(args.switches):
            n = b if last == a else a
            last = n
            r = srv.txt2img(f"{args.prompt} <lora:{n}:{args.lora_weight:g}>", args.switch_steps,
                            args.switch_size, args.switch_size)
            times.append(r["wall_s"])
            if i + 1 in (10, args.switches):
                rss[i + 1] = srv.status()["VmRSS"]
        g1 = srv.metrics()
        st = srv.status()
        growth = (rss[args.switches] - rss[10]) / rss[10] * 100
        res["growth"] = {
            "switches": args.switches, "size": args.switch_size, "steps": args.switch_steps,
            "rss_before_bytes": rss_before, "rss_after_10_bytes": rss[10],
            f"rss_after_{args.switches}_bytes": rss[args.switches],
            "growth_pct": round(growth, 3), "target_pct": 2.0, "target_met": growth <= 2.0,
            "request_s_median": r3(med(times)), "request_s_max": r3(max(times)),
            "metrics": delta(g1, g0, METRICS),
            "server_peak_rss_bytes": st["VmHWM"],
        }
        print(f"  RSS {rss[10] / 2**20:.1f} -> {rss[args.switches] / 2**20:.1f} MiB "
              f"({growth:+.2f} %)", flush=True)
        res["server_log_tail"] = srv.tail()[-1500:]
    finally:
        srv.stop()

    # 2b. in-process: adapter_set (miss, hit) and the bind, no HTTP, no server running
    print("in-process adapter_set / slot_values ...", flush=True)
    res["lora_direct"] = child([sys.executable, "-c", DIRECT, str(build), str(lora_dir), a, b,
                                f"{args.lora_weight:g}", args.provider, str(args.reps)],
                               args.timeout, "in-process adapter timing")

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"serve_{name}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    table(res)
    print(f"wrote {path}")


def table(res: dict) -> None:
    c, w, lh, d, g = res["cold"], res["warm"], res["lora_http"], res["lora_direct"], res["growth"]
    s = res["settings"]
    gib = 2**30
    lines = [
        f"{res['build']}: {s['width']}x{s['height']}, {s['steps']} steps; "
        f"{res['machine']['cpu']}, {res['machine']['cores']} cores",
        f"{'cold sdc run (process)':44} {c['wall_s']:9.3f} s   peak RSS {c['peak_rss_gib']:.3f} GiB",
        f"{'warm server start (to /health)':44} {w['server_start_s']:9.3f} s",
        f"{'warm first request (sessions created)':44} {w['first_request']['wall_s']:9.3f} s",
        f"{'warm request (median of %d)' % len(w['requests']):44} {w['request_s_median']:9.3f} s"
        f"   peak RSS {w['peak_rss_gib']:.3f} GiB   x{w['speedup_vs_cold']} vs cold",
        f"{'warm image == cold image (pixels)':44} {str(w['identical_to_cold']):>9}",
        f"LoRA requests, {lh['steps']} steps (wall = stages + other):",
    ]
    for r in lh["requests"]:
        stages = " ".join(f"{k} {v:.3f}" for k, v in r["stages_s"].items())
        lines.append(f"  {r['adapter']:10} {r['kind']:14} {r['wall_s']:8.3f} s = {stages} "
                     f"+ other {r['other_s']:.3f}")
    lines += [
        f"{'switch cost, first use A / B':44} "
        + " / ".join(f"{x:.4f}" for x in lh["switch_cost_first_use_s"]) + " s",
        f"{'switch cost, cached (median)':44} {lh['switch_cost_cached_s_median']:9.4f} s",
        f"{'metrics over cached switches':44} " + ", ".join(
            f"{k.removeprefix('sdc_').removesuffix('_total')} {v:g}"
            for k, v in lh["metrics_cached_switches"].items()),
        f"{'cached switch created no session':44} {str(lh['cached_switch_created_no_session']):>9}",
        f"{'A -> B -> A gives A bit for bit':44} "
        f"{str(lh['a_repeat_identical'] and lh['b_repeat_identical']):>9}",
        f"{'in-process adapter_set miss (median)':44} {d['adapter_set_miss_s']['median']:9.4f} s",
        f"{'in-process adapter_set hit (median)':44} {d['adapter_set_hit_s']['median']:9.4f} s",
    ]
    for st, v in d["slot_values_s"].items():
        lines.append(f"{'in-process slot_values ' + st + ' (median)':44} {v['median']:9.4f} s")
    lines += [
        f"{'in-process cached switch (tags+hit+binds)':44} {d['cached_switch_s']:9.4f} s   "
        f"target <= 0.2 s: {d['cached_switch_target_met']}",
        f"{'RSS after 10 / %d switches' % g['switches']:44} {g['rss_after_10_bytes'] / gib:.3f} / "
        f"{g['rss_after_%d_bytes' % g['switches']] / gib:.3f} GiB   growth {g['growth_pct']:+.2f} % "
        f"(target <= 2 %: {g['target_met']})",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
