"""LoRA files -> one normalised list of layers (torch-free), every key accounted for.

Which components a LoRA may change and under which key prefixes is the model family's
(sdc.families: `kohya_prefixes`, `diffusers_prefixes`): SD1.x/SD2.x lora_unet_ / lora_te_ and
unet. / text_encoder.; SDXL lora_unet_ / lora_te1_ / lora_te2_ and unet. / text_encoder. /
text_encoder_2. (`text_encoder_2` is OpenCLIP-bigG, a CLIPTextModelWithProjection).

Formats read (local .safetensors only):
  kohya / A1111   lora_unet_<module with _>.lora_down.weight / .lora_up.weight / .alpha and
                  lora_te_text_model_<...> (SDXL: lora_te1_ / lora_te2_) for the text encoders;
                  conv LoRAs (LoCon) have 4-D down [r, in, kh, kw] and up [out, r, 1, 1]. No
                  .alpha means alpha = rank. UNet modules come in diffusers' names
                  (down_blocks_1_attentions_0_...) or, as kohya's sd-scripts write SDXL LoRAs,
                  the original SGM/LDM names (input_blocks_4_1_..., middle_block_1_...,
                  output_blocks_0_1_..., resnets' in_layers_2 / emb_layers_1 / out_layers_3 /
                  skip_connection, time_embed_0, label_emb_0_0, out_2): fusion/sgm.py names
                  every base module in that layout from the UNet's own structure.
  diffusers       unet.<module>.lora.down.weight / .lora.up.weight (older saves), and
  diffusers/peft  unet.<module>.lora_A.weight / .lora_B.weight, text_encoder.<...> (and
                  text_encoder_2.<...>) likewise; the alpha comes from the file's
                  `lora_adapter_metadata` (`unet.lora_alpha`, `unet.r`, `unet.alpha_pattern`),
                  else a per-module `.alpha` tensor, else alpha = rank, which is what diffusers
                  assumes and why a file saved without that metadata silently changes strength
                  (FACTS.md): sdc says so in the report.
Kohya module names flatten dots to underscores, which is ambiguous ("to_out_0"); they are matched
against the base model's own module paths (the manifest's weight map, or the torch module's
parameters), never guessed. Anything not matched fails with the file, the first unmatched keys and
their count; formats sdc does not fuse (LoHa, LoKr, DoRA, Flux/SD3) are named. A LoRA made for
another family than the build's (an SDXL LoRA on an SD1.x build: lora_te1_/lora_te2_ or
text_encoder_2 keys, SDXL's context width; an SD1.x one on SDXL: lora_te_ keys, ...) is refused
naming both families, and where the base model's weight shapes are known (`Known`), a layer whose
update does not fit its weight is refused at read time, not at fuse time.
A LoRA is untrusted input: besides the header checks of safetensors_file, every layer must be a
float, finite, rank >= 1 down/up pair that chains, every alpha one finite number >= 0, and the
JSON metadata fields sdc interprets (lora_adapter_metadata, ss_tag_frequency) must have the types
their writers give them; anything else is one SdcError line naming the file and the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import SdcError
from ..runtime.manifest import sha256_file
from ..families import FAMILIES, SD1, Family
from .safetensors_file import FLOAT_DTYPES, json_type, loads_bounded, quote, read_safetensors
from .sgm import sgm_names

# SD1.x's LoRA-able components (kept for callers that predate families; use the family's)
COMPONENTS = tuple(SD1.diffusers_prefixes)
# every component a LoRA of some family may change, in a stable order
ALL_COMPONENTS = tuple(dict.fromkeys(c for f in FAMILIES.values() for c in f.diffusers_prefixes))
BUILDS = "sdc builds SD1.x, SD2.x and SDXL models"


class Known(dict):
    """{component: {module path with a .weight: that weight's shape, or None where unknown}} of one
    base model, and the family it belongs to (read_lora takes the family from here unless given).
    A plain {component: set of module paths} is accepted wherever a Known is (no width checks,
    family SD1 unless given)."""

    def __init__(self, modules: dict, family: Family = SD1):
        super().__init__(modules)
        self.family = family


@dataclass
class LoraLayer:
    component: str  # unet | text_encoder | text_encoder_2 (the family's LoRA-able components)
    module: str  # dotted module path in the component, as the component's own parameters name it
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
    (re.compile(r"^(double_blocks|single_blocks|transformer\.|lora_transformer_)"),
     f"Flux/SD3 transformer LoRA; {BUILDS}"),
]


# safetensors metadata naming the stage a LoRA was trained for (sdc's trainer writes it): picks
# the component among a family's `lora_alternates` (DeepFloyd IF: unet = stage I, unet_2 = II)
STAGE_METADATA = "sdc_stage"


def read_lora(path, known: dict, family: Family | None = None) -> LoraFile:
    """Parse `path` against the base model's module paths: {component: {dotted module path with a
    `.weight` parameter}} (a `Known`, whose weight shapes are then checked too). `family` is the
    base model's family; by default `known.family` when `known` is a Known, else SD1.

    A family whose components share a key layout (`lora_alternates`: IF's two UNets, both
    `unet.*` in diffusers' files) reads the file for the component its `sdc_stage` metadata
    names, else for the first component whose modules and shapes it fits."""
    family = family or getattr(known, "family", None) or SD1
    alternates = [(c, like) for c, like in family.lora_alternates if c in known]
    if not alternates:
        return _read_lora(path, known, family)
    named = None
    if Path(path).is_file() and Path(path).suffix.lower() == ".safetensors":
        named = read_safetensors(Path(path), f"--lora {path}", allow_empty=True).metadata.get(
            STAGE_METADATA)
    tries = [None] + [c for c, _ in alternates]
    if named in tries:
        tries.remove(named)
        tries.insert(0, named)
    first_error = None
    for target in tries:
        fam = family
        if target is not None:
            like = dict(alternates)[target]
            fam = replace(family, diffusers_prefixes={target: family.diffusers_prefixes[like]},
                          kohya_prefixes={target: family.kohya_prefixes[like]})
        try:
            return _read_lora(path, known, fam)
        except SdcError as e:
            first_error = first_error or e
    raise first_error


def _read_lora(path, known: dict, family: Family) -> LoraFile:
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
                           "adapters for SD1.x, SD2.x and SDXL")
    _check_prefixes(keys, family, label)
    # metadata sdc interprets is checked up front, so a bad field fails before any tensor is read
    meta_alpha = _metadata_alphas(st.metadata, label)
    trigger_words = triggers(st.metadata, label)
    if any(k.startswith(tuple(family.kohya_prefixes.values())) for k in keys):
        fmt, groups = "kohya", _kohya_groups(st, known, family)
    else:
        fmt, groups = _diffusers_groups(st, known, family)
    used = {k for parts in groups.values() for k in parts.values()}
    unused = [k for k in keys if k not in used]
    if unused:
        other = _foreign_family(st, family)
        if other:
            raise SdcError(f"{label}: {len(unused)} of {len(keys)} keys match no layer of this "
                           f"{family.title} base model (first: {unused[0]}); {other}")
        raise SdcError(f"{label}: {len(unused)} of {len(keys)} keys match no layer of this "
                       f"base model (first: {', '.join(unused[:3])}); is it an {family.title} "
                       "LoRA?")
    layers, alpha_sources = [], set()
    for (component, module), parts in sorted(groups.items()):
        if "down" not in parts or "up" not in parts:
            missing = "up" if "down" in parts else "down"
            some = next(iter(parts.values()))
            raise SdcError(f"{label}: {component} {module} has no {missing} weight (key "
                           f"{some}); the file is incomplete")
        down, up = _pair(st, parts["down"], parts["up"], label)
        _check_width(st, known, family, component, module, down, up, label)
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
    return LoraFile(path, sha256_file(path), fmt, layers, len(keys),
                    ", ".join(sorted(alpha_sources)), dict(st.metadata), trigger_words)


# --- which family a LoRA was made for ------------------------------------------------------------


def _titles(families) -> str:
    return "/".join(f.title for f in families)


def _check_prefixes(keys: list[str], family: Family, label: str) -> None:
    """Keys under a component prefix only other families have: lora_te1_/lora_te2_/text_encoder_2.
    (SDXL's two text encoders) on an SD1.x/SD2.x build, lora_te_ (one text encoder) on SDXL."""
    mine = set(family.kohya_prefixes.values()) | set(family.diffusers_prefixes.values())
    for other in FAMILIES.values():
        for component, prefix in [*other.kohya_prefixes.items(),
                                  *other.diffusers_prefixes.items()]:
            if prefix in mine:
                continue
            hit = next((k for k in keys if k.startswith(prefix)), None)
            if hit is None:
                continue
            owners = [f for f in FAMILIES.values()
                      if prefix in (*f.kohya_prefixes.values(), *f.diffusers_prefixes.values())]
            n = len({c for f in owners for c in f.diffusers_prefixes if c != "unet"})
            encoders = "two text encoders" if n > 1 else "one text encoder"
            raise SdcError(f"{label}: an {_titles(owners)} LoRA ({encoders}: {prefix} keys, e.g. "
                           f"{hit}), but this base model is {family.title}; {BUILDS} and fuses a "
                           "LoRA only into the family it was made for")


# cross-attention context width (attn2.to_k/to_v input) -> the family whose UNet has it
_CONTEXT = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_CONTEXT_KEY = re.compile(r"attn2[._]to_[kv][._](?:lora_down|lora_A|lora\.down)\b")
_SDXL_ONLY = re.compile(r"add_embedding|label_emb|^te[12]\.")


def looks_sdxl(path) -> bool:
    """Whether a LoRA file has keys only SDXL has (its second text encoder, add_embedding)."""
    st = read_safetensors(Path(path), f"--lora {path}", allow_empty=True)
    return any(_SDXL_ONLY.search(k) or k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2."))
               for k in st.keys())


def _foreign_family(st, family: Family) -> str | None:
    """A clause naming the family the file's keys or widths point to, when that is not `family`
    (used in refusals only: nothing is matched by it)."""
    hit = next((k for k in st.keys() if _SDXL_ONLY.search(k)), None)
    if hit and family.name != "sdxl":
        return (f"it looks like an SDXL LoRA ({hit}), but this base model is {family.title}; "
                f"{BUILDS} and fuses a LoRA only into the family it was made for")
    for key in st.keys():
        if _CONTEXT_KEY.search(key) and len(st.shape(key)) >= 2:
            width = st.shape(key)[1]
            title = _CONTEXT.get(width)
            if title and title != family.title:
                return (f"it looks like an {title} LoRA (cross-attention context width {width}, "
                        f"{key}), but this base model is {family.title}; {BUILDS} and fuses a "
                        "LoRA only into the family it was made for")
            break
    return None


def _check_width(st, known: dict, family: Family, component: str, module: str,
                 down: np.ndarray, up: np.ndarray, label: str) -> None:
    """A (well-formed, _pair-checked) layer whose update does not fit the base weight, where the
    shape is known: refused here, naming the families when the file tells which it was made for."""
    modules = known.get(component)
    shape = modules.get(module) if isinstance(modules, dict) else None
    if not shape:
        return
    if up.shape[0] == shape[0] and math.prod(down.shape[1:]) == math.prod(shape[1:]):
        return
    update = [int(up.shape[0]), *map(int, down.shape[1:])]
    why = _foreign_family(st, family) or (
        f"the LoRA was made for another model; {BUILDS} and fuses a LoRA only into the family it "
        "was made for")
    raise SdcError(f"{label}: {component} {module} update {update} does not fit this "
                   f"{family.title} base model's weight {list(shape)}; {why}")


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


_KOHYA_SUFFIX = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


def _aliases(component: str, module: str) -> set[str]:
    """The dotted names a file may give a text-encoder module: transformers names CLIPTextModel's
    parameters with or without the `text_model.` level depending on version and class (5.x:
    CLIPTextModel without, CLIPTextModelWithProjection with), and files use both."""
    if component == "unet":
        return {module}
    out = {module}
    if module.startswith("text_model."):
        out.add(module.removeprefix("text_model."))
    elif module.split(".", 1)[0] in ("embeddings", "encoder", "final_layer_norm"):
        out.add("text_model." + module)
    return out


def _kohya_groups(st, known: dict, family: Family) -> dict:
    flat: dict[str, tuple | None] = {}

    def add(stem: str, target: tuple) -> None:
        if flat.get(stem, target) != target:
            flat[stem] = None  # two base modules flatten alike: such a key stays unmatched
        else:
            flat[stem] = target

    for component, prefix in family.kohya_prefixes.items():
        modules = known.get(component, ())
        for module in modules:
            for name in _aliases(component, module):
                add(prefix + name.replace(".", "_"), (component, module))
        if component == "unet":
            for module, sgm in sgm_names(modules).items():
                add(prefix + sgm.replace(".", "_"), (component, module))
    groups: dict = {}
    for key in st.keys():
        stem, _, suffix = key.partition(".")
        part = _KOHYA_SUFFIX.get(suffix)
        target = flat.get(stem)
        if part is None or target is None:
            continue  # reported as unmatched
        groups.setdefault(target, {})[part] = key
    return groups


_DIFFUSERS_SUFFIX = re.compile(r"^(?P<module>.+?)\.(?:(?P<old>lora\.(?:down|up))|"
                               r"(?P<peft>lora_[AB])|(?P<alpha>alpha))(?:\.weight)?$")


def _diffusers_groups(st, known: dict, family: Family) -> tuple[str, dict]:
    index = {c: _alias_index(c, known.get(c, ())) for c in family.diffusers_prefixes}
    groups: dict = {}
    kinds = set()
    for key in st.keys():
        m = _DIFFUSERS_SUFFIX.match(key)
        if not m:
            continue
        component, module = _split_component(m["module"], index, family)
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


def _alias_index(component: str, modules) -> dict[str, str | None]:
    """{name a file may use: base module}; a name two modules share maps to None (unmatched)."""
    index: dict[str, str | None] = {}
    for module in modules:
        for name in _aliases(component, module):
            index[name] = module if index.get(name, module) == module else None
    for module in modules:  # a module's own path always names it
        index[module] = module
    return index


def _split_component(path: str, index: dict, family: Family) -> tuple[str | None, str]:
    # longest prefix first, so a nested prefix can never shadow a longer one
    prefixes = sorted(((p, c) for c, p in family.diffusers_prefixes.items()),
                      key=lambda pc: -len(pc[0]))
    for prefix, component in [*prefixes, ("base_model.model.", None)]:
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        found = [(comp, index[comp][rest])
                 for comp in ([component] if component else list(family.diffusers_prefixes))
                 if index[comp].get(rest)]
        if len(found) == 1:  # a bare peft key that two components have is ambiguous: unmatched
            return found[0]
        return None, path
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
    for component in ALL_COMPONENTS:
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
