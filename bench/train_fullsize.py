"""Memory and time of a LoRA training step on the full-size SD1.5 architecture (random weights), at
512 x 512, rank 8, batch 1: sdc's recipe against a plain diffusers + peft loop, each in its own
subprocess so the peak RSS (getrusage of the finished child, from the OS) is that run's alone.

  plain diffusers   what a user writes from diffusers' LoRA example: UNet, VAE and text encoder
                    loaded, each step encodes its image and caption, AdamW, no checkpointing
  sdc train-lora    the CLI: cached latents and text states (VAE and text encoder released
                    before the UNet trains), Adafactor, gradient checkpointing
  sdc, no ckpt      the same without gradient checkpointing

The seed's claim for its recipe is ~3.5-3.8 GB of *VRAM* with fp16 weights; on this CPU machine
everything is fp32 (half-precision training is for CUDA), so weights alone are twice that.

    python bench/train_fullsize.py [--work DIR] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "train_fullsize.json"
sys.path.insert(0, str(HERE.parent.parent))

PLAIN = r"""
import sys, time, json, numpy as np, torch
from PIL import Image
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
from peft import LoraConfig
model, data, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
te = CLIPTextModel.from_pretrained(model + "/text_encoder")
tok = CLIPTokenizer.from_pretrained(model + "/tokenizer")
noise = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
for m in (unet, vae, te): m.requires_grad_(False)
unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                            init_lora_weights="gaussian"))
params = [p for p in unet.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
img = torch.from_numpy(np.asarray(Image.open(data + "/seal-000.png").convert("RGB"), np.float32)
                       .transpose(2, 0, 1)[None] / 127.5 - 1)
caption = open(data + "/seal-000.txt").read().strip()
torch.manual_seed(0)
t0 = None
for step in range(steps):
    if step == 1: t0 = time.perf_counter()
    with torch.no_grad():
        x0 = vae.encode(img).latent_dist.sample() * vae.config.scaling_factor
        cond = te(tok([caption], padding="max_length", max_length=77, return_tensors="pt").input_ids).last_hidden_state
    t = torch.randint(0, 1000, (1,)); eps = torch.randn_like(x0)
    loss = torch.nn.functional.mse_loss(unet(noise.add_noise(x0, eps, t), t, cond).sample, eps)
    loss.backward(); opt.step(); opt.zero_grad()
print(json.dumps({"step_seconds": (time.perf_counter() - t0) / (steps - 1)}))
"""


SDC = r"""
import json, sys
from sdc.training.config import LoraConfig, resolve
from sdc.training.lora_train import train_lora
flags = json.loads(sys.argv[1])
r = train_lora(resolve(LoraConfig, None, flags), log=lambda m: None)
r["step_seconds"] = round(r["train_seconds"] / flags["steps"], 2)
print(json.dumps(r))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdc-bench")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    from build_fullsize import MAKE_MODEL
    from run_fullsize import run  # a child's wall time and its own peak RSS (wait4)

    model = args.work / "sd15-random"
    if not (model / "model_index.json").exists():
        run([sys.executable, "-c", MAKE_MODEL, str(model)])
    from PIL import Image

    from sdc.training.emblem import write_seal_folder

    data = args.work / "seal-512"
    write_seal_folder(data, 4, seed=0)
    for p in data.glob("*.png"):
        Image.open(p).resize((512, 512), Image.Resampling.NEAREST).save(p)
    common = {"model": str(model), "data": str(data), "trigger": "sks seal", "rank": 8,
              "batch_size": 1, "steps": args.steps, "samples": False, "resolution": 512,
              "cache_dir": str(args.work / "bench-cache")}
    plan = {
        "sdc train-lora (cached latents, Adafactor, checkpointing)":
            [sys.executable, "-c", SDC, json.dumps({**common, "out": str(args.work / "a.safetensors")})],
        "sdc train-lora, no gradient checkpointing":
            [sys.executable, "-c", SDC, json.dumps({**common, "gradient_checkpointing": False,
                                                     "out": str(args.work / "b.safetensors")})],
        "plain diffusers + peft loop (VAE + text encoder resident, AdamW, no checkpointing)":
            [sys.executable, "-c", PLAIN, str(model), str(data), str(args.steps)],
    }
    runs = {}
    for name, cmd in plan.items():
        r = run(cmd)
        runs[name] = {k: r[k] for k in ("wall_s", "peak_rss_gib", "step_seconds") if k in r}
        print(name, runs[name], flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": f"{os.cpu_count()} cores, fp32 CPU",
                                   "steps": args.steps, "resolution": 512, "rank": 8,
                                   "runs": runs}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
