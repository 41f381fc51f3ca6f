"""The model card of a trained sdc-tiny folder (README.md), rendered from what the folder records.

`train_tiny.py` writes training.json (config, architecture, parameter counts, seconds, losses);
`bench/tiny_eval.py --record` writes evaluation.json (colour / background / shape correctness
through the ONNX path). The card is regenerated from those two files and the sha256 of every file
the model is made of, so it can never disagree with them. numpy-free, torch-free.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CARD = "README.md"
TRAINING = "training.json"
EVALUATION = "evaluation.json"
DEFAULTS = "sdc.json"
_NOT_MODEL = {CARD, TRAINING, EVALUATION}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_files(folder: Path) -> list[Path]:
    """Every file that defines the model (weights, configs, tokenizer, defaults), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in _NOT_MODEL)


def render(folder: Path) -> str:
    folder = Path(folder)
    t = json.loads((folder / TRAINING).read_text())
    ev = json.loads((folder / EVALUATION).read_text()) if (folder / EVALUATION).is_file() else None
    defaults = json.loads((folder / DEFAULTS).read_text()).get("defaults", {}) \
        if (folder / DEFAULTS).is_file() else {}
    cfg, sec, loss = t["config"], t["seconds"], t["loss"]
    files = model_files(folder)
    total = sum(p.stat().st_size for p in files)
    lines = [
        "# sdc-tiny",
        "",
        "sdc's built-in model: a Stable Diffusion v1 architecture (CLIP text encoder, cross-attention "
        "UNet, KL VAE) at toy size, trained by sdc itself on procedurally drawn pictures so that "
        "`sdc build` with no MODEL makes images that follow the prompt, offline. It draws one "
        "coloured shape on a coloured background at 64 x 64 px, nothing else.",
        "",
        "## Data",
        f"{cfg['images']} pictures from `training/shapes.py` (seed {cfg['seed']}): 6 shapes (circle, "
        "square, triangle, star, ring, cross), 8 colours, plain / striped / gradient backgrounds, "
        "position and size varied, upright within 10 degrees; captions such as "
        + ", ".join(f'"{c}"' for c in t["example_captions"][:3]) + ".",
        "",
        "## Architecture",
        "| part | parameters | config |",
        "|---|---|---|",
    ]
    for part, p in t["params"].items():
        conf = t["architecture"][part]
        brief = {k: conf[k] for k in ("block_out_channels", "hidden_size", "num_hidden_layers",
                                      "latent_channels", "cross_attention_dim") if k in conf}
        lines.append(f"| {part} | {p:,} | {json.dumps(brief)} |")
    lines += [
        "",
        f"Tokenizer: CLIP BPE cut to the captions' merges, {t['vocab_size']} tokens. VAE factor 4 "
        f"(64 px <-> 4 x 16 x 16 latents), scaling_factor {t['scaling_factor']}. Scheduler: PNDM "
        "on SD1's betas, v-prediction.",
        "",
        "## Training (`make tiny-model`, `training/train_tiny.py`)",
        f"- VAE: {cfg['vae_steps']} steps x {cfg['vae_batch']}, lr {cfg['vae_lr']}, L1 + MSE + "
        f"{cfg['kl_weight']} KL; final loss {loss['vae_final']}; {sec['vae']} s.",
        f"- UNet + text encoder: {cfg['unet_steps']} steps x {cfg['unet_batch']}, AdamW lr "
        f"{cfg['unet_lr']}, min-SNR-{cfg['min_snr']:g}, EMA {cfg['ema']}, caption dropout "
        f"{cfg['caption_dropout']}; v-MSE {loss['unet_v_mse_first']} -> "
        f"{loss['unet_v_mse_final']}; {sec['unet_text_encoder']} s.",
        f"- Total {sec['total']} s ({sec['total'] / 60:.1f} min) on {t.get('machine', t['device'])}"
        + (f"; peak RSS {t['peak_rss_gib']} GiB" if t.get("peak_rss_gib") else "") + ".",
        "",
        "## Use",
        "Recommended: " + (", ".join(f"{k} {v}" for k, v in defaults.items()) or "SD1 defaults")
        + " (in `sdc.json`; the build copies them into its manifest and `sdc run` uses them unless "
        "flags say otherwise). Higher guidance (SD's 7.5) over-saturates this model.",
        "",
        "## Evaluation (`bench/tiny_eval.py`, through `sdc build` + `sdc run`)",
    ]
    if ev:
        lines += [
            f"{ev['n']} prompt/seed pairs covering every shape and colour, {ev['steps']} steps, "
            f"guidance {ev['guidance']}, scored by `training/shape_score.py`:",
            "",
            "| colour | background | shape | all three |",
            "|---|---|---|---|",
            f"| {ev['colour']:.1f} % | {ev['background']:.1f} % | {ev['shape']:.1f} % | "
            f"{ev['all']:.1f} % |",
        ]
        if ev.get("per_shape"):
            lines += ["", "Shape correct per shape: " + ", ".join(
                f"{k} {v:.0f} %" for k, v in ev["per_shape"].items()) + "."]
    else:
        lines.append("Not evaluated yet: run `python bench/tiny_eval.py MODEL --record`.")
    lines += [
        "",
        f"## Files ({total / 1e6:.2f} MB, sha256)",
        "| file | bytes | sha256 |",
        "|---|---|---|",
        *(f"| {p.relative_to(folder)} | {p.stat().st_size} | `{_sha256(p)}` |" for p in files),
        "",
    ]
    return "\n".join(lines)


def write_card(folder: Path) -> Path:
    path = Path(folder) / CARD
    path.write_text(render(folder))
    return path
