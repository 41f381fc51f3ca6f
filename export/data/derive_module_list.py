"""Regenerate sd15/modules.json: the module paths (with a .weight) of SD1.5's UNet and text
encoder, from the shipped configs on the meta device. `sdc inspect LORA.safetensors` matches a
LoRA's keys against it without torch when no build is given.

    python -m sdc.export.data.derive_module_list
"""

import json
from pathlib import Path

from sdc.export.tiny_model import SD15_CONFIGS
from sdc.fusion.torch_apply import known_from_configs


def main() -> None:
    configs = {c: json.loads((SD15_CONFIGS / c / "config.json").read_text())
               for c in ("unet", "text_encoder")}
    known = known_from_configs(configs)
    out = Path(__file__).parent / "sd15" / "modules.json"
    out.write_text(json.dumps({c: sorted(m) for c, m in known.items()}, indent=0) + "\n")
    print(out, {c: len(m) for c, m in known.items()})


if __name__ == "__main__":
    main()
