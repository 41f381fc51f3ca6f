"""LoRA fusion against a finished build, torch-free: read base weights out of the graphs'
external data through the manifest's weight table, fuse in numpy, and either hand the results to
onnxruntime at session creation (run-time swap) or write a new build (re-fuse).

The manifest's `graphs.<stage>.weights` holds `map` {module parameter: initializer} and `data`
{initializer: [offset, length, dtype, shape]} in `data_file`: everything needed to find a weight's
bytes without onnx or torch. Both paths start from the *base* build's bytes every time, so
switching adapters A -> B -> A gives A's weights bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SdcError
from .fuse import Applied, LoraSpec, fuse_param, plan, report
from .lora import COMPONENTS, read_lora

STAGE_OF = {"unet": "unet", "text_encoder": "text_encoder"}


def known_modules(manifest: dict) -> dict[str, set[str]]:
    """{component: module paths with a .weight} from a build's weight maps."""
    out = {}
    for component in COMPONENTS:
        graph = manifest["graphs"].get(STAGE_OF[component])
        if graph:
            out[component] = {p.removesuffix(".weight") for p in graph["weights"]["map"]
                              if p.endswith(".weight")}
    return out


def load_adapters(specs: list[LoraSpec], known: dict[str, set[str]]):
    return [(read_lora(spec.path, known), spec) for spec in specs]


def _check_base(manifest: dict, folder: Path) -> None:
    if manifest.get("loras"):
        names = ", ".join(lo["name"] for lo in manifest["loras"])
        raise SdcError(f"{folder} already has LoRA(s) fused ({names}); fusing again needs the "
                       "base weights: use a build made without --lora")


def fused_initializers(folder: Path, manifest: dict, applied: Applied
                       ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """{stage: {initializer name: fused array}} and max |delta| per adapter file."""
    _check_base(manifest, folder)
    out: dict[str, dict[str, np.ndarray]] = {}
    max_delta: dict[str, float] = {}
    for (component, param), terms in sorted(applied.terms.items(), key=lambda kv: kv[0]):
        stage = STAGE_OF[component]
        graph = manifest["graphs"].get(stage)
        if graph is None:
            raise SdcError(f"this build has no {stage} graph, which the LoRA changes; rebuild "
                           f"with the {stage} stage")
        weights = graph["weights"]
        init = weights["map"].get(param)
        info = weights.get("data", {}).get(init)
        if info is None:
            raise SdcError(f"{stage} weight {param} is not stored as external data in {folder} "
                           "(built by an older sdc?); rebuild to fuse or swap LoRAs without torch")
        base = read_weight(folder / stage / weights["data_file"], info)
        fused, deltas = fuse_param(f"{stage} {param}", base, terms, base.dtype)
        out.setdefault(stage, {})[init] = fused
        for source, d in deltas.items():
            max_delta[source] = max(max_delta.get(source, 0.0), d)
    return out, max_delta


def read_weight(data_file: Path, info: list) -> np.ndarray:
    offset, length, dtype, shape = info
    arr = np.fromfile(data_file, dtype=np.dtype(dtype), count=length // np.dtype(dtype).itemsize,
                      offset=offset)
    return arr.reshape(shape)


def prepare(folder: Path, manifest: dict, specs: list[LoraSpec]):
    """Read the adapters against the build and fuse: ({stage: {init: array}}, manifest report)."""
    adapters = load_adapters(specs, known_modules(manifest))
    fused, max_delta = fused_initializers(folder, manifest, plan(adapters))
    return fused, report(adapters, max_delta)


def patch_data_file(data_file: Path, table: dict, arrays: dict[str, np.ndarray]) -> None:
    """Overwrite the given initializers' bytes in place (same dtype and shape as the table)."""
    with open(data_file, "r+b") as f:
        for name, arr in arrays.items():
            offset, length, dtype, shape = table[name]
            raw = np.ascontiguousarray(arr, dtype=np.dtype(dtype)).tobytes()
            if len(raw) != length or list(arr.shape) != list(shape):
                raise AssertionError(f"{name}: fused weight does not fit its slot")
            f.seek(offset)
            f.write(raw)
