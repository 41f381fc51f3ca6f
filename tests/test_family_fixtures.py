"""The SD2.x / SDXL test fixtures and shipped configs, checked against diffusers/transformers only.

* shipped full-size configs (export/data/sd21, sd21-v, sdxl) build the published architectures
  (on the meta device: parameter counts, no weights allocated);
* their tokenizers are sd15's with the pad token changed, consistent between transformers and the
  `tokenizers` library (what the torch-free runtime reads);
* the tiny folders (family_models.py) load and run in diffusers' own pipelines;
* the single-file writers (ldm_checkpoint.py) read back through diffusers' own LDM/SGM converters
  to exactly the folder's tensors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from family_models import (SD15_TOKENIZER, SD21, SD21_V, SDXL, load_sd2_pipeline, load_sdxl_pipeline,
                           make_sd2_folder, make_sdxl_folder, sd2_tiny_configs, shipped_tokenizer,
                           write_clip_tokenizer)
from ldm_checkpoint import open_clip_to_ldm, write_sd2_single_file, write_sdxl_single_file

from sdc.export.quiet import quiet_torch_stack

PROMPTS = ["a photo of a cat", "Hello! world!!  ", "", "a " * 90]


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    return make_sd2_folder(tmp_path_factory.mktemp("fam") / "tiny-sd2")


@pytest.fixture(scope="module")
def sd2v_folder(tmp_path_factory):
    return make_sd2_folder(tmp_path_factory.mktemp("fam") / "tiny-sd2-v", prediction="v_prediction")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return make_sdxl_folder(tmp_path_factory.mktemp("fam") / "tiny-sdxl")


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), (what, sorted(got.keys() ^ want.keys())[:5])
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (what, k)


# ---------------------------------------------------------------------------------------------
# Shipped configs


@pytest.mark.parametrize("family", ["sd21", "sd21-v", "sdxl"])
def test_shipped_configs_build_the_published_architectures(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = {"sd21": SD21, "sd21-v": SD21_V, "sdxl": SDXL}[family]
    index = json.loads((root / "model_index.json").read_text())
    unet_cfg = UNet2DConditionModel.load_config(root / "unet")
    with quiet_torch_stack(), torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
        te2 = (CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(root / "text_encoder_2"))
               if family == "sdxl" else None)
    assert unet.device.type == "meta"
    assert _params(vae) == 83_653_863  # SD1's KL-f8 VAE
    assert te.dtype == torch.float32 and (te2 is None or te2.dtype == torch.float32)
    if family == "sdxl":
        assert index["_class_name"] == "StableDiffusionXLPipeline"
        assert index["force_zeros_for_empty_prompt"] is True
        assert _params(unet) == 2_567_463_684
        assert _params(te) == 123_060_480  # CLIP ViT-L/14 text
        assert _params(te2) == 694_659_840  # OpenCLIP ViT-bigG/14 text + projection
        assert unet_cfg["cross_attention_dim"] == te.config.hidden_size + te2.config.hidden_size
        assert unet.add_embedding.linear_1.in_features == (
            6 * unet_cfg["addition_time_embed_dim"] + te2.config.projection_dim) == 2816
        assert vae.config.scaling_factor == 0.13025 and vae.config.force_upcast
    else:
        assert index["_class_name"] == "StableDiffusionPipeline"
        assert _params(unet) == 865_910_724
        assert _params(te) == 340_387_840  # OpenCLIP ViT-H/14 text, 23 of its 24 layers
        assert unet_cfg["cross_attention_dim"] == te.config.hidden_size == 1024
        assert unet_cfg["upcast_attention"] is (family == "sd21-v")
        assert unet_cfg["sample_size"] == (96 if family == "sd21-v" else 64)
    for part in ("text_encoder", "text_encoder_2"):
        if part in index:
            arch = json.loads((root / part / "config.json").read_text())["architectures"]
            assert arch == [index[part][1]]


@pytest.mark.parametrize("family,cls,prediction", [
    ("sd21", "PNDMScheduler", "epsilon"), ("sd21-v", "DDIMScheduler", "v_prediction"),
    ("sdxl", "EulerDiscreteScheduler", "epsilon")])
def test_shipped_schedulers(family, cls, prediction):
    import diffusers

    root = {"sd21": SD21, "sd21-v": SD21_V, "sdxl": SDXL}[family]
    assert json.loads((root / "model_index.json").read_text())["scheduler"] == ["diffusers", cls]
    s = getattr(diffusers, cls).from_pretrained(root / "scheduler")
    c = s.config
    assert (c.prediction_type, c.beta_schedule, c.beta_start, c.beta_end, c.steps_offset,
            c.num_train_timesteps) == (prediction, "scaled_linear", 0.00085, 0.012, 1, 1000)
    if family == "sdxl":
        assert c.timestep_spacing == "leading"
    else:
        assert c.set_alpha_to_one is False


@pytest.mark.parametrize("folder,pad,pad_id", [
    (SD21 / "tokenizer", "!", 0), (SD21_V / "tokenizer", "!", 0),
    (SDXL / "tokenizer", "<|endoftext|>", 49407), (SDXL / "tokenizer_2", "!", 0)])
def test_shipped_tokenizers(folder, pad, pad_id, tmp_path):
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    from sdc.runtime.tokenizer import PromptTokenizer

    # shipped as a pad token only: sd15's files with the pad token changed (and made special,
    # as transformers does), derived when needed
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer_config.json"]
    folder = shipped_tokenizer(folder, tmp_path / "shipped")
    derived = write_clip_tokenizer(tmp_path / "tok", pad)
    for name in ("LICENSE", "merges.txt", "vocab.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).read_bytes() == (derived / name).read_bytes(), name
    for name in ("merges.txt", "vocab.json"):
        assert (folder / name).read_bytes() == (SD15_TOKENIZER / name).read_bytes()

    hf = CLIPTokenizer.from_pretrained(str(folder))
    assert (hf.pad_token, hf.pad_token_id, hf.model_max_length) == (pad, pad_id, 77)
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert fast.padding is None and fast.truncation is None
    for p in PROMPTS[:3]:  # unpadded: BOS ... EOS from both libraries
        assert fast.encode(p).ids == hf(p).input_ids, p
    padded = hf(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert padded[0][7:] == [pad_id] * 70  # "a photo of a cat" = BOS + 5 + EOS, then pads
    if pad == "!":  # a "!" in a prompt is the pad token too, in both libraries
        assert hf("cat!").input_ids == fast.encode("cat!").ids == [49406, 2368, 0, 49407]
    assert PromptTokenizer(folder)(PROMPTS).ids.tolist() == padded


# ---------------------------------------------------------------------------------------------
# Tiny folders


def test_tiny_sd2_configs(sd2_folder, sd2v_folder):
    from transformers import CLIPTokenizer

    for folder, pred, sched in ((sd2_folder, "epsilon", "PNDMScheduler"),
                                (sd2v_folder, "v_prediction", "DDIMScheduler")):
        unet = json.loads((folder / "unet" / "config.json").read_text())
        te = json.loads((folder / "text_encoder" / "config.json").read_text())
        sc = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert unet["use_linear_projection"] and unet["attention_head_dim"] == [2, 4]
        assert unet["cross_attention_dim"] == te["hidden_size"] == 48 and te["hidden_act"] == "gelu"
        assert unet["upcast_attention"] is (pred == "v_prediction")
        assert (sc["_class_name"], sc["prediction_type"], sc["steps_offset"], sc["set_alpha_to_one"]) == (
            sched, pred, 1, False)
        assert json.loads((folder / "model_index.json").read_text())["scheduler"][1] == sched
        assert CLIPTokenizer.from_pretrained(str(folder / "tokenizer")).pad_token_id == 0


def test_tiny_folders_are_deterministic(sd2_folder, tmp_path):
    again = make_sd2_folder(tmp_path / "again")
    unet_vae = "diffusion_pytorch_model.safetensors"
    for part, name in (("unet", unet_vae), ("vae", unet_vae), ("text_encoder", "model.safetensors")):
        assert (again / part / name).read_bytes() == (sd2_folder / part / name).read_bytes(), part
    other = make_sd2_folder(tmp_path / "other", seed=5)
    assert (other / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != (
        sd2_folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


@pytest.mark.parametrize("which", ["epsilon", "v_prediction"])
def test_tiny_sd2_runs_in_diffusers(which, sd2_folder, sd2v_folder):
    pipe = load_sd2_pipeline(sd2_folder if which == "epsilon" else sd2v_folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.scheduler.config.prediction_type == which
    assert pipe.tokenizer.pad_token_id == 0 and pipe.unet.dtype == torch.float32
    with torch.no_grad(), quiet_torch_stack():
        img = pipe("a photo of a cat!", num_inference_steps=2, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_tiny_sdxl_runs_in_diffusers(sdxl_folder):
    pipe = load_sdxl_pipeline(sdxl_folder)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (pipe.tokenizer.pad_token_id, pipe.tokenizer_2.pad_token_id) == (49407, 0)
    assert pipe.unet.config.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size) == 80
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    with torch.no_grad(), quiet_torch_stack():
        img = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


# ---------------------------------------------------------------------------------------------
# Single-file writers, read back by diffusers' converters


def _diffusers_read_back(sd: dict, folder, parts: dict) -> dict:
    """Each component as diffusers' single-file loaders build it from `sd` + the folder's configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    out = {}
    with quiet_torch_stack():
        for part, cls in parts.items():
            if cls is None:
                m = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[part].from_single_file(
                    sd, config=str(folder), subfolder=part, local_files_only=True)
            else:
                m = create_diffusers_clip_model_from_ldm(cls, sd, subfolder=part, config=str(folder),
                                                         local_files_only=True)
            out[part] = m.state_dict()
    return out


def _folder_state(folder, part: str) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
           "text_encoder_2": CLIPTextModelWithProjection}[part]
    with quiet_torch_stack():
        return cls.from_pretrained(folder / part).state_dict()


def test_sd2_single_file_reads_back_exactly(sd2_folder, tmp_path):
    from transformers import CLIPTextModel

    path = write_sd2_single_file(sd2_folder, tmp_path / "tiny-sd2.safetensors")
    sd = load_file(path)
    te = sd2_tiny_configs()["text_encoder"]
    h, n = te["hidden_size"], te["num_hidden_layers"]
    # the layout of real SD2 files
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "cond_stage_model"}
    assert sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * h, h)
    assert sd["cond_stage_model.model.text_projection"].shape == (h, te["projection_dim"])
    assert f"cond_stage_model.model.transformer.resblocks.{n}.ln_1.weight" in sd  # one extra layer
    assert f"cond_stage_model.model.transformer.resblocks.{n + 1}.ln_1.weight" not in sd
    assert sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # linear projection
    assert sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1] == 48
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4

    got = _diffusers_read_back(sd, sd2_folder, {"unet": None, "vae": None, "text_encoder": CLIPTextModel})
    for part in got:
        _assert_same_tensors(got[part], _folder_state(sd2_folder, part), part)

    ckpt = write_sd2_single_file(sd2_folder, tmp_path / "tiny-sd2.ckpt")
    _assert_same_tensors(torch.load(ckpt, weights_only=True)["state_dict"], sd, "ckpt")


def test_sd2_converter_drops_the_24th_open_clip_layer_by_name(tmp_path):
    """diffusers drops cond_stage_model.model.transformer.resblocks.23.* (a fixed key list,
    SD_2_TEXT_ENCODER_KEYS_TO_IGNORE, with the text_projection): a 23-layer encoder written with
    its 24th layer reads back to exactly its 23 layers. A shallower tiny encoder's extra layer is
    converted to text_model.encoder.layers.N.* keys instead, which the loader skips as unknown."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    for layers in (23, 3):
        cfg = CLIPTextConfig(**sd2_tiny_configs(text_layers=layers)["text_encoder"])
        torch.manual_seed(0)
        with quiet_torch_stack():
            CLIPTextModel(cfg).save_pretrained(tmp_path / str(layers) / "text_encoder")
        weights = load_file(tmp_path / str(layers) / "text_encoder" / "model.safetensors")
        sd = open_clip_to_ldm(weights, "cond_stage_model.model.", extra_layers=1,
                              text_projection=torch.zeros(cfg.hidden_size, cfg.projection_dim))
        assert f"cond_stage_model.model.transformer.resblocks.{layers}.attn.in_proj_weight" in sd
        with quiet_torch_stack():
            converted = convert_open_clip_checkpoint(CLIPTextModel(cfg), sd)
        extra = [k for k in converted if f"encoder.layers.{layers}." in k]
        assert bool(extra) is (layers != 23), layers
        assert "text_projection.weight" not in converted
        got = _diffusers_read_back(sd, tmp_path / str(layers), {"text_encoder": CLIPTextModel})
        _assert_same_tensors(got["text_encoder"], _folder_state(tmp_path / str(layers), "text_encoder"),
                             f"{layers} layers")


def test_sdxl_single_file_reads_back_exactly(sdxl_folder, tmp_path):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = write_sdxl_single_file(sdxl_folder, tmp_path / "tiny-sdxl.safetensors")
    sd = load_file(path)
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "conditioner"}
    assert infer_diffusers_model_type(sd) == "xl_base"
    te2 = json.loads((sdxl_folder / "text_encoder_2" / "config.json").read_text())
    assert sd["conditioner.embedders.1.model.text_projection"].shape == (
        te2["hidden_size"], te2["projection_dim"])
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in sd
    assert "model.diffusion_model.label_emb.0.0.weight" in sd  # text_time embedding
    assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in sd)  # no attention
    assert sd["model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"].shape[1] == 80

    got = _diffusers_read_back(sd, sdxl_folder, {"unet": None, "vae": None, "text_encoder": CLIPTextModel,
                                                 "text_encoder_2": CLIPTextModelWithProjection})
    for part in got:
        _assert_same_tensors(got[part], _folder_state(sdxl_folder, part), part)


def test_sdxl_pipeline_from_single_file_matches_folder(sdxl_folder, tmp_path):
    """The whole pipeline through diffusers' from_single_file (the folder as config) equals the
    folder's pipeline, component by component."""
    from diffusers import StableDiffusionXLPipeline

    path = write_sdxl_single_file(sdxl_folder, tmp_path / "tiny-sdxl.safetensors")
    with quiet_torch_stack():
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(sdxl_folder),
                                                          local_files_only=True, torch_dtype=torch.float32)
    ref = load_sdxl_pipeline(sdxl_folder)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_tensors(getattr(pipe, part).state_dict(), getattr(ref, part).state_dict(), part)
    assert pipe.tokenizer_2.pad_token_id == 0 and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_sd2_pipeline_from_single_file_matches_folder(sd2v_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = write_sd2_single_file(sd2v_folder, tmp_path / "tiny-sd2-v.safetensors")
    with quiet_torch_stack():
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(sd2v_folder), safety_checker=None, local_files_only=True,
            torch_dtype=torch.float32)
    ref = load_sd2_pipeline(sd2v_folder)
    for part in ("unet", "vae", "text_encoder"):
        _assert_same_tensors(getattr(pipe, part).state_dict(), getattr(ref, part).state_dict(), part)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.tokenizer.pad_token_id == 0
