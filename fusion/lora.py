"""LoRA files -> one normalised list of layers (torch-free), every key accounted for.

Formats read (local .safetensors only):
  kohya / A1111   lora_unet_<module with _>.lora_down.weight / .lora_up.weight / .alpha and
                  lora_te_text_model_<...> for the text encoder; conv LoRAs (LoCon) have 4-D
                  down [r, in, kh, kw] and up [out, r, 1, 1]. No .alpha means alpha = rank.
  diffusers       unet.<module>.lora.down.weight / .lora.up.weight (older saves), and
  diffusers/peft  unet.<module>.lora_A.weight / .lora_B.weight, text_encoder.<...> likewise; the
                  alpha comes from the file's `lora_adapter_metadata` (`unet.lora_alpha`,
                  `unet.r`, `unet.alpha_pattern`), else a per-module `.alpha` tensor, else alpha
                  = rank, which is what diffusers assumes and why a file saved without that
                  metadata silently changes strength (FACTS.md): sdc says so in the report.
Kohya module names flatten dots to underscores, which is ambiguous ("to_out_0"); they are matched
against the base model's own module paths (the manifest's weight map, or the torch module's
parameters), never guessed. Anything not matched fails with the file, the first unmatched keys and
their count; formats sdc does not fuse (LoHa, LoKr, DoRA, SDXL's two text encoders) are named.
A LoRA is untrusted input: besides the header checks of safetensors_file, every layer must be a
float, finite, rank >= 1 down/up pair that chains, every alpha one finite number >= 0, and the
JSON metadata fields sdc interprets (lora_adapter_metadata, ss_tag_frequency) must have the types
their writers give them; anything else is one SdcError line naming the file and the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SdcError
from ..runtime.manifest import sha256_file
from .safetensors_file import FLOAT_DTYPES, json_type, loads_bounded, quote, read_safetensors

COMPONENTS = ("unet", "text_encoder")


@dataclass
class LoraLayer:
    component: str  # unet | text_encoder
    module: str  # dotted module path in the component (text encoder: without "text_model.")
    down: np.ndarray  # [r, in] or [r, in, kh, kw]
    up: np.ndarray  # [out, r] or [out, r, 1, 1]
    alpha: float
    source: str = ""  # the adapter file it came from

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraFile:
    path: Path
    sha256: str
    format: str  # kohya | diffusers | peft
    layers: list[LoraLayer]
    total_keys: int
    alpha_source: str
    metadata: dict = field(default_factory=dict)
    triggers: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem

    def ranks(self) -> list[int]:
        return sorted({layer.rank for layer in self.layers})

    def alphas(self) -> list[float]:
        return sorted({layer.alpha for layer in self.layers})


_UNSUPPORTED = [
    (re.compile(r"hada_w|hada_t"), "LoHa (LyCORIS) adapter"),
    (re.compile(r"lokr_w|lokr_t"), "LoKr (LyCORIS) adapter"),
    (re.compile(r"dora_scale|lora_magnitude_vector"), "DoRA adapter"),
    (re.compile(r"^lora_te[12]_|text_encoder_2\.|^te2\.|add_embedding"),
     "SDXL LoRA (two text encoders); sdc builds SD1.x models"),
    (re.compile(r"^(double_blocks|single_blocks|transformer\.|lora_transformer_)"),
     "Flux/SD3 transformer LoRA; sdc builds SD1.x models"),
]


def read_lora(path, known: dict[str, set[str]]) -> LoraFile:
    """Parse `path` against the base model's module paths: {component: {dotted module path with a
    `.weight` parameter}}."""
    path = Path(path)
    if not path.is_file():
        raise SdcError(f"--lora {path}: no such file; expected a LoRA .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise SdcError(f"--lora {path}: sdc reads LoRAs as .safetensors only (found "
                       f"{path.suffix or 'no extension'}); convert the file to safetensors")
    label = f"--lora {path}"
    st = read_safetensors(path, label, allow_empty=True)
    keys = st.keys()
    if not keys:
        raise SdcError(f"{label}: the file holds no tensors; expected a LoRA's down/up weights")
    for pattern, what in _UNSUPPORTED:
        hits = [k for k in keys if pattern.search(k)]
        if hits:
            raise SdcError(f"{label}: {what} (e.g. {hits[0]}); sdc fuses plain LoRA/LoCon "
                           "adapters for SD1.x only")
    # metadata sdc interprets is checked up front, so a bad field fails before any tensor is read
    meta_alpha = _metadata_alphas(st.metadata, label)
    trigger_words = triggers(st.metadata, label)
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        fmt, groups = "kohya", _kohya_groups(st, known)
    else:
        fmt, groups = _diffusers_groups(st, known)
    layers, used, alpha_sources = [], set(), set()
    for (component, module), parts in sorted(groups.items()):
        if "down" not in parts or "up" not in parts:
            missing = "up" if "down" in parts else "down"
            some = next(iter(parts.values()))
            raise SdcError(f"{label}: {component} {module} has no {missing} weight (key "
                           f"{some}); the file is incomplete")
        down, up = _pair(st, parts["down"], parts["up"], label)
        used.update(parts.values())
        rank = down.shape[0]
        if "alpha" in parts:
            alpha = _alpha_tensor(st, parts["alpha"], label)
            alpha_sources.add("file")
        elif (a := meta_alpha(component, module)) is not None:
            alpha = a
            alpha_sources.add("metadata")
        else:
            alpha = float(rank)
            alpha_sources.add("rank (no alpha in the file)")
        layers.append(LoraLayer(component, module, down, up, alpha, str(path)))
    unused = [k for k in keys if k not in used]
    if unused:
        raise SdcError(f"{label}: {len(unused)} of {len(keys)} keys match no layer of this "
                       f"base model (first: {', '.join(unused[:3])}); is it an SD1.x LoRA?")
    return LoraFile(path, sha256_file(path), fmt, layers, len(keys),
                    ", ".join(sorted(alpha_sources)), dict(st.metadata), trigger_words)


def _pair(st, down_key: str, up_key: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """One layer's down/up weights, checked to be float, non-empty, chaining and finite: what the
    fusion formula (alpha / rank) * up @ down needs to be well defined."""
    for key in (down_key, up_key):
        if st.dtype(key) not in FLOAT_DTYPES:
            raise SdcError(f"{label}: {key} is {st.dtype(key)}; expected float weights "
                           f"({', '.join(FLOAT_DTYPES)})")
    ds, us = st.shape(down_key), st.shape(up_key)
    if len(ds) not in (2, 4) or len(us) != len(ds):
        raise SdcError(f"{label}: {down_key} has shape {ds} and {up_key} {us}; expected 2-D "
                       "(linear) or 4-D (conv) pairs")
    if 0 in ds or 0 in us:
        raise SdcError(f"{label}: {down_key} has shape {ds} and {up_key} {us}; a LoRA layer "
                       "needs rank >= 1 and non-empty weights")
    if us[1] != ds[0]:
        raise SdcError(f"{label}: rank differs between {down_key} ({ds[0]}) and {up_key} "
                       f"({us[1]}); the file is corrupt")
    if len(us) == 4 and us[2:] != [1, 1]:
        raise SdcError(f"{label}: {up_key} has shape {us}; a conv LoRA's up weight is "
                       "[out, rank, 1, 1]")
    down, up = st.tensor(down_key), st.tensor(up_key)
    for key, arr in ((down_key, down), (up_key, up)):
        if not np.isfinite(arr).all():
            raise SdcError(f"{label}: {key} contains NaN or Inf; the adapter is broken")
    return down, up


def _alpha_tensor(st, key: str, label: str) -> float:
    shape = st.shape(key)
    if st.dtype(key) == "BOOL" or math.prod(shape) != 1:
        raise SdcError(f"{label}: {key} is {st.dtype(key)} {shape}; expected one number (the "
                       "layer's alpha)")
    value = float(np.asarray(st.tensor(key), np.float64).reshape(-1)[0])
    return _check_alpha(value, key, label)


def _check_alpha(value: float, what: str, label: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise SdcError(f"{label}: {what} is {value:g}; expected a finite alpha >= 0")
    return value


def _kohya_groups(st, known: dict[str, set[str]]) -> dict:
    flat = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for module in known.get(component, ()):
            stems = {module.replace(".", "_")}
            if component == "text_encoder":
                stems.add("text_model_" + module.replace(".", "_"))
            for stem in stems:
                flat[prefix + stem] = (component, module)
    groups: dict = {}
    for key in st.keys():
        stem, _, suffix = key.partition(".")
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
        target = flat.get(stem)
        if part is None or target is None:
            continue  # reported as unmatched
        groups.setdefault(target, {})[part] = key
    return groups


_DIFFUSERS_SUFFIX = re.compile(r"^(?P<module>.+?)\.(?:(?P<old>lora\.(?:down|up))|"
                               r"(?P<peft>lora_[AB])|(?P<alpha>alpha))(?:\.weight)?$")


def _diffusers_groups(st, known: dict[str, set[str]]) -> tuple[str, dict]:
    groups: dict = {}
    kinds = set()
    for key in st.keys():
        m = _DIFFUSERS_SUFFIX.match(key)
        if not m:
            continue
        component, module = _split_component(m["module"], known)
        if component is None:
            continue
        if m["old"]:
            part = "down" if m["old"].endswith("down") else "up"
            kinds.add("diffusers")
        elif m["peft"]:
            part = "down" if m["peft"] == "lora_A" else "up"
            kinds.add("peft")
        else:
            part = "alpha"
        groups.setdefault((component, module), {})[part] = key
    return ("peft" if kinds == {"peft"} else "diffusers"), groups


def _split_component(path: str, known: dict[str, set[str]]) -> tuple[str | None, str]:
    for prefix, component in (("unet.", "unet"), ("text_encoder.", "text_encoder"),
                              ("base_model.model.", None)):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        for comp in ([component] if component else list(COMPONENTS)):
            for candidate in (rest, rest.removeprefix("text_model.")):
                if candidate in known.get(comp, ()):
                    return comp, candidate
    return None, path


def _metadata_json(metadata: dict, field_name: str, label: str):
    """A metadata field that holds JSON text: an object, or None when the field is absent."""
    raw = metadata.get(field_name)
    if raw is None or raw == "":
        return None
    try:
        # the fields sdc reads nest 2 deep; the bound keeps a hostile string from recursing
        value = loads_bounded(raw, 4, f"metadata {field_name}")
    except ValueError as e:
        raise SdcError(f"{label}: {e}; fix or remove the field and re-save the file") from None
    if not isinstance(value, dict):
        raise SdcError(f"{label}: metadata {field_name} is a JSON {json_type(value)}, expected "
                       "an object")
    return value


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_nonneg(value) -> bool:
    return math.isfinite(value) and value >= 0


def _metadata_alphas(metadata: dict, label: str = "--lora"):
    """diffusers' `lora_adapter_metadata`: per component lora_alpha, with peft's alpha_pattern
    (a module-name suffix -> alpha) taking precedence. Every field sdc reads is type-checked here
    (JSON has no schema: an alpha of "8" or an alpha_pattern list would otherwise crash or be
    silently ignored, changing the adapter's strength)."""
    meta = _metadata_json(metadata, "lora_adapter_metadata", label) or {}
    where = "metadata lora_adapter_metadata"
    for component in COMPONENTS:
        alpha = meta.get(f"{component}.lora_alpha")
        if alpha is not None:
            if not _number(alpha):
                raise SdcError(f"{label}: {where} {component}.lora_alpha is {quote(alpha)} (a "
                               f"JSON {json_type(alpha)}); expected a number")
            _check_alpha(float(alpha), f"{where} {component}.lora_alpha", label)
        r = meta.get(f"{component}.r")
        if r is not None and not (type(r) is int and r > 0):
            raise SdcError(f"{label}: {where} {component}.r is {quote(r)}; expected a positive "
                           "integer rank")
        for pattern_field, want in (("alpha_pattern", "alpha"), ("rank_pattern", "rank")):
            patterns = meta.get(f"{component}.{pattern_field}")
            if patterns is None:
                continue
            if not isinstance(patterns, dict):
                raise SdcError(f"{label}: {where} {component}.{pattern_field} is a JSON "
                               f"{json_type(patterns)}; expected an object of module "
                               f"name -> {want}")
            for pat, value in patterns.items():
                if want == "alpha":
                    ok, expected = _number(value) and _finite_nonneg(value), "finite number >= 0"
                else:
                    ok, expected = type(value) is int and value > 0, "positive integer"
                if not ok:
                    raise SdcError(f"{label}: {where} {component}.{pattern_field}[{quote(pat)}] "
                                   f"is {quote(value)}; expected a {expected}")

    def alpha(component: str, module: str) -> float | None:
        patterns = meta.get(f"{component}.alpha_pattern") or {}
        for pat, value in patterns.items():
            if module == pat or module.endswith("." + pat):
                return float(value)
        value = meta.get(f"{component}.lora_alpha")
        return float(value) if value is not None else None

    return alpha


def triggers(metadata: dict, label: str = "--lora") -> list[str]:
    """Trigger words an adapter declares: sdc's own, modelspec's trigger phrase, then kohya's most
    frequent training tags (ss_tag_frequency: {dataset: {tag: count}}), in that order, without
    repeats."""
    found: list[str] = []
    for key in ("sdc.trigger", "modelspec.trigger_phrase"):
        for word in (metadata.get(key) or "").split(","):
            if word.strip():
                found.append(word.strip())
    freq = _metadata_json(metadata, "ss_tag_frequency", label) or {}
    counts: dict[str, int] = {}
    for dataset, tags in freq.items():
        if not isinstance(tags, dict):
            raise SdcError(f"{label}: metadata ss_tag_frequency[{quote(dataset)}] is a JSON "
                           f"{json_type(tags)}; expected an object of tag -> count")
        for tag, n in tags.items():
            if not (_number(n) and _finite_nonneg(n) and n == int(n)):
                raise SdcError(f"{label}: metadata ss_tag_frequency[{quote(dataset)}]"
                               f"[{quote(tag)}] is {quote(n)}; expected a count (an integer >= 0)")
            counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
    found += [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:5]]
    return list(dict.fromkeys(t for t in found if t))
