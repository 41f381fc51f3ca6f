"""Which execution provider each stage runs on: `--provider` for all, `--stage-provider` per stage.

`--stage-provider vae_decoder=cpu` is the "VAE on the CPU" of small-GPU setups: the UNet keeps the
card, the decoder (whose activations at 1024² are larger than its weights) runs in host memory.
The planner then holds only the stages on the device to `--vram-budget` and reports the host
stages' peak beside it (runtime/planner.py): the two memories are counted apart.
"""

from __future__ import annotations

from ..errors import SdcError
from .sessions import PROVIDERS


def parse_stage_providers(text: str | dict | None, stages) -> dict[str, str]:
    """'vae_decoder=cpu,text_encoder_2=cpu' (or a dict) -> {stage: provider}, checked against
    the build's stages."""
    if not text:
        return {}
    items = text.items() if isinstance(text, dict) else (
        p.strip().partition("=")[::2] for p in str(text).split(",") if p.strip())
    out = {}
    for stage, provider in items:
        stage, provider = str(stage).strip(), str(provider).strip()
        if not stage or not provider:
            raise SdcError(f"--stage-provider {text!r}: expected STAGE=PROVIDER[,...], e.g. "
                           "vae_decoder=cpu")
        if stage not in stages:
            raise SdcError(f"--stage-provider: no stage {stage!r} in this build; expected one of "
                           f"{', '.join(stages)}")
        if provider not in PROVIDERS:
            raise SdcError(f"--stage-provider {stage}={provider}: expected one of "
                           f"{', '.join(PROVIDERS)}")
        out[stage] = provider
    return out


def host_stages(provider: str, stage_providers: dict[str, str], cuda_available: bool) -> set[str]:
    """Stages that run in host memory while the others use the device: the ones placed on the
    CPU when the run's provider resolves to CUDA. On a CPU run every stage is in the one memory
    the budget bounds, so none is set apart."""
    on_device = provider == "cuda" or (provider == "auto" and cuda_available)
    if not on_device:
        return set()
    return {s for s, p in stage_providers.items() if p == "cpu"}
