"""Regenerate <set>/modules.json for the shipped config sets sd15 and sdxl: the module paths (with
a .weight) of the UNet and text encoder(s), from the shipped configs on the meta device.
`sdc inspect LORA.safetensors` matches a LoRA's keys against it without torch when no build is
given (an SDXL LoRA against SDXL's layout, any other against SD1.5's).

    python -m sdc.export.data.derive_module_list
"""

import json

from sdc.families import SD1, SDXL
from sdc.fusion.torch_apply import known_from_configs


def main() -> None:
    for family in (SD1, SDXL):
        folder = family.config_dir()
        parts = [c for c in family.components if c != "vae"]
        configs = {c: json.loads((folder / c / "config.json").read_text()) for c in parts}
        known = known_from_configs(configs, family)
        out = folder / "modules.json"
        out.write_text(json.dumps({c: sorted(m) for c, m in known.items()}, indent=0) + "\n")
        print(out, {c: len(m) for c, m in known.items()})


if __name__ == "__main__":
    main()
