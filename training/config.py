"""Effective configuration of a training run: defaults < config file (TOML or JSON) < flags.

A config file holds the same keys as the flags (dashes or underscores), so a run can be written
down once and repeated (`--print-config` prints the effective config as JSON, itself a valid
config file). Every value is checked here, before any model loads.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import SdcError

OPTIMIZERS = ("adafactor", "adamw", "adamw8bit")
SCHEDULES = ("constant", "cosine", "polynomial")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TARGETS = ("attn", "attn+conv")
CROPS = ("center", "random")
RESOLUTION_TYPES = ("pixel",)
# DeepFloyd IF flavours (SimpleTuner's names) -> the UNet they train: i-* stage I (`unet`, MODEL's
# own), ii-* stage II (`unet_2`, the IF-II folder given with `upscaler`)
IF_FLAVOURS = {"i-medium-400m": "unet", "i-large-900m": "unet", "i-xlarge-4.3b": "unet",
               "ii-medium-450m": "unet_2", "ii-large-1.2b": "unet_2"}
# Defaults that differ by family, applied to the settings not given (file or flag) once the family
# is known from model_family / model_flavour / upscaler or MODEL's model_index.json (metadata
# only): SimpleTuner's DeepFloyd guide, lr 4e-5 decaying to 4e-6.
# lr_end: a tenth of the learning rate, whichever it is (4e-6 for the default 4e-5).
FAMILY_DEFAULTS = {"deepfloyd": {"lr": 4e-5, "lr_schedule": "polynomial"}}
FAMILY_LR_END = {"deepfloyd": 0.1}


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
    lr_end: float | None = None  # cosine / polynomial: the rate they decay to (None: 0)
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
    # DeepFloyd IF (training/if_train.py); model_family is checked against the detected family
    model_family: str | None = None
    model_flavour: str | None = None  # IF_FLAVOURS; chooses stage I or II
    upscaler: str | None = None  # stage II: the IF-II folder (MODEL stays IF-I: its T5 is used)
    resolution_type: str = "pixel"
    validation_resolution: str | None = None  # "64,96,64x96,96x64" (WxH or a side); IF only


@dataclass
class EmbeddingConfig(CommonConfig):
    token: str | None = None
    init_word: str | None = None
    vectors: int = 1
    lr: float = 5e-3
    optimizer: str = "adamw"


PATH_SETTINGS = ("model", "data", "out", "reg_data", "cache_dir", "upscaler")  # str or os.PathLike


def _read_file(path: Path) -> dict:
    kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
    if path.suffix.lower() in (".yaml", ".yml"):
        # read as TOML it would fail with a TOML parse error that hides the real problem
        raise SdcError(f"--config {path}: YAML is not read; write the settings as TOML "
                       "(key = value) or JSON, e.g. the output of --print-config")
    try:
        text = path.read_text()
    except OSError as e:
        raise SdcError(f"--config {path}: cannot read it ({e.strerror}); check the path") from None
    try:
        raw = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SdcError(f"--config {path}: not valid {kind} ({e}); fix the file") from None
    if not isinstance(raw, dict):
        raise SdcError(f"--config {path}: expected a table of settings, found "
                       f"{_kind_of(raw)}; write key = value pairs (or a JSON object)")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def _kind_of(value) -> str:
    """A value's type in the words of a config file (TOML/JSON), for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a non-finite number" if not math.isfinite(value) else "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _type_ok(value, kind: str, name: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":  # bool is an int subclass in Python: `steps = true` must not be 1
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":  # no setting here means anything at inf or nan
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if kind == "str":
        return isinstance(value, str) or (name in PATH_SETTINGS and isinstance(value, os.PathLike))
    raise AssertionError(f"config field {name}: unhandled type {kind}")


_EXPECTED = {"bool": "true or false", "int": "an integer", "float": "a finite number",
             "str": "a string"}


def _where(name: str, value, config_file, from_file: set) -> str:
    """How the user wrote the setting: as a key of the config file or as a flag."""
    # as the file would spell it where Python's repr differs (true, null)
    if value is None or isinstance(value, bool):
        shown = "null" if value is None else str(value).lower()
    else:
        shown = repr(value)
    if len(shown) > 60:  # a whole list or table pasted into one key: enough to recognise it
        shown = shown[:57] + "..."
    if name in from_file:
        return f"--config {config_file}: {name} = {shown}"
    return f"--{name.replace('_', '-')} {shown}"


def _check_types(cls, merged: dict, config_file, from_file: set) -> None:
    """Every value has its field's type, checked against the dataclass annotations (so a new
    setting is covered without a new line here), before any range check or model load: a config
    file can hold anything (`steps = "ten"`, `rank = 2.5`, a list), which would otherwise fail deep
    inside training, or worse, be taken (`flip = "no"` is truthy)."""
    for f in fields(cls):
        if f.name not in merged:
            continue
        value = merged[f.name]
        parts = [p.strip() for p in str(f.type).split("|")]
        nullable = "None" in parts
        (kind,) = [p for p in parts if p != "None"]
        if value is None and nullable:
            continue
        if not _type_ok(value, kind, f.name):
            fix = "fix it in the file" if f.name in from_file else "give another value"
            raise SdcError(f"{_where(f.name, value, config_file, from_file)}: expected "
                           f"{_EXPECTED[kind]}{' (or leave it out)' if nullable else ''}, found "
                           f"{_kind_of(value)}; {fix}")


def resolve(cls, config_file: str | Path | None, flags: dict, complete: bool = True):
    """Merge defaults, the config file and the flags given (None = not given) into `cls`;
    `complete=False` (for --print-config) skips the checks for required settings."""
    known = {f.name: f for f in fields(cls)}
    merged = {}
    from_file: set = set()
    if config_file:
        from_file_values = _read_file(Path(config_file))
        unknown = sorted(set(from_file_values) - set(known))
        if unknown:
            near = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.75)
            raise SdcError(f"--config {config_file}: unknown setting(s) {', '.join(unknown)}"
                           + (f" (did you mean {near[0]}?)" if near else "")
                           + f"; expected some of {', '.join(known)}")
        merged.update(from_file_values)
        from_file = set(from_file_values)
    given = {k: v for k, v in flags.items() if v is not None}
    merged.update(given)
    from_file -= set(given)  # a flag overrides the file: errors then name the flag
    if isinstance(merged.get("validation_resolution"), int) \
            and not isinstance(merged["validation_resolution"], bool):
        merged["validation_resolution"] = str(merged["validation_resolution"])  # `= 64` in TOML
    _check_types(cls, merged, config_file, from_file)
    merged = {k: (os.fspath(v) if k in PATH_SETTINGS and isinstance(v, os.PathLike) else v)
              for k, v in merged.items()}
    family = family_hint(merged) if cls is LoraConfig else None
    for k, v in FAMILY_DEFAULTS.get(family, {}).items():
        merged.setdefault(k, v)  # only where neither the file nor a flag gave it
    if family in FAMILY_LR_END and "lr_end" not in merged and _type_ok(merged["lr"], "float", "lr"):
        merged["lr_end"] = float(f"{merged['lr'] * FAMILY_LR_END[family]:.6g}")
    cfg = cls(**merged)
    check(cfg, complete, config_file, from_file)
    return cfg


def family_hint(settings: dict) -> str | None:
    """The family the settings point at before any model is resolved: model_family, else
    deepfloyd for a model_flavour or upscaler, else what MODEL's model_index.json names (no
    tensor read; a broken folder is left for resolve_model to report)."""
    if settings.get("model_family"):
        return settings["model_family"]
    if settings.get("model_flavour") or settings.get("upscaler"):
        return "deepfloyd"
    model = settings.get("model")
    if model:
        index = Path(model).expanduser() / "model_index.json"
        try:
            cls = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            return None
        from ..families import FAMILIES

        for f in FAMILIES.values():
            if f.space == "pixel" and cls in f.pipeline_classes:
                return f.name
    return None


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"64,96,64x96,96x64" -> [(64, 64), (96, 96), (64, 96), (96, 64)] as (width, height)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        w, _, h = part.partition("x")
        if not (w.isdigit() and (not h or h.isdigit())):
            raise ValueError(part)
        size = (int(w), int(h or w))
        if min(size) < 8:
            raise ValueError(part)
        out.append(size)
    return out


def check(cfg: CommonConfig, complete: bool = True, config_file=None,
          from_file: set | None = None) -> None:
    """The values' ranges (their types are `_check_types`'s); a failure names the setting as the
    user wrote it, flag or config-file key."""
    from_file = from_file or set()

    def fail(name: str, expected: str):
        value = getattr(cfg, name)
        fix = "; fix it in the file" if name in from_file else ""
        raise SdcError(f"{_where(name, value, config_file, from_file)}: expected {expected}{fix}")

    for name, lo in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup", 0),
                     ("crops", 1), ("checkpoint_every", 0), ("validate_every", 0),
                     ("validation_steps", 1), ("seed", 0)):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            fail(name, f"an integer >= {lo}")
    if not (isinstance(cfg.lr, (int, float)) and 0 < cfg.lr < 1):  # also refuses nan and inf
        fail("lr", "a learning rate in (0, 1), e.g. 1e-4")
    if cfg.lr_end is not None and not 0 <= cfg.lr_end <= cfg.lr:
        fail("lr_end", f"a learning rate from 0 to lr ({cfg.lr:g}), the end of a cosine or "
                       "polynomial decay")
    for name, allowed in (("optimizer", OPTIMIZERS), ("lr_schedule", SCHEDULES),
                          ("mixed_precision", PRECISIONS), ("crop", CROPS)):
        if getattr(cfg, name) not in allowed:
            fail(name, "one of " + ", ".join(allowed))
    if cfg.resolution is not None and (not isinstance(cfg.resolution, int) or cfg.resolution < 8):
        fail("resolution", "a size in pixels >= 8")
    if cfg.validation_guidance is not None and not (math.isfinite(cfg.validation_guidance)
                                                    and cfg.validation_guidance >= 0):
        fail("validation_guidance", "a finite number >= 0, e.g. 7.5")
    for name in ("data", "out") if complete else ():
        if not getattr(cfg, name):
            raise SdcError(f"--{name} is required (as a flag or in the config file)")
    if cfg.out and Path(cfg.out).is_dir():
        # found at the very end otherwise, when the finished weights are renamed onto it
        kind = "lora" if isinstance(cfg, LoraConfig) else "embedding"
        fail("out", f"a .safetensors file to write, found an existing folder; give a file path "
                    f"such as {Path(cfg.out) / (kind + '.safetensors')}")
    if cfg.out and not str(cfg.out).endswith(".safetensors"):
        fail("out", "a path ending in .safetensors")
    if isinstance(cfg, LoraConfig):
        if isinstance(cfg.rank, bool) or not isinstance(cfg.rank, int) or cfg.rank < 1:
            fail("rank", "an integer >= 1 (4-32 is usual)")
        if cfg.alpha is not None and not (isinstance(cfg.alpha, (int, float))
                                          and math.isfinite(cfg.alpha) and cfg.alpha > 0):
            # nan compares False (refused by `> 0`), inf would scale the update to inf
            fail("alpha", "a finite number > 0 (default: the rank)")
        if cfg.targets not in TARGETS:
            fail("targets", "one of " + ", ".join(TARGETS))
        if complete and (not cfg.trigger or not cfg.trigger.strip()):
            raise SdcError("--trigger is required: the word(s) that call the LoRA up in a prompt")
        _check_family_keys(cfg, fail)
    if isinstance(cfg, EmbeddingConfig):
        if (complete or cfg.token) and (not cfg.token or len(cfg.token.split()) != 1):
            fail("token", "one placeholder word, e.g. '<sks>'")
        if (complete or cfg.init_word) and (not cfg.init_word or len(cfg.init_word.split()) != 1):
            fail("init_word", "one ordinary word the model knows, e.g. 'seal'")
        if isinstance(cfg.vectors, bool) or not isinstance(cfg.vectors, int) \
                or not 1 <= cfg.vectors <= 16:
            fail("vectors", "an integer from 1 to 16")


def _check_family_keys(cfg: LoraConfig, fail) -> None:
    """The DeepFloyd IF keys among themselves; against the model's detected family they are
    checked by lora_train.check_family once MODEL is resolved (metadata only)."""
    from ..families import FAMILIES

    if cfg.model_family is not None and cfg.model_family not in FAMILIES:
        fail("model_family", "one of " + ", ".join(FAMILIES) + " (or leave it out: it is "
                             "detected from MODEL)")
    if cfg.resolution_type not in RESOLUTION_TYPES:
        fail("resolution_type", "'pixel' (resolution is the side of the square in pixels: "
                                "DeepFloyd IF trains stage I at 64, stage II at 256); "
                                "SimpleTuner's 'area' / 'pixel_area' sizing is not supported")
    deepfloyd = family_hint(asdict(cfg)) == "deepfloyd"
    if cfg.model_flavour is not None:
        if cfg.model_flavour not in IF_FLAVOURS:
            fail("model_flavour", "a DeepFloyd IF flavour: one of " + ", ".join(IF_FLAVOURS))
        if not deepfloyd:
            fail("model_flavour", f"model_family deepfloyd with a flavour, not "
                                  f"{cfg.model_family} (flavours name DeepFloyd IF's stages)")
        stage_ii = IF_FLAVOURS[cfg.model_flavour] == "unet_2"
        if stage_ii and not cfg.upscaler:
            fail("model_flavour", "--upscaler IF-II-DIR alongside: ii-* flavours train stage "
                                  "II's UNet, read from the IF-II folder (MODEL stays the IF-I "
                                  "folder, whose T5 encodes the captions)")
        if not stage_ii and cfg.upscaler:
            fail("model_flavour", "an ii-* flavour (ii-medium-450m, ii-large-1.2b) with "
                                  "--upscaler, which trains stage II; drop --upscaler to train "
                                  "stage I")
    if cfg.upscaler is not None and cfg.model_family not in (None, "deepfloyd"):
        fail("upscaler", f"no upscaler for model_family {cfg.model_family}: it is DeepFloyd "
                         "IF's stage II folder")
    if cfg.validation_resolution is not None:
        try:
            parse_sizes(cfg.validation_resolution)
        except ValueError as e:
            fail("validation_resolution", f"sizes like '64,96,64x96,96x64' (a side or WxH, "
                                          f"each >= 8), not {str(e)!r}")


def as_json(cfg: CommonConfig) -> str:
    return json.dumps(asdict(cfg), indent=1)
