"""Textual-inversion embeddings added at build (`sdc build --embedding`), against diffusers'
`load_textual_inversion` as the oracle: the built text encoder, fed the runtime's own tokenization
(multi-vector tokens expanded), must give the hidden states diffusers gives for the same prompt,
within the fp32 parity gate's 1e-4 relative.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import read_manifest, run_sdc

torch = pytest.importorskip("torch")

PROMPT = "a photo of <seal> next to <cat-toy>, <seal>"


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(3)
    a1111 = d / "seal.safetensors"  # A1111 layout, 3 vectors, token given on the command line
    save_file({"emb_params": rng.standard_normal((3, 32)).astype(np.float32)}, str(a1111))
    diff = d / "learned_embeds.safetensors"  # diffusers layout: {token: [n, dim]}
    save_file({"<cat-toy>": rng.standard_normal((2, 32)).astype(np.float32)}, str(diff))
    return a1111, diff


@pytest.fixture(scope="module")
def build_with_embeddings(tiny_folder, embedding_files, tmp_path_factory):
    a1111, diff = embedding_files
    out = tmp_path_factory.mktemp("b") / "emb"
    run_sdc("build", tiny_folder, "--precision", "fp32", "--stages", "text_encoder,unet,vae_decoder",
            "--embedding", f"{a1111}:<seal>", "--embedding", diff, "--out", out)
    return out


def _ours(build, prompt):
    import onnxruntime as ort

    from sdc.fusion.embeddings import expand_prompt
    from sdc.runtime.tokenizer import PromptTokenizer

    m = read_manifest(build)
    ids = PromptTokenizer(build / "tokenizer")([expand_prompt(prompt, m["embeddings"])]).ids
    s = ort.InferenceSession(str(build / "text_encoder" / "model.onnx"))
    return ids, s.run(None, {"input_ids": ids})[0]


def test_embeddings_match_diffusers(tiny_folder, embedding_files, build_with_embeddings):
    from diffusers import StableDiffusionPipeline

    from sdc.export.quiet import quiet_torch_stack

    a1111, diff = embedding_files
    with quiet_torch_stack():
        pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.load_textual_inversion(str(a1111), token="<seal>")
        pipe.load_textual_inversion(str(diff))
    text = pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer)
    ref_ids = pipe.tokenizer(text, padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ref_ids).last_hidden_state.numpy()
    ids, ours = _ours(build_with_embeddings, PROMPT)
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4
    m = read_manifest(build_with_embeddings)
    assert [e["tokens"] for e in m["embeddings"]] == [
        ["<seal>", "<seal>_1", "<seal>_2"], ["<cat-toy>", "<cat-toy>_1"]]
    assert [e["format"] for e in m["embeddings"]] == ["a1111", "diffusers"]
    assert m["embeddings"][0]["ids"] == [49408, 49409, 49410]


def test_embeddings_change_only_their_tokens(build_fp32, build_with_embeddings):
    # a prompt without the new tokens encodes exactly as in the base build
    _, base = _ours(build_fp32, "a photo of a cat")
    _, ours = _ours(build_with_embeddings, "a photo of a cat")
    np.testing.assert_allclose(ours, base, rtol=0, atol=1e-6)
    _, with_tok = _ours(build_with_embeddings, "a photo of <seal>")
    _, without = _ours(build_with_embeddings, "a photo of a")
    assert np.abs(with_tok[0, 4] - without[0, 4]).max() > 1e-3  # the learned token differs
    np.testing.assert_allclose(with_tok[0, :4], without[0, :4], atol=1e-6)  # causal: before it, same


@pytest.mark.parametrize("case,needle", [("width", "width"), ("clash", "already in the vocabulary"),
                                         ("sdxl", "SDXL"), ("nan", "NaN")])
def test_bad_embeddings(tiny_folder, tmp_path, case, needle):
    from safetensors.numpy import save_file

    f = tmp_path / "bad.safetensors"
    arg = str(f)
    if case == "width":
        save_file({"emb_params": np.zeros((2, 768), np.float32)}, str(f))
    elif case == "clash":
        save_file({"emb_params": np.zeros((1, 32), np.float32)}, str(f))
        arg += ":cat</w>"
    elif case == "sdxl":
        save_file({"clip_l": np.zeros((1, 768), np.float32), "clip_g": np.zeros((1, 1280),
                                                                               np.float32)}, str(f))
    else:
        save_file({"emb_params": np.full((1, 32), np.nan, np.float32)}, str(f))
    out = tmp_path / "out"
    proc = run_sdc("build", tiny_folder, "--precision", "fp32", "--embedding", arg, "--out", out,
                   check=False)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert not out.exists()
