"""DeepFloyd IF model folders: stage I (an IFPipeline download) and, with `sdc build --upscaler
DIR`, stage II (an IFSuperResolutionPipeline download), checked before any tensor loads.

Stage II's UNet becomes the build's `unet_2`; its own DDPM scheduler and the
`image_noising_scheduler` that noises the upscaled stage-I image travel with it into the build
(manifest `cascade`). Stage II's T5 is not read: IF's stages share one T5, stage I's.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SdcError
from ..families import Family
from ..families.deepfloyd import UPSCALER_COMPONENTS, UPSCALER_PIPELINES

# what a stage I folder must hold, and what the UNets must look like
_STAGE_I = ("text_encoder", "unet", "scheduler", "tokenizer")
_STAGE_II = ("unet", "scheduler", "image_noising_scheduler")


def _config(path: Path, folder: Path) -> dict:
    from .sources import _read_config

    return _read_config(path, folder)


def _check_unet(unet: dict, folder: Path, in_channels: int) -> None:
    if unet.get("in_channels") != in_channels or unet.get("out_channels") != 6:
        raise SdcError(f"{folder}: its UNet has in_channels={unet.get('in_channels')}, "
                       f"out_channels={unet.get('out_channels')}; expected {in_channels} in and 6 "
                       "out (IF's learned variance)")
    if unet.get("addition_embed_type") != "text":
        raise SdcError(f"{folder}: its UNet has addition_embed_type="
                       f"{unet.get('addition_embed_type')!r}, expected 'text' (IF's pooled T5 "
                       "conditioning); is this a DeepFloyd IF folder?")


def check_if_folder(folder: Path, family: Family) -> None:
    """A stage I folder: T5 + tokenizer + a 3-channel pixel UNet + its scheduler."""
    missing = [p for p in _STAGE_I if not (folder / p).is_dir()]
    if missing:
        raise SdcError(f"{folder}: missing {', '.join(p + '/' for p in missing)}; expected a "
                       f"DeepFloyd IF stage I folder with {', '.join(p + '/' for p in _STAGE_I)}")
    for part in ("text_encoder", "unet"):
        if not (folder / part / "config.json").is_file():
            raise SdcError(f"{folder}: missing {part}/config.json; expected a DeepFloyd IF stage I "
                           "folder")
    _check_unet(_config(folder / "unet" / "config.json", folder), folder, 3)


def upscaler_parts(upscaler: str | None, family: Family) -> dict:
    """{component: (folder, subfolder)} for --upscaler; {} without one (a stage I build)."""
    if family.space != "pixel":
        if upscaler is not None:
            raise SdcError(f"--upscaler names a cascade's super-resolution stage; a {family.title} "
                           "model has none (it is for DeepFloyd IF)")
        return {}
    if upscaler is None:
        return {}
    folder = Path(upscaler).expanduser()
    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        raise SdcError(f"--upscaler {upscaler}: expected a DeepFloyd IF stage II diffusers folder "
                       "(model_index.json naming IFSuperResolutionPipeline)")
    folder = folder.resolve()
    cls = _config(folder / "model_index.json", folder).get("_class_name")
    if cls not in UPSCALER_PIPELINES:
        raise SdcError(f"--upscaler {upscaler}: model_index.json names {cls}, expected "
                       f"{' or '.join(UPSCALER_PIPELINES)} (an IF-II download)")
    missing = [p for p in _STAGE_II if not (folder / p).is_dir()]
    if missing:
        raise SdcError(f"--upscaler {upscaler}: missing {', '.join(p + '/' for p in missing)}; "
                       "expected an IF stage II folder")
    _check_unet(_config(folder / "unet" / "config.json", folder), folder, 6)
    if not any(p.suffix in (".safetensors", ".bin") for p in (folder / "unet").iterdir()):
        raise SdcError(f"--upscaler {upscaler}: unet/ has no weights (.safetensors or .bin)")
    return {ours: (folder, theirs) for ours, theirs in UPSCALER_COMPONENTS.items()}


def cascade_schedulers(source) -> dict:
    """{relative build path: scheduler config} for stage II (its sampler and its noiser)."""
    if "unet_2" not in source.parts:
        return {}
    folder, _ = source.parts["unet_2"]
    # beside the graphs' folders, not in unet_2/ (whose files a quantized or re-fused build
    # rewrites)
    return {f"{ours}/scheduler_config.json": _config(folder / sub / "scheduler_config.json", folder)
            for ours, sub in (("scheduler_2", "scheduler"),
                              ("image_noising_scheduler", "image_noising_scheduler"))}


def write_cascade(tmp: Path, source) -> dict | None:
    """Stage II's schedulers into the build; the manifest's `cascade` block (None: no stage II)."""
    configs = cascade_schedulers(source)
    if not configs:
        return None
    for rel, config in configs.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(json.dumps(config, indent=2) + "\n")
    dims = source.dims()
    return {"upscale": {
        "stage": "unet_2", "factor": dims.upscale_factor, "noise_level": 250,
        "scheduler": {"class": configs["scheduler_2/scheduler_config.json"].get("_class_name"),
                      "config": "scheduler_2/scheduler_config.json"},
        "noising_scheduler": {"class": configs[
            "image_noising_scheduler/scheduler_config.json"].get("_class_name"),
            "config": "image_noising_scheduler/scheduler_config.json"},
        "description": "stage II: stage I's image upscaled bilinearly (align_corners) by factor, "
                       "noised to noise_level by noising_scheduler, denoised with scheduler",
    }}
