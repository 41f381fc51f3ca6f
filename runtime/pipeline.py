"""`sdc run` / `sdc.runtime.generate`: prompt -> images from a build, without torch.

Stage order is the manifest's `pipeline` (its family's text encoders -> unet -> vae_decoder), one
stage alive at a time: each stage's session is created, used and released (`del` + gc + malloc_trim) before the
next, so the process holds one graph's weights at once (a chunked UNet under a budget: the chunks
the plan keeps resident plus one streamed; runtime/planner.py decides). Every input, and the
budget, is checked before anything is loaded.

Semantics follow diffusers' StableDiffusionPipeline so images match it given the same initial
latents: negative prompt first in the CFG batch, guidance applied only when > 1, latents scaled
by the scheduler's init sigma, VAE fed latents / scaling_factor, pixels (x / 2 + 0.5) rounded to
uint8. Seeds: image i of a batch uses seed S + i with numpy's PCG64 for its initial noise (and
then its ancestral noise), so each image reproduces alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import SdcError
from .manifest import load_manifest, stage_with
from .png import a1111_parameters

MAX_STEPS = 1000
MAX_BATCH = 64
MAX_SEED = 2**63 - 1  # numpy's PCG64 takes any non-negative int; 63 bits round-trips everywhere
MAX_SIDE = 65536  # px: bounds the planner's arithmetic; the plan refuses far smaller absurd sizes
# --init-image: 8192 x 8192. Checked from the header, before decoding: a PNG may claim any size
# in 30 bytes, and decoding 50000 x 50000 would take 7.5 GB before anything could refuse it.
MAX_INIT_PIXELS = 8192 * 8192
MIN_TILE = 8  # latents: the smallest VAE tile accepted (and planned)


@dataclass
class GenerateOptions:
    prompt: str
    artifacts: Path | None = None  # None: the most recent build under ./artifacts
    negative: str = ""
    steps: int | None = None  # None: the model's default (manifest `defaults`), else 20
    guidance: float | None = None  # classifier-free guidance; <= 1 runs the UNet on the prompt
    # only; None: the model's default (sdc-tiny: 3), else SD's 7.5
    seed: int | None = None  # None: a random seed, reported in the result
    width: int | None = None  # pixels; None: the model's native size (512 for SD1.x)
    height: int | None = None
    scheduler: str | None = None  # None: the artifact's own scheduler
    batch: int = 1
    provider: str = "auto"  # auto | cpu | cuda
    latents: np.ndarray | str | Path | None = None  # initial noise [batch, C, H/f, W/f] float32
    init_image: object = None  # path or PIL image: img2img through vae_encoder
    strength: float = 0.8  # img2img: fraction of the schedule re-noised (0, 1]
    verify: bool = True  # sha256 every artifact file before loading (False: sizes only)
    vae_tile: int | None = None  # latent tile for the VAE decode; 0 untiled; None: auto
    # (tiles of 32 above the model's native size, 64 latents for SD1.x: exact tiles cost ~1.3x
    # the untiled decode's time at 512 px and save a quarter of its peak, measured; under
    # --vram-budget the planner chooses the tile)
    cfg_split: bool | None = None  # CFG halves as two UNet passes (half the activations);
    # None: the planner decides
    vram_budget: int | str | None = None  # bytes or "4GiB": the planner keeps the run's peak
    # (device memory on CUDA, RSS above the baseline on CPU) under it, or refuses before running
    # LoRAs fused in numpy at session start (`PATH[:WEIGHT[:BLOCKS]]` strings or LoraSpec) and
    # swapped into the sessions; the build on disk is not changed
    loras: tuple = ()
    # where `<lora:NAME:WEIGHT>` tags in the prompt are looked up (runtime/prompt_loras.py)
    lora_dir: Path | None = None
    # onnxruntime intra-op threads per session; None: onnxruntime's default (every core). Pixels
    # can differ by one level between thread counts (reductions split differently), so a run
    # reproduces another's image bit for bit at the same count
    threads: int | None = None
    # per-stage execution providers over `provider` ("vae_decoder=cpu" or {stage: provider}):
    # stages on the CPU beside a CUDA run are held to host memory, not the budget (placement.py)
    stage_providers: str | dict | None = None
    # Pixel cascades (DeepFloyd IF): "I" stops after stage I (64 px), "II" (the default when the
    # build has stage II) runs it on; stage II's steps, guidance and the noise level its input
    # image is noised to (None: the model's defaults, IF's 50, 4.0 and 250)
    cascade: str | None = None
    upscale_steps: int | None = None
    upscale_guidance: float | None = None
    noise_level: int | None = None


@dataclass
class GenerateResult:
    images: list  # PIL images, each with .info["parameters"]
    seeds: list[int]
    parameters: list[str]  # the A1111 `parameters` text of each image
    timings: dict[str, float]  # seconds per stage (session creation included)
    providers: dict[str, str]  # stage -> execution provider it really ran on
    warnings: list[str] = field(default_factory=list)
    artifacts: Path | None = None
    plan: object = None  # planner.Plan (None for builds without a memory profile)
    # baseline / measured peak above it / planned peak / budget, bytes; measuring resets the
    # process's VmHWM at the start of the run (runtime/memory.py)
    memory: dict = field(default_factory=dict)
    options: object = None  # the GenerateOptions run, with the model's defaults filled in
    scheduler: str | None = None  # the sdc scheduler that ran
    interrupted: bool = False  # stopped early (A1111's interrupt): decoded from the latents reached


def resolve_artifacts(artifacts: Path | str | None) -> Path:
    if artifacts is not None:
        return Path(artifacts)
    builds = sorted(Path("artifacts").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not builds:
        raise SdcError("no builds under ./artifacts; run `sdc build` first or pass -a ARTIFACTS")
    return builds[-1].parent


def _load_latents(value, shape: tuple) -> np.ndarray:
    if isinstance(value, (str, Path)):
        try:
            # memory-mapped: the shape and dtype are checked before the data is read
            value = np.load(value, allow_pickle=False, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise SdcError(f"--latents {value}: cannot read as a .npy array ({e})") from None
    arr = np.asarray(value)
    if arr.shape != shape or arr.dtype != np.float32:
        raise SdcError(f"--latents: expected float32 {list(shape)} (batch, channels, height/f, "
                       f"width/f), found {arr.dtype} {list(arr.shape)}")
    return np.array(arr)


def _open_init_image(value):
    """The init image opened lazily (header only), refused above MAX_INIT_PIXELS before any
    pixel is decoded."""
    import re
    import warnings

    from PIL import Image, UnidentifiedImageError

    limit = f"the {MAX_INIT_PIXELS:,}-pixel limit (8192x8192); downscale it first"
    if isinstance(value, Image.Image):
        img = value
    else:
        path = Path(value)
        if not path.exists():
            raise SdcError(f"--init-image {value}: file not found; expected a PNG/JPEG/WebP file")
        if path.is_dir():
            raise SdcError(f"--init-image {value}: is a folder; expected a PNG/JPEG/WebP file")
        try:
            with warnings.catch_warnings():
                # PIL warns above its own 89 MP; ours is lower and refuses with one line below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(path)
        except Image.DecompressionBombError as e:  # PIL's hard stop (2 x 89 MP), at open
            found = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
            raise SdcError(f"--init-image {value}: its header claims {size}, over {limit}") \
                from None
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise SdcError(f"--init-image {value}: cannot read it as an image "
                           f"({e.__class__.__name__}); expected a PNG/JPEG/WebP file") from None
    w, h = img.size
    if w * h > MAX_INIT_PIXELS:
        _close_opened(img, value)
        raise SdcError(f"--init-image {value}: {w}x{h} is {w * h:,} pixels, over {limit}")
    return img


def _close_opened(img, value) -> None:
    """Close the file behind an init image this module opened (not one the caller passed)."""
    if img is not None and img is not value:
        img.close()


def _init_size(img, width: int | None, height: int | None, multiple: int) -> tuple[int, int]:
    w = width or img.width // multiple * multiple
    h = height or img.height // multiple * multiple
    if w < multiple or h < multiple:
        raise SdcError(f"--init-image: {img.width}x{img.height} is smaller than {multiple} px")
    return w, h


def init_image_rgb(img):
    """Any PIL mode -> 8-bit RGB as it looks on screen.

    PIL's own convert("RGB") clips 16-bit and 32-bit grey to 0..255 (a mid-grey 16-bit scan comes
    out white) and drops alpha, showing whatever colour transparent pixels happen to store; here
    high-bit-depth grey is scaled to 8 bits and transparency is composited over white (what A1111
    does with transparent init images)."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (PNG/TIFF/PGM open as I;16, or as I in older PIL): 0..65535 -> 0..255.
        # 32-bit 'I' data outside 16 bits is clipped: it has no agreed white point.
        grey = np.clip(np.asarray(img).astype(np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.round(grey).astype(np.uint8)).convert("RGB")
    if mode == "F":
        # float grey: 0..1 (the usual float convention) when it stays within it, else 0..255
        grey = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if grey.size and grey.max() <= 1.0 else 1.0
        return Image.fromarray(np.round(np.clip(grey * scale, 0, 255)).astype(np.uint8)) \
            .convert("RGB")
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info:  # or tRNS
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def _init_array(img, value, w: int, h: int) -> np.ndarray:
    from PIL import Image

    try:
        rgb = init_image_rgb(img)
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt data
        raise SdcError(f"--init-image {value}: cannot decode it ({e}); expected a complete "
                       "PNG/JPEG/WebP file") from None
    if (w, h) != rgb.size:
        rgb = rgb.resize((w, h), Image.LANCZOS)
    x = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return x.transpose(2, 0, 1)[None]


FALLBACK_DEFAULTS = {"steps": 20, "guidance": 7.5}  # SD1.x's usual values


def with_model_defaults(opts: GenerateOptions, manifest: dict) -> GenerateOptions:
    """Fill steps / guidance left unset from the build's model defaults, else SD1.x's."""
    own = manifest.get("defaults") or {}
    unset = {k: own.get(k, v) for k, v in FALLBACK_DEFAULTS.items() if getattr(opts, k) is None}
    return replace(opts, **unset) if unset else opts


def _validate(opts: GenerateOptions, manifest: dict) -> tuple[int, int, str]:
    from .schedulers import SCHEDULERS

    model = manifest["model"]
    multiple = model["vae_scale_factor"] * model["unet_multiple"]
    if not isinstance(opts.steps, int) or not 1 <= opts.steps <= MAX_STEPS:
        raise SdcError(f"--steps {opts.steps}: expected an integer from 1 to {MAX_STEPS}")
    if not (isinstance(opts.guidance, (int, float)) and math.isfinite(opts.guidance)
            and opts.guidance >= 0):
        raise SdcError(f"--guidance {opts.guidance}: expected a finite number >= 0 (7.5 is typical)")
    if not isinstance(opts.batch, int) or not 1 <= opts.batch <= MAX_BATCH:
        raise SdcError(f"--batch {opts.batch}: expected an integer from 1 to {MAX_BATCH}")
    if opts.seed is not None:
        if isinstance(opts.seed, bool) or not isinstance(opts.seed, int) \
                or not 0 <= opts.seed <= MAX_SEED:
            raise SdcError(f"--seed {opts.seed}: expected an integer from 0 to {MAX_SEED}")
        if opts.seed + opts.batch - 1 > MAX_SEED:
            # image i uses seed S + i, and each must be a seed --seed accepts to reproduce it
            raise SdcError(f"--seed {opts.seed} --batch {opts.batch}: the batch's last seed "
                           f"{opts.seed + opts.batch - 1} is above {MAX_SEED}, the largest "
                           f"--seed; give --seed {MAX_SEED - opts.batch + 1} or lower")
    if opts.vae_tile and opts.vae_tile < MIN_TILE:
        raise SdcError(f"--vae-tile {opts.vae_tile}: expected 0 (untiled) or >= 8 latents")
    default = model.get("default_size", 512)
    for name, v in (("width", opts.width), ("height", opts.height)):
        if v is not None and (not isinstance(v, int) or not 0 < v <= MAX_SIDE or v % multiple):
            raise SdcError(f"--{name} {v}: expected a positive multiple of {multiple} (VAE factor "
                           f"{model['vae_scale_factor']} x UNet multiple {model['unet_multiple']}) "
                           f"up to {MAX_SIDE}")
    width = opts.width or default
    height = opts.height or default
    name = opts.scheduler or _default_scheduler(manifest)
    if name not in SCHEDULERS:
        raise SdcError(f"--scheduler {name}: expected one of {', '.join(SCHEDULERS)}")
    if opts.init_image is not None:
        if not (isinstance(opts.strength, (int, float)) and 0 < opts.strength <= 1):
            raise SdcError(f"--strength {opts.strength}: expected a number in (0, 1]")
        if int(opts.steps * opts.strength) < 1:
            # img2img denoises int(steps x strength) steps (diffusers' get_timesteps, every
            # scheduler): 0 would decode the noised init image without one denoising step
            least = min_strength(opts.steps)
            raise SdcError(f"--strength {opts.strength}: with --steps {opts.steps} it leaves no "
                           f"denoising step (int({opts.steps} x {opts.strength}) = 0); expected "
                           f"--strength {least:g} or more for {opts.steps} steps, or more --steps")
        if stage_with(manifest, "encode_image") is None:
            raise SdcError("--init-image: this build has no vae_encoder graph; rebuild with the "
                           "vae_encoder stage")
    pixel = manifest["family"].get("space") == "pixel"
    needed = manifest["family"]["pipeline"]
    if pixel:  # a cascade runs the stages it has; --stages II without stage II is refused there
        _validate_cascade(opts)
        # its last stage (IF stage II) is optional: a stage I build runs alone
        needed = [s for s in needed[:-1] if manifest["family"]["roles"].get(s) != "upscale"]
        if opts.init_image is not None:
            raise SdcError("--init-image: DeepFloyd IF builds run text-to-image only in this sdc")
    elif opts.cascade is not None or opts.upscale_steps is not None or \
            opts.upscale_guidance is not None or opts.noise_level is not None:
        raise SdcError("--stages I|II, --upscale-steps, --upscale-guidance and --noise-level are "
                       "for cascaded (DeepFloyd IF) builds; this one is "
                       f"{manifest['family'].get('title', manifest['family']['name'])}")
    for stage in needed:
        if stage not in manifest["graphs"] or stage not in manifest["family"]["roles"]:
            raise SdcError(f"this build lacks the {stage} graph; rebuild with every stage")
    return width, height, name


def _validate_cascade(opts: GenerateOptions) -> None:
    if opts.upscale_steps is not None and (not isinstance(opts.upscale_steps, int)
                                           or not 1 <= opts.upscale_steps <= MAX_STEPS):
        raise SdcError(f"--upscale-steps {opts.upscale_steps}: expected an integer from 1 to "
                       f"{MAX_STEPS}")
    g = opts.upscale_guidance
    if g is not None and not (isinstance(g, (int, float)) and math.isfinite(g) and g >= 0):
        raise SdcError(f"--upscale-guidance {g}: expected a finite number >= 0 (IF uses 4)")
    n = opts.noise_level
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 1000):
        raise SdcError(f"--noise-level {n}: expected an integer from 0 to 999 (IF uses 250)")


def min_strength(steps: int) -> float:
    """The smallest --strength, to 3 decimals rounded up, that leaves one denoising step: a
    figure that, typed back, is accepted (1/3 printed as 0.333 would not be)."""
    s = math.ceil(1000 / steps) / 1000
    while int(steps * s) < 1:
        s = round(s + 0.001, 3)
    return s


def _default_scheduler(manifest: dict) -> str:
    """The sdc name of the build's own scheduler class (first match), else SD's PNDM."""
    from .schedulers import SCHEDULERS

    cls = manifest.get("scheduler", {}).get("class")
    return next((name for name, s in SCHEDULERS.items() if s.diffusers_class == cls), "pndm")


def plan_run(opts: GenerateOptions):
    """(plan, manifest, options with model defaults) for `opts` without running anything: what
    `sdc run --plan` prints. Validates the options; hashes nothing, decodes no image."""
    from .prompt_loras import resolve_tags, split_prompt

    folder = resolve_artifacts(opts.artifacts)
    manifest = load_manifest(folder)
    opts = with_model_defaults(opts, manifest)
    width, height, _ = _validate(opts, manifest)
    resolve_tags(split_prompt(opts.prompt)[1], opts.lora_dir)  # a bad <lora:...> fails now
    if opts.init_image is not None:
        multiple = manifest["model"]["vae_scale_factor"] * manifest["model"]["unet_multiple"]
        img = _open_init_image(opts.init_image)
        try:
            width, height = _init_size(img, opts.width, opts.height, multiple)
        finally:
            _close_opened(img, opts.init_image)
    return _plan(opts, manifest, width, height), manifest, opts


def _plan(opts: GenerateOptions, manifest: dict, width: int, height: int):
    from .memory import check_budget, fmt_bytes, memory_limit_bytes, parse_size
    from .planner import make_plan

    budget = opts.vram_budget
    if isinstance(budget, str):
        budget = parse_size(budget)
    elif budget is not None:
        budget = check_budget(budget)
    kw = dict(batch=opts.batch, cfg=opts.guidance > 1.0, width=width, height=height,
              steps=opts.steps, vae_tile=opts.vae_tile, cfg_split=opts.cfg_split,
              img2img=opts.init_image is not None, host=frozenset(_host_stages(opts, manifest)))
    if manifest["family"].get("space") == "pixel":
        from .cascade import cascade_stages, upscale_settings

        steps_2, guidance_2, _ = upscale_settings(opts, manifest)
        kw["cascade"] = (cascade_stages(manifest, opts.cascade), steps_2, guidance_2 > 1.0)
    plan = make_plan(manifest, budget=budget, **kw)
    # A plan above the machine's memory cannot run: refuse it now, before anything is allocated
    # (65536² would otherwise die in an allocation minutes in, or take the machine into swap).
    # Builds without a profile are checked on the arrays the run must hold whatever the graphs
    # need: latents, and decoded float pixels (3 x 4 bytes a pixel) plus the uint8 images.
    limit = memory_limit_bytes()
    peak = plan.peak if plan is not None else opts.batch * width * height * 15
    if limit is not None and peak > limit:
        hint = "lower --width/--height/--batch"
        if plan is not None and budget is None:
            try:
                make_plan(manifest, budget=limit, **kw)
                hint = (f"give --vram-budget {limit // 2**20}MiB for a slower plan that fits, "
                        f"or {hint}")
            except SdcError:
                pass
        raise SdcError(f"{width}x{height}, batch {opts.batch}: the planned peak "
                       f"{fmt_bytes(peak)} is more than this machine's {fmt_bytes(limit)} of "
                       f"memory, the most a run can hold; {hint}")
    return plan


def _host_stages(opts: GenerateOptions, manifest: dict) -> set[str]:
    from .placement import host_stages, parse_stage_providers

    placed = parse_stage_providers(opts.stage_providers, manifest["graphs"])
    if not placed:
        return set()
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    return host_stages(opts.provider, placed, cuda)


def run_pipeline(opts: GenerateOptions, log: Callable[[str], None] | None = None,
                 progress: Callable[[str, int, int], None] | None = None,
                 observe: Callable[[str, dict], None] | None = None) -> GenerateResult:
    """One request on a one-shot Engine (runtime/engine.py): every input is checked before any
    file is hashed, then each stage's session is created, used and released in turn."""
    from .engine import Engine

    engine = Engine(opts.artifacts, provider=opts.provider, lora_dir=opts.lora_dir,
                    threads=opts.threads, stage_providers=opts.stage_providers)
    try:
        job = engine.prepare(opts)
        engine.verify(hashes=opts.verify)
        return engine.run(job, log=log, progress=progress, observe=observe)
    finally:
        engine.close()


def _to_images(pixels, opts, manifest, seeds, width, height, sched_name, truncated, swapped=()):
    from PIL import Image

    base = manifest["base_model"]
    images, params = [], []
    for px, seed in zip(pixels, seeds):
        arr = np.clip(px[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1)
        img = Image.fromarray((arr * 255).round().astype(np.uint8))
        text = a1111_parameters({
            "prompt": opts.prompt, "negative": opts.negative, "steps": opts.steps,
            "scheduler": sched_name, "guidance": opts.guidance, "seed": seed, "width": width,
            "height": height, "model": base["name"],
            "model_hash": base.get("a1111_hash") or base["sha256"][:10],
            "loras": [(lo.get("name"), lo.get("weight"))
                      for lo in list(manifest.get("loras", [])) + list(swapped)],
            "strength": opts.strength if opts.init_image is not None else None,
            "truncated": truncated, "version": f"sdc {__version__}",
        })
        img.info["parameters"] = text
        images.append(img)
        params.append(text)
    return images, params


def generate(prompt: str, **kwargs) -> list:
    """Python API: the same options as `sdc run`, returning PIL images (with .info["parameters"])."""
    return run_pipeline(GenerateOptions(prompt=prompt, **kwargs)).images
