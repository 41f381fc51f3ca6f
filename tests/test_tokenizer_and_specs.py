"""The shipped CLIP tokenizer and SD1.5 configs, and the GraphSpec contract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdc.families import SD1, ModelDims
from sdc.families.sd1 import UNET, VAE_DECODER

GRAPH_SPECS = {s.stage: s for s in SD1.specs}
from sdc.export.tiny_model import SD15_CONFIGS

TOKENIZER = SD15_CONFIGS / "tokenizer"


def test_tokenizer_gives_clip_ids():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    # golden ids of OpenAI CLIP ViT-L/14 (FACTS.md); regenerate the files with
    # export/data/derive_clip_tokenizer.py
    assert tok.encode("a photo of a cat").ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.get_vocab_size() == 49408
    assert len(json.loads((TOKENIZER / "vocab.json").read_text())) == 49408


@pytest.mark.parametrize("prompt", [
    "a red circle on a blue background", "A  Photo, of a CAT!!", "naïve café — 東京 2024",
    "(masterpiece:1.2), best quality, <lora:foo:0.5>", "",
])
def test_tokenizers_json_agrees_with_transformers_reading_vocab_and_merges(prompt):
    """Two independent readers of the shipped files: the runtime's `tokenizers` (tokenizer.json)
    and transformers' CLIPTokenizer built from vocab.json + merges.txt only."""
    import tempfile
    import shutil

    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(TOKENIZER / f, d)
        ref = CLIPTokenizer(vocab=f"{d}/vocab.json", merges=f"{d}/merges.txt")(prompt)["input_ids"]
    assert Tokenizer.from_file(str(TOKENIZER / "tokenizer.json")).encode(prompt).ids == ref


def test_shipped_sd15_configs_build_the_real_architecture():
    """Full-size SD1.5 parameter counts (FACTS.md), instantiated on the meta device (no memory)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(SD15_CONFIGS / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIGS / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIGS / "text_encoder"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    assert count(vae.decoder) + count(vae.post_quant_conv) == pytest.approx(49.49e6, rel=1e-3)
    assert count(te) == pytest.approx(123.06e6, rel=1e-3)


DIMS = ModelDims(hidden_size=768, vocab_size=49408, max_sequence=77, latent_channels=4,
                 vae_scale_factor=8, unet_multiple=8, scaling_factor=0.18215)


def test_specs_resolve_model_constants():
    assert UNET.inputs[2].resolve(DIMS)["shape"] == ["batch", "sequence", 768]
    assert VAE_DECODER.outputs[0].resolve(DIMS)["shape"] == \
        ["batch", 3, "latent_height*8", "latent_width*8"]
    assert GRAPH_SPECS["vae_encoder"].outputs[0].resolve(DIMS)["shape"][1] == 8


def test_trace_case_avoids_specialisable_dims():
    """The exporter specialises size-1 and coincident dims to constants: the trace must have
    neither, and parity must cover batch 1 and a non-square latent."""
    for spec in GRAPH_SPECS.values():
        cases = spec.case_dims(DIMS)
        t = cases["trace"]
        assert t["batch"] == 2 and t["latent_height"] != t["latent_width"]
        assert t["sequence"] not in (1, t["batch"])
        assert cases["non_square"]["batch"] == 1
        assert cases["non_square"]["latent_height"] != cases["non_square"]["latent_width"]
        for c in cases.values():
            assert c["latent_height"] % DIMS.unet_multiple == 0
            assert c["latent_width"] % DIMS.unet_multiple == 0


def test_dummy_inputs_are_deterministic_and_in_range():
    case = UNET.case_dims(DIMS)["square"]
    a, b = UNET.dummy_inputs(DIMS, case, seed=3), UNET.dummy_inputs(DIMS, case, seed=3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["sample"].shape == (2, 4, 32, 32) and a["sample"].dtype == np.float32
    assert ((a["timestep"] >= 0) & (a["timestep"] < 1000)).all()
    ids = GRAPH_SPECS["text_encoder"].dummy_inputs(DIMS, case)["input_ids"]
    assert ids.dtype == np.int64 and ids.max() < 49408
