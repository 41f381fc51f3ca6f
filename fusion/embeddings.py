"""Textual-inversion embeddings: `--embedding PATH[:TOKEN]` adds tokens to the tokenizer and rows
to the text encoder's token embedding, at build.

Formats: A1111 `.safetensors` (`emb_params` [n, dim]) and `.pt` (`string_to_param: {"*": [n,
dim]}`, `name`), and diffusers `learned_embeds` (`{token: [dim] or [n, dim]}`, .safetensors or
.bin). A multi-vector embedding becomes n tokens `TOKEN`, `TOKEN_1`, ..., `TOKEN_{n-1}`, and the
runtime expands `TOKEN` in a prompt into all n, as diffusers' `load_textual_inversion` +
`maybe_convert_prompt` do. SDXL embeddings (A1111's and diffusers' SDXL format, .safetensors)
hold two tensors, `clip_l` [n, 768] for `text_encoder` (CLIP-L) and `clip_g` [n, 1280] for
`text_encoder_2` (OpenCLIP-bigG), with the same n: both encoders get the n tokens.
An embedding is untrusted input: it must hold at least one finite float vector of width >= 1
(checked here) whose width is the text encoder's (checked by the caller, which also refuses an
embedding of another family: an SDXL one on an SD1.x/SD2.x build or the reverse); .pt files are
unpickled weights-only and must be plain dicts of tensors. Anything else is one SdcError line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SdcError
from ..runtime.manifest import sha256_file
from .safetensors_file import quote, read_safetensors


# an SDXL embedding's tensors -> the text encoder (diffusers component) each goes into
SDXL_PARTS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
# one-encoder embedding width -> the family whose text encoder has it (messages only)
_WIDTH_FAMILY = {768: "SD1.x", 1024: "SD2.x"}


def family_of_width(width: int, default: str | None = "SD1.x/SD2.x") -> str | None:
    return _WIDTH_FAMILY.get(int(width), default)


@dataclass
class Embedding:
    path: Path
    sha256: str
    token: str
    vectors: np.ndarray  # [n, dim] float32 (SDXL: clip_l's)
    format: str  # a1111 | diffusers | sdxl
    parts: dict[str, np.ndarray] | None = None  # SDXL: {"clip_l": [n, 768], "clip_g": [n, 1280]}

    def tokens(self) -> list[str]:
        return token_names(self.token, len(self.vectors))

    def report(self) -> dict:
        return {"file": str(self.path), "sha256": self.sha256, "token": self.token,
                "tokens": self.tokens(), "vectors": int(len(self.vectors)),
                "dim": int(self.vectors.shape[1]), "format": self.format}


def token_names(token: str, n: int) -> list[str]:
    """A1111's and diffusers' names for an n-vector embedding: TOKEN, TOKEN_1, ... TOKEN_{n-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def parse_embedding_arg(text: str) -> tuple[Path, str | None]:
    path, sep, token = text.rpartition(":")
    if sep and path and not Path(text).exists():
        return Path(path), token.strip() or None
    return Path(text), None


def read_embedding(path: Path, token: str | None = None) -> Embedding:
    """Read and check one embedding file; every malformed file is one SdcError line. The vector
    width is checked against the text encoder by the caller (plan_embeddings), which knows it."""
    path = Path(path)
    label = f"--embedding {path}"
    if not path.is_file():
        raise SdcError(f"{label}: no such file; expected a textual-inversion embedding")
    if path.suffix.lower() == ".safetensors":
        st = read_safetensors(path, label, allow_empty=True)
        tensors = {k: st.tensor(k) for k in st.keys()}
        meta_name = st.metadata.get("name")
    elif path.suffix.lower() in (".pt", ".bin"):
        tensors, meta_name = _read_torch_file(path, label)
    else:
        raise SdcError(f"{label}: expected .safetensors, .pt or .bin, found "
                       f"{path.suffix or 'no extension'}")
    if not tensors:
        raise SdcError(f"{label}: the file holds no tensors; expected an embedding's vectors")
    if any(k in tensors for k in SDXL_PARTS):
        return _sdxl_embedding(path, label, tensors, token or meta_name or path.stem)
    if "emb_params" in tensors:
        fmt, key, default = "a1111", "emb_params", meta_name or path.stem
    elif "string_to_param" in tensors:
        fmt, key, default = "a1111", "string_to_param", meta_name or path.stem
    elif len(tensors) == 1:
        (key,) = tensors
        fmt, default = "diffusers", key
    else:
        raise SdcError(f"{label}: unrecognised layout (keys "
                       f"{', '.join(quote(k) for k in sorted(tensors)[:4])}); "
                       "expected emb_params, string_to_param or one learned_embeds entry")
    vectors = _vectors(tensors, key, label)
    token = _token(token or default, label)
    return Embedding(path, sha256_file(path), token, vectors, fmt)


def _vectors(tensors: dict, key: str, label: str) -> np.ndarray:
    vectors = tensors[key]
    if not np.issubdtype(vectors.dtype, np.floating):
        # an integer or bool "embedding" would be cast to float silently: never a real one
        raise SdcError(f"{label}: {key} holds {vectors.dtype} values; expected float vectors")
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or 0 in vectors.shape:
        raise SdcError(f"{label}: {key} has shape {list(tensors[key].shape)}; expected [n, dim] "
                       "(or [dim]) with at least one vector of width >= 1")
    if not np.isfinite(vectors).all():
        raise SdcError(f"{label}: contains NaN or Inf")
    return vectors


def _token(token: str | None, label: str) -> str:
    if not token or re.search(r"\s", token):
        raise SdcError(f"{label}: token {quote(token)} must be one word; pass PATH:TOKEN")
    return token


def _sdxl_embedding(path: Path, label: str, tensors: dict, token: str | None) -> Embedding:
    """clip_l + clip_g, each [n, dim] with the same n, and nothing else."""
    missing = [p for p in SDXL_PARTS if p not in tensors]
    if missing:
        raise SdcError(f"{label}: an SDXL embedding needs both clip_l and clip_g; {missing[0]} is "
                       "missing")
    extra = sorted(k for k in tensors if k not in SDXL_PARTS)
    if extra:
        raise SdcError(f"{label}: an SDXL embedding holds clip_l and clip_g only; found also "
                       f"{', '.join(quote(k) for k in extra[:4])}")
    parts = {p: _vectors(tensors, p, label) for p in SDXL_PARTS}
    counts = {p: len(a) for p, a in parts.items()}
    if len(set(counts.values())) != 1:
        raise SdcError(f"{label}: clip_l has {counts['clip_l']} vectors and clip_g "
                       f"{counts['clip_g']}; an SDXL embedding has the same number for both "
                       "encoders")
    return Embedding(path, sha256_file(path), _token(token, label), parts["clip_l"], "sdxl",
                     parts)


def _read_torch_file(path: Path, label: str) -> tuple[dict, str | None]:
    try:
        import torch
    except ImportError:
        raise SdcError(f"{label}: .pt/.bin files need torch; convert to "
                       ".safetensors for the runtime-only install") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SdcError(f"{label}: cannot read it weights-only ({first[:120]})") from None
    if not isinstance(obj, dict):
        raise SdcError(f"{label}: unrecognised .pt layout (a {type(obj).__name__}); expected "
                       "a dict with string_to_param, or {token: tensor}")

    def as_numpy(key, v) -> np.ndarray:
        if not isinstance(v, torch.Tensor):
            raise SdcError(f"{label}: {quote(str(key))} is {type(v).__name__}, expected a tensor")
        # floats widened for numpy (which has no bf16); others kept so the dtype check names them
        return v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy()

    name = obj.get("name")
    if name is not None and not isinstance(name, str):
        raise SdcError(f"{label}: its name is {type(name).__name__}, expected a string")
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise SdcError(f"{label}: string_to_param should map one placeholder to its vectors; "
                           f"found {type(params).__name__} of "
                           f"{len(params) if hasattr(params, '__len__') else '?'} entries")
        (value,) = params.values()
        return {"string_to_param": as_numpy("string_to_param", value)}, name
    if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return {k: as_numpy(k, v) for k, v in obj.items()}, None
    raise SdcError(f"{label}: unrecognised .pt layout (keys {sorted(map(str, obj))[:4]}); "
                   "expected string_to_param or {token: tensor}")


def expand_prompt(text: str, embeddings: list[dict]) -> str:
    """Replace each multi-vector token by its n tokens, as diffusers' maybe_convert_prompt does
    (a plain string replacement)."""
    for emb in embeddings:
        if len(emb["tokens"]) > 1:
            text = text.replace(emb["token"], " ".join(emb["tokens"]))
    return text
