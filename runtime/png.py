"""PNG output with A1111's `parameters` text chunk, the de-facto metadata format that
A1111, ComfyUI and Civitai read back ("PNG info"): prompt, then `Negative prompt: ...`, then one
line of `Key: value` pairs."""

from __future__ import annotations

from pathlib import Path

# sdc scheduler name -> the sampler name A1111 writes (PLMS is A1111's name for SD's PNDM).
A1111_SAMPLERS = {"ddim": "DDIM", "pndm": "PLMS", "euler": "Euler", "euler-a": "Euler a",
                  "dpmpp-2m": "DPM++ 2M", "dpmpp-2m-karras": "DPM++ 2M Karras", "lms": "LMS"}


def a1111_parameters(p: dict) -> str:
    """p: prompt, negative, steps, scheduler, guidance, seed, width, height, model, model_hash,
    loras (list of (name, weight)), strength (img2img or None), version."""
    fields = [
        ("Steps", p["steps"]), ("Sampler", A1111_SAMPLERS.get(p["scheduler"], p["scheduler"])),
        ("CFG scale", p["guidance"]), ("Seed", p["seed"]), ("Size", f"{p['width']}x{p['height']}"),
    ]
    if p.get("model_hash"):
        fields.append(("Model hash", p["model_hash"]))
    fields.append(("Model", p["model"]))
    if p.get("strength") is not None:
        fields.append(("Denoising strength", p["strength"]))
    if p.get("loras"):
        fields.append(("Lora weights", ", ".join(f"{n}: {w}" for n, w in p["loras"])))
    if p.get("truncated"):
        fields.append(("Prompt truncated", "yes"))
    fields.append(("Version", p["version"]))
    text = p["prompt"]
    if p.get("negative"):
        text += f"\nNegative prompt: {p['negative']}"
    return text + "\n" + ", ".join(f"{k}: {_quote(v)}" for k, v in fields)


def _quote(value) -> str:
    s = str(value)
    return f'"{s}"' if ("," in s or ":" in s) and not s.startswith('"') else s


def save_png(image, path: Path, parameters: str) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)  # never leave a half-written PNG under the final name
    return path
