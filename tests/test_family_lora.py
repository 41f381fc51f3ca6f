"""Family-aware LoRA and textual-inversion fusion (sdc.fusion): SDXL's three components, kohya's
two UNet namings, refusals across families.

Oracle: diffusers itself. A tiny SDXL pipeline (tests/family_models.py) gets peft adapters on its
UNet (attention, feed-forward, proj_in/out, every resnet conv incl. 3x3 LoCon, conv_shortcut,
time_emb_proj, down/upsampler convs, conv_in/conv_out, time and add embeddings) and on both text
encoders (attention, MLP, and bigG's text_projection); diffusers' `save_lora_weights` writes the
peft file, and the test writes the same weights in kohya's layouts itself: diffusers' module
names with underscores, and SGM names (input_blocks_4_1_..., from tests/ldm_checkpoint.py's
diffusers -> SGM UNet mapping, written independently of sdc's fusion/sgm.py). Each file is loaded
and fused by diffusers (`load_lora_weights` + `fuse_lora`, which maps SGM names from the UNet
config itself) and by sdc (read_lora + TorchFusion, and the torch-free build path through a
manifest's weight table); fused weights must agree within 1e-5 of the weight's largest magnitude
(both float32 results of the same products; observed ~1e-7).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sdc.errors import SdcError  # noqa: E402
from sdc.families import SD1, SDXL  # noqa: E402
from sdc.fusion.fuse import LoraSpec, block_multiplier, plan  # noqa: E402
from sdc.fusion.lora import read_lora  # noqa: E402
from sdc.fusion.torch_apply import TorchFusion, known_from_configs, plan_embeddings  # noqa: E402

REL = 1e-5
XL = ("unet", "text_encoder", "text_encoder_2")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in",
                "conv_out", "linear_1", "linear_2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SD15 = SD1.config_dir()


def _configs(folder, comps=XL) -> dict:
    return {c: json.loads((folder / c / "config.json").read_text()) for c in comps}


def _pipe(folder):
    from family_models import load_sdxl_pipeline

    return load_sdxl_pipeline(folder)


def _read(path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _save(tensors: dict, path, metadata=None):
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata or {})
    return path


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    from family_models import make_sdxl_folder

    return make_sdxl_folder(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="module")
def xl_loras(xl, tmp_path_factory):
    """{"peft", "kohya-diffusers", "kohya-sgm"}: one adapter in three layouts."""
    from diffusers import StableDiffusionXLPipeline
    from ldm_checkpoint import unet_to_ldm
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sdc.export.quiet import quiet_torch_stack

    d = tmp_path_factory.mktemp("xl-loras")
    pipe = _pipe(xl)
    torch.manual_seed(21)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8.0, target_modules=UNET_TARGETS,
                                     init_lora_weights=False))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=3.0, target_modules=TE_TARGETS,
                                             init_lora_weights=False))
    pipe.text_encoder_2.add_adapter(LoraConfig(r=3, lora_alpha=5.0, init_lora_weights=False,
                                               target_modules=TE_TARGETS + ["text_projection"]))
    with torch.no_grad():  # keep the update a plausible size
        for c in XL:
            for name, p in getattr(pipe, c).named_parameters():
                if "lora_" in name:
                    p.mul_(0.3)
    with quiet_torch_stack():
        StableDiffusionXLPipeline.save_lora_weights(
            d, weight_name="peft.safetensors",
            unet_lora_layers=get_peft_model_state_dict(pipe.unet),
            text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
            text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
            unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
            text_encoder_2_lora_adapter_metadata=pipe.text_encoder_2.peft_config[
                "default"].to_dict())
    peft_file = d / "peft.safetensors"
    tensors, meta = _read(peft_file)
    alphas = json.loads(meta["lora_adapter_metadata"])
    unet_config = pipe.unet.config

    def kohya(sgm: bool) -> dict:
        out = {}
        for key, value in tensors.items():
            comp, rest = key.split(".", 1)
            module, part = rest.rsplit(".lora_", 1)
            if comp == "unet":
                if not sgm and module.startswith("add_embedding"):
                    continue  # kohya writes SDXL's label_emb in SGM names only
                name = module
                if sgm:
                    (ldm,) = unet_to_ldm({module + ".weight": 0}, unet_config)
                    name = ldm.removeprefix("model.diffusion_model.").removesuffix(".weight")
                stem = "lora_unet_" + name.replace(".", "_")
            else:
                if module != "text_projection":
                    module = "text_model." + module.removeprefix("text_model.")
                stem = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[comp] + \
                    module.replace(".", "_")
            out[f"{stem}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
            out[f"{stem}.alpha"] = np.array(alphas[f"{comp}.lora_alpha"], np.float32)
        return out

    return {"peft": peft_file,
            "kohya-diffusers": _save(kohya(False), d / "kohya-diffusers.safetensors"),
            "kohya-sgm": _save(kohya(True), d / "kohya-sgm.safetensors")}


def _params(pipe) -> dict:
    return {(c, n.replace(".base_layer", "")): p.detach().numpy().copy()
            for c in XL for n, p in getattr(pipe, c).named_parameters() if "lora_" not in n}


def _diffusers_fused(folder, path, weights: dict | float = 1.0) -> dict:
    from sdc.export.quiet import quiet_torch_stack
    from sdc.training.stack import check_peft_stack

    check_peft_stack("diffusers' load_lora_weights (the test oracle)")
    pipe = _pipe(folder)
    with quiet_torch_stack():
        pipe.load_lora_weights(str(path), adapter_name="a")
        pipe.set_adapters(["a"], [weights])
        pipe.fuse_lora(components=list(XL))
    return _params(pipe)


def _sdc_fused(folder, specs) -> tuple[dict, list]:
    known = known_from_configs(_configs(folder))
    adapters = [(read_lora(s.path, known), s) for s in specs]
    fusion = TorchFusion(plan(adapters), keep=False)
    pipe = _pipe(folder)
    for c in XL:
        fusion.apply(getattr(pipe, c), c)
    return _params(pipe), adapters


def _assert_close(ours: dict, ref: dict):
    assert set(ref) <= set(ours)
    for key, want in ref.items():
        scale = max(float(np.abs(want).max()), 1e-12)
        assert np.abs(ours[key] - want).max() / scale <= REL, key


# ---------------------------------------------------------------------------------------------
# names


def _ldm_names(config: dict, modules) -> dict:
    from ldm_checkpoint import unet_to_ldm

    return {m: next(iter(unet_to_ldm({m + ".weight": 0}, config))).removeprefix(
        "model.diffusion_model.").removesuffix(".weight") for m in modules}


@pytest.mark.parametrize("config", ["xl", "sdxl", "sd15"])
def test_sgm_names_are_the_ldm_layout(xl, config):
    # every UNet module with a weight, tiny SDXL (2 levels), SDXL base (3 levels, 10 transformer
    # layers) and SD1.5 (4 levels, its first up block has no attention but an upsampler)
    from sdc.fusion.sgm import sgm_names

    root = xl if config == "xl" else (SD15 if config == "sd15" else SDXL.config_dir())
    unet_config = _configs(root, ("unet",))["unet"]
    modules = known_from_configs({"unet": unet_config}, SDXL if "xl" in config else SD1)["unet"]
    ours = sgm_names(modules)
    assert set(ours) == set(modules)
    assert ours == _ldm_names(unet_config, modules)


def test_known_covers_the_family(xl):
    known = known_from_configs(_configs(xl))
    assert known.family is SDXL and set(known) == set(XL)
    assert "text_projection" in known["text_encoder_2"]
    assert "add_embedding.linear_1" in known["unet"]
    assert known["text_encoder_2"]["text_projection"] == (40, 48)
    sd1 = known_from_configs(_configs(SD15, ("unet", "text_encoder")))
    assert sd1.family is SD1 and set(sd1) == {"unet", "text_encoder"}


# ---------------------------------------------------------------------------------------------
# fused weights against diffusers


@pytest.mark.parametrize("which", ["peft", "kohya-diffusers", "kohya-sgm"])
def test_sdxl_lora_fuses_like_diffusers(xl, xl_loras, which):
    ref = _diffusers_fused(xl, xl_loras[which], 0.7)
    ours, [(lora, _)] = _sdc_fused(xl, [LoraSpec(xl_loras[which], 0.7)])
    _assert_close(ours, ref)
    assert lora.format == ("peft" if which == "peft" else "kohya")
    assert {layer.component for layer in lora.layers} == set(XL)
    assert lora.ranks() == [2, 3, 4] and lora.alphas() == [3.0, 5.0, 8.0]
    assert any(layer.down.ndim == 4 and layer.down.shape[2] == 3 for layer in lora.layers)
    # the three layouts are one adapter: the same modules, the same update as the peft file
    peft = _diffusers_fused(xl, xl_loras["peft"], 0.7)
    if which != "kohya-diffusers":
        _assert_close(ours, peft)
    base = _params(_pipe(xl))
    moved = {k for k in ref if np.abs(ref[k] - base[k]).max() > 1e-4}
    assert len(moved) == len(lora.layers)
    assert {(layer.component, layer.module + ".weight") for layer in lora.layers} == moved
    if which == "kohya-sgm":
        assert ("unet", "add_embedding.linear_2.weight") in moved
        assert ("unet", "up_blocks.0.upsamplers.0.conv.weight") in moved
        assert ("text_encoder_2", "text_projection.weight") in moved


def test_te_block_weight_covers_both_text_encoders(xl, xl_loras):
    assert block_multiplier("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1",
                            {"te": 0.25}) == 0.25
    spec = LoraSpec(xl_loras["kohya-sgm"], 0.8, {"te": 0.5})
    ref = _diffusers_fused(xl, xl_loras["kohya-sgm"],
                           {"unet": 0.8, "text_encoder": 0.4, "text_encoder_2": 0.4})
    ours, _ = _sdc_fused(xl, [spec])
    _assert_close(ours, ref)


def _fake_build(folder, out):
    """A build folder as the fusion code reads it: the manifest's family block and, per LoRA-able
    stage, a weight map into an external data file (no graphs: fusion never opens them)."""
    pipe = _pipe(folder)
    graphs = {}
    for stage in XL:
        (out / stage).mkdir(parents=True)
        mapping, data, offset = {}, {}, 0
        with open(out / stage / "model.onnx_data", "wb") as f:
            for name, p in getattr(pipe, stage).named_parameters():
                arr = p.detach().numpy().astype(np.float32)
                init = f"onnx::{stage}::{name}"
                mapping[name] = init
                data[init] = [offset, arr.nbytes, "float32", list(arr.shape)]
                f.write(arr.tobytes())
                offset += arr.nbytes
        graphs[stage] = {"weights": {"map": mapping, "data": data, "data_file": "model.onnx_data",
                                     "slots": []}}
    return {"base_model": {"name": "tiny-sdxl", "family": "sdxl"},
            "family": SDXL.describe(SDXL.stages), "graphs": graphs, "precision": "fp32"}


def test_torch_free_paths_route_text_encoder_2(xl, xl_loras, tmp_path):
    # what `sdc build --from B --lora` and the run-time swap fuse: stage-keyed, from the manifest
    from sdc.fusion.artifact import fused_initializers, known_modules, load_adapters, stage_of
    from sdc.runtime.adapters import fuse_set

    manifest = _fake_build(xl, tmp_path)
    assert stage_of(manifest) == {c: c for c in XL}
    known = known_modules(manifest, tmp_path)
    assert known.family is SDXL
    spec = LoraSpec(xl_loras["kohya-sgm"], 0.7, {"te": 0.5, "mid": 0.0})
    fused, _ = fused_initializers(tmp_path, manifest, plan(load_adapters([spec], known)))
    ours, _ = _sdc_fused(xl, [spec])
    assert set(fused) == set(XL)
    for stage, arrays in fused.items():
        for init, arr in arrays.items():
            param = init.split("::", 2)[2]
            np.testing.assert_allclose(arr, ours[(stage, param)], rtol=0, atol=1e-6)
    entry = fuse_set(tmp_path, manifest, [spec], ("k",))
    assert set(entry.swaps) == set(XL) and not entry.slots
    assert entry.report[0]["components"] == sorted(XL)


# ---------------------------------------------------------------------------------------------
# another family's LoRA


def _assert_refused(fn, *needles):
    with pytest.raises(SdcError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.fixture(scope="module")
def sd15_known():
    return known_from_configs(_configs(SD15, ("unet", "text_encoder")), SD1)


@pytest.fixture(scope="module")
def sdxl_known():  # the real SDXL base layout (meta tensors: shapes only)
    return known_from_configs(_configs(SDXL.config_dir()), SDXL)


def _pair(stem, rank, width_in, width_out, conv=False):
    shape = (1, 1) if conv else ()
    return {f"{stem}.lora_down.weight": np.full((rank, width_in, *shape), 0.01, np.float32),
            f"{stem}.lora_up.weight": np.full((width_out, rank, *shape), 0.01, np.float32)}


@pytest.mark.parametrize("which", ["peft", "kohya-diffusers", "kohya-sgm"])
def test_sdxl_lora_on_sd1_is_refused(xl_loras, sd15_known, which):
    needle = "text_encoder_2." if which == "peft" else "lora_te"
    _assert_refused(lambda: read_lora(xl_loras[which], sd15_known), "an SDXL LoRA",
                    "this base model is SD1.x", needle)
    # the family may also be named by the caller, over a plain {component: modules} dict
    _assert_refused(lambda: read_lora(xl_loras[which], dict(sd15_known), family=SD1), "SDXL",
                    "SD1.x")


def test_unet_only_loras_are_refused_by_width(tmp_path, sd15_known, sdxl_known):
    # an SDXL UNet-only kohya LoRA (SGM names): its names exist in SD1.5 too, its widths do not
    xl_unet = _save({**_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 4, 2048,
                             640)}, tmp_path / "xl-unet.safetensors")
    _assert_refused(lambda: read_lora(xl_unet, sd15_known), "SDXL LoRA", "context width 2048",
                    "SD1.x base model", "[640, 2048]", "[640, 768]")
    assert read_lora(xl_unet, sdxl_known).layers[0].module == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    # an SD1.5 UNet-only one on SDXL: down_blocks.1 is 640 wide in both, the context is not
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    sd1_unet = _save(_pair(stem, 4, 768, 640), tmp_path / "sd1-unet.safetensors")
    _assert_refused(lambda: read_lora(sd1_unet, sdxl_known), "SD1.x LoRA", "context width 768",
                    "this SDXL base model")
    # SDXL's second transformer layer has no SD1.5 counterpart: unmatched, and said to be SDXL
    deep = _save({**_pair("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", 4, 2048,
                          640)}, tmp_path / "xl-deep.safetensors")
    _assert_refused(lambda: read_lora(deep, sd15_known), "match no layer", "SDXL LoRA", "SD1.x")
    # add_embedding is a real SDXL module: fused there, refused (as SDXL's) on SD1.5
    add = _save(_pair("lora_unet_label_emb_0_0", 2, 2816, 1280), tmp_path / "add.safetensors")
    assert read_lora(add, sdxl_known).layers[0].module == "add_embedding.linear_1"
    _assert_refused(lambda: read_lora(add, sd15_known), "SDXL", "SD1.x")


def test_sd1_lora_on_sdxl_is_refused(xl, tmp_path, sdxl_known):
    te = {**_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 2, 768, 768),
          **_pair("lora_unet_down_blocks_0_attentions_0_proj_in", 2, 320, 320, conv=True)}
    f = _save(te, tmp_path / "sd1.safetensors")
    for known in (sdxl_known, known_from_configs(_configs(xl))):
        _assert_refused(lambda: read_lora(f, known), "an SD1.x/SD2.x LoRA", "one text encoder",
                        "lora_te_", "this base model is SDXL")


def test_refusal_messages_name_the_families_sdc_builds(tmp_path, sd15_known):
    loha = _save({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a":
                  np.zeros((2, 4), np.float32)}, tmp_path / "loha.safetensors")
    _assert_refused(lambda: read_lora(loha, sd15_known), "LoHa", "SD1.x, SD2.x and SDXL")
    flux = _save(_pair("lora_transformer_single_blocks_0_attn_to_q", 2, 4, 4),
                 tmp_path / "flux.safetensors")
    _assert_refused(lambda: read_lora(flux, sd15_known), "Flux/SD3", "SD1.x, SD2.x and SDXL")


# ---------------------------------------------------------------------------------------------
# textual inversion


def _xl_widths():
    return {"text_encoder": 32, "text_encoder_2": 48}


def _xl_dirs(xl):
    return {"text_encoder": xl / "tokenizer", "text_encoder_2": xl / "tokenizer_2"}


def test_sdxl_embedding_goes_into_both_encoders(xl, tmp_path):
    import shutil

    from sdc.export.quiet import quiet_torch_stack
    from sdc.fusion.torch_apply import add_tokens

    rng = np.random.default_rng(5)
    clip_l = rng.standard_normal((2, 32)).astype(np.float32)
    clip_g = rng.standard_normal((2, 48)).astype(np.float32)
    f = _save({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "xl-emb.safetensors")
    entries = plan_embeddings(_xl_dirs(xl), [(f, "<xl>")], _xl_widths(), family=SDXL)
    (e,) = entries
    assert e["format"] == "sdxl" and e["tokens"] == ["<xl>", "<xl>_1"]
    assert e["dims"] == _xl_widths() and e["encoder_ids"]["text_encoder"] == e["ids"]
    json.dumps({k: v for k, v in e.items() if k != "vectors_data"})  # the manifest entry

    # diffusers' SDXL recipe: each tensor into its encoder with its tokenizer
    ref = _pipe(xl)
    with quiet_torch_stack():
        ref.load_textual_inversion(torch.from_numpy(clip_l), token=["<xl>", "<xl>_1"],
                                   text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
        ref.load_textual_inversion(torch.from_numpy(clip_g), token=["<xl>", "<xl>_1"],
                                   text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    ours = _pipe(xl)
    fusion = TorchFusion(plan([]), entries, keep=False)
    for comp, tok, vectors in (("text_encoder", "tokenizer", clip_l),
                               ("text_encoder_2", "tokenizer_2", clip_g)):
        ids = e["encoder_ids"][comp]
        assert getattr(ref, tok).convert_tokens_to_ids(e["tokens"]) == ids
        fusion.apply(getattr(ours, comp), comp)
        table = getattr(ours, comp).get_input_embeddings().weight.detach().numpy()
        want = getattr(ref, comp).get_input_embeddings().weight.detach().numpy()
        assert table.shape == want.shape
        np.testing.assert_array_equal(table[ids], vectors)
        np.testing.assert_array_equal(table, want)
        copy = shutil.copytree(xl / tok, tmp_path / tok)
        add_tokens(copy, entries, comp)  # checks the ids each tokenizer gives


def test_embeddings_of_another_family_are_refused(xl, tmp_path):
    sd15_tok = SD15 / "tokenizer"
    xl_emb = _save({"clip_l": np.zeros((1, 768), np.float32),
                    "clip_g": np.zeros((1, 1280), np.float32)}, tmp_path / "xl.safetensors")
    sd1_emb = _save({"emb_params": np.zeros((1, 768), np.float32)}, tmp_path / "sd1.safetensors")
    # SDXL on SD1.x: the existing int call and the family call both refuse, naming both
    _assert_refused(lambda: plan_embeddings(sd15_tok, [(xl_emb, None)], 768), "SDXL embedding",
                    "clip_l [n, 768]", "clip_g [n, 1280]", "SD1.x", "width 768")
    _assert_refused(lambda: plan_embeddings(sd15_tok, [(xl_emb, None)], {"text_encoder": 768},
                                            family=SD1), "SDXL embedding", "this build is SD1.x")
    # SD1.x on SDXL (the real widths: 768 / 1280)
    _assert_refused(lambda: plan_embeddings(_xl_dirs(xl), [(sd1_emb, None)],
                                            {"text_encoder": 768, "text_encoder_2": 1280},
                                            family=SDXL),
                    "width 768", "SD1.x embedding", "this build is SDXL", "clip_g [n, 1280]")
    # an SDXL one whose widths are not this SDXL model's
    _assert_refused(lambda: plan_embeddings(_xl_dirs(xl), [(xl_emb, None)], _xl_widths(),
                                            family=SDXL), "clip_l vectors of width 768",
                    "text_encoder is 32")
    # malformed SDXL files
    half = _save({"clip_l": np.zeros((1, 32), np.float32)}, tmp_path / "half.safetensors")
    _assert_refused(lambda: plan_embeddings(_xl_dirs(xl), [(half, None)], _xl_widths()),
                    "needs both clip_l and clip_g")
    uneven = _save({"clip_l": np.zeros((1, 32), np.float32),
                    "clip_g": np.zeros((2, 48), np.float32)}, tmp_path / "uneven.safetensors")
    _assert_refused(lambda: plan_embeddings(_xl_dirs(xl), [(uneven, None)], _xl_widths()),
                    "clip_l has 1 vectors and clip_g 2")
    # SD1's own path is unchanged
    (e,) = plan_embeddings(sd15_tok, [(sd1_emb, "<s>")], 768)
    assert e["ids"] == [49408] and e["vectors_data"].shape == (1, 768) and "encoder_ids" not in e
    assert re.fullmatch(r"[0-9a-f]{64}", e["sha256"])


def test_inspect_without_a_build_knows_an_sdxl_lora(xl_loras):
    """`sdc inspect LORA` with no --base matches an SDXL file against the shipped SDXL module list
    (export/data/sdxl/modules.json) and an SD1 one against SD1.5's."""
    from conftest import run_sdc

    # the tiny model's module paths all exist in SDXL base's layout (it has more of each)
    proc = run_sdc("inspect", xl_loras["kohya-sgm"])
    assert "matched against sdxl module layout" in proc.stdout, proc.stdout
    assert "text_encoder_2:" in proc.stdout
