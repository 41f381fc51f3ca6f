"""A build directory is untrusted input (issue 19): path containment, verification before reuse,
never deleting a user's file, interrupt-safe swaps, one-line errors for malformed manifests and for
folders that are not sdc builds. Mechanisms under test: runtime/store.py (containment, ownership,
the staging/commit transaction) and runtime/manifest_schema.py (one schema check at load).

Each case runs the real CLI on a copy of the session's tiny fp32 build; the few that need a fresh
build use `--stages text_encoder` (a few seconds)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import read_manifest, run_sdc
from lora_files import make_peft_lora
from sdc.runtime import store

TE_ONLY = ("--stages", "text_encoder")


@pytest.fixture
def copy_of(build_fp32, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(build_fp32, dst)
    return dst


def _edit(folder, change):
    m = read_manifest(folder)
    change(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def _one_line_failure(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr  # progress lines may precede it; the error is one line
    err = errors[0]
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture(scope="module")
def lora_file(tiny_folder, tmp_path_factory):
    return make_peft_lora(tiny_folder, tmp_path_factory.mktemp("lora") / "a", seed=3)


# --- security: containment ------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["../../../../etc/passwd", "/etc/hostname", "unet/../../x",
                                 "./manifest.json", "C:/x", "tokenizer\\vocab.json", ""])
def test_files_keys_outside_the_build_are_refused_by_verify(copy_of, key):
    _edit(copy_of, lambda m: m["files"].update({key: {"sha256": "0" * 64, "bytes": 1}}))
    err = _one_line_failure(run_sdc("verify", copy_of, check=False), repr(key))
    assert "refusing" in err


@pytest.mark.parametrize("where", ["graph", "tokenizer", "scheduler", "data_file", "tiled"])
def test_paths_named_elsewhere_in_the_manifest_are_contained(copy_of, where):
    def change(m):
        if where == "graph":
            m["graphs"]["unet"]["files"].append("../../etc/passwd")
        elif where == "tokenizer":
            m["tokenizer"]["files"][0] = "/etc/passwd"
        elif where == "scheduler":
            m["scheduler"]["config"] = "../scheduler_config.json"
        elif where == "data_file":
            m["graphs"]["unet"]["weights"]["data_file"] = "../../x"
        else:
            m["graphs"]["vae_decoder"]["tiled"]["segments"][0]["file"] = "/tmp/seg.onnx"
    _edit(copy_of, change)
    for cmd in (("verify", copy_of), ("inspect", copy_of), ("run", "x", "-a", copy_of)):
        _one_line_failure(run_sdc(*cmd, check=False), "refusing")


def test_a_symlink_out_of_the_build_is_refused(copy_of, tmp_path):
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    vocab = copy_of / "tokenizer" / "vocab.json"
    vocab.unlink()
    vocab.symlink_to(outside)
    _one_line_failure(run_sdc("verify", copy_of, check=False), "tokenizer/vocab.json", "outside")


def test_a_symlink_inside_the_build_is_a_problem(copy_of):
    (copy_of / "unet" / "extra.bin").symlink_to(copy_of / "unet" / "model.onnx_data")
    _one_line_failure(run_sdc("verify", copy_of, check=False), "unet/extra.bin", "symlink")


def test_from_never_writes_outside_its_output(copy_of, lora_file, tmp_path):
    """A crafted source whose folder climbs out through a symlink: refused before anything is
    written, and the file the attack aimed at is untouched."""
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    (victim_dir / "model.onnx").write_text("precious")
    shutil.rmtree(copy_of / "text_encoder")
    (copy_of / "text_encoder").symlink_to(victim_dir)
    out = tmp_path / "out"
    _one_line_failure(run_sdc("build", "--from", copy_of, "--lora", lora_file, "--out", out,
                              check=False), "outside")
    assert (victim_dir / "model.onnx").read_text() == "precious"
    assert not out.exists() and not list(tmp_path.glob(".sdc-tmp-*"))


def test_from_refuses_a_key_that_climbs_out(copy_of, lora_file, tmp_path):
    _edit(copy_of, lambda m: m["files"].update({"../escaped.txt": m["files"]["model_index.json"]}))
    out = tmp_path / "deep" / "out"
    _one_line_failure(run_sdc("build", "--from", copy_of, "--lora", lora_file, "--out", out,
                              check=False), "'../escaped.txt'")
    assert not (tmp_path / "deep" / "escaped.txt").exists()


def test_every_file_the_graphs_need_must_be_listed(copy_of):
    _edit(copy_of, lambda m: m["files"].pop("unet/model.onnx_data"))
    _one_line_failure(run_sdc("verify", copy_of, check=False), "unet/model.onnx_data",
                      "not in the manifest's files table")
    _edit(copy_of, lambda m: m.update(files={}))
    _one_line_failure(run_sdc("verify", copy_of, check=False))


def test_staging_directories_are_private_and_fresh(tmp_path):
    out = tmp_path / "out"
    # A planted link where an older sdc put its fixed-name temp dir is never followed.
    planted = tmp_path / f"{store.TMP_PREFIX}{os.getpid()}-new-out"
    planted.symlink_to(tmp_path / "elsewhere")
    with store.staging(out) as tmp:
        assert tmp.is_dir() and not tmp.is_symlink() and tmp.parent == tmp_path
        assert oct(tmp.stat().st_mode & 0o777) == "0o700"
        (tmp / "f").write_text("x")
        store.commit(tmp, out)
    assert (out / "f").read_text() == "x" and not (tmp_path / "elsewhere").exists()


# --- integrity ------------------------------------------------------------------------------------

def test_from_hash_verifies_its_source(copy_of, lora_file, tmp_path):
    data = copy_of / "unet" / "model.onnx_data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x10  # same size: only the hash can tell
    data.write_bytes(bytes(raw))
    out = tmp_path / "laundered"
    _one_line_failure(run_sdc("build", "--from", copy_of, "--lora", lora_file, "--out", out,
                              check=False), "sha256", "unet/model.onnx_data")
    assert not out.exists()


def test_an_up_to_date_build_is_hashed_before_reuse(tiny_folder, tmp_path):
    out = tmp_path / "te"
    run_sdc("build", tiny_folder, "--precision", "fp32", "--out", out, *TE_ONLY)
    data = out / "text_encoder" / "model.onnx_data"
    raw = bytearray(data.read_bytes())
    raw[7] ^= 0x01
    data.write_bytes(bytes(raw))
    proc = run_sdc("build", tiny_folder, "--precision", "fp32", "--out", out, *TE_ONLY)
    assert "up to date" not in proc.stderr and "no longer match" in proc.stderr
    run_sdc("verify", out)


MALFORMED = {
    "null": None, "list": [], "number": 3,
    "graphs null": lambda m: m.update(graphs=None),
    "no files": lambda m: m.pop("files"),
    "files entry a string": lambda m: m["files"].update({"unet/model.onnx": "abc"}),
    "bytes a string": lambda m: m["files"]["unet/model.onnx"].update(bytes="12"),
    "graph files null": lambda m: m["graphs"]["unet"].update(files=None),
    "inputs of numbers": lambda m: m["graphs"]["unet"].update(inputs=[1, 2]),
    "latent_channels a string": lambda m: m["model"].update(latent_channels="4"),
    "scaling_factor a bool": lambda m: m["model"].update(scaling_factor=True),
    "tokenizer missing": lambda m: m.pop("tokenizer"),
    "format_version a string": lambda m: m.update(format_version="1"),
    "weights map a list": lambda m: m["graphs"]["unet"]["weights"].update(map=[]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifests_fail_in_one_line_naming_the_key(copy_of, case):
    change = MALFORMED[case]
    if callable(change):
        _edit(copy_of, change)
    else:
        (copy_of / "manifest.json").write_text(json.dumps(change))
    for cmd in (("verify", copy_of), ("inspect", copy_of)):
        err = _one_line_failure(run_sdc(*cmd, check=False))
        assert "manifest" in err


def test_malformed_manifest_through_run_and_from(copy_of, lora_file, tmp_path):
    _edit(copy_of, lambda m: m["graphs"]["text_encoder"].update(outputs=None))
    _one_line_failure(run_sdc("run", "a red circle", "-a", copy_of, "--out", tmp_path / "x.png",
                              check=False), "graphs.text_encoder.outputs")
    _one_line_failure(run_sdc("build", "--from", copy_of, "--lora", lora_file, "--out",
                              tmp_path / "o", check=False), "graphs.text_encoder.outputs")


# --- data loss ------------------------------------------------------------------------------------

def test_forced_rebuild_never_deletes_a_users_files(tiny_folder, tmp_path):
    out = tmp_path / "te"
    run_sdc("build", tiny_folder, "--precision", "fp32", "--out", out, *TE_ONLY)
    (out / "outputs").mkdir()
    (out / "outputs" / "mine.png").write_bytes(b"my picture")
    (out / "notes.txt").write_text("mine")
    err = _one_line_failure(run_sdc("build", tiny_folder, "--precision", "fp32", "--out", out,
                                    *TE_ONLY, "--force", check=False), "outputs/", "notes.txt")
    assert "did not write" in err
    assert (out / "outputs" / "mine.png").read_bytes() == b"my picture"
    run_sdc("verify", out)  # the build itself is untouched too


def test_commit_swaps_atomically_and_removes_only_the_old_build(tmp_path):
    out = tmp_path / "out"
    with store.staging(out) as tmp:
        (tmp / "a").write_text("old")
        store.commit(tmp, out)
    with store.staging(out) as tmp:
        (tmp / "a").write_text("new")
        store.commit(tmp, out, listed_before=["a"])
    assert (out / "a").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_swap_killed_between_its_renames_restores_the_previous_build(tmp_path):
    """The fallback swap (no renameat2) moves the old build into a backup first; a process killed
    right then leaves `out` missing. The next sdc run beside it puts the previous build back."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    backup = tmp_path / f"{store.TMP_PREFIX}{dead.pid}-{store.BACKUP}-out.abc123"
    (backup / "build").mkdir(parents=True)
    (backup / "build" / "manifest.json").write_text("previous")
    staging = tmp_path / f"{store.TMP_PREFIX}{dead.pid}-{store.STAGING}-out.def456"
    staging.mkdir()
    store.recover_stale(out)
    assert (out / "manifest.json").read_text() == "previous"
    assert not backup.exists() and not staging.exists()


def test_fallback_swap_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "_EXCHANGE", None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with store.staging(out) as tmp:
        (tmp / "a").write_text("new")
        store.commit(tmp, out, listed_before=["a"])
    assert (out / "a").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_out_that_is_a_symlink_is_refused(tiny_folder, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    _one_line_failure(run_sdc("build", tiny_folder, "--out", tmp_path / "link", *TE_ONLY,
                              check=False), "symlink")


# --- folders that are not sdc builds -------------------------------------------------------------

def test_an_optimum_export_is_named_as_such(tmp_path, build_fp32):
    folder = tmp_path / "optimum"
    for stage in ("text_encoder", "unet", "vae_decoder"):
        (folder / stage).mkdir(parents=True)
        shutil.copy(build_fp32 / stage / "model.onnx", folder / stage / "model.onnx")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ORTStableDiffusionPipeline"}))
    err = _one_line_failure(run_sdc("run", "x", "-a", folder, check=False), "another tool")
    assert "interrupted" not in err
    _one_line_failure(run_sdc("verify", folder, check=False), "another tool")
    _one_line_failure(run_sdc("build", folder, check=False), "ONNX export by another tool")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_a_model_index_that_is_not_a_json_object(tmp_path, tiny_folder, text):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    (folder / "model_index.json").write_bytes(text.encode("latin-1"))
    _one_line_failure(run_sdc("build", folder, check=False), "model_index.json")
    shutil.rmtree(folder / "unet")
    (folder / "unet").mkdir()
    (folder / "manifest.json").unlink(missing_ok=True)
    _one_line_failure(run_sdc("run", "x", "-a", folder, check=False), "model_index.json")


def test_a_broken_component_config_is_one_line(tmp_path, tiny_folder):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    (folder / "vae" / "config.json").write_text("[]")
    _one_line_failure(run_sdc("build", folder, check=False), "vae/config.json")


# --- malformed files inside a self-consistent build (hashes re-written to match) ----------------

def _replace_file(folder, rel, text):
    import hashlib

    (folder / rel).write_text(text)
    raw = (folder / rel).read_bytes()
    _edit(folder, lambda m: m["files"].update(
        {rel: {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}}))


@pytest.mark.parametrize("rel, text, needle", [
    ("scheduler/scheduler_config.json", "[]", "expected an object"),
    ("scheduler/scheduler_config.json", "{bad", "not a readable JSON"),
    ("scheduler/scheduler_config.json", '{"num_train_timesteps": "x"}', "num_train_timesteps"),
    ("scheduler/scheduler_config.json", '{"beta_start": 0.5, "beta_end": 0.1}', "beta_start"),
    ("scheduler/scheduler_config.json", '{"trained_betas": [0.1]}', "trained_betas"),
    ("tokenizer/tokenizer.json", "[]", "tokenizer"),
    ("tokenizer/tokenizer_config.json", '{"pad_token": 5}', "pad_token"),
    ("tokenizer/tokenizer_config.json", "[1]", "expected an object"),
])
def test_malformed_configs_inside_a_build(copy_of, tmp_path, rel, text, needle):
    _replace_file(copy_of, rel, text)
    run_sdc("verify", copy_of)  # consistent with its manifest: only reading it can tell
    _one_line_failure(run_sdc("run", "a red circle", "-a", copy_of, "--out", tmp_path / "x.png",
                              check=False), needle)
    assert not (tmp_path / "x.png").exists()
