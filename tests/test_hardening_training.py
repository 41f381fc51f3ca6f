"""Hardening: an fp16-overflowing LoRA fails naming its layer on all three apply paths, and
`sdc train-lora` / `sdc train-embedding` refuse bad settings up front and stop a diverging run
without writing a NaN file. Everything goes through the real CLI; failures must be one `error:`
line with exit code 2 and leave no output behind.

Costs (2 cores): the fp16 build fixture ~30-60 s (shared with other files in a session), the
failing build ~10 s (it fails right after loading, before any export), each tiny training run
~6-8 s; the config checks run before torch is imported (~0.1 s each).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import run_sdc

TRIGGER = "sks seal"


def _one_error_line(proc, *needles: str) -> str:
    """The `error:` line, after checking it is the only one, is the last line, and holds the
    needles; training logs may come before it."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])
    assert "Traceback" not in proc.stderr
    return errors[0]


# ---------------------------------------------------------------------------------------------
# 1. LoRA over fp16's range: build, re-fuse and run-time swap all refuse it, naming the layer

BIG_MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
BIG_LAYER = f"unet {BIG_MODULE}.weight"


@pytest.fixture(scope="module")
def overflow_lora(tiny_folder, tmp_path_factory):
    """A real peft LoRA for the tiny model with one layer's update pushed past 65504: up = 1e5 and
    down = 1 everywhere give (alpha / rank = 8 / 4) * 1e5 * rank 4 = 8e5 per element, which
    float32 holds and float16 does not; every other layer stays small."""
    from lora_files import make_peft_lora, rewrite

    d = tmp_path_factory.mktemp("overflow")
    src = make_peft_lora(tiny_folder, d / "src", seed=31)

    def blow_up(tensors, meta):
        up, down = f"unet.{BIG_MODULE}.lora_B.weight", f"unet.{BIG_MODULE}.lora_A.weight"
        assert up in tensors and down in tensors, sorted(tensors)[:4]
        tensors[up] = np.full_like(tensors[up], 1e5)
        tensors[down] = np.ones_like(tensors[down])

    return rewrite(src, d / "overflow.safetensors", blow_up)


def test_overflowing_lora_fails_the_fp16_build(tiny_folder, overflow_lora, tmp_path):
    out = tmp_path / "fp16-lora"
    proc = run_sdc("build", tiny_folder, "--lora", overflow_lora, "--precision", "fp16",
                   "--out", out, check=False)
    _one_error_line(proc, BIG_LAYER, "65504", "--precision fp32")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sdc-tmp-")]


def test_overflowing_lora_fails_refuse_and_swap_on_fp16(build_fp16, overflow_lora, tmp_path):
    out = tmp_path / "refused"
    proc = run_sdc("build", "--from", build_fp16, "--lora", overflow_lora, "--out", out,
                   check=False)
    _one_error_line(proc, BIG_LAYER, "65504")
    assert not out.exists()
    img = tmp_path / "x.png"
    proc = run_sdc("run", "a seal", "--artifacts", build_fp16, "--lora", overflow_lora,
                   "--steps", "2", "--width", "64", "--height", "64", "--out", img, "--quiet",
                   check=False)
    _one_error_line(proc, BIG_LAYER, "65504")
    assert not img.exists()


def test_fp32_fusion_holds_what_fp16_refuses(tiny_folder, overflow_lora):
    """The control: the build's fusion refuses only because the weights end up fp16. Fused for
    an fp32 build (keep=False), the same LoRA gives the 8e5-sized weights, finite."""
    from sdc.errors import SdcError
    from sdc.export.sources import resolve_model
    from sdc.fusion.fuse import LoraSpec, plan
    from sdc.fusion.lora import read_lora
    from sdc.fusion.torch_apply import TorchFusion, known_from_configs

    source = resolve_model(str(tiny_folder))
    applied = plan([(read_lora(overflow_lora, known_from_configs(source.configs())),
                     LoraSpec(overflow_lora))])
    unet = source.load("unet")
    TorchFusion(applied, keep=False).apply(unet, "unet")
    w = dict(unet.named_parameters())[f"{BIG_MODULE}.weight"].detach().numpy()
    assert np.isfinite(w).all() and np.abs(w).max() > 65504
    with pytest.raises(SdcError, match="65504"):
        TorchFusion(applied, keep=True).apply(source.load("unet"), "unet")


# ---------------------------------------------------------------------------------------------
# 2. Training settings: refused up front, one line naming the key, the expectation and the value


@pytest.fixture(scope="module")
def seal2(tmp_path_factory):
    """Two captioned seal pictures: enough for a couple of training steps."""
    from sdc.training.emblem import write_seal_folder

    folder = tmp_path_factory.mktemp("seal2") / "data"
    write_seal_folder(folder, 2, seed=0, trigger=TRIGGER)
    return folder


BAD_CONFIG = [
    # (file name, content, what the error line must hold)
    ("steps.toml", 'steps = "ten"\n', ["steps = 'ten'", "expected an integer", "a string"]),
    ("rank.toml", "rank = 2.5\n", ["rank = 2.5", "expected an integer", "a decimal number"]),
    ("lr.json", '{"lr": "fast"}', ["lr = 'fast'", "expected a finite number", "a string"]),
    ("list.json", '{"batch_size": [1, 2]}', ["batch_size = [1, 2]", "an integer", "a list"]),
    ("bool.toml", "steps = true\n", ["steps = true", "an integer", "a boolean"]),
    ("flip.toml", 'flip = "no"\n', ["flip = 'no'", "true or false", "a string"]),
    ("alpha.toml", "alpha = inf\n", ["alpha = inf", "finite number"]),
    ("lrnan.json", '{"lr": NaN}', ["lr = nan", "finite number"]),
    ("table.toml", "[steps]\nvalue = 10\n", ["steps = {'value': 10}", "an integer", "a table"]),
    ("unknown.toml", "ranks = 4\n", ["unknown setting(s) ranks", "did you mean rank?"]),
    ("range.toml", "steps = 0\n", ["steps = 0", "an integer >= 1", "fix it in the file"]),
    ("top.json", "[1, 2]", ["expected a table of settings", "a list"]),
    ("run.yaml", "steps: 10\n", ["YAML is not read", "TOML"]),
]


@pytest.mark.parametrize("name,content,needles", BAD_CONFIG, ids=[c[0] for c in BAD_CONFIG])
def test_bad_config_file_values(tmp_path, seal2, name, content, needles):
    cfg = tmp_path / name
    cfg.write_text(content)
    out = tmp_path / "x.safetensors"
    proc = run_sdc("train-lora", "--config", cfg, "--data", seal2, "--trigger", TRIGGER,
                   "--out", out, check=False)
    line = _one_error_line(proc, *needles)
    assert f"--config {cfg}" in line
    assert proc.stderr.strip() == line  # refused before anything else ran (no log lines)
    assert not out.exists() and not (tmp_path / "x.safetensors.cache").exists()


def test_a_flag_overrides_a_bad_file_value_and_is_named(tmp_path, seal2):
    """The file's wrong value is overridden by the flag; a bad flag is then named as a flag."""
    cfg = tmp_path / "run.toml"
    cfg.write_text('steps = "ten"\nrank = 4\n')
    proc = run_sdc("train-lora", "--config", cfg, "--steps", "3", "--rank", "0",
                   "--data", seal2, "--trigger", TRIGGER, "--out", tmp_path / "x.safetensors",
                   check=False)
    _one_error_line(proc, "--rank 0", "an integer >= 1")
    printed = run_sdc("train-lora", "--config", cfg, "--steps", "3", "--print-config")
    assert json.loads(printed.stdout)["steps"] == 3


ALPHA_FLAGS = [("--alpha", "inf", "--alpha inf"), ("--alpha", "nan", "--alpha nan"),
               ("--alpha", "-1", "--alpha -1.0"), ("--alpha", "0", "--alpha 0.0")]
COMMON_FLAGS = [("--lr", "inf", "--lr inf"), ("--lr", "nan", "--lr nan"),
                ("--lr", "1e30", "--lr 1e+30"),
                ("--validation-guidance", "inf", "--validation-guidance inf"),
                ("--out", "FOLDER", "found an existing folder")]
BAD_FLAGS = ([("train-lora", *f) for f in ALPHA_FLAGS + COMMON_FLAGS]
             + [("train-embedding", *f) for f in COMMON_FLAGS])  # embeddings have no alpha


@pytest.mark.parametrize("kind,flag,value,needle", BAD_FLAGS)
def test_bad_flags_are_refused_up_front(tmp_path, seal2, kind, flag, value, needle):
    out = tmp_path / "x.safetensors"
    if value == "FOLDER":  # an existing folder, even one named like the file
        out.mkdir()
        value = str(out)
    args = ["--data", seal2, "--out", out]
    args += (["--trigger", TRIGGER] if kind == "train-lora"
             else ["--token", "<t>", "--init-word", "seal"])
    proc = run_sdc(kind, *args, f"{flag}={value}", check=False)
    line = _one_error_line(proc, needle, "expected")
    assert proc.stderr.strip() == line
    assert out.is_dir() if flag == "--out" else not out.exists()


# ---------------------------------------------------------------------------------------------
# 3. Divergence: the run stops with one line naming the step; no NaN file, no partial file

TINY_RUN = ["--steps", "4", "--batch-size", "1", "--no-samples", "--no-gradient-checkpointing"]


def _no_output(folder, out):
    assert not out.exists()
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(f".{out.name}")]
    assert not leftovers, leftovers  # atomic_write's temporary files


def test_lora_loss_nan_stops_training(tmp_path, seal2):
    """alpha 1e15 (finite, so allowed) on rank 1: step 1 is fine (lora_B starts at 0), its
    update times alpha / rank makes step 2's activations overflow: the loss is NaN (measured:
    0.315 then nan). Checkpoints of the steps before are kept, and are finite."""
    from safetensors.numpy import load_file

    out = tmp_path / "nan.safetensors"
    proc = run_sdc("train-lora", "--data", seal2, "--trigger", TRIGGER, "--out", out,
                   "--rank", "1", "--alpha", "1e15", "--checkpoint-every", "1", *TINY_RUN,
                   check=False)
    _one_error_line(proc, "training diverged at step 2 of 4", "the loss is nan", "--alpha",
                    "was not written")
    _no_output(tmp_path, out)
    ckpts = sorted((tmp_path / "nan.safetensors.checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-000001"]
    weights = load_file(str(ckpts[0] / "trainable.safetensors"))
    assert weights and all(np.isfinite(v).all() for v in weights.values())


def test_lora_gradient_overflow_stops_training(tmp_path, seal2):
    """alpha 1e30: step 1's loss is finite but its gradient norm overflows to inf; clipping would
    then scale every gradient by 0 and the run would "train" 4 steps without learning."""
    out = tmp_path / "inf.safetensors"
    proc = run_sdc("train-lora", "--data", seal2, "--trigger", TRIGGER, "--out", out,
                   "--rank", "1", "--alpha", "1e30", *TINY_RUN, check=False)
    _one_error_line(proc, "training diverged at step 1 of 4", "gradient norm is inf")
    _no_output(tmp_path, out)


def test_embedding_on_a_nan_model_stops_at_step_1(tmp_path, seal2):
    """A base model with one NaN weight (what an overflowed fp16 merge leaves): the first loss is
    NaN before any update, so the error blames the model, not the learning rate."""
    from safetensors.numpy import load_file, save_file

    from sdc.export.sources import SDC_TINY

    model = tmp_path / "nan-model"
    shutil.copytree(SDC_TINY, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["conv_out.weight"][0, 0, 0, 0] = np.nan
    save_file(tensors, str(weights))
    out = tmp_path / "emb.safetensors"
    proc = run_sdc("train-embedding", model, "--data", seal2, "--token", "<t>", "--init-word",
                   "seal", "--instance-prompt", "a <t> on a background", "--out", out,
                   *TINY_RUN, check=False)
    _one_error_line(proc, "the loss is nan at step 1, before any update", "nan-model",
                    "check the model files", "was not written")
    _no_output(tmp_path, out)
