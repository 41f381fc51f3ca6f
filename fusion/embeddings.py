"""Textual-inversion embeddings: `--embedding PATH[:TOKEN]` adds tokens to the tokenizer and rows
to the text encoder's token embedding, at build.

Formats: A1111 `.safetensors` (`emb_params` [n, dim]) and `.pt` (`string_to_param: {"*": [n,
dim]}`, `name`), and diffusers `learned_embeds` (`{token: [dim] or [n, dim]}`, .safetensors or
.bin). A multi-vector embedding becomes n tokens `TOKEN`, `TOKEN_1`, ..., `TOKEN_{n-1}`, and the
runtime expands `TOKEN` in a prompt into all n, as diffusers' `load_textual_inversion` +
`maybe_convert_prompt` do. SDXL embeddings (`clip_l` / `clip_g`) are refused by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SdcError
from ..runtime.manifest import sha256_file
from .safetensors_file import read_safetensors


@dataclass
class Embedding:
    path: Path
    sha256: str
    token: str
    vectors: np.ndarray  # [n, dim] float32
    format: str

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
    path = Path(path)
    if not path.is_file():
        raise SdcError(f"--embedding {path}: no such file; expected a textual-inversion embedding")
    if path.suffix.lower() == ".safetensors":
        st = read_safetensors(path)
        tensors = {k: st.tensor(k) for k in st.keys()}
        meta_name = st.metadata.get("name")
    elif path.suffix.lower() in (".pt", ".bin"):
        tensors, meta_name = _read_torch_file(path)
    else:
        raise SdcError(f"--embedding {path}: expected .safetensors, .pt or .bin, found "
                       f"{path.suffix or 'no extension'}")
    if any(k in tensors for k in ("clip_l", "clip_g")):
        raise SdcError(f"--embedding {path}: an SDXL embedding (clip_l/clip_g); sdc builds SD1.x")
    if "emb_params" in tensors:
        fmt, vectors, default = "a1111", tensors["emb_params"], meta_name or path.stem
    elif "string_to_param" in tensors:
        fmt, vectors, default = "a1111", tensors["string_to_param"], meta_name or path.stem
    elif len(tensors) == 1:
        (name, vectors), = tensors.items()
        fmt, default = "diffusers", name
    else:
        raise SdcError(f"--embedding {path}: unrecognised layout (keys {sorted(tensors)[:4]}); "
                       "expected emb_params, string_to_param or one learned_embeds entry")
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not len(vectors):
        raise SdcError(f"--embedding {path}: vectors of shape {list(vectors.shape)}; expected "
                       "[n, dim]")
    if not np.isfinite(vectors).all():
        raise SdcError(f"--embedding {path}: contains NaN or Inf")
    token = token or default
    if not token or re.search(r"\s", token):
        raise SdcError(f"--embedding {path}: token {token!r} must be one word; pass PATH:TOKEN")
    return Embedding(path, sha256_file(path), token, vectors, fmt)


def _read_torch_file(path: Path) -> tuple[dict, str | None]:
    try:
        import torch
    except ImportError:
        raise SdcError(f"--embedding {path}: .pt/.bin files need torch; convert to "
                       ".safetensors for the runtime-only install") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors come in many types
        raise SdcError(f"--embedding {path}: cannot read it weights-only "
                       f"({str(e).splitlines()[0][:120]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):
        params = list(obj["string_to_param"].values())
        return {"string_to_param": params[0].float().numpy()}, obj.get("name")
    if isinstance(obj, dict) and all(hasattr(v, "numpy") for v in obj.values()):
        return {k: v.float().numpy() for k, v in obj.items()}, None
    raise SdcError(f"--embedding {path}: unrecognised .pt layout")


def expand_prompt(text: str, embeddings: list[dict]) -> str:
    """Replace each multi-vector token by its n tokens, as diffusers' maybe_convert_prompt does
    (a plain string replacement)."""
    for emb in embeddings:
        if len(emb["tokens"]) > 1:
            text = text.replace(emb["token"], " ".join(emb["tokens"]))
    return text
