"""Shared fixtures: tiny real SD1 models and real `sdc build` runs, built once per session.

Builds cost ~20-45 s each on 2 cores (the dynamo exporter dominates), so every test that only
reads a build shares these session fixtures instead of building its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (tiny.py, ldm_checkpoint.py)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub


def run_sdc(*args, cwd=None, timeout=900, check=True) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess: real exit codes, real stderr."""
    cmd = [sys.executable, "-m", "sdc.cli.main", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})
    if check and proc.returncode != 0:
        raise AssertionError(f"sdc {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    from tiny import make_tiny_folder

    return make_tiny_folder(tmp_path_factory.mktemp("models") / "tiny-sd1")


@pytest.fixture(scope="session")
def build_fp32(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("builds") / "tiny-fp32"
    run_sdc("build", tiny_folder, "--precision", "fp32", "--out", out)
    return out


@pytest.fixture(scope="session")
def build_fp16(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("builds") / "tiny-fp16"
    run_sdc("build", tiny_folder, "--precision", "fp16", "--out", out)
    return out


def assert_cli_torch_free(argv: list[str]) -> None:
    """Run `sdc *argv` in a fresh interpreter and fail if torch/diffusers/transformers got imported:
    the runtime side must work on edge boxes that have none of them."""
    code = (
        "import sys\n"
        "from sdc.cli.main import main\n"
        f"sys.argv = ['sdc', *{[str(a) for a in argv]!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def read_manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


@pytest.fixture(scope="session")
def builtin_build(tmp_path_factory) -> Path:
    """`sdc build` with no MODEL (the shipped sdc-tiny), fp32, in a scratch working directory."""
    cwd = tmp_path_factory.mktemp("builtin")
    proc = run_sdc("build", "--precision", "fp32", cwd=cwd)
    out = cwd / "artifacts" / "sdc-tiny-fp32"
    assert proc.stdout.strip() == str(out), proc.stdout
    return out


@pytest.fixture(scope="session")
def chunked_tiny(tmp_path_factory) -> Path:
    """The built-in sdc-tiny with 3 UNet chunks (not the random test model: its full 49k-token
    CLIP tokenizer, 35 MB resident, outweighs its whole UNet and would hide every UNet plan);
    shared by the budget and quantization tests."""
    out = tmp_path_factory.mktemp("budget") / "sdc-tiny-c3"
    run_sdc("build", "--precision", "fp32", "--unet-chunks", "3", "--out", out)
    return out


# --- tiny SD2.x and SDXL models and their fp32 builds (tests/family_models.py) ---------------


@pytest.fixture(scope="session")
def sd2_folders(tmp_path_factory):
    from family_models import make_sd2_folder

    root = tmp_path_factory.mktemp("sd2")
    return {p: make_sd2_folder(root / p, prediction=p) for p in ("epsilon", "v_prediction")}


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    from family_models import make_sdxl_folder

    return make_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "model")


def build_family(model, out, *extra):
    """`sdc build MODEL --precision fp32 --out OUT [extra]`; returns OUT."""
    run_sdc("build", model, "--precision", "fp32", "--out", out, *extra)
    return out


@pytest.fixture(scope="session")
def sd2_builds(sd2_folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2-builds")
    return {p: build_family(f, root / p) for p, f in sd2_folders.items()}


@pytest.fixture(scope="session")
def sdxl_build(sdxl_folder, tmp_path_factory):
    return build_family(sdxl_folder, tmp_path_factory.mktemp("sdxl-build") / "fp32")
