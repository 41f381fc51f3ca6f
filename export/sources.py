"""Model inputs for `sdc build`: what MODEL points at, what family it is, and how to load each part.

Three kinds, all offline:
  diffusers     a diffusers-format folder (model_index.json, unet/, vae/, text_encoder/, ...)
  single_file   an A1111/CompVis checkpoint (.safetensors, or .ckpt/.pt unpickled weights-only)
  builtin       no MODEL: sdc-tiny, the project's own trained tiny SD1 model, shipped in the package
                (export/data/sdc-tiny, trained by training/train_tiny.py)

The family (sd1 / sd2 / sdxl, families/) is detected from metadata before any tensor is loaded:
the diffusers configs, or the safetensors header (key names and shapes). A model sdc cannot build
yet is refused naming what it is. Single-file checkpoints are converted with diffusers' own
converters against the family's full-size component configs shipped in export/data/ (sd15, sd21,
sd21-v, sdxl; no hub access), or the folder --config names.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SdcError
from ..fusion.safetensors_file import read_safetensors
from ..runtime.manifest import sha256_file
from ..families import FAMILIES, Family, ModelDims
from ..families.base import DATA
from ..families.deepfloyd import UPSCALER_COMPONENTS
from ..families import family as family_of

SDC_TINY = Path(__file__).parent / "data" / "sdc-tiny"
# Optional file in a model folder: the generation defaults its trainer recommends (sdc-tiny wants
# guidance 3, not SD's 7.5). Copied into the manifest's `defaults`; `sdc run` flags override them.
MODEL_DEFAULTS_FILE = "sdc.json"
DEFAULT_KEYS = {"guidance": float, "steps": int}

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


# ---------------------------------------------------------------------------------------------
# Reading metadata without loading tensors


def read_safetensors_header(path: Path) -> dict:
    """The validated header {name: {dtype, shape, data_offsets}}, from sdc's one safetensors
    parser (fusion/safetensors_file.py): malformed, truncated or empty files are refused there."""
    return read_safetensors(path).entries


# A CompVis/A1111 .ckpt nests its weights as {"state_dict": {...}}, sometimes twice; more than this
# is no checkpoint, and a pickle can make the dict its own state_dict (an endless unwrap).
MAX_STATE_DICT_NESTING = 4


def _load_pickled_weights(path: Path) -> dict:
    import torch

    import zipfile

    try:
        # mmap keeps a multi-GB checkpoint out of RAM; only zip-format (torch >= 1.6) files allow it
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - torch raises many types; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SdcError(f"{path}: cannot be read as a weights-only checkpoint ({first[:160]}); "
                       "sdc never unpickles code, convert it to .safetensors") from None
    seen: set[int] = set()  # ids of the dicts unwrapped so far: a cycle is caught at once
    while isinstance(sd, dict) and "state_dict" in sd:
        if id(sd) in seen or len(seen) >= MAX_STATE_DICT_NESTING:
            raise SdcError(f"{path}: its state_dict "
                           + ("contains itself" if id(sd) in seen else
                              f"is nested more than {MAX_STATE_DICT_NESTING} levels deep")
                           + "; expected {'state_dict': {name: tensor}} or {name: tensor}")
        seen.add(id(sd))
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise SdcError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    if not sd:
        raise SdcError(f"{path}: the checkpoint holds no tensors (an empty state_dict); expected "
                       "a full SD1.x checkpoint")
    for key, value in sd.items():
        # everything downstream (family detection, diffusers' converters) assumes name -> tensor
        if not isinstance(key, str):
            raise SdcError(f"{path}: state_dict key {str(key)[:80]!r} is {type(key).__name__}, "
                           "expected string names; is it a plain weights checkpoint?")
        if not isinstance(value, torch.Tensor):
            raise SdcError(f"{path}: state_dict entry {key[:80]!r} is {type(value).__name__}, "
                           "not a tensor; expected a plain name -> tensor checkpoint (is it a "
                           "training-state file?)")
    return sd


def _shapes_of(path: Path) -> tuple[dict[str, list[int]], dict | None]:
    """Key -> shape for a single-file checkpoint, plus the loaded dict for pickles (else None)."""
    if path.suffix.lower() == ".safetensors":
        return read_safetensors(path).shapes(), None
    sd = _load_pickled_weights(path)
    return {k: list(v.shape) for k, v in sd.items()}, sd


def detect_single_file_family(shapes: dict[str, list[int]], path: Path) -> str:
    """The family name (sd1 | sd2 | sdxl), or an SdcError naming what the checkpoint is."""
    keys = shapes.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("lora_unet_") or has("lora_te") or any(".lora_" in k or "lora_A" in k for k in keys):
        raise SdcError(f"{path}: this is a LoRA adapter, not a base model; pass it as "
                       "`sdc build MODEL --lora PATH`")
    if has("model.diffusion_model.joint_blocks") or has("model.diffusion_model.double_blocks"):
        raise SdcError(f"{path}: SD3/Flux (transformer) checkpoint; sdc builds UNet models "
                       "(SD1.x, SD2.x, SDXL) only")
    if not has("model.diffusion_model."):
        sample = ", ".join(list(keys)[:3])
        raise SdcError(f"{path}: not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet "
                       f"weights; keys look like: {sample}); expected an SD1.x/SD2.x/SDXL "
                       ".safetensors/.ckpt")
    if has("conditioner.embedders."):
        if not has("conditioner.embedders.1.model."):
            raise SdcError(f"{path}: SDXL refiner checkpoint (one OpenCLIP text encoder, aesthetic-"
                           "score conditioning); sdc builds SDXL base models, use one")
        if not has("conditioner.embedders.0.transformer."):
            raise SdcError(f"{path}: SDXL checkpoint without its CLIP-L text encoder "
                           "(conditioner.embedders.0.transformer.*); expected a full SDXL checkpoint")
        family = "sdxl"
    elif has("cond_stage_model.model."):
        family = "sd2"  # OpenCLIP-H
    elif has("cond_stage_model.transformer."):
        to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        if to_k in shapes and shapes[to_k][1] == 1024:
            raise SdcError(f"{path}: SD2.x UNet (context 1024) with an SD1 CLIP text encoder; "
                           "expected a standard SD1.x or SD2.x checkpoint")
        family = "sd1"
    else:
        raise SdcError(f"{path}: checkpoint has no text encoder (cond_stage_model.* or "
                       "conditioner.embedders.*); expected a full SD1.x/SD2.x/SDXL checkpoint")
    if not has("first_stage_model."):
        raise SdcError(f"{path}: checkpoint has no VAE (first_stage_model.*); expected a full "
                       f"{family_of(family).title} checkpoint")
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight", [0, 4])
    if conv_in[1] != 4:
        what = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(
            conv_in[1], f"a {conv_in[1]}-channel UNet")
        raise SdcError(f"{path}: this is {what} (UNet takes {conv_in[1]} input channels); sdc "
                       "builds text-to-image models (4 channels) only for now")
    return family


def _read_config(path: Path, folder: Path) -> dict:
    """A diffusers JSON config as a dict; one line when it is not one (a hand-edited or truncated
    download), instead of a traceback from json or from whoever reads it next."""
    try:
        if path.stat().st_size > 16 * 2**20:  # real configs are a few kB
            raise ValueError(f"{path.stat().st_size} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise SdcError(f"{folder}: {path.relative_to(folder)} is not a readable JSON config "
                       f"({str(e)[:60]}); restore it from the model's original download") from None
    if not isinstance(data, dict):
        raise SdcError(f"{folder}: {path.relative_to(folder)} holds a JSON {type(data).__name__}, "
                       "expected an object; restore it from the model's original download")
    return data


def detect_diffusers_family(folder: Path) -> str:
    index = _read_config(folder / "model_index.json", folder)
    cls = index.get("_class_name", "?")
    if (folder / "manifest.json").is_file():
        raise SdcError(f"{folder}: an sdc build, not a model to build from; to fuse LoRAs into it "
                       f"use `sdc build --from {folder} --lora ...`, to run it `sdc run -a {folder}`")
    onnx_graphs = list(folder.glob("*/model.onnx"))
    if onnx_graphs or cls.startswith(("Onnx", "ORT", "OV")):
        raise SdcError(f"{folder}: an ONNX export by another tool ({cls}, {len(onnx_graphs)} graphs), "
                       "not PyTorch weights; sdc builds from the original diffusers folder or "
                       "single-file checkpoint — pass that instead")
    matching = [f for f in FAMILIES.values() if cls in f.pipeline_classes]
    if not matching:
        known = ", ".join(c for f in FAMILIES.values() for c in f.pipeline_classes[:1])
        raise SdcError(f"{folder}: model_index.json names {cls}, expected one of {known}")
    family = matching[0]
    if family.space == "pixel":
        from .if_source import check_if_folder

        check_if_folder(folder, family)
        return family.name
    if family.name == "sdxl" and not (folder / "text_encoder" / "config.json").is_file() \
            and (folder / "text_encoder_2" / "config.json").is_file():
        raise SdcError(f"{folder}: SDXL refiner (text_encoder_2 only, aesthetic-score "
                       "conditioning); sdc builds SDXL base models, use one")
    for part in family.components:
        if not (folder / part / "config.json").is_file():
            raise SdcError(f"{folder}: missing {part}/config.json; expected a diffusers "
                           f"{family.title} folder with " + ", ".join(f"{c}/" for c in family.components))
    unet = _read_config(folder / "unet" / "config.json", folder)
    if unet.get("in_channels", 4) != 4:
        raise SdcError(f"{folder}: UNet takes {unet['in_channels']} input channels (inpainting or "
                       "pix2pix); sdc builds text-to-image models (4 channels) only for now")
    added = unet.get("addition_embed_type")
    if family.conditioning == "text_time" and added != "text_time":
        raise SdcError(f"{folder}: a {cls} whose UNet has addition_embed_type={added!r}, expected "
                       "'text_time' (SDXL's added conditioning); the configs do not match")
    if family.conditioning == "text" and added:
        raise SdcError(f"{folder}: UNet uses addition_embed_type={added} (SDXL-style) under a "
                       f"{cls}; the configs do not match")
    if family.name == "sd1" and (unet.get("use_linear_projection")
                                 or unet.get("cross_attention_dim") == 1024):
        return "sd2"  # same pipeline class; OpenCLIP-H conditioning and linear projections
    return family.name


# ---------------------------------------------------------------------------------------------
# The source object


@dataclass
class ModelSource:
    kind: str  # diffusers | single_file | builtin
    path: Path
    name: str
    family: str
    config_dir: Path  # folder holding unet/vae/text_encoder configs, tokenizer/, scheduler/
    weight_files: list[Path]
    note: str = ""
    _state_dict: dict | None = field(default=None, repr=False)  # loaded pickle (single_file .ckpt)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    _hashes: dict | None = field(default=None, repr=False)
    # components read from another folder than `path`: {component: (folder, subfolder)}
    # (DeepFloyd IF's stage II UNet from the IF-II download given with --upscaler)
    parts: dict = field(default_factory=dict)

    @property
    def builtin(self) -> bool:
        return self.kind == "builtin"

    def defaults(self) -> dict:
        """Generation defaults from the model folder's sdc.json ({} when it has none)."""
        f = self.path / MODEL_DEFAULTS_FILE if self.path.is_dir() else None
        if f is None or not f.is_file():
            return {}
        try:
            raw = json.loads(f.read_text()).get("defaults", {})
        except (json.JSONDecodeError, AttributeError) as e:
            raise SdcError(f"{f}: not a JSON object with a 'defaults' object ({e}); fix or delete "
                           "it") from None
        out = {}
        for k, v in raw.items():
            kind = DEFAULT_KEYS.get(k)
            if kind is None or isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 \
                    or (kind is int and v != int(v)):
                raise SdcError(f"{f}: defaults.{k} = {v!r}; expected positive "
                               f"{' / '.join(f'{n} ({t.__name__})' for n, t in DEFAULT_KEYS.items())}")
            out[k] = kind(v)
        return out

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every weight and config file that defines the model, by relative name."""
        if self._hashes is None:
            named = [(str(f.relative_to(self.path)) if self.path.is_dir() else f.name, f)
                     for f in self.weight_files]
            configs = sorted(self.config_dir.glob("*/*.json")) + [self.config_dir / "model_index.json",
                                                                   self.config_dir / MODEL_DEFAULTS_FILE]
            named += [(f"config:{f.relative_to(self.config_dir)}", f) for f in configs if f.is_file()]
            for component, (root, sub) in sorted(self.parts.items()):  # --upscaler's files
                extra = sorted((root / sub).iterdir()) + sorted(root.glob("*scheduler/*.json"))
                named += [(f"{component}:{f.relative_to(root)}", f) for f in extra if f.is_file()]
            self._hashes = {rel: sha256_file(f) for rel, f in named}
        return self._hashes

    def content_hash(self) -> str:
        """One sha256 over all of file_hashes(): the model's identity in the build key."""
        h = hashlib.sha256()
        for rel, digest in self.file_hashes().items():
            h.update(f"{rel}\0{digest}\n".encode())
        return h.hexdigest()

    def a1111_hash(self) -> str | None:
        """A1111's model hash (first 10 hex of the checkpoint file's sha256), for PNG metadata;
        only defined for single-file checkpoints."""
        return self.file_hashes()[self.path.name][:10] if self.kind == "single_file" else None

    @property
    def spec(self) -> Family:
        return family_of(self.family)

    def native_size(self) -> int:
        """Training resolution in pixels (512 for SD1.x, 1024 for SDXL): the default size."""
        cfg = self.configs()
        return int(cfg["unet"].get("sample_size", 64)) * self.dims().vae_scale_factor

    def dims(self) -> ModelDims:
        return self.spec.dims(self.configs())

    def component_dir(self, component: str) -> tuple[Path, str]:
        """(folder, subfolder) holding a component's weights and config.json."""
        return self.parts.get(component, (self.config_dir, component))

    def configs(self) -> dict:
        out = {}
        for p in self.spec.components:
            root, sub = self.component_dir(p)
            if (root / sub / "config.json").is_file() or p not in self.optional_components():
                out[p] = _read_config(root / sub / "config.json", root)
        return out

    def optional_components(self) -> tuple[str, ...]:
        """Components a build may go without (IF's stage II, without --upscaler)."""
        return tuple(c for c in self.spec.components if c in UPSCALER_COMPONENTS
                     and c not in self.parts) if self.spec.space == "pixel" else ()

    def scheduler_config(self) -> dict:
        return _read_config(self.config_dir / "scheduler" / "scheduler_config.json", self.config_dir)

    def model_index(self) -> dict:
        index = self.config_dir / "model_index.json"
        return _read_config(index, self.config_dir) if index.is_file() else {}

    def tokenizer_dir(self, name: str = "tokenizer") -> Path:
        """The model's tokenizer folder `name`; SD1 folders without one use the shipped CLIP's,
        and the shipped config sets' tokenizers (a pad token over it) are derived on first use."""
        own = self.config_dir / name
        if (own / "vocab.json").is_file() or (own / "tokenizer.json").is_file():
            return own
        if (own / "tokenizer_config.json").is_file() and DATA in own.resolve().parents:
            from .clip_tokenizer import shipped_tokenizer

            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="sdc-tokenizers-")
            derived = Path(self._tmp.name) / name
            return derived if derived.is_dir() else shipped_tokenizer(own, derived)
        if self.family == "sd1":
            return family_of("sd1").config_dir() / "tokenizer"
        raise SdcError(f"{self.path}: no {name}/ (vocab.json or tokenizer.json) for its "
                       f"{self.spec.title} text encoder; copy the model's {name} folder in, or "
                       "pass --config DIR holding it")

    def load(self, component: str, dtype: str = "fp32"):
        """The torch module (eval) for one of the family's diffusers components."""
        import importlib

        import torch

        torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
        library, cls_name = self.spec.components[component]
        cls = getattr(importlib.import_module(library), cls_name)
        if self.kind != "single_file":
            variant = self._variant(component)
            root, sub = self.component_dir(component)
            if library == "transformers":
                m, info = cls.from_pretrained(root / sub, dtype=torch_dtype,
                                              variant=variant, output_loading_info=True)
            else:
                m, info = cls.from_pretrained(root, subfolder=sub,
                                              torch_dtype=torch_dtype, variant=variant,
                                              output_loading_info=True)
            # transformers 5 re-initialises weights whose shape does not fit the config, and both
            # libraries fill missing ones randomly, with only a log line: a build would then
            # "pass" parity against the same random module. Refuse instead.
            bad = [k for key in ("missing_keys", "mismatched_keys") for k in info.get(key) or []]
            if bad:
                shown = ", ".join(str(b[0] if isinstance(b, tuple) else b) for b in bad[:3])
                raise SdcError(f"{self.path}: cannot load its {component}: {len(bad)} weight(s) "
                               f"missing or not matching {component}/config.json (e.g. {shown}); "
                               "the folder's weights and configs disagree")
            return m.eval()
        sd = self._component_state_dict(component)
        # diffusers' own LDM -> diffusers converters, fed the shipped configs (offline).
        if library == "transformers":
            from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

            m = create_diffusers_clip_model_from_ldm(
                cls, sd, subfolder=component, config=str(self.config_dir),
                torch_dtype=torch_dtype, local_files_only=True)
        else:
            m = cls.from_single_file(sd, config=str(self.config_dir), subfolder=component,
                                     torch_dtype=torch_dtype, local_files_only=True)
        unloaded = [n for n, p in m.named_parameters() if p.device.type == "meta"]
        if unloaded:  # the converter found no tensor for these: never export an empty weight
            raise SdcError(f"{self.path}: the checkpoint has no {component} weights for "
                           f"{len(unloaded)} parameter(s) (e.g. {unloaded[0]}); is it a full "
                           f"{self.spec.title} checkpoint matching the configs?")
        return m.eval()

    def _variant(self, component: str) -> str | None:
        """'fp16' for folders that ship only `*.fp16.safetensors` weights (a common download)."""
        root, sub = self.component_dir(component)
        files = [p.name for p in (root / sub).iterdir()]
        plain = [f for f in files if f.endswith((".safetensors", ".bin")) and f.count(".") == 1]
        return "fp16" if not plain and any(".fp16." in f for f in files) else None

    def _component_state_dict(self, component: str) -> dict:
        prefix = self.spec.ldm_prefixes[component]
        if self._state_dict is not None:
            return {k: v for k, v in self._state_dict.items() if k.startswith(prefix)}
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}

    def close(self) -> None:
        self._state_dict = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _diffusers_weight_files(folder: Path, family: Family | None = None,
                            parts: dict | None = None) -> list[Path]:
    family = family or family_of("sd1")
    files = []
    for part in family.components:
        if part in (parts or {}):
            continue  # hashed with its own folder (ModelSource.file_hashes)
        if family.space == "pixel" and part in UPSCALER_COMPONENTS:
            continue  # from --upscaler's folder, or not built
        found = sorted(p for p in (folder / part).iterdir()
                       if p.suffix in (".safetensors", ".bin") and p.is_file())
        if not found:
            raise SdcError(f"{folder}: {part}/ has no weights (.safetensors or .bin); expected a "
                           f"complete diffusers {family.title} folder")
        for p in found:
            if p.suffix == ".safetensors":
                read_safetensors_header(p)  # refuses truncated files before diffusers chokes
        files += found
    return files


def _check_single_file_fits(shapes: dict, config_dir: Path, path: Path, family: Family) -> None:
    """A checkpoint whose widths differ from the configs would fail deep inside diffusers."""
    configs = {p: _read_config(config_dir / p / "config.json", config_dir) for p in family.components}
    unet = configs["unet"]
    checks = [("model.diffusion_model.input_blocks.0.0.weight", 0, unet["block_out_channels"][0],
               "UNet width")]
    for component, cfg in configs.items():
        if family.components[component][0] != "transformers":
            continue
        prefix = family.ldm_prefixes[component]
        for key in (prefix + "text_model.embeddings.token_embedding.weight",  # CLIP layout
                    prefix + "token_embedding.weight"):  # OpenCLIP layout
            checks.append((key, 1, cfg["hidden_size"], f"{component} width"))
    for key, axis, want, what in checks:
        if key in shapes and shapes[key][axis] != want:
            raise SdcError(f"{path}: {what} is {shapes[key][axis]}, the configs in {config_dir} say "
                           f"{want}; pass --config DIR with this model's diffusers component configs")


def config_folder(config: str, family: Family) -> Path:
    """--config: a shipped config set by name (sd15, sd21, sd21-v, sdxl) or a folder."""
    shipped = {name: f for f in FAMILIES.values() for name in f.configs}
    if config in shipped:
        if shipped[config].name != family.name:
            raise SdcError(f"--config {config} holds {shipped[config].title} configs, but the "
                           f"checkpoint is {family.title}; use one of {', '.join(family.configs)}")
        return family.config_dir(config)
    folder = Path(config).resolve()
    for part in family.components:
        if not (folder / part / "config.json").is_file():
            raise SdcError(f"--config {folder}: missing {part}/config.json; expected a diffusers "
                           f"{family.title} folder's component configs, or one of "
                           f"{', '.join(shipped)}")
    return folder


def resolve_model(model: str | None, config: str | None = None,
                  upscaler: str | None = None) -> ModelSource:
    """Turn the MODEL argument into a validated ModelSource (raises SdcError on bad input).

    `config` is a shipped config set's name or a diffusers-format folder of component configs,
    for single-file checkpoints (default: the family's standard full-size configs).
    """
    if model is None:
        if not (SDC_TINY / "model_index.json").is_file():
            raise SdcError(f"the built-in model is missing from {SDC_TINY}; reinstall sdc, or "
                           "retrain it with `make tiny-model`, or pass MODEL")
        return ModelSource("builtin", SDC_TINY, "sdc-tiny", "sd1", SDC_TINY,
                           _diffusers_weight_files(SDC_TINY, family_of("sd1")),
                           note="the built-in sdc-tiny: 64 px shapes on backgrounds, trained by "
                                "sdc (training/train_tiny.py); see its model card")
    path = Path(model).expanduser()
    if not path.exists():
        raise SdcError(f"model not found: {path}; expected a diffusers model folder or a "
                       ".safetensors/.ckpt checkpoint (omit MODEL for the built-in one)")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SdcError(f"{path}: not a diffusers model folder (no model_index.json); expected a "
                           "diffusers model folder or a single-file checkpoint")
        family = detect_diffusers_family(path)
        parts = {}
        if upscaler is not None or family_of(family).space == "pixel":
            from .if_source import upscaler_parts

            parts = upscaler_parts(upscaler, family_of(family))
        return ModelSource("diffusers", path.resolve(), path.resolve().name, family, path.resolve(),
                           _diffusers_weight_files(path.resolve(), family_of(family), parts),
                           parts=parts)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise SdcError(f"{path}: unknown model file type '{path.suffix}'; expected .safetensors or "
                       ".ckpt (or a diffusers folder)")
    shapes, state_dict = _shapes_of(path)
    family = family_of(detect_single_file_family(shapes, path))
    config_dir = config_folder(config, family) if config else family.config_dir()
    _check_single_file_fits(shapes, config_dir, path, family)
    return ModelSource("single_file", path.resolve(), path.stem, family.name, config_dir,
                       [path.resolve()], _state_dict=state_dict)
