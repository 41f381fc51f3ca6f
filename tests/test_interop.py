"""Interop with Optimum's layout (issue 20), checked fast in the default suite: each model folder of
a build holds its source component's own config.json with the fields Optimum's
`ORTStableDiffusionPipeline` reads, hashed like every file; model_index.json names the build's
real scheduler; sdc-tiny's text encoder loads with the key layouts of both transformers 4 and 5;
log lines carry no source locations. `make interop` runs the real Optimum client (its own venv)."""

from __future__ import annotations

import json

from conftest import read_manifest, run_sdc
from sdc.export.sources import SDC_TINY

# What optimum-onnx's ORT diffusion pipeline reads from each folder's config.json (FACTS.md):
READ_BY_OPTIMUM = {
    "unet": ("sample_size", "in_channels", "out_channels", "cross_attention_dim"),
    "text_encoder": ("num_hidden_layers", "hidden_size", "vocab_size", "max_position_embeddings"),
    "vae_decoder": ("block_out_channels", "scaling_factor", "latent_channels"),
    "vae_encoder": ("block_out_channels", "scaling_factor", "latent_channels"),
}
SOURCE_OF = {"unet": "unet", "text_encoder": "text_encoder", "vae_decoder": "vae", "vae_encoder": "vae"}


def test_each_model_folder_holds_its_source_config(builtin_build):
    manifest = read_manifest(builtin_build)
    for stage, fields in READ_BY_OPTIMUM.items():
        config = json.loads((builtin_build / stage / "config.json").read_text())
        source = json.loads((SDC_TINY / SOURCE_OF[stage] / "config.json").read_text())
        assert config == source, stage  # the model's real config, whole
        for field in fields:
            assert field in config, f"{stage}/config.json lacks {field}"
        assert f"{stage}/config.json" in manifest["files"]
    assert manifest["layout"] >= 4


def test_model_index_names_the_real_scheduler(builtin_build):
    index = json.loads((builtin_build / "model_index.json").read_text())
    sched = json.loads((builtin_build / "scheduler" / "scheduler_config.json").read_text())
    assert index["scheduler"] == ["diffusers", sched["_class_name"]]
    assert index["_class_name"] == "ORTStableDiffusionPipeline"


def test_old_builds_are_told_to_rebuild(builtin_build, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(builtin_build, old)
    m = read_manifest(old)
    m.pop("layout")
    (old / "manifest.json").write_text(json.dumps(m))
    for cmd in ("verify", "inspect"):
        out = run_sdc(cmd, old).stdout
        assert "Optimum" in out and "rebuild" in out, out
    assert "Optimum" not in run_sdc("verify", builtin_build).stdout


def test_sdc_tiny_text_encoder_loads_in_both_key_layouts(tmp_path):
    """transformers 5 reads the `text_model.`-prefixed layout the shipped file uses; transformers 4
    reads only that one. Both layouts must give the same model here."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    shipped = SDC_TINY / "text_encoder"
    assert all(k.startswith("text_model.") for k in load_file(shipped / "model.safetensors"))
    bare = tmp_path / "bare"
    shutil.copytree(shipped, bare)
    sd = load_file(bare / "model.safetensors")
    save_file({k.removeprefix("text_model."): v for k, v in sd.items()}, bare / "model.safetensors")
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    a = CLIPTextModel.from_pretrained(shipped).eval()
    b = CLIPTextModel.from_pretrained(bare).eval()
    with torch.no_grad():
        assert torch.equal(a(ids).last_hidden_state, b(ids).last_hidden_state)
    # loaded from the file, not initialised at random (what a reader missing every key does)
    assert torch.equal(a.state_dict()["embeddings.token_embedding.weight"],
                       sd["text_model.embeddings.token_embedding.weight"].to(torch.float32))


def test_log_lines_carry_no_source_locations(tiny_folder, tmp_path):
    proc = run_sdc("build", tiny_folder, "--stages", "text_encoder", "--precision", "fp32",
                   "--out", tmp_path / "te")
    assert "main.py:" not in proc.stderr, proc.stderr
