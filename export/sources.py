"""Model inputs for `sdc build`: what MODEL points at, what family it is, and how to load each part.

Three kinds, all offline:
  diffusers     a diffusers-format SD1.x folder (model_index.json, unet/, vae/, text_encoder/, ...)
  single_file   an A1111/CompVis checkpoint (.safetensors, or .ckpt/.pt unpickled weights-only)
  builtin       no MODEL: sdc-tiny, the project's own trained tiny SD1 model, shipped in the package
                (export/data/sdc-tiny, trained by training/train_tiny.py)

The family (SD1.x / SD2.x / SDXL / ...) is detected from metadata before any tensor is loaded: the
diffusers configs, or the safetensors header (key names and shapes). A model sdc cannot build yet
is refused naming what it is. Single-file checkpoints are converted with diffusers' own converters
against the SD1.x component configs shipped in export/data/sd15 (no hub access).
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
from ..runtime.specs import ModelDims
from .tiny_model import SD15_CONFIGS

SDC_TINY = Path(__file__).parent / "data" / "sdc-tiny"
# Optional file in a model folder: the generation defaults its trainer recommends (sdc-tiny wants
# guidance 3, not SD's 7.5). Copied into the manifest's `defaults`; `sdc run` flags override them.
MODEL_DEFAULTS_FILE = "sdc.json"
DEFAULT_KEYS = {"guidance": float, "steps": int}

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# Where each diffusers component lives inside an A1111/CompVis checkpoint.
LDM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}


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
    """'sd1' or an SdcError naming what the checkpoint is."""
    keys = shapes.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("lora_unet_") or has("lora_te") or any(".lora_" in k or "lora_A" in k for k in keys):
        raise SdcError(f"{path}: this is a LoRA adapter, not a base model; pass it as "
                       "`sdc build MODEL --lora PATH`")
    if has("conditioner.embedders."):
        raise SdcError(f"{path}: SDXL checkpoint (conditioner.embedders.* keys); sdc builds SD1.x "
                       "only for now, use an SD1.x model")
    if has("model.diffusion_model.joint_blocks") or has("model.diffusion_model.double_blocks"):
        raise SdcError(f"{path}: SD3/Flux (transformer) checkpoint; sdc builds SD1.x UNet models only")
    if not has("model.diffusion_model."):
        sample = ", ".join(list(keys)[:3])
        raise SdcError(f"{path}: not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet "
                       f"weights; keys look like: {sample}); expected an SD1.x .safetensors/.ckpt")
    to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    context = shapes[to_k][1] if to_k in shapes else None
    if has("cond_stage_model.model.") or context == 1024:
        raise SdcError(f"{path}: SD2.x checkpoint (OpenCLIP text encoder, context 1024); sdc builds "
                       "SD1.x only for now")
    if not has("cond_stage_model.transformer."):
        raise SdcError(f"{path}: checkpoint has no CLIP text encoder "
                       "(cond_stage_model.transformer.*); expected a full SD1.x checkpoint")
    if not has("first_stage_model."):
        raise SdcError(f"{path}: checkpoint has no VAE (first_stage_model.*); expected a full SD1.x "
                       "checkpoint")
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight", [0, 4])
    if conv_in[1] != 4:
        what = {9: "an SD1.x inpainting model", 8: "an instruct-pix2pix model"}.get(
            conv_in[1], f"a {conv_in[1]}-channel UNet")
        raise SdcError(f"{path}: this is {what} (UNet takes {conv_in[1]} input channels); sdc "
                       "builds text-to-image SD1.x (4 channels) only for now")
    return "sd1"


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
    if onnx_graphs or cls in ("OnnxStableDiffusionPipeline", "ORTStableDiffusionPipeline"):
        raise SdcError(f"{folder}: an ONNX export by another tool ({cls}, {len(onnx_graphs)} graphs), "
                       "not PyTorch weights; sdc builds from the original diffusers folder or "
                       "single-file checkpoint — pass that instead")
    if "XL" in cls:
        raise SdcError(f"{folder}: SDXL pipeline ({cls}); sdc builds SD1.x only for now")
    if cls not in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
        raise SdcError(f"{folder}: model_index.json names {cls}, expected StableDiffusionPipeline "
                       "(SD1.x)")
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part / "config.json").is_file():
            raise SdcError(f"{folder}: missing {part}/config.json; expected a diffusers SD1.x folder "
                           "with unet/, vae/, text_encoder/")
    unet = _read_config(folder / "unet" / "config.json", folder)
    if unet.get("cross_attention_dim") == 1024:
        raise SdcError(f"{folder}: SD2.x model (cross_attention_dim 1024); sdc builds SD1.x only for now")
    if unet.get("in_channels", 4) != 4:
        raise SdcError(f"{folder}: UNet takes {unet['in_channels']} input channels (inpainting or "
                       "pix2pix); sdc builds text-to-image SD1.x (4 channels) only for now")
    if unet.get("addition_embed_type"):
        raise SdcError(f"{folder}: UNet uses addition_embed_type={unet['addition_embed_type']} "
                       "(SDXL-style); sdc builds SD1.x only for now")
    return "sd1"



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

    def native_size(self) -> int:
        """Training resolution in pixels (512 for SD1.x): the runtime's default width/height."""
        cfg = self.configs()
        return int(cfg["unet"].get("sample_size", 64)) * self.dims().vae_scale_factor

    def dims(self) -> ModelDims:
        cfg = self.configs()
        unet, vae, te = cfg["unet"], cfg["vae"], cfg["text_encoder"]
        return ModelDims(
            hidden_size=int(te["hidden_size"]),
            vocab_size=int(te["vocab_size"]),
            max_sequence=int(te.get("max_position_embeddings", 77)),
            latent_channels=int(vae.get("latent_channels", 4)),
            vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
            unet_multiple=2 ** (len(unet["block_out_channels"]) - 1),
            scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        )

    def configs(self) -> dict:
        return {p: _read_config(self.config_dir / p / "config.json", self.config_dir)
                for p in ("unet", "vae", "text_encoder")}

    def scheduler_config(self) -> dict:
        return _read_config(self.config_dir / "scheduler" / "scheduler_config.json", self.config_dir)

    def tokenizer_dir(self) -> Path:
        own = self.config_dir / "tokenizer"
        return own if (own / "vocab.json").is_file() else SD15_CONFIGS / "tokenizer"

    def load(self, component: str, dtype: str = "fp32"):
        """The torch module (eval) for a diffusers component name (unet, vae, text_encoder)."""
        import torch

        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
        if self.kind != "single_file":
            variant = self._variant(component)
            if component == "text_encoder":
                m, info = CLIPTextModel.from_pretrained(
                    self.path / "text_encoder", dtype=torch_dtype, variant=variant,
                    output_loading_info=True)
            else:
                cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
                m, info = cls.from_pretrained(self.path, subfolder=component,
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
        # diffusers' own LDM -> diffusers converters, fed the shipped SD1.x configs (offline).
        if component == "text_encoder":
            from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

            m = create_diffusers_clip_model_from_ldm(
                CLIPTextModel, sd, subfolder="text_encoder", config=str(self.config_dir),
                torch_dtype=torch_dtype, local_files_only=True)
        else:
            cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
            m = cls.from_single_file(sd, config=str(self.config_dir), subfolder=component,
                                     torch_dtype=torch_dtype, local_files_only=True)
        unloaded = [n for n, p in m.named_parameters() if p.device.type == "meta"]
        if unloaded:  # the converter found no tensor for these: never export an empty weight
            raise SdcError(f"{self.path}: the checkpoint has no {component} weights for "
                           f"{len(unloaded)} parameter(s) (e.g. {unloaded[0]}); is it a full SD1.x "
                           "checkpoint matching the configs?")
        return m.eval()

    def _variant(self, component: str) -> str | None:
        """'fp16' for folders that ship only `*.fp16.safetensors` weights (a common download)."""
        files = [p.name for p in (self.path / component).iterdir()]
        plain = [f for f in files if f.endswith((".safetensors", ".bin")) and f.count(".") == 1]
        return "fp16" if not plain and any(".fp16." in f for f in files) else None

    def _component_state_dict(self, component: str) -> dict:
        prefix = LDM_PREFIXES[component]
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


def _diffusers_weight_files(folder: Path) -> list[Path]:
    files = []
    for part in ("unet", "vae", "text_encoder"):
        found = sorted(p for p in (folder / part).iterdir()
                       if p.suffix in (".safetensors", ".bin") and p.is_file())
        if not found:
            raise SdcError(f"{folder}: {part}/ has no weights (.safetensors or .bin); expected a "
                           "complete diffusers SD1.x folder")
        for p in found:
            if p.suffix == ".safetensors":
                read_safetensors_header(p)  # refuses truncated files before diffusers chokes
        files += found
    return files


def _check_single_file_fits(shapes: dict, config_dir: Path, path: Path) -> None:
    """A checkpoint whose widths differ from the configs would fail deep inside diffusers."""
    unet = json.loads((config_dir / "unet" / "config.json").read_text())
    te = json.loads((config_dir / "text_encoder" / "config.json").read_text())
    checks = [
        ("model.diffusion_model.input_blocks.0.0.weight", 0, unet["block_out_channels"][0], "UNet width"),
        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", 1,
         te["hidden_size"], "text encoder width"),
        ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", 1,
         unet["cross_attention_dim"], "UNet cross-attention width"),
    ]
    for key, axis, want, what in checks:
        if key in shapes and shapes[key][axis] != want:
            raise SdcError(f"{path}: {what} is {shapes[key][axis]}, the configs in {config_dir} say "
                           f"{want}; pass --config DIR with this model's diffusers component configs")


def resolve_model(model: str | None, config: str | None = None) -> ModelSource:
    """Turn the MODEL argument into a validated ModelSource (raises SdcError on bad input).

    `config` is a diffusers-format folder of component configs for single-file checkpoints that
    are not the standard SD1.x size (default: the shipped SD1.5 configs).
    """
    if model is None:
        if not (SDC_TINY / "model_index.json").is_file():
            raise SdcError(f"the built-in model is missing from {SDC_TINY}; reinstall sdc, or "
                           "retrain it with `make tiny-model`, or pass MODEL")
        return ModelSource("builtin", SDC_TINY, "sdc-tiny", "sd1", SDC_TINY,
                           _diffusers_weight_files(SDC_TINY),
                           note="the built-in sdc-tiny: 64 px shapes on backgrounds, trained by "
                                "sdc (training/train_tiny.py); see its model card")
    path = Path(model).expanduser()
    if not path.exists():
        raise SdcError(f"model not found: {path}; expected a diffusers SD1.x folder or a "
                       ".safetensors/.ckpt checkpoint (omit MODEL for the built-in one)")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SdcError(f"{path}: not a diffusers model folder (no model_index.json); expected a "
                           "diffusers SD1.x folder or a single-file checkpoint")
        family = detect_diffusers_family(path)
        return ModelSource("diffusers", path.resolve(), path.resolve().name, family, path.resolve(),
                           _diffusers_weight_files(path.resolve()))
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise SdcError(f"{path}: unknown model file type '{path.suffix}'; expected .safetensors or "
                       ".ckpt (or a diffusers folder)")
    config_dir = Path(config).resolve() if config else SD15_CONFIGS
    for part in ("unet", "vae", "text_encoder"):
        if not (config_dir / part / "config.json").is_file():
            raise SdcError(f"--config {config_dir}: missing {part}/config.json; expected a diffusers "
                           "folder's component configs")
    shapes, state_dict = _shapes_of(path)
    family = detect_single_file_family(shapes, path)
    _check_single_file_fits(shapes, config_dir, path)
    return ModelSource("single_file", path.resolve(), path.stem, family, config_dir, [path.resolve()],
                       _state_dict=state_dict)
