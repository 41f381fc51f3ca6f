"""Benchmark the three ways to apply a LoRA on the full-size SD1.5 architecture (random weights):
a rank-32 adapter on every attention projection and every resnet conv of the UNet.

  full build   `sdc build MODEL --precision fp32 --lora L` (torch: load, fuse, export, parity)
  re-fuse      `sdc build --from BASE --lora L` (numpy: copy the base build, patch changed weights)
  swap at run  fuse in numpy + create the UNet session with add_external_initializers, against
               creating the same session without the adapter

Each in its own subprocess; peak RSS is the child's own (wait4). Needs the folders
bench/build_fullsize.py leaves with --keep (sd15-random, sd15-fp32).

    python bench/lora_fullsize.py --work /tmp/sdc-bench
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from run_fullsize import run  # noqa: E402

RESULTS = HERE / "results" / "lora_fullsize.json"

MAKE_LORA = r"""
import sys, torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
torch.manual_seed(0)
unet = UNet2DConditionModel.from_pretrained(sys.argv[1], subfolder="unet")
cfg = LoraConfig(r=32, lora_alpha=16, init_lora_weights=False,
                 target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
unet.add_adapter(cfg)
with torch.no_grad():
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.mul_(0.05)
StableDiffusionPipeline.save_lora_weights(sys.argv[2], unet_lora_layers=get_peft_model_state_dict(unet),
    unet_lora_adapter_metadata=cfg.to_dict(), weight_name="rank32.safetensors")
"""

SWAP = r"""
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
from sdc.runtime.manifest import load_manifest
from sdc.runtime.sessions import open_session
art, lora, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
m = load_manifest(art)
fused, fuse_s = None, 0.0
if mode == "swap":
    from sdc.fusion.artifact import prepare
    from sdc.fusion.fuse import parse_lora_arg
    t = time.perf_counter()
    fused, _ = prepare(art, m, [parse_lora_arg(lora)])
    fuse_s = time.perf_counter() - t
t = time.perf_counter()
s = open_session(art, "unet", m["graphs"]["unet"], "cpu", initializers=(fused or {}).get("unet"))
print(json.dumps({"fuse_s": round(fuse_s, 1), "session_s": round(time.perf_counter() - t, 1),
                  "weights_swapped": len((fused or {}).get("unet", {}))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdc-bench"))
    args = ap.parse_args()
    model, base = args.work / "sd15-random", args.work / "sd15-fp32"
    if not (base / "manifest.json").is_file():
        sys.exit(f"{base}: no build; run bench/build_fullsize.py --work {args.work} --keep first")
    py = sys.executable
    lora = args.work / "lora" / "rank32.safetensors"
    if not lora.is_file():
        run([py, "-c", MAKE_LORA, str(model), str(lora.parent)])
    sdc = [py, "-m", "sdc.cli.main"]
    res = {"lora": {"file": str(lora), "bytes": lora.stat().st_size, "rank": 32,
                    "targets": "to_q, to_k, to_v, to_out.0, resnet conv1, conv2 (UNet)"}}
    print("full build ...", flush=True)
    res["full_build"] = run(sdc + ["build", str(model), "--precision", "fp32", "--lora", str(lora),
                                   "--out", str(args.work / "sd15+lora-fp32"), "--force"])
    print("re-fuse ...", flush=True)
    res["refuse"] = run(sdc + ["build", "--from", str(base), "--lora", str(lora), "--out",
                               str(args.work / "sd15+lora-refused"), "--force"])
    print("swap ...", flush=True)
    res["session_base"] = run([py, "-c", SWAP, str(base), str(lora), "base"])
    res["session_swap"] = run([py, "-c", SWAP, str(base), str(lora), "swap"])
    res["refuse"]["vs_full_build"] = round(res["refuse"]["wall_s"] / res["full_build"]["wall_s"], 3)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
