"""AUTOMATIC1111's txt2img / img2img request fields mapped to GenerateOptions, and its responses.

Every field A1111's API models define falls in one of three groups:
  SUPPORTED   mapped onto sdc's options (prompt, seed, sampler, steps, size, batch, LoRA tags...)
  NO_OP       accepted at the value that leaves the image as it is (webuiapi sends all of them:
              enable_hr=False, restore_faces=False, subseed_strength=0, s_noise=1, ...); any other
              value changes the image in A1111, so it is refused by name, never silently ignored
  IGNORED     fields with no effect on the image (save flags, ids, hires settings while
              enable_hr is false)
A field outside all three is accepted only when it is empty (None, False, 0, "", [] or {}): a
newer client's default passes, an extension's real argument is refused by name.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import time
from dataclasses import dataclass

from ..errors import SdcError

# A1111 sampler name -> sdc scheduler (PLMS is A1111's name for SD's PNDM).
SAMPLERS = {"Euler a": "euler-a", "Euler": "euler", "LMS": "lms", "DDIM": "ddim", "PLMS": "pndm",
            "DPM++ 2M": "dpmpp-2m", "DPM++ 2M Karras": "dpmpp-2m-karras"}
ALIASES = {sdc: a1111 for a1111, sdc in SAMPLERS.items()}  # sdc names work too
SCHEDULERS = {"automatic": None, "karras": "karras"}  # A1111 >= 1.9's separate "scheduler" field

EMPTY = (None, False, 0, 0.0, "", [], {})
# field -> the values that leave the image unchanged
NO_OP = {
    "enable_hr": (False, None), "restore_faces": (False, None), "tiling": (False, None),
    "subseed_strength": (0, 0.0, None), "seed_resize_from_h": (-1, 0, None),
    "seed_resize_from_w": (-1, 0, None), "styles": ([], None), "script_name": (None, ""),
    "script_args": ([], None), "alwayson_scripts": ({}, None), "s_churn": (0, 0.0, None),
    "s_tmin": (0, 0.0, None), "s_tmax": (0, 0.0, None, math.inf), "s_noise": (1, 1.0, None),
    "s_min_uncond": (0, 0.0, None), "mask": (None, ""), "latent_mask": (None, ""),
    "initial_noise_multiplier": (1, 1.0, None), "refiner_checkpoint": (None, ""),
    "disable_extra_networks": (False, None), "resize_mode": (0, None),
    "include_init_images": (False, None), "save_images": (False, None),
    "firstpass_image": (None, ""),
}
WHY = {
    "enable_hr": "hires fix (a second, upscaled pass)", "restore_faces": "face restoration",
    "tiling": "seamless tiling", "subseed_strength": "variation seeds", "styles": "saved styles",
    "seed_resize_from_h": "seed resize", "seed_resize_from_w": "seed resize",
    "script_name": "scripts", "script_args": "scripts", "alwayson_scripts": "extension scripts",
    "mask": "inpainting", "latent_mask": "inpainting", "refiner_checkpoint": "a refiner model",
    "resize_mode": "resize modes other than 0 (just resize)",
    "include_init_images": "returning the init images", "save_images": "saving on the server",
    "disable_extra_networks": "ignoring <lora:...> tags", "firstpass_image": "hires fix",
}
IGNORED = {
    "negative_prompt", "do_not_save_samples", "do_not_save_grid", "send_images", "subseed",
    "override_settings_restore_afterwards", "sampler_index", "denoising_strength", "hr_scale",
    "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
    "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_additional_modules",
    "firstphase_width", "firstphase_height", "force_task_id", "infotext", "comments", "user",
    "mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res",
    "inpaint_full_res_padding", "inpainting_mask_invert", "image_cfg_scale", "refiner_switch_at",
    "eta", "sampler_name", "scheduler", "prompt", "seed", "steps", "cfg_scale", "width", "height",
    "batch_size", "n_iter", "override_settings", "init_images", "model",
}
# override_settings keys: value -> what it must be for sdc's image to be A1111's
OVERRIDES_NO_OP = {"CLIP_stop_at_last_layers": (1, None), "sd_vae": ("Automatic", "None", None),
                   "eta_noise_seed_delta": (0, None)}


@dataclass
class Limits:
    max_steps: int = 150
    max_side: int = 2048  # px per side
    max_images: int = 16  # batch_size x n_iter per request
    max_prompt: int = 16_384  # characters (CLIP reads 77 tokens; the rest is truncated)


@dataclass
class Request:
    """A validated A1111 request, in sdc's terms."""

    kind: str  # txt2img | img2img
    prompt: str
    negative: str
    seed: int | None
    scheduler: str | None  # sdc name; None: the build's own
    sampler_name: str | None  # as A1111 names it (for the infotext)
    steps: int | None
    guidance: float | None
    width: int | None
    height: int | None
    batch: int
    n_iter: int
    model: str | None  # override_settings.sd_model_checkpoint
    strength: float
    init_image: object  # PIL image (img2img) or None
    send_images: bool
    raw: dict  # the request as sent (A1111 echoes it as `parameters`)


def _same(value, v) -> bool:
    """value == v, with True/False never standing in for 1/0 (or the reverse)."""
    return value is v or (value == v and isinstance(value, bool) == isinstance(v, bool))


def refuse(field: str, value, why: str) -> SdcError:
    shown = json.dumps(value)[:60] if not isinstance(value, str) else repr(value[:60])
    return SdcError(f"{field}={shown}: {why}; sdc serve does not do it, so the image would not "
                    "be A1111's")


def _int(body: dict, key: str, lo: int, hi: int, default=None):
    v = body.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v != int(v):
        raise SdcError(f"{key}={v!r}: expected an integer from {lo} to {hi}")
    v = int(v)
    if not lo <= v <= hi:
        raise SdcError(f"{key}={v}: expected an integer from {lo} to {hi}")
    return v


def _float(body: dict, key: str, lo: float, hi: float):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not lo <= v <= hi:
        raise SdcError(f"{key}={v!r}: expected a number from {lo:g} to {hi:g}")
    return float(v)


def _str(body: dict, key: str, limit: int) -> str:
    v = body.get(key) or ""
    if not isinstance(v, str):
        raise SdcError(f"{key}: expected a string, found {type(v).__name__}")
    if len(v) > limit:
        raise SdcError(f"{key}: {len(v)} characters, over the limit of {limit}")
    return v


def sampler(name, scheduler=None) -> tuple[str | None, str | None]:
    """(sdc scheduler, A1111 sampler name) for an A1111 sampler_name + scheduler."""
    if name in (None, ""):
        return None, None
    if not isinstance(name, str):
        raise SdcError(f"sampler_name: expected a string, found {type(name).__name__}")
    a1111 = name if name in SAMPLERS else ALIASES.get(name)
    if a1111 is None:
        raise SdcError(f"sampler_name={name!r}: expected one of {', '.join(SAMPLERS)}")
    sched = (scheduler or "automatic")
    if not isinstance(sched, str) or sched.lower() not in SCHEDULERS:
        raise SdcError(f"scheduler={scheduler!r}: expected Automatic (or Karras with DPM++ 2M)")
    if SCHEDULERS[sched.lower()] == "karras" and a1111 != "DPM++ 2M Karras":
        if a1111 != "DPM++ 2M":
            raise SdcError(f"scheduler={scheduler!r} with sampler {a1111}: Karras sigmas exist "
                           "here only for DPM++ 2M")
        a1111 = "DPM++ 2M Karras"
    return SAMPLERS[a1111], a1111


def parse(body, kind: str, limits: Limits) -> Request:
    """Validate an A1111 txt2img/img2img JSON body; SdcError (a one-line reason) otherwise."""
    if not isinstance(body, dict):
        raise SdcError(f"expected a JSON object, found {type(body).__name__}")
    for key, value in body.items():
        if key in NO_OP:
            if not any(_same(value, v) for v in NO_OP[key]):
                raise refuse(key, value, WHY.get(key, "an option"))
        elif key not in IGNORED and not any(_same(value, e) for e in EMPTY):
            raise refuse(key, value, "an unknown option (extension or newer A1111 field)")
    if kind == "txt2img" and body.get("init_images"):
        raise SdcError("init_images: only /sdapi/v1/img2img takes an init image")
    steps = _int(body, "steps", 1, limits.max_steps)
    width = _int(body, "width", 8, limits.max_side)
    height = _int(body, "height", 8, limits.max_side)
    batch = _int(body, "batch_size", 1, limits.max_images) or 1
    n_iter = _int(body, "n_iter", 1, limits.max_images) or 1
    if batch * n_iter > limits.max_images:
        raise SdcError(f"batch_size {batch} x n_iter {n_iter} = {batch * n_iter} images, over the "
                       f"limit of {limits.max_images} per request")
    seed = body.get("seed", -1)
    if seed in (None, -1):
        seed = None
    else:
        seed = _int(body, "seed", 0, 2**63 - 1 - limits.max_images)
    name = body.get("sampler_name") or body.get("sampler_index")
    sched, a1111 = sampler(name, body.get("scheduler"))
    eta = body.get("eta")
    if sched == "ddim" and eta not in (None, 0, 0.0):
        raise refuse("eta", eta, "DDIM with eta > 0 (sdc's DDIM is the deterministic eta 0); "
                     "send eta 0 or use another sampler")
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise SdcError("override_settings: expected an object")
    model = None
    for key, value in overrides.items():
        if key == "sd_model_checkpoint":
            if not isinstance(value, str) or not value:
                raise SdcError("override_settings.sd_model_checkpoint: expected a model title")
            model = value
        elif key in OVERRIDES_NO_OP:
            if value not in OVERRIDES_NO_OP[key]:
                raise refuse(f"override_settings.{key}", value, "a setting that changes the image")
        else:
            raise refuse(f"override_settings.{key}", value, "a setting sdc serve does not have")
    strength, init = 0.75, None
    if kind == "img2img":
        strength = _float(body, "denoising_strength", 0.0, 1.0)
        strength = 0.75 if strength is None else strength
        if strength <= 0:
            raise SdcError("denoising_strength=0: leaves the init image as it is; expected (0, 1]")
        images = body.get("init_images")
        if not isinstance(images, list) or len(images) != 1:
            raise SdcError("init_images: expected a list with one base64 image (sdc serve takes "
                           f"one init image per request), found {_count(images)}")
        init = decode_image(images[0], "init_images[0]")
    return Request(kind, _str(body, "prompt", limits.max_prompt),
                   _str(body, "negative_prompt", limits.max_prompt), seed, sched, a1111, steps,
                   _float(body, "cfg_scale", 0.0, 100.0), width, height, batch, n_iter, model,
                   strength, init, body.get("send_images", True) is not False, body)


def _count(value) -> str:
    return f"{len(value)} items" if isinstance(value, list) else type(value).__name__


def decode_image(data, what: str):
    """A base64 image (optionally a data: URL) opened lazily; its size is checked by the runtime
    from the header before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str):
        raise SdcError(f"{what}: expected a base64 string, found {type(data).__name__}")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SdcError(f"{what}: not valid base64") from None
    try:
        img = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise SdcError(f"{what}: not a readable PNG/JPEG/WebP image ({type(e).__name__})") from None
    return img


def encode_png(img) -> str:
    """base64 PNG with the image's A1111 `parameters` text chunk."""
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    if img.info.get("parameters"):
        meta.add_text("parameters", img.info["parameters"])
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode()


def info(req: Request, results: list, model: dict, version: str) -> dict:
    """A1111's `info` object for the images of `results` (GenerateResults, one per iteration)."""
    seeds = [s for r in results for s in r.seeds]
    infotexts = [p for r in results for p in r.parameters]
    warnings = [w for r in results for w in r.warnings]
    first = results[0] if results else None
    prompt_seed = seeds[0] if seeds else req.seed
    opts = first.options if first else None
    used = ALIASES.get(first.scheduler) if first else None
    return {
        "prompt": req.prompt, "all_prompts": [req.prompt] * len(seeds),
        "negative_prompt": req.negative, "all_negative_prompts": [req.negative] * len(seeds),
        "seed": prompt_seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": first.images[0].width if first and first.images else None,
        "height": first.images[0].height if first and first.images else None,
        "sampler_name": used or req.sampler_name,
        "cfg_scale": opts.guidance if opts else req.guidance,
        "steps": opts.steps if opts else req.steps,
        "batch_size": req.batch, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model["model_name"], "sd_model_hash": model["hash"],
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": req.strength if req.kind == "img2img" else None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts,
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": version,
        "sdc": {"timings": [r.timings for r in results], "memory": [r.memory for r in results],
                "warnings": warnings, "interrupted": any(r.interrupted for r in results)},
    }
