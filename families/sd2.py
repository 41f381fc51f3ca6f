"""SD2.x: SD1's pipeline with OpenCLIP-H (a 23-layer CLIPTextModel in diffusers' conversion, whose
last output is the penultimate layer of the original), `!` as pad token, linear projections in the
transformer blocks and per-block head dims, and 768-v models predicting v. The graphs are SD1's;
what differs is in the configs the exporter traces and in the scheduler's prediction_type."""

from __future__ import annotations

from dataclasses import replace

from .sd1 import SD1

SD2 = replace(
    SD1,
    name="sd2",
    title="SD2.x",
    # OpenCLIP's weights in an SD2 checkpoint; diffusers' converter turns them into CLIPTextModel
    ldm_prefixes={**SD1.ldm_prefixes, "text_encoder": "cond_stage_model.model."},
    # sd21: 2.0/2.1 base (512 px, epsilon); sd21-v: 768-v (768 px, v-prediction)
    configs=("sd21", "sd21-v"),
)
