"""The manifest's schema, written once as data and checked once at load.

Every key the runtime, `sdc verify`, `sdc inspect` and `sdc build --from` read is declared here with
its type, so a malformed manifest (JSON `null`, `[]`, a missing key, a string where a number
belongs) fails in `load_manifest` with one line naming the key path — never later as a KeyError or
AttributeError inside some reader after verification passed. Keys not declared are allowed (newer
builds add facts); declared keys must have their declared type.

The little type language: `str`, `int`, `float` (int accepted), `bool`, `dict` (any object), `list`
(any list), `[T]` a list of T, `{"*": T}` an object of T values, `{"key": T, "key?": T}` an object
with required and optional keys, `Nullable(T)`.
"""

from __future__ import annotations

import math

from ..errors import SdcError


class Nullable:
    def __init__(self, inner):
        self.inner = inner


TENSOR = {"name": str, "dtype": str, "shape": list}
PARITY = {"metric": str, "value": float, "threshold": float, "passed": bool}
WEIGHTS = {"map": {"*": str}, "data?": {"*": list}, "data_file?": str, "unused?": [str]}
GRAPH = {
    "files": [str], "inputs": [TENSOR], "outputs": [TENSOR], "precision": str,
    "parity?": PARITY, "memory?": dict, "weights?": WEIGHTS, "opset?": int, "optimization?": str,
    "tiled?": {"files": [str], "segments": [{"file": str}], "parity?": PARITY},
    "chunks?": {"files": [str], "parts": [{"file": str}], "parity?": dict},
    "quantization?": {"format": str, "layers": {"*": {"format": str, "bytes": int}},
                      "kept": {"*": str}, "target_db?": Nullable(float),
                      "achieved_db?": Nullable(float), "search?": Nullable(dict)},
}
MANIFEST_SCHEMA = {
    "format": str, "format_version": int, "layout?": int, "build_key": str, "precision": str,
    "versions?": {"*": Nullable(str)},
    "base_model": {"name": str, "kind": str, "family": str, "sha256?": Nullable(str),
                   "builtin?": bool},
    "defaults?": dict,
    "model": {"latent_channels": int, "vae_scale_factor": int, "unet_multiple": int,
              "scaling_factor": float, "prediction_type?": str, "default_size?": int,
              "hidden_size?": int, "max_sequence?": int, "vocab_size?": int},
    "family": {"name": str, "roles": {"*": str}, "pipeline": [str], "conditioning": str,
               "text_encoders": [{"stage": str, "tokenizer": str, "states": str, "pooled?": str,
                                  "kind?": str, "mask?": str}],
               "zero_empty_negative?": bool, "space?": str},
    "pipeline": [str],
    "scheduler": {"config": str, "class?": Nullable(str)},
    # a pixel cascade's super-resolution stage (DeepFloyd IF stage II)
    "cascade?": {"upscale": {"stage": str, "factor": int, "noise_level": int,
                             "scheduler": {"config": str, "class?": Nullable(str)},
                             "noising_scheduler": {"config": str, "class?": Nullable(str)}}},
    "tokenizer": {"files": [str], "max_length": int},
    "graphs": {"*": GRAPH},
    "memory_profile?": Nullable(dict),
    "loras?": [{"name": str, "format": str, "weight": float, "rank": [int], "layers": int,
                "triggers": [str]}],
    "embeddings?": [dict],
    "quantized_from?": {"path": str, "build_key": str, "precision": str},
    "quantization?": {"formats": {"*": str}, "block_size": int},
    "build": {"seconds": float, "peak_rss_bytes": int},
    "files": {"*": {"sha256": str, "bytes": int}},
}

_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false",
          dict: "an object", list: "a list"}


def _describe(spec) -> str:
    if isinstance(spec, Nullable):
        return _describe(spec.inner) + " or null"
    if isinstance(spec, list):
        return f"a list of {_describe(spec[0]).removeprefix('a ').removeprefix('an ')}s"
    if isinstance(spec, dict):
        return "an object"
    return _NAMES[spec]


def _found(value) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'…' if len(text) > 40 else ''}"


def _fits(value, spec) -> bool:
    if spec is bool:
        return isinstance(value, bool)
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if spec is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, spec)


def check(value, spec, path: str) -> None:
    """Raise SdcError naming `path` when `value` does not have the shape `spec` declares."""
    if isinstance(spec, Nullable):
        if value is not None:
            check(value, spec.inner, path)
        return
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise SdcError(f"{path}: expected {_describe(spec)}, found {_found(value)}")
        for i, item in enumerate(value):
            check(item, spec[0], f"{path}[{i}]")
        return
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise SdcError(f"{path}: expected an object, found {_found(value)}")
        if "*" in spec:
            for key, item in value.items():
                check(item, spec["*"], f"{path}.{key}")
            return
        for key, sub in spec.items():
            name = key.removesuffix("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                raise SdcError(f"{path}: required key '{name}' is missing")
            check(value[name], sub, f"{path}.{name}")
        return
    if not _fits(value, spec):
        raise SdcError(f"{path}: expected {_describe(spec)}, found {_found(value)}")


def check_manifest(manifest, where: str) -> None:
    """One schema check of a parsed manifest; the message names the key and says what to do."""
    try:
        check(manifest, MANIFEST_SCHEMA, "manifest")
    except SdcError as e:
        raise SdcError(f"{where}: malformed manifest: {e}; rebuild with `sdc build --force`") from None
    for rel, entry in manifest["files"].items():
        if entry["bytes"] < 0 or len(entry["sha256"]) != 64:
            raise SdcError(f"{where}: malformed manifest: files.{rel}: expected a 64-digit sha256 and "
                           "a byte count >= 0; rebuild with `sdc build --force`")
