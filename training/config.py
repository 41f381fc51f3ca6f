"""Effective configuration of a training run: defaults < config file (TOML or JSON) < flags.

A config file holds the same keys as the flags (dashes or underscores), so a run can be written
down once and repeated (`--print-config` prints the effective config as JSON, itself a valid
config file). Every value is checked here, before any model loads.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import SdcError

OPTIMIZERS = ("adafactor", "adamw", "adamw8bit")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TARGETS = ("attn", "attn+conv")
CROPS = ("center", "random")


@dataclass
class CommonConfig:
    model: str | None = None  # None: the built-in sdc-tiny
    data: str | None = None
    out: str | None = None
    instance_prompt: str | None = None
    reg_data: str | None = None  # prior preservation: pictures + captions without the trigger,
    # trained alongside so that prompts without it keep the base model's behaviour
    steps: int = 500
    lr: float = 1e-4
    optimizer: str = "adafactor"
    lr_schedule: str = "constant"
    warmup: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    resolution: int | None = None  # None: the model's native size
    crop: str = "center"
    crops: int = 2  # random crop: offsets drawn per image (each cached once)
    flip: bool = False
    mixed_precision: str = "auto"  # auto: bf16 on CUDA where supported, else fp16; fp32 on CPU
    gradient_checkpointing: bool = True
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0: only at the end
    validate_every: int = 0  # steps; 0: only the final sample grid
    samples: bool = True  # the final sample grid (OUT.samples.png)
    validation_steps: int = 20  # denoising steps of the validation images
    validation_guidance: float | None = None  # None: the model's default (sdc-tiny 3, SD 7.5)
    cache_dir: str | None = None  # None: <out>.cache next to the output
    device: str = "auto"


@dataclass
class LoraConfig(CommonConfig):
    trigger: str | None = None
    rank: int = 8
    alpha: float | None = None  # None: = rank (scale 1)
    targets: str = "attn"
    train_text_encoder: bool = False


@dataclass
class EmbeddingConfig(CommonConfig):
    token: str | None = None
    init_word: str | None = None
    vectors: int = 1
    lr: float = 5e-3
    optimizer: str = "adamw"


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise SdcError(f"--config {path}: cannot read it ({e.strerror})") from None
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise SdcError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}"
                       f" ({e}); fix the file") from None
    if not isinstance(raw, dict):
        raise SdcError(f"--config {path}: expected a table of settings, found {type(raw).__name__}")
    return {k.replace("-", "_"): v for k, v in raw.items()}


def resolve(cls, config_file: str | Path | None, flags: dict, complete: bool = True):
    """Merge defaults, the config file and the flags given (None = not given) into `cls`;
    `complete=False` (for --print-config) skips the checks for required settings."""
    known = {f.name: f for f in fields(cls)}
    merged = {}
    if config_file:
        from_file = _read_file(Path(config_file))
        unknown = sorted(set(from_file) - set(known))
        if unknown:
            raise SdcError(f"--config {config_file}: unknown setting(s) {', '.join(unknown)}; "
                           f"expected some of {', '.join(known)}")
        merged.update(from_file)
    merged.update({k: v for k, v in flags.items() if v is not None})
    cfg = cls(**merged)
    check(cfg, complete)
    return cfg


def _fail(name: str, value, expected: str):
    raise SdcError(f"--{name.replace('_', '-')} {value!r}: expected {expected}")


def check(cfg: CommonConfig, complete: bool = True) -> None:
    for name, lo in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup", 0),
                     ("crops", 1), ("checkpoint_every", 0), ("validate_every", 0),
                     ("validation_steps", 1), ("seed", 0)):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            _fail(name, v, f"an integer >= {lo}")
    if not (isinstance(cfg.lr, (int, float)) and 0 < cfg.lr < 1):
        _fail("lr", cfg.lr, "a learning rate in (0, 1), e.g. 1e-4")
    for name, allowed in (("optimizer", OPTIMIZERS), ("lr_schedule", SCHEDULES),
                          ("mixed_precision", PRECISIONS), ("crop", CROPS)):
        if getattr(cfg, name) not in allowed:
            _fail(name, getattr(cfg, name), "one of " + ", ".join(allowed))
    if cfg.resolution is not None and (not isinstance(cfg.resolution, int) or cfg.resolution < 8):
        _fail("resolution", cfg.resolution, "a size in pixels >= 8")
    for name in ("data", "out") if complete else ():
        if not getattr(cfg, name):
            raise SdcError(f"--{name} is required (as a flag or in the config file)")
    if cfg.out and not str(cfg.out).endswith(".safetensors"):
        _fail("out", cfg.out, "a path ending in .safetensors")
    if isinstance(cfg, LoraConfig):
        if isinstance(cfg.rank, bool) or not isinstance(cfg.rank, int) or cfg.rank < 1:
            _fail("rank", cfg.rank, "an integer >= 1 (4-32 is usual)")
        if cfg.alpha is not None and not (isinstance(cfg.alpha, (int, float)) and cfg.alpha > 0):
            _fail("alpha", cfg.alpha, "a number > 0 (default: the rank)")
        if cfg.targets not in TARGETS:
            _fail("targets", cfg.targets, "one of " + ", ".join(TARGETS))
        if complete and (not cfg.trigger or not cfg.trigger.strip()):
            raise SdcError("--trigger is required: the word(s) that call the LoRA up in a prompt")
    if isinstance(cfg, EmbeddingConfig):
        if (complete or cfg.token) and (not cfg.token or len(cfg.token.split()) != 1):
            _fail("token", cfg.token, "one placeholder word, e.g. '<sks>'")
        if (complete or cfg.init_word) and (not cfg.init_word or len(cfg.init_word.split()) != 1):
            _fail("init_word", cfg.init_word, "one ordinary word the model knows, e.g. 'seal'")
        if isinstance(cfg.vectors, bool) or not isinstance(cfg.vectors, int) \
                or not 1 <= cfg.vectors <= 16:
            _fail("vectors", cfg.vectors, "an integer from 1 to 16")


def as_json(cfg: CommonConfig) -> str:
    return json.dumps(asdict(cfg), indent=1)
