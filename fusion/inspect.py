"""`sdc inspect LORA.safetensors`: what an adapter is and what it would change, without building
(torch-free). Keys are matched against a build's modules (`--base DIR`) or a shipped module list
(SDXL's for a file with SDXL-only keys, SD1.5's otherwise), so an adapter that does not fit fails
here exactly as it would at build.
"""

from __future__ import annotations

import json
from pathlib import Path

from .fuse import LoraSpec, report
from .lora import read_lora



def describe_lora(path: Path, base: Path | None = None) -> tuple[str, dict]:
    if base is not None:
        from ..runtime.manifest import load_manifest
        from .artifact import known_modules

        known = known_modules(load_manifest(base))
        against = str(base)
    else:
        from ..families import SD1, SDXL
        from .lora import Known, looks_sdxl

        family = SDXL if looks_sdxl(path) else SD1
        modules = json.loads((family.config_dir() / "modules.json").read_text())
        known = Known({c: dict.fromkeys(m) for c, m in modules.items()}, family)
        against = f"{family.config_dir().name} module layout"
    lora = read_lora(path, known)
    rep = report([(lora, LoraSpec(Path(path)))], {})[0]
    rep.pop("max_abs_delta")
    rep.pop("weight")
    rep.pop("blocks")
    rep["matched_against"] = against
    per = {}
    for layer in lora.layers:
        kind = "conv" if layer.down.ndim == 4 else "linear"
        per.setdefault(layer.component, {}).setdefault(kind, 0)
        per[layer.component][kind] += 1
    rep["layers_by_component"] = per
    lines = [
        f"lora: {lora.name} ({rep['format']}) {path}",
        f"sha256: {rep['sha256']}",
        f"rank: {'/'.join(map(str, rep['rank']))}   alpha: "
        f"{'/'.join(f'{a:g}' for a in rep['alpha'])} (from {rep['alpha_source']})",
        f"keys: {rep['matched_keys']}/{rep['total_keys']} matched against {against}",
    ]
    for comp, kinds in per.items():
        lines.append(f"  {comp}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    lines.append("triggers: " + (", ".join(rep["triggers"]) or "none declared"))
    return "\n".join(lines), rep
