"""Benchmark DeepFloyd IF at the full-size ARCHITECTURE of IF-I-M (stage I) + IF-II-M (stage II),
random weights (values change neither speed nor memory), with a T5 of T5 v1.1 XXL's width but only
a few of its 24 layers, on this CPU machine: `sdc build`, a 64 px -> 256 px run against diffusers'
IFPipeline + IFSuperResolutionPipeline in the same script (same seed, same noise), the memory
planner, and a stage-I LoRA training step (sdc train-lora vs a plain diffusers + peft loop).
Not a test.

Each contender runs in its own subprocess, so its peak RSS (wait4's rusage of the finished child,
from the OS) is that run's alone:
  model      IF-I-M / IF-II-M UNet configs (constructed from diffusers' scripts/convert_if.py logic,
             see UNET_I / UNET_II), T5EncoderModel(d_model 4096, d_kv 64, 64 heads, d_ff 10240,
             gated-gelu, vocab 32128, T5_LAYERS layers), random init (seed 0), safetensors, fp32.
             Tokenizer: tests/if_models.py's small T5-style tokenizer (~140 ids, all < 32128):
             with random weights token identity does not matter, the embedding table's size does.
  build      `sdc build IF-I --upscaler IF-II --precision fp32`
  plan       `sdc run --plan`, and the smallest --vram-budget the planner accepts
  sdc        `sdc run` 64 px -> 256 px, STEPS / UPSCALE_STEPS steps, CFG 7 / 4, seed 0
  diffusers  IFPipeline + IFSuperResolutionPipeline fp32 CPU, stage II sharing stage I's T5, no
             safety checker / watermarker, clean_caption=False, stage I output_type "pt";
             diffusers' randn_tensor draws from the same seeded PCG64 generator in the order sdc
             draws (tests/test_deepfloyd.py's SharedNoise), so both see identical noise
  train      rank-32 batch-4 stage-I LoRA at 64 px: `sdc train-lora` (model_family deepfloyd) vs
             plain diffusers + peft (AdamW, MSE on the epsilon half, T5 states precomputed)

    python bench/deepfloyd_fullsize.py [--work DIR] [--phases model,build,plan,sdc,diffusers,repeat,budget,train,train2,quiet]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "deepfloyd_fullsize.json"
T5_LAYERS = 2
STEPS, UPSCALE_STEPS = 10, 5
GUIDANCE, UPSCALE_GUIDANCE = 7.0, 4.0
SEED = 0
PROMPT, NEGATIVE = "a photo of a red circle on a blue background", "blurry"
TRAIN_STEPS = 3  # timed steps (one more untimed warm-up step in the plain loop)

T5 = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": T5_LAYERS,
      "num_heads": 64, "relative_attention_num_buckets": 32,
      "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
      "is_encoder_decoder": False, "use_cache": False, "dropout_rate": 0.0,
      "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
      "layer_norm_epsilon": 1e-6}

# Constructed, not copied: no IF-I-M / IF-II-M config.json is in reach here. convert_if.py maps
# the original UNetModel's params: block_out_channels = model_channels * channel_mult, attention
# at the original attention_resolutions (SimpleCrossAttn blocks), head dim num_head_channels,
# cross_attention_dim = encoder_channels, encoder_hid_dim = encoder_dim (T5's 4096), scale-shift
# resnets, gelu, addition_embed_type "text" (attention pooling of T5 into the time embedding).
# IF-I-M: model_channels 192, mult 1,2,3,4, 3 res blocks, attention at 32/16/8 of 64 px,
# encoder_channels 1536 -> 394.5 M params (published: 400 M).
UNET_I = {
    "sample_size": 64, "in_channels": 3, "out_channels": 6, "layers_per_block": 3,
    "block_out_channels": [192, 384, 576, 768],
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                         "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                       "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "cross_attention_dim": 1536, "encoder_hid_dim": 4096, "attention_head_dim": 64,
    "addition_embed_type": "text", "addition_embed_type_num_heads": 64,
    "cross_attention_norm": "group_norm", "resnet_time_scale_shift": "scale_shift",
    "act_fn": "gelu", "upcast_attention": False, "use_linear_projection": False,
}
# IF-II-M: the super-resolution UNet, 5 levels; per-level res blocks [2, 2, 3, 5, 5] (the layout
# convert_if.py's verify_param_count checks for -II- models), model_channels 96, mult 1,2,4,6,8,
# attention at the two lowest resolutions, the noise level as a timestep class embedding ->
# 488.9 M params (published: IF-II-M 450 M / "500M" in the IF README).
UNET_II = {
    **UNET_I, "sample_size": 256, "in_channels": 6, "layers_per_block": [2, 2, 3, 5, 5],
    "block_out_channels": [96, 192, 384, 576, 768],
    "down_block_types": ["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D",
                         "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                         "SimpleCrossAttnDownBlock2D"],
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                       "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"],
    "class_embed_type": "timestep", "mid_block_scale_factor": 1.414,
    "time_embedding_act_fn": "gelu", "resnet_skip_time_act": True, "resnet_out_scale_factor": 1.414,
}

MAKE_MODEL = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from if_models import write_if_folders
cfg = json.loads(sys.argv[3])
root = Path(sys.argv[1])
_, _, counts = write_if_folders(root / "IF-I-M-random", root / "IF-II-M-random", cfg, seed=0)
(root / "params.json").write_text(json.dumps(counts, indent=1))
print(json.dumps(counts))
"""

DIFFUSERS = r"""
import json, sys, time, numpy as np, torch
sys.path.insert(0, sys.argv[2])
torch.set_num_threads(int(sys.argv[9]))
import diffusers.pipelines.deepfloyd_if.pipeline_if as p1
import diffusers.pipelines.deepfloyd_if.pipeline_if_superresolution as p2
import diffusers.schedulers.scheduling_ddpm as ddpm
from if_models import load_if_pipelines
root, prompt, negative = sys.argv[1], sys.argv[3], sys.argv[4]
seed, steps, steps_2, out = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), sys.argv[8]
g1, g2 = %(g1)r, %(g2)r
rng = np.random.default_rng(seed)
def shared(shape, generator=None, device=None, dtype=None, layout=None):
    x = torch.from_numpy(np.concatenate([rng.standard_normal((1, *shape[1:]), dtype=np.float32)
                                         for _ in range(shape[0])]))
    return x.to(dtype) if dtype is not None else x
for m in (p1, p2, ddpm):
    m.randn_tensor = shared
t0 = time.perf_counter()
first, second = load_if_pipelines(root + "/IF-I-M-random", root + "/IF-II-M-random")
load = time.perf_counter() - t0
with torch.no_grad():
    t1 = time.perf_counter()
    image = first(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=g1,
                  output_type="pt", clean_caption=False).images
    t2 = time.perf_counter()
    img = second(image=image, prompt=prompt, negative_prompt=negative,
                 num_inference_steps=steps_2, guidance_scale=g2, output_type="pt",
                 clean_caption=False).images
    t3 = time.perf_counter()
arr = ((img / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
np.save(out, arr)
print(json.dumps({"load_s": round(load, 1), "stage_I_s": round(t2 - t1, 1),
                  "stage_II_s": round(t3 - t2, 1)}))
""" % {"g1": GUIDANCE, "g2": UPSCALE_GUIDANCE}

PLAIN_TRAIN = r"""
import json, sys, time, numpy as np, torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import T5EncoderModel, T5TokenizerFast
from peft import LoraConfig
torch.set_num_threads(int(sys.argv[4]))
one, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
captions = [f"a sks seal on a {c} background" for c in ("red", "green", "blue", "yellow")][:batch]
tok = T5TokenizerFast.from_pretrained(one + "/tokenizer")
te = T5EncoderModel.from_pretrained(one + "/text_encoder")
with torch.no_grad():  # T5 states precomputed, T5 released before the UNet trains
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    cond = te(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
del te
unet = UNet2DConditionModel.from_pretrained(one, subfolder="unet")
noise = DDPMScheduler.from_pretrained(one, subfolder="scheduler")
unet.requires_grad_(False)
unet.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian",
                            target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj",
                                            "add_v_proj"]))
params = [p for p in unet.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=4e-5)
unet.train()
x0 = torch.rand(batch, 3, 64, 64) * 2 - 1
times = []
for step in range(steps + 1):
    t0 = time.perf_counter()
    t = torch.randint(0, 1000, (batch,)); eps = torch.randn_like(x0)
    pred = unet(noise.add_noise(x0, eps, t), t, cond).sample
    loss = torch.nn.functional.mse_loss(pred[:, :3], eps)  # the epsilon half
    loss.backward(); opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t0)
print(json.dumps({"step_seconds": round(sum(times[1:]) / steps, 2), "first_step_s": round(times[0], 2),
                  "trainable_params": sum(p.numel() for p in params), "loss": float(loss)}))
"""

SDC_TRAIN = r"""
import json, sys
from sdc.training.config import LoraConfig, resolve
from sdc.training.lora_train import train_lora
flags = json.loads(sys.argv[1])
r = train_lora(resolve(LoraConfig, None, flags), log=lambda m: None)
r["step_seconds"] = round(r["train_seconds"] / flags["steps"], 2)
print(json.dumps(r))
"""


def run(cmd: list[str], label: str, timeout: float | None = None) -> dict:
    """Run a child to completion; wall time and that child's own peak RSS (wait4's rusage)."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1",
                                     "TOKENIZERS_PARALLELISM": "false"})
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        if timer:
            timer.cancel()
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        log = out.read()
    result = {"seconds": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2),
              "exit": code, "load_avg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
              "log": log[-4000:]}
    if timeout and wall >= timeout:
        result["killed_after_s"] = timeout
    last = [ln for ln in log.splitlines() if ln.startswith("{")]
    if last:
        try:
            result["child"] = json.loads(last[-1])
        except json.JSONDecodeError:
            pass
    print(f"{label}: {result['seconds']} s, peak {result['peak_rss_gib']} GiB, exit {code}",
          flush=True)
    return result


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def machine() -> dict:
    m = {"node": os.uname().nodename, "cores": os.cpu_count(),
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "note": "2 cores shared with another engineer's test runs: timings are contended"}
    try:
        m["cpu"] = next(line.split(":", 1)[1].strip() for line in
                        subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                        if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return m


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdc-bench/if"))
    ap.add_argument("--phases", default="model,build,plan,sdc,diffusers,budget,train")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=float, default=3600, help="per child, seconds")
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    import numpy as np

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    one, two, build = work / "IF-I-M-random", work / "IF-II-M-random", work / "if-m-fp32"
    res = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    res.update({"machine": machine(), "size": {"stage_I": 64, "stage_II": 256},
                "steps": {"stage_I": STEPS, "stage_II": UPSCALE_STEPS},
                "guidance": {"stage_I": GUIDANCE, "stage_II": UPSCALE_GUIDANCE}, "seed": SEED,
                "prompt": PROMPT, "negative": NEGATIVE,
                "configs": {"t5": T5, "unet_i": UNET_I, "unet_ii": UNET_II,
                            "configs_source": "constructed from diffusers scripts/convert_if.py's "
                            "mapping with assumed original params (see bench/deepfloyd_fullsize.py"
                            "); no real IF-I-M/IF-II-M config.json was available offline"}})

    def save():
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(res, indent=2) + "\n")

    py = sys.executable
    sdc = [py, "-m", "sdc.cli.main"]
    tests = str(ROOT / "tests")
    if "model" in phases and not (two / "model_index.json").is_file():
        cfg = json.dumps({"t5": T5, "unet_i": UNET_I, "unet_ii": UNET_II})
        res["model"] = run([py, "-c", MAKE_MODEL, str(work), tests, cfg], "model", args.timeout)
        save()
    if (work / "params.json").is_file():
        p = json.loads((work / "params.json").read_text())
        res["params"] = {**p, "total": p["text_encoder"] + p["unet_i"] + p["unet_ii"]}
        res["params_millions"] = {k: round(v / 1e6, 1) for k, v in res["params"].items()
                                  if k != "tokenizer_vocab"}
    if one.is_dir():
        res["source_bytes"] = {"IF-I-M-random": dir_bytes(one), "IF-II-M-random": dir_bytes(two)}
    if "build" in phases and not (build / "manifest.json").is_file():
        res["build"] = run(sdc + ["build", str(one), "--upscaler", str(two), "--precision", "fp32",
                                  "--out", str(build)], "build", args.timeout)
        save()
        if res["build"]["exit"]:
            return 1
    if (build / "manifest.json").is_file():
        manifest = json.loads((build / "manifest.json").read_text())
        res["build_bytes"] = dir_bytes(build)
        res["build_manifest"] = {
            "seconds": manifest["build"].get("seconds"),
            "peak_rss_gib": round(manifest["build"].get("peak_rss_bytes", 0) / 2**30, 2),
            "graphs": {s: {"precision": g["precision"], "parity": g["parity"].get("value"),
                           "threshold": g["parity"].get("threshold"),
                           "bytes": dir_bytes(build / s)}
                       for s, g in manifest["graphs"].items()}}
        save()
    common = [PROMPT, "-a", str(build), "--negative", NEGATIVE, "--seed", str(SEED),
              "--steps", str(STEPS), "--upscale-steps", str(UPSCALE_STEPS),
              "--guidance", str(GUIDANCE), "--upscale-guidance", str(UPSCALE_GUIDANCE),
              "--provider", "cpu"]
    if "plan" in phases:
        plan = run(sdc + ["run", *common, "--plan"], "plan", 600)
        res["plan"] = {"exit": plan["exit"], "output": plan["log"][-3000:]}
        small = run(sdc + ["run", *common, "--vram-budget", "1MiB", "--plan"], "plan at 1 MiB",
                    600)
        m = re.search(r"is (\d+) MiB", small["log"])
        res["smallest_budget_mib"] = int(m[1]) if m else None
        res["smallest_budget_output"] = small["log"][-1500:]
        if m:
            ok = run(sdc + ["run", *common, "--vram-budget", f"{m[1]}MiB", "--plan"],
                     f"plan at {m[1]} MiB", 600)
            res["plan_smallest"] = {"exit": ok["exit"], "output": ok["log"][-3000:]}
        save()
    ours, ref = work / "sdc.png", work / "diffusers.npy"
    if "sdc" in phases:
        res["sdc"] = run(sdc + ["run", *common, "--out", str(ours)], "sdc run", args.timeout)
        save()
    if "diffusers" in phases:
        res["diffusers"] = run([py, "-c", DIFFUSERS, str(work), tests, PROMPT, NEGATIVE,
                                str(SEED), str(STEPS), str(UPSCALE_STEPS), str(ref),
                                str(args.threads)], "diffusers", args.timeout)
        save()
    if "repeat" in phases:  # a second sdc / diffusers pair: the spread the shared cores give
        res["sdc_2"] = run(sdc + ["run", *common, "--out", str(work / "sdc-2.png")], "sdc run 2",
                           args.timeout)
        save()
        res["diffusers_2"] = run([py, "-c", DIFFUSERS, str(work), tests, PROMPT, NEGATIVE,
                                  str(SEED), str(STEPS), str(UPSCALE_STEPS),
                                  str(work / "diffusers-2.npy"), str(args.threads)],
                                 "diffusers 2", args.timeout)
        save()
    if res.get("sdc", {}).get("exit") == 0 and res.get("diffusers", {}).get("exit") == 0:
        from PIL import Image

        a = np.asarray(Image.open(ours).convert("RGB"), np.int16)
        b = np.load(ref).astype(np.int16)
        res["pixel_diff_max"] = int(np.abs(a - b).max())
        res["pixel_diff_mean"] = round(float(np.abs(a - b).mean()), 3)
        res["time_ratio_sdc_vs_diffusers"] = round(res["sdc"]["seconds"] /
                                                   res["diffusers"]["seconds"], 3)
        res["memory_ratio_sdc_vs_diffusers"] = round(res["sdc"]["peak_rss_gib"] /
                                                     res["diffusers"]["peak_rss_gib"], 3)
        save()
    for key, png in (("sdc_2", "sdc-2.png"), ("sdc_smallest_budget", "small.png")):
        if res.get(key, {}).get("exit") == 0 and (work / png).is_file() and ref.is_file():
            from PIL import Image

            c = np.asarray(Image.open(work / png).convert("RGB"), np.int16)
            res[key]["pixel_diff_max_vs_diffusers"] = int(np.abs(c - np.load(ref)).max())
    if res.get("sdc_2", {}).get("exit") == 0 and res.get("diffusers_2", {}).get("exit") == 0:
        res["time_ratio_sdc_vs_diffusers_2"] = round(res["sdc_2"]["seconds"] /
                                                     res["diffusers_2"]["seconds"], 3)
    save()
    if "budget" in phases and res.get("smallest_budget_mib"):
        budget = f"{res['smallest_budget_mib']}MiB"
        res["sdc_smallest_budget"] = run(sdc + ["run", *common, "--vram-budget", budget,
                                                "--out", str(work / "small.png")],
                                         f"sdc run at {budget}", args.timeout)
        save()
    if "train" in phases:
        data = work / "seal"
        if not data.is_dir():
            from sdc.training.emblem import write_seal_folder

            write_seal_folder(data, 4, seed=0)
        res["train"] = {"rank": 32, "batch": 4, "resolution": 64, "timed_steps": TRAIN_STEPS,
                        "reference": "SimpleTuner DeepFloyd guide: ~24 GB (GPU) for a rank-32 "
                                     "batch-4 stage-I LoRA"}
        flags = {"model": str(one), "data": str(data), "trigger": "sks seal", "rank": 32,
                 "batch_size": 4, "steps": TRAIN_STEPS, "samples": False, "resolution": 64,
                 "model_family": "deepfloyd", "model_flavour": "i-medium-400m",
                 "cache_dir": str(work / "train-cache"), "out": str(work / "lora-i.safetensors")}
        res["train"]["sdc"] = run([py, "-c", SDC_TRAIN, json.dumps(flags)], "sdc train-lora",
                                  args.timeout)
        save()
        res["train"]["plain"] = run([py, "-c", PLAIN_TRAIN, str(one), str(TRAIN_STEPS), "4",
                                     str(args.threads)], "plain diffusers+peft", args.timeout)
        save()
    if "train2" in phases:  # sdc's trainer on the plain loop's recipe: AdamW, no checkpointing
        data = work / "seal"
        flags = {"model": str(one), "data": str(data), "trigger": "sks seal", "rank": 32,
                 "batch_size": 4, "steps": TRAIN_STEPS, "samples": False, "resolution": 64,
                 "model_family": "deepfloyd", "model_flavour": "i-medium-400m",
                 "optimizer": "adamw", "gradient_checkpointing": False,
                 "cache_dir": str(work / "train-cache"), "out": str(work / "lora-i-2.safetensors")}
        res.setdefault("train", {})["sdc_adamw_no_checkpointing"] = run(
            [py, "-c", SDC_TRAIN, json.dumps(flags)], "sdc train-lora (adamw, no ckpt)",
            args.timeout)
        save()
    if "quiet" in phases:  # everything timed again back to back (run when the cores are idle)
        data, q = work / "seal", {}
        base = {"model": str(one), "data": str(data), "trigger": "sks seal", "rank": 32,
                "batch_size": 4, "steps": TRAIN_STEPS, "samples": False, "resolution": 64,
                "model_family": "deepfloyd", "model_flavour": "i-medium-400m",
                "cache_dir": str(work / "train-cache")}
        res["quiet"] = q
        q["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
        q["sdc"] = run(sdc + ["run", *common, "--out", str(work / "sdc-q.png")], "quiet sdc run",
                       args.timeout)
        save()
        q["diffusers"] = run([py, "-c", DIFFUSERS, str(work), tests, PROMPT, NEGATIVE, str(SEED),
                              str(STEPS), str(UPSCALE_STEPS), str(work / "diffusers-q.npy"),
                              str(args.threads)], "quiet diffusers", args.timeout)
        q["time_ratio_sdc_vs_diffusers"] = round(q["sdc"]["seconds"] / q["diffusers"]["seconds"], 3)
        save()
        if res.get("smallest_budget_mib"):
            q["sdc_smallest_budget"] = run(
                sdc + ["run", *common, "--vram-budget", f"{res['smallest_budget_mib']}MiB",
                       "--out", str(work / "small-q.png")], "quiet sdc run, smallest budget",
                args.timeout)
            save()
        q["train_sdc"] = run([py, "-c", SDC_TRAIN, json.dumps(
            {**base, "out": str(work / "lora-q1.safetensors")})], "quiet sdc train-lora",
            args.timeout)
        save()
        q["train_sdc_adamw_no_checkpointing"] = run([py, "-c", SDC_TRAIN, json.dumps(
            {**base, "optimizer": "adamw", "gradient_checkpointing": False,
             "out": str(work / "lora-q2.safetensors")})], "quiet sdc train-lora (adamw, no ckpt)",
            args.timeout)
        save()
        q["train_plain"] = run([py, "-c", PLAIN_TRAIN, str(one), str(TRAIN_STEPS), "4",
                                str(args.threads)], "quiet plain diffusers+peft", args.timeout)
        q["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        save()
    save()
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
